"""New token embeddings: the trainable rows of Textual Inversion and pivotal tuning, and their files.

The new tokens are added to the tokenizer; the text encoder's own embedding table is never
resized or written. Its token-embedding layer is wrapped by `NewTokenEmbedding`, which looks
every id up in the frozen table and puts the trainable rows in where a new token stands,
so no other row can change (and none is stored in the optimizer).

Files, in the formats people load:
- diffusers `learned_embeds.safetensors`: {placeholder: float32 [n, dim]}
  (`StableDiffusionPipeline.load_textual_inversion` reads it; n > 1 expands the
  placeholder into `placeholder placeholder_1 ...`, as diffusers' textual_inversion.py names them);
- A1111 / ComfyUI: `<name>.safetensors` with `emb_params` [n, dim], and `<name>.pt` with
  `string_to_param` {'*': [n, dim]}, `string_to_token`, `name`, `step` (both UIs read either).
"""
from __future__ import annotations

from pathlib import Path

import torch

from trainer.errors import UserError
from trainer.families.sd import EMBEDDING_FILE as DIFFUSERS_FILE
from trainer.families.sd import model_and_embeddings

_A1111_STAR_TOKEN = 265  # CLIP's id of "*", what A1111 writes in string_to_token


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

    # checkpoint interface (trainer.checkpoint saves models with save_pretrained)
    def save_pretrained(self, folder, safe_serialization: bool = True) -> None:
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        save_diffusers(folder / DIFFUSERS_FILE, self.placeholder, self.rows)

    def load_pretrained(self, folder) -> None:
        from trainer.formats.safe_load import load_tensors

        state = load_tensors(Path(folder) / DIFFUSERS_FILE)
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


# ------------------------------------------------------------------ files

def _atomic(path: Path, write) -> Path:
    import os

    path = Path(path)
    tmp = path.with_name("." + path.name + ".tmp")
    write(tmp)
    os.chmod(tmp, 0o644)  # (safetensors creates its file owner-only; these files are meant to be shared)
    os.replace(tmp, path)
    return path


def save_diffusers(path, placeholder: str, rows: torch.Tensor) -> Path:
    from safetensors.torch import save_file

    t = rows.detach().float().cpu().contiguous()
    return _atomic(Path(path), lambda p: save_file({placeholder: t}, str(p), metadata={"format": "pt"}))


def save_a1111_safetensors(path, rows: torch.Tensor, name: str, step: int) -> Path:
    from safetensors.torch import save_file

    t = rows.detach().float().cpu().contiguous()
    meta = {"name": name, "step": str(step), "vectors": str(t.shape[0])}
    return _atomic(Path(path), lambda p: save_file({"emb_params": t}, str(p), metadata=meta))


def save_a1111_pt(path, rows: torch.Tensor, name: str, step: int, checkpoint_name: str | None = None) -> Path:
    t = rows.detach().float().cpu().contiguous()
    data = {"string_to_token": {"*": _A1111_STAR_TOKEN}, "string_to_param": {"*": t}, "name": name, "step": step,
            "sd_checkpoint": None, "sd_checkpoint_name": checkpoint_name}
    return _atomic(Path(path), lambda p: torch.save(data, p))


def read_embedding(path) -> tuple[str | None, torch.Tensor]:
    """(token name the file carries or None, [n, dim] float tensor) from any of the three formats,
    read safely (safetensors, or a weights-only pickle)."""
    from trainer.formats.safe_load import load_tensors

    path = Path(path)
    data = load_tensors(path)
    if isinstance(data, torch.Tensor):
        return None, data.float().reshape(-1, data.shape[-1])
    if not isinstance(data, dict) or not data:
        raise UserError(f"{path} holds no embedding")
    if "string_to_param" in data:  # A1111 .pt
        params = data["string_to_param"]
        if not isinstance(params, dict) or len(params) != 1:
            raise UserError(f"{path}: string_to_param must hold exactly one tensor")
        name = data.get("name") if isinstance(data.get("name"), str) else None
        t = next(iter(params.values()))
    elif "emb_params" in data:  # A1111 / kohya / ComfyUI .safetensors
        name, t = None, data["emb_params"]
    elif "clip_l" in data or "clip_g" in data:
        raise UserError(f"{path} is an SDXL embedding (clip_l / clip_g); SDXL is not supported here")
    elif len(data) == 1:  # diffusers
        name, t = next(iter(data.items()))
    else:
        raise UserError(f"{path}: not an embedding file (keys {', '.join(list(data)[:5])})")
    if not isinstance(t, torch.Tensor) or t.dim() not in (1, 2):
        raise UserError(f"{path}: the embedding must be a [n, dim] tensor")
    return name, t.float().reshape(-1, t.shape[-1])


def load_embedding_into(pipe, path, token: str | None = None) -> str:
    """Load an embedding file (any of the formats above, read safely) into a diffusers pipeline;
    returns the token to write in prompts. Without `token`: the name the file carries, or the
    file's stem in angle brackets for files that carry none (A1111 names embeddings by file)."""
    path = Path(path)
    name, rows = read_embedding(path)
    token = token or name or f"<{path.stem}>"
    dim = pipe.text_encoder.get_input_embeddings().weight.shape[1]
    if rows.shape[1] != dim:
        raise UserError(f"{path}: embedding width {rows.shape[1]} does not fit this model's text encoder ({dim})")
    try:
        pipe.load_textual_inversion({token: rows}, token=token)
    except ValueError as e:  # token already in the vocabulary, ...
        raise UserError(f"{path}: {str(e).splitlines()[0]}") from e
    return token
