"""The trained model as a diffusers folder (safetensors) in output_dir, written without risk.

The pipeline is saved into output_dir/.tmp-export first (after a free-space check), then
each item is moved into place. An item already in output_dir is replaced only if an
earlier export of this run wrote it (the run's marker lists what each export wrote);
anything else there is never touched, and a failed write leaves no temporary behind.
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import torch

from trainer.formats import outdir
from trainer.errors import UserError

_TMP = ".tmp-export"
_OLD = ".tmp-old-"


def pipeline(cfg, unet, te, tokenizer=None, te2=None):
    """The base model's StableDiffusionPipeline with the trained UNet (and text encoder, and a tokenizer
    with new tokens); for an SDXL base model its StableDiffusionXLPipeline (te2: the trained second text
    encoder). A --pretrained_vae_model_name_or_path VAE replaces the model's own."""
    from trainer.families.sdxl import load_pipeline

    kw = {"unet": unet}
    if te is not None:
        kw["text_encoder"] = te
    if te2 is not None:
        kw["text_encoder_2"] = te2
    if isinstance(tokenizer, (list, tuple)):  # the run's tokenizers, with new tokens (SDXL: both)
        if len(tokenizer) > 1:
            kw["tokenizer_2"] = tokenizer[1]
        tokenizer = tokenizer[0]
    if tokenizer is None and getattr(cfg, "tokenizer_name", None):  # diffusers' --tokenizer_name
        from transformers import CLIPTokenizer

        tokenizer = CLIPTokenizer.from_pretrained(cfg.tokenizer_name)
    if tokenizer is not None:
        kw["tokenizer"] = tokenizer
    if getattr(cfg, "variant", None):  # the base model's parts not passed in come from its variant files
        kw["variant"] = cfg.variant
    vae_path = getattr(cfg, "pretrained_vae_model_name_or_path", None)
    return load_pipeline(cfg.pretrained_model_name_or_path, vae_path=vae_path, dtype=unet.dtype, **kw)


def model_bytes(cfg, pipe) -> int:
    """About the size of the exported folder: every module's tensors plus the small files."""
    n = 0
    for comp in pipe.components.values():
        if isinstance(comp, torch.nn.Module):
            n += sum(t.numel() * t.element_size() for t in comp.state_dict().values())
    tok = Path(cfg.pretrained_model_name_or_path) / "tokenizer"
    return n + sum(f.stat().st_size for f in tok.glob("*") if f.is_file()) + outdir.MB


def remove_temporaries(out: Path) -> None:
    """Undo what a run killed during its export left (only call on a folder of ours)."""
    shutil.rmtree(out / _TMP, ignore_errors=True)
    for old in out.glob(_OLD + "*"):
        dest = out / old.name[len(_OLD):]
        if dest.exists():
            shutil.rmtree(old, ignore_errors=True) if old.is_dir() else old.unlink(missing_ok=True)
        else:  # killed between moving the old item aside and the new one in: put the old one back
            os.rename(old, dest)


def _remove(p: Path) -> None:
    shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)


def staging(out: Path) -> Path:
    """An empty staging folder inside `out` for an export (see install)."""
    tmp = out / _TMP
    shutil.rmtree(tmp, ignore_errors=True)
    return tmp


def export(cfg, unet, te, out: Path, te2=None) -> None:
    """Write the model into `out` (SDXL: a StableDiffusionXLPipeline folder). Raises outdir.NoSpace (no room,
    failed write) or UserError (an item there that this run did not write); `out` is then as it was before."""
    pipe = pipeline(cfg, unet, te, te2=te2)
    if getattr(cfg, "skip_save_text_encoder", False):  # diffusers' flag: the folder without text_encoder/
        pipe.register_modules(text_encoder=None)
        if hasattr(pipe, "text_encoder_2"):
            pipe.register_modules(text_encoder_2=None)
    need = model_bytes(cfg, pipe)
    outdir.require_space(out, need, "the trained model")
    tmp = staging(out)
    try:
        pipe.save_pretrained(tmp, safe_serialization=True)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise outdir.failed_write(out, "the trained model", e, need) from e
    install(out, tmp)


def install(out: Path, tmp: Path) -> None:
    """Move every item of the staging folder `tmp` into `out`: an item already there is replaced only if an
    earlier export of this run wrote it (UserError otherwise, nothing moved); `tmp` is removed."""
    items = sorted(tmp.iterdir())
    ours = set((outdir.read_marker(out) or {}).get("exported", []))
    foreign = [i.name for i in items if (out / i.name).exists() and i.name not in ours]
    if foreign:
        shutil.rmtree(tmp, ignore_errors=True)
        raise UserError(f"{out} holds {', '.join(foreign)}, which dbtrain did not write, so the model was not "
                        f"saved over it; move it away")
    outdir.write_marker(out, exported=sorted(ours | {i.name for i in items}))
    for item in items:
        dest = out / item.name
        if dest.exists():
            old = out / f"{_OLD}{item.name}"
            _remove(old)
            os.rename(dest, old)
            os.rename(item, dest)
            _remove(old)
        else:
            os.rename(item, dest)
    shutil.rmtree(tmp, ignore_errors=True)


