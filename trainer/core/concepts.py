"""The subjects of a run as the inputs of its batches: one from the flags, or several from --concepts FILE.

Each concept is read as a run of that subject alone would read it (trainer.options.concepts.options_of: a copy
of the options holding the concept's folders and prompts as the flags), then the concepts are merged: one
instance image list with each image's prompt, concept and draw weight (its concept's repeats), one class image
list with each image's prompt and concept. Batches draws the instance rows by weight and pairs each class row
with its instance row's concept. Without --concepts this is exactly the one-subject path (the same calls, no
weights: Batches draws as it always did).
"""
from __future__ import annotations

from pathlib import Path

from trainer.core import images, prompts
from trainer.core.class_images import generate_per_concept
from trainer.options.buckets import buckets_of
from trainer.options.concepts import concepts_of, options_of


class Subjects:
    """The instance images of the run's concepts, read and checked before the model loads."""

    def __init__(self, opts):
        self.opts = opts
        self.several = bool(opts.data.concepts)
        self.concepts = concepts_of(opts)
        # each concept's options (the run's own for one subject: nothing to copy)
        self.options = [options_of(opts, c) for c in self.concepts] if self.several else [opts]
        self.files, self.owner = [], []  # per instance image: its file, its concept
        for k, o in enumerate(self.options):
            files = images.list_images(o.data.instance_data_dir, "instance image", captions=_caption_suffix(o))
            self.files += files
            self.owner += [k] * len(files)
        data = opts.data
        self.inst = images.ImageSet(self.files, data.resolution, center_crop=data.center_crop,
                                    random_flip=data.random_flip, interpolation=data.image_interpolation_mode,
                                    buckets=buckets_of(data), image_fit=data.image_fit)
        self.captions = []  # per instance image: its caption file's first line, or None
        for k, o in enumerate(self.options):
            files, suffix = [f for f, j in zip(self.files, self.owner) if j == k], _caption_suffix(o)
            self.captions += images.read_captions(files, suffix) if suffix else [None] * len(files)
        if opts.prior.with_prior_preservation:  # a broken class image fails before the model loads
            for o in self.options:
                if Path(o.prior.class_data_dir).is_dir():
                    for f in images.list_images(o.prior.class_data_dir, "class image", allow_empty=True,
                                                captions=_caption_suffix(o))[: o.prior.num_class_images]:
                        images.load_image(f)
        if self.several:
            print(self.summary())

    def summary(self) -> str:
        """concepts: 2 (dog: 5 images x repeats 1, 20 class images; cat: ...)"""
        parts = []
        for k, c in enumerate(self.concepts):
            n = self.owner.count(k)
            cls = f", {c.num_class_images} class images" if self.opts.prior.with_prior_preservation else ""
            parts.append(f"{c.name}: {n} images x repeats {c.repeats}{cls}")
        return f"concepts: {len(self.concepts)} ({'; '.join(parts)})"

    @property
    def mask_dirs(self) -> list[str | None]:
        """Each instance image's mask folder (its concept's mask_dir, else --mask_dir)."""
        return [self.concepts[k].mask_dir for k in self.owner]

    def prompts(self, method, comps):
        """(what [V] becomes, the identifier, the run's prompts) of the first concept; the prompts are those of
        every instance image, each with its concept's word. Several concepts with --identifier auto get
        different words."""
        if not self.several:
            word, ident = method.prompt_word(self.opts, comps, prompts.identifier(self.opts, comps.tokenizer))
            return word, ident, prompts.RunPrompts(self.opts, word, self.captions)
        per, idents = [], []
        for k, o in enumerate(self.options):
            word, ident = method.prompt_word(o, comps, prompts.identifier(o, comps.tokenizer, exclude=idents))
            idents.append(ident)
            per.append(prompts.RunPrompts(o, word, [c for c, j in zip(self.captions, self.owner) if j == k]))
        return per[0].word, idents[0], ConceptPrompts(self, per, idents)

    def class_images(self, device, dtype):
        """(ImageSet, prompt of each class image, concept of each class image): each concept's class folder, its
        missing images generated first with its class prompt."""
        data = self.opts.data
        files, texts, owner = [], [], []
        for k, (o, made) in enumerate(zip(self.options, generate_per_concept(self.options, device, dtype))):
            if made:
                print(f"generated {made} class image(s) in {o.prior.class_data_dir}")
            suffix = _caption_suffix(o)
            listed = images.list_images(o.prior.class_data_dir, "class image", captions=suffix)
            mine = listed[: o.prior.num_class_images]
            files += mine
            texts += images.class_prompts(mine, suffix, o.prior.class_prompt)  # kohya: captions beside them too
            owner += [k] * len(mine)
        cls = images.ImageSet(files, data.resolution, center_crop=data.center_crop, random_flip=data.random_flip,
                              interpolation=data.image_interpolation_mode, image_fit=data.image_fit)
        return cls, texts, owner

    def draws(self, cls_owner: list[int] | None) -> dict:
        """Batches' keyword arguments of the concepts: each instance image's concept, weight and mask folder, each
        class image's concept (one subject: none, so that its draws stay what they were)."""
        if not self.several:
            return {}
        return {"inst_concepts": list(self.owner), "cls_concepts": list(cls_owner) if cls_owner is not None else None,
                "inst_weights": [float(self.concepts[k].repeats) for k in self.owner],
                "inst_mask_dirs": self.mask_dirs}


class ConceptPrompts:
    """The prompts of several concepts as trainer.core.prompts.RunPrompts has them for one (the first concept's
    word, class word and prompts where one is meant: validation's [V]), plus each concept's."""

    def __init__(self, subjects: Subjects, per: list, identifiers: list[str]):
        first = per[0]
        self.word, self.class_word, self.by_kind = first.word, first.class_word, first.by_kind
        self.instance = [None] * len(subjects.owner)
        seen = [0] * len(per)
        for i, k in enumerate(subjects.owner):  # each image's, in the merged order
            self.instance[i] = per[k].instance[seen[k]]
            seen[k] += 1
        self.concepts = [{"concept": c, "prompts": p, "identifier": ident, "options": o} for c, p, ident, o
                         in zip(subjects.concepts, per, identifiers, subjects.options)]

    def sub(self, text):
        return self.concepts[0]["prompts"].sub(text)


def _caption_suffix(opts) -> str | None:
    ext = opts.data.caption_extension
    return images.caption_suffix(ext) if ext else None
