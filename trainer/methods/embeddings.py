"""New token embeddings: the trainable rows of Textual Inversion and pivotal tuning, and the two methods.

The new tokens are added to the tokenizer; the text encoder's own embedding table is never
resized or written. Its token-embedding layer is wrapped by `NewTokenEmbedding`, which looks
every id up in the frozen table and puts the trainable rows in where a new token stands,
so no other row can change (and none is stored in the optimizer). SDXL: the same tokens in both
text encoders, each with its own rows.

  TextualInversion  only the rows train (the UNet frozen); the result is the embedding files
  PivotalTuning     the UNet and the rows train (the rows for the first --text_embedding_frac of the
                    steps, at --text_embedding_lr); the result is the model folder and the embedding files
The embedding files are those of trainer.formats.embedding_files, in the family's layout.
"""
from __future__ import annotations

from pathlib import Path

import torch

from trainer.distributed import data_parallel as distributed
from trainer.errors import UserError
from trainer.families import family_of
from trainer.formats import outdir
from trainer.formats.embedding_files import DIFFUSERS_FILE, save_diffusers
from trainer.methods.base import Method, Trainable, frozen_dtype
from trainer.methods.full import FullModel
from trainer.methods.outputs import recorded_base_of

def vector_tokens(placeholder: str, n: int) -> list[str]:
    """The tokens of an n-vector placeholder, named as diffusers names them (and expands prompts to)."""
    return [placeholder] + [f"{placeholder}_{i}" for i in range(1, n)]


def expand(text: str, placeholder: str, n: int) -> str:
    """`placeholder` -> `placeholder placeholder_1 ...` in a prompt (what diffusers' maybe_convert_prompt does)."""
    return text.replace(placeholder, " ".join(vector_tokens(placeholder, n))) if n > 1 else text


def check_new_tokens(tokenizer, placeholder: str, n: int, initializer: str | None) -> list[int] | None:
    """UserError for a placeholder the tokenizer already knows or an initializer that is not one token;
    the initializer's token id list (one id) or None."""
    if not placeholder or len(placeholder.split()) != 1:
        raise UserError(f"--placeholder_token must be one word without spaces, got {placeholder!r}")
    vocab = tokenizer.get_vocab()
    for tok in vector_tokens(placeholder, n):
        if tok in vocab or tok + "</w>" in vocab:
            raise UserError(f"--placeholder_token {placeholder}: {tok!r} is already in the tokenizer's vocabulary; "
                            f"choose a new word, e.g. <{placeholder.strip('<>')}-new>")
    if initializer is None:
        return None
    ids = tokenizer.encode(initializer, add_special_tokens=False)
    if len(ids) != 1:
        pieces = tokenizer.convert_ids_to_tokens(ids)
        raise UserError(f"--initializer_token {initializer!r} is {len(ids)} tokens for this tokenizer "
                        f"({' '.join(pieces)}); it must be exactly one, e.g. a common single word like the class")
    return ids


class NewTokenEmbedding(torch.nn.Module):
    """The text encoder's token embedding plus trainable rows for new token ids.

    `base` stays frozen and untouched; `rows` [n, dim] (float32 master copy) is the only parameter.
    """

    def __init__(self, base: torch.nn.Embedding, token_ids: list[int], init: torch.Tensor, placeholder: str):
        super().__init__()
        self.base = base
        self.placeholder = placeholder
        self.register_buffer("token_ids", torch.tensor(token_ids, dtype=torch.long), persistent=False)
        self.rows = torch.nn.Parameter(init.detach().float().clone())

    @property
    def weight(self):  # what code that reads embeddings.token_embedding.weight (dtype, device) expects
        return self.base.weight

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        n_base = self.base.num_embeddings
        out = self.base(input_ids.clamp(max=n_base - 1))
        rows = self.rows.to(out.dtype)
        for k in range(self.token_ids.numel()):
            out = torch.where((input_ids == self.token_ids[k])[..., None], rows[k], out)
        return out

    # checkpoint interface (trainer.core.checkpoint saves models with save_pretrained)
    def save_pretrained(self, folder, safe_serialization: bool = True) -> None:
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        save_diffusers(folder / DIFFUSERS_FILE, self.placeholder, self.rows)

    def load_pretrained(self, folder) -> None:
        from trainer.formats.safe_load import load_tensors

        from trainer.formats.safe_load import require_finite

        state = load_tensors(Path(folder) / DIFFUSERS_FILE)
        require_finite(state, Path(folder) / DIFFUSERS_FILE, "embedding")
        t = state.get(self.placeholder)
        if t is None or tuple(t.shape) != tuple(self.rows.shape):
            got = {k: tuple(v.shape) for k, v in state.items()}
            raise UserError(f"{folder}: expected {self.placeholder} of shape {tuple(self.rows.shape)}, found {got}")
        with torch.no_grad():
            self.rows.copy_(t)

    def trainable_state(self) -> dict:
        return {"rows": self.rows}