def export_single_file(cfg, out: Path, lora_file: Path | None = None) -> str:
    """`--save_single_file`: the exported folder (or the base model with the LoRA merged in) as one
    original-layout .safetensors file in `out`, for A1111 / ComfyUI; returns its name."""
    from trainer.formats import single_file
    from trainer.formats.kohya_lora import merge_lora
    from trainer.families.sdxl import is_sdxl, merge_lora_sdxl

    name = file_stem(out.resolve().name, "model")
    if lora_file is None:
        model, parts, name = out, None, f"{name}.safetensors"
    else:  # the kohya LoRA file already has <name>.safetensors
        model, name = Path(cfg.pretrained_model_name_or_path), f"{name}-merged.safetensors"
        if is_sdxl(model):
            parts = merge_lora_sdxl(model, lora_file)
        else:
            merged = merge_lora(model, lora_file)
            parts = (merged["unet"], merged["vae"], merged["text_encoder"])
        if getattr(cfg, "pretrained_vae_model_name_or_path", None):  # the VAE the run used, not the base's
            from diffusers import AutoencoderKL

            parts = (parts[0], AutoencoderKL.from_pretrained(cfg.pretrained_vae_model_name_or_path), *parts[2:])
    half = bool(getattr(cfg, "single_file_half", False))
    need = (1 if half else 2) * sum(f.stat().st_size for f in model.rglob("*.safetensors")) + outdir.MB
    outdir.require_space(out, need, "the single-file checkpoint")
    tmp = staging(out)
    tmp.mkdir(parents=True)
    try:
        single_file.save_single_file(model, tmp / name, half=half, components=parts,
                                     metadata={"dbtrain.base_model": str(Path(cfg.pretrained_model_name_or_path))})
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise outdir.failed_write(out, "the single-file checkpoint", e, need) from e
    install(out, tmp)
    return name


def file_stem(text: str, default: str) -> str:
    """A file name made of `text`: letters, digits, '-', '_', '.' kept, anything else '-' (`default` if empty)."""
    return "".join(c if c.isalnum() or c in "-_." else "-" for c in text.strip()).strip(".-") or default


def a1111_name(placeholder: str) -> str:
    """The embedding's file name for A1111 / ComfyUI (they name an embedding by its file): <cat-toy> -> cat-toy."""
    return file_stem(placeholder.strip("<>"), "embedding")


def export_embedding(out: Path, new_tokens, step: int, *, name: str | None = None, a1111: bool = True,
                     base_model=None, second=None) -> list[str]:
    """learned_embeds.safetensors (diffusers), and <name>.safetensors (emb_params) + <name>.pt (string_to_param)
    for A1111 / ComfyUI, into `out`; each written to a temporary name and renamed. A file there that this
    run did not write is never replaced (UserError). Returns the names written.
    SDXL (second: the second text encoder's new rows): both files hold clip_l and clip_g (no .pt)."""
    from trainer.methods import embeddings as E
    from trainer.families.sdxl import save_embedding_sdxl

    out = Path(out)
    rows, token = new_tokens.rows.detach().float().cpu(), new_tokens.placeholder
    files = {(name or Path(E.DIFFUSERS_FILE).stem) + ".safetensors": lambda p: E.save_diffusers(p, token, rows)}
    if second is not None:
        rows = torch.cat([rows, second.rows.detach().float().cpu()], dim=1)  # (only counted for the space check)
        files = {k: lambda p: save_embedding_sdxl(p, new_tokens, second, step) for k in files}
        if a1111:
            files[a1111_name(token) + ".safetensors"] = lambda p: save_embedding_sdxl(p, new_tokens, second, step)
    elif a1111:
        short = a1111_name(token)
        ckpt = Path(base_model).name if base_model else None
        files[short + ".safetensors"] = lambda p: E.save_a1111_safetensors(p, rows, short, step)
        files[short + ".pt"] = lambda p: E.save_a1111_pt(p, rows, short, step, ckpt)
    ours = set((outdir.read_marker(out) or {}).get("exported", []))
    foreign = [n for n in files if (out / n).exists() and n not in ours]
    if foreign:
        raise UserError(f"{out} holds {', '.join(foreign)}, which dbtrain did not write, so the embedding was not "
                        f"saved over it; move it away")
    outdir.require_space(out, rows.numel() * 4 * len(files) + outdir.MB, "the embedding files")
    outdir.write_marker(out, exported=sorted(ours | set(files)))
    for n, write in files.items():
        try:
            write(out / n)  # (each writer goes through a temporary name and os.replace)
        except OSError as e:
            raise outdir.failed_write(out, n, e, rows.numel() * 4) from e
    return list(files)
