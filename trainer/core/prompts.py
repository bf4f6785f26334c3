"""A run's prompts: the identifier [V] stands for, and the instance / class prompts with it filled in."""
from __future__ import annotations

import re

from trainer.errors import UserError
from trainer.options.checks import names_subject
from trainer.options.diffusers_flags import say


def pick_identifier(tokenizer, class_word: str | None, seed: int, exclude=()) -> str:
    """A rare single-token word, as the paper picks its identifier.

    Candidates: whole-word vocabulary entries of 2-3 lowercase letters that the tokenizer
    maps back to exactly one token, other than `exclude` (the words of the run's other concepts);
    the rarest quarter of them by merge rank (BPE adds rarer merges later, so higher ids are
    rarer); then one chosen with `seed`.
    """
    import random

    vocab = tokenizer.get_vocab()
    cands = []
    for tok, idx in vocab.items():
        word = tok[:-4] if tok.endswith("</w>") else None
        if (word and 2 <= len(word) <= 3 and word.isalpha() and word.islower() and word != class_word
                and word not in exclude):
            if tokenizer.tokenize(word) == [tok]:
                cands.append((idx, word))
    if not cands:
        raise UserError("--identifier auto: the tokenizer has no rare 2-3 letter single-token word; "
                        "pass --identifier <word>")
    cands.sort()
    rare = cands[-max(1, len(cands) // 4):]
    return random.Random(seed).choice(rare)[1]


def class_word(opts) -> str | None:
    """The class noun: the last word of --class_prompt (None without one)."""
    return opts.prior.class_prompt.split()[-1] if opts.prior.class_prompt else None


def identifier(opts, tokenizer, exclude=()) -> str:
    """--identifier, or with `auto` a rare word of the (first) tokenizer, as the paper picks one (not one of
    `exclude`: another concept's)."""
    ident = opts.data.identifier
    return pick_identifier(tokenizer, class_word(opts), opts.training.seed, exclude) if ident == "auto" else ident


class RunPrompts:
    """The prompts of a run with [V] replaced by `word` (the identifier, or the new tokens it became).

    An instance prompt that does not name the word is refused (trainer.options.checks does so before anything
    loads), or with --prompt_without_identifier trained as written after one note line."""

    def __init__(self, opts, word: str, captions: list[str | None]):
        self.word = word
        # several new tokens ("<p> <p>_1"): the placeholder written out stands for all of them, as [V] does
        first = word.split()[0] if word.strip() else word
        self._placeholder = first if first != word and opts.embedding.train_text_embedding else None
        self.class_word = class_word(opts)
        self.by_kind = {"inst": self.sub(opts.data.instance_prompt)}  # {"inst": ..., "cls": ...}
        if opts.prior.with_prior_preservation:
            self.by_kind["cls"] = opts.prior.class_prompt
        # each instance image's: its caption file's ([V] filled in), else the instance prompt
        self.instance = [self.sub(c) if c is not None else self.by_kind["inst"] for c in captions]
        self._check_named(opts, first)

    def sub(self, text: str | None) -> str | None:
        if not text:
            return text
        if self._placeholder is None:
            return text.replace("[V]", self.word)
        bare = rf"(?<![\w<>-]){re.escape(self._placeholder)}(?![\w<>-])"
        return re.sub(rf"\[V\]|{bare}", lambda m: self.word, text)

    def _check_named(self, opts, first: str) -> None:
        """Refuse (or with --prompt_without_identifier note once) instance prompts that lack the subject's word."""
        unnamed = sorted({p for p in self.instance + [self.by_kind["inst"]] if p and not names_subject(p, (first,))})
        if not unnamed:
            return
        shown = repr(unnamed[0]) + (f" and {len(unnamed) - 1} more" if len(unnamed) > 1 else "")
        if not opts.data.prompt_without_identifier:
            raise UserError(f"the instance prompt {shown} does not name {first}, the subject's word: write [V] "
                            f"where it goes, or add --prompt_without_identifier to train on it as written")
        say(f"--prompt_without_identifier: the instance prompt {shown} does not name {first}, the subject's word; "
            f"the subject is learned under the prompt as written")


def note_class_labels(opts, unet) -> None:
    """diffusers' --class_labels_conditioning timesteps on a UNet without a class embedding changes nothing."""
    if opts.training.class_labels_conditioning != "timesteps":
        return
    config = unet.config
    if config.get("class_embed_type") is None and config.get("num_class_embeds") is None:
        say("--class_labels_conditioning timesteps: this UNet has no class embedding, so the timesteps it gets as "
            "class_labels change nothing (as in diffusers)")