def embeddings_module(text_encoder):
    """CLIPTextEmbeddings of a CLIPTextModel (under .text_model before transformers 5, at the top since)."""
    return getattr(text_encoder, "text_model", text_encoder).embeddings


def new_tokens_of(text_encoder) -> NewTokenEmbedding | None:
    emb = getattr(embeddings_module(text_encoder), "token_embedding", None)
    return emb if isinstance(emb, NewTokenEmbedding) else None


def add_new_tokens(tokenizer, text_encoder, placeholder: str, n: int, initializer: str | None,
                   init_std: float | None = None, seed: int = 0) -> NewTokenEmbedding:
    """Add the placeholder's n tokens to the tokenizer and wrap the text encoder's token embedding.

    Rows start as the initializer's embedding (every row), or, without one, random normal rows with
    the table's own per-dimension std (as diffusers' advanced script does)."""
    init_ids = check_new_tokens(tokenizer, placeholder, n, initializer)
    tokens = vector_tokens(placeholder, n)
    added = tokenizer.add_tokens(tokens)
    if added != n:
        raise UserError(f"--placeholder_token {placeholder}: the tokenizer added {added} of {n} tokens")
    ids = tokenizer.convert_tokens_to_ids(tokens)
    emb_holder = embeddings_module(text_encoder)
    base = emb_holder.token_embedding
    if isinstance(base, NewTokenEmbedding):
        raise UserError("this text encoder already carries new tokens")
    table = base.weight.detach()
    if init_ids is not None:
        init = table[init_ids[0]].float().expand(n, -1).clone()
    else:
        gen = torch.Generator().manual_seed(seed)
        std = table.float().std(dim=0) if init_std is None else torch.full((table.shape[1],), init_std)
        init = torch.randn(n, table.shape[1], generator=gen) * std
    base.requires_grad_(False)
    wrapped = NewTokenEmbedding(base, ids, init, placeholder)
    emb_holder.token_embedding = wrapped
    return wrapped


# ------------------------------------------------------------------ the methods

def add_placeholder(opts, comps, identifier: str) -> tuple[str, str]:
    """[V] becomes new token(s) in every tokenizer/encoder pair: (the prompt word, the placeholder)."""
    emb = opts.embedding
    placeholder = emb.placeholder_token or f"<{identifier}>"
    init = emb.initializer_token or (None if opts.data.identifier == placeholder else identifier)
    seed = opts.training.seed
    for k, (tok, enc) in enumerate(zip(comps.tokenizers, comps.text_encoders)):  # SDXL: the same tokens in both
        add_new_tokens(tok, enc, placeholder, emb.num_vectors, init, seed=seed + k)
    print(f"placeholder: {placeholder} ({emb.num_vectors} new token(s), initialised from "
          f"{init if init else 'random rows'})")
    return expand(placeholder, placeholder, emb.num_vectors), placeholder


def train_rows(opts, comps, device, weights_dtype, params: list, models: dict) -> list:
    """The new rows of every text encoder become trainable (fp32 master copies on the device), the encoders
    frozen in weights_dtype; the rows join `params` and `models` (text_embedding, text_embedding_2)."""
    rows_of = []
    for enc, key in zip(comps.text_encoders, ("text_embedding", "text_embedding_2")):
        new = new_tokens_of(enc)
        if new is None:
            continue
        rows = new.rows.detach().clone()
        enc.requires_grad_(False)
        enc.to(device, dtype=weights_dtype).train()
        new.rows.data = rows.to(device)  # fp32 master copy, whatever the frozen dtype
        new.rows.requires_grad_(True)
        params.append(new.rows)
        models[key] = new
        rows_of.append(new)
    return rows_of


def row_groups(opts, params: list, rows_of: list):
    """The optimizer's groups: with --text_embedding_lr the new rows learn at their own rate."""
    lr_rows = opts.embedding.text_embedding_lr
    if lr_rows is None:
        return None
    rows = {id(m.rows) for m in rows_of}
    groups = [{"params": [p for p in params if id(p) not in rows]},
              {"params": [p for p in params if id(p) in rows], "lr": lr_rows}]
    return [g for g in groups if g["params"]]


