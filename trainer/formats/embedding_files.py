"""Textual Inversion embedding files, in the formats people load, written atomically and read safely.

- diffusers `learned_embeds.safetensors`: {placeholder: float32 [n, dim]}
  (`StableDiffusionPipeline.load_textual_inversion` reads it; n > 1 expands the
  placeholder into `placeholder placeholder_1 ...`, as diffusers' textual_inversion.py names them);
- A1111 / ComfyUI: `<name>.safetensors` with `emb_params` [n, dim], and `<name>.pt` with
  `string_to_param` {'*': [n, dim]}, `string_to_token`, `name`, `step` (both UIs read either);
- SDXL (two text encoders): one file with `clip_l` [n, d1] and `clip_g` [n, d2] (diffusers' advanced
  script and A1111 write it so), the placeholder in the header.
"""
from __future__ import annotations

import os
from pathlib import Path

from trainer.errors import UserError
from trainer.formats.io import normal_permissions
from trainer.formats.safe_load import require_finite

DIFFUSERS_FILE = "learned_embeds.safetensors"
SDXL_KEYS = ("clip_l", "clip_g")
_A1111_STAR_TOKEN = 265  # CLIP's id of "*", what A1111 writes in string_to_token


def file_stem(text: str, default: str) -> str:
    """A file name made of `text`: letters, digits, '-', '_', '.' kept, anything else '-' (`default` if empty)."""
    return "".join(c if c.isalnum() or c in "-_." else "-" for c in text.strip()).strip(".-") or default


def a1111_name(placeholder: str) -> str:
    """The embedding's file name for A1111 / ComfyUI (they name an embedding by its file): <cat-toy> -> cat-toy."""
    return file_stem(placeholder.strip("<>"), "embedding")


def _atomic(path: Path, write) -> Path:
    path = Path(path)
    tmp = path.with_name("." + path.name + ".tmp")
    write(tmp)
    normal_permissions(tmp)  # (safetensors creates its file owner-only; these files are meant to be shared)
    os.replace(tmp, path)
    return path


def _rows(t):
    return t.detach().float().cpu().contiguous()


def save_diffusers(path, placeholder: str, rows) -> Path:
    from safetensors.torch import save_file

    t = _rows(rows)
    return _atomic(Path(path), lambda p: save_file({placeholder: t}, str(p), metadata={"format": "pt"}))


def save_a1111_safetensors(path, rows, name: str, step: int) -> Path:
    from safetensors.torch import save_file

    t = _rows(rows)
    meta = {"name": name, "step": str(step), "vectors": str(t.shape[0])}
    return _atomic(Path(path), lambda p: save_file({"emb_params": t}, str(p), metadata=meta))


def save_a1111_pt(path, rows, name: str, step: int, checkpoint_name: str | None = None) -> Path:
    import torch

    t = _rows(rows)
    data = {"string_to_token": {"*": _A1111_STAR_TOKEN}, "string_to_param": {"*": t}, "name": name, "step": step,
            "sd_checkpoint": None, "sd_checkpoint_name": checkpoint_name}
    return _atomic(Path(path), lambda p: torch.save(data, p))


def save_sdxl(path, rows_l, rows_g, placeholder: str, step: int | None = None) -> Path:
    """An SDXL embedding file: clip_l [n, d1] and clip_g [n, d2], the placeholder in the header."""
    from safetensors.torch import save_file

    state = dict(zip(SDXL_KEYS, (_rows(rows_l), _rows(rows_g))))
    meta = {"dbtrain.placeholder": placeholder, "vectors": str(state["clip_l"].shape[0])}
    if step is not None:
        meta["step"] = str(step)
    return _atomic(Path(path), lambda p: save_file(state, str(p), metadata=meta))


def read_embedding(path):
    """(token name the file carries or None, [n, dim] float tensor) from any of the one-encoder formats,
    read safely (safetensors, or a weights-only pickle)."""
    import torch

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
    require_finite({name or "rows": t}, path, "embedding")
    return name, t.float().reshape(-1, t.shape[-1])


def load_into(pipe, path, token: str | None = None) -> str:
    """Load a one-encoder embedding file (any of the formats above, read safely) into a diffusers pipeline;
    returns the token to write in prompts. Without `token`: the name the file carries, or the file's stem in
    angle brackets for files that carry none (A1111 names embeddings by file)."""
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


def is_sdxl_embedding(path) -> bool:
    try:
        from safetensors import safe_open

        with safe_open(str(path), "pt") as f:
            return set(SDXL_KEYS) <= set(f.keys())
    except Exception:  # noqa: BLE001 - not a safetensors file: not ours to read here
        return False


def load_sdxl_into(pipe, path, token: str | None = None) -> str:
    """Load an SDXL embedding file (clip_l, clip_g) into both text encoders of an SDXL pipeline, as diffusers
    documents it (load_textual_inversion per encoder); returns the token to write in prompts (the placeholder
    the file records, else <file stem> as A1111 names embeddings)."""
    from safetensors import safe_open

    path = Path(path)
    if not is_sdxl_embedding(path):
        raise UserError(f"{path}: not an SDXL embedding (an SDXL model needs a file with clip_l and clip_g rows; "
                        "SD 1.x / 2.x embeddings do not fit its two text encoders)")
    with safe_open(str(path), "pt") as f:
        rows = {k: f.get_tensor(k).float() for k in SDXL_KEYS}
        token = token or (f.metadata() or {}).get("dbtrain.placeholder") or f"<{path.stem}>"
    require_finite(rows, path, "embedding")
    for key, enc, tok in (("clip_l", pipe.text_encoder, pipe.tokenizer),
                          ("clip_g", pipe.text_encoder_2, pipe.tokenizer_2)):
        dim = enc.get_input_embeddings().weight.shape[1]
        if rows[key].ndim != 2 or rows[key].shape[1] != dim:
            raise UserError(f"{path}: {key} has shape {tuple(rows[key].shape)}, this model's encoder takes width {dim}")
        try:
            pipe.load_textual_inversion({token: rows[key].to(enc.dtype)}, token=token, text_encoder=enc, tokenizer=tok)
        except ValueError as e:
            raise UserError(f"{path}: {str(e).splitlines()[0]}") from e
    return token