def export_embedding(out: Path, opts, new_tokens: list, step: int, *, name: str | None = None,
                     a1111: bool = True) -> list[str]:
    """The embedding files of the new rows into `out` (the family's: diffusers' learned_embeds.safetensors, and
    with a1111 the A1111 / ComfyUI files), each written to a temporary name and renamed. A file there that this
    run did not write is never replaced (UserError). Returns the names written."""
    out = Path(out)
    base = opts.model.pretrained_model_name_or_path
    rows = [m.rows.detach().float().cpu() for m in new_tokens]
    files = family_of(base).embedding_files(rows, new_tokens[0].placeholder, step,
                                            stem=name or Path(DIFFUSERS_FILE).stem, a1111=a1111,
                                            checkpoint_name=Path(base).name if a1111 else None)
    ours = set((outdir.read_marker(out) or {}).get("exported", []))
    foreign = [n for n in files if (out / n).exists() and n not in ours]
    if foreign:
        raise UserError(f"{out} holds {', '.join(foreign)}, which dbtrain did not write, so the embedding was not "
                        f"saved over it; move it away")
    size = sum(r.numel() for r in rows) * 4
    outdir.require_space(out, size * len(files) + outdir.MB, "the embedding files")
    outdir.write_marker(out, exported=sorted(ours | set(files)))
    for n, write in files.items():
        try:
            write(out / n)  # (each writer goes through a temporary name and os.replace)
        except OSError as e:
            raise outdir.failed_write(out, n, e, size) from e
    return list(files)


class TextualInversion(Method):
    name = "textual_inversion"
    saved = "the embedding files"
    trains_unet = False

    def weights_dtype(self, opts, device):
        return frozen_dtype(opts, device)  # nothing of the base trains: half precision where it can be

    def prompt_word(self, opts, comps, identifier: str) -> tuple[str, str]:
        return add_placeholder(opts, comps, identifier)

    def prepare(self, opts, comps, device, weights_dtype) -> Trainable:
        params, models = [], {}
        rows_of = train_rows(opts, comps, device, weights_dtype, params, models)
        return Trainable(params=params, models=models, groups=row_groups(opts, params, rows_of), new_tokens=rows_of,
                         freeze_at=opts.training.max_train_steps)

    def writes_at(self, opts, step: int) -> bool:
        every = opts.checkpoints.save_steps
        return bool(every) and step % every == 0

    def on_step(self, run, out: Path, step: int) -> None:
        if self.writes_at(run.opts, step):  # diffusers' --save_steps (torchrun: rank 0 writes)
            distributed.on_rank0(export_embedding, out, run.opts, run.trainable.new_tokens, step, a1111=False,
                                 name=f"learned_embeds-steps-{step}")

    def save(self, run, out: Path, step: int) -> None:  # the embedding files, never the extended text encoder
        export_embedding(out, run.opts, run.trainable.new_tokens, step)

    def record(self, opts, run) -> dict:
        return {"method": self.name, "embedding": DIFFUSERS_FILE, "num_vectors": opts.embedding.num_vectors,
                **recorded_base_of(opts)}


class PivotalTuning(FullModel):
    """The whole UNet and the new rows of [V] (the rows for the first --text_embedding_frac of the steps)."""

    name = "pivotal_tuning"

    def prompt_word(self, opts, comps, identifier: str) -> tuple[str, str]:
        return add_placeholder(opts, comps, identifier)

    def prepare(self, opts, comps, device, weights_dtype) -> Trainable:
        params = [p for p in comps.unet.parameters() if p.requires_grad]
        models = {"unet": comps.unet}
        rows_of = train_rows(opts, comps, device, weights_dtype, params, models)
        frac, steps = opts.embedding.text_embedding_frac, opts.training.max_train_steps
        return Trainable(params=params, models=models, groups=row_groups(opts, params, rows_of), new_tokens=rows_of,
                         freeze_at=steps if frac >= 1 else max(1, round(frac * steps)))

    def writes_at(self, opts, step: int) -> bool:
        return TextualInversion.writes_at(self, opts, step)

    def on_step(self, run, out: Path, step: int) -> None:
        TextualInversion.on_step(self, run, out, step)

    def save(self, run, out: Path, step: int) -> None:
        super().save(run, out, step)
        export_embedding(out, run.opts, run.trainable.new_tokens, step)

    def record(self, opts, run) -> dict:
        return {"method": self.name, "embedding": DIFFUSERS_FILE, "num_vectors": opts.embedding.num_vectors}
