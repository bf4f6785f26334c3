"""What a training run's output folder holds, read back for sampling: its LoRA and embedding files and the
subject it recorded (dreambooth.json). Torch-free: the commands check these before anything loads."""
from __future__ import annotations

import json
from pathlib import Path

from trainer.errors import UserError
from trainer.formats.embedding_files import DIFFUSERS_FILE as EMBEDDING_FILE

LORA_FILE = "pytorch_lora_weights.safetensors"  # diffusers' LoRA file (trainer.methods.lora writes it)
SUBJECT_FILE = "dreambooth.json"


def recorded_subject(model) -> dict:
    """The run's dreambooth.json ({} when there is none or it does not read)."""
    path = Path(model) / SUBJECT_FILE
    try:
        rec = json.loads(path.read_text()) if path.is_file() else {}
    except (OSError, ValueError):
        return {}
    return rec if isinstance(rec, dict) else {}


def model_and_embeddings(model, embedding_files=None) -> tuple[Path, list[Path]]:
    """What `dbtrain sample|eval --model DIR [--embedding FILE ...]` should load: (diffusers folder, embedding
    files). A Textual Inversion output folder (its dreambooth.json names the base model, no model_index.json)
    means that base model plus its learned_embeds.safetensors; a pivotal-tuning folder means itself plus its
    learned_embeds.safetensors; files given explicitly come after those."""
    model = Path(model)
    files = []
    rec = recorded_subject(model)
    if (model / EMBEDDING_FILE).is_file() and rec.get("embedding"):
        files.append(model / EMBEDDING_FILE)
    if not (model / "model_index.json").is_file() and rec.get("base_model"):
        base = Path(rec["base_model"])
        if not base.is_dir():
            raise UserError(f"{model} is a Textual Inversion result for the base model {base}, which is not there")
        model = base
    files += [Path(f) for f in (embedding_files or [])]
    for f in files:
        if not f.is_file():
            raise UserError(f"--embedding {f}: no such file")
    return model, files


def lora_files_of(model, given=None) -> list[Path]:
    """The LoRA files to apply: a LoRA output folder's own file first, then those given."""
    files = []
    own = Path(model) / LORA_FILE
    if own.is_file() and not (Path(model) / "model_index.json").is_file():
        files.append(own)
    for f in given or []:
        f = Path(f)
        if f.is_dir() and (f / LORA_FILE).is_file():
            f = f / LORA_FILE
        if not f.is_file():
            raise UserError(f"--lora {f}: no such file (a .safetensors LoRA, or a dbtrain LoRA output folder)")
        files.append(f)
    return files


def load_pipeline(model, device, embedding_files=None, lora_files=None, lora_scale: float = 1.0):
    """The pipeline of a model folder; a Textual Inversion / pivotal-tuning / LoRA output folder, or
    `embedding_files` / `lora_files`, add their embeddings (read safely) and fused LoRAs on top."""
    from trainer.families import check_model_folder, family_of

    loras = lora_files_of(model, lora_files)
    model, files = model_and_embeddings(model, embedding_files)
    check_model_folder(model)
    family = family_of(model)
    pipe = family.load_pipeline(model)
    pipe.set_progress_bar_config(disable=True)
    for f in files:
        family.load_embedding(pipe, f)
    apply_loras(pipe, loras, lora_scale, say=lambda _: None)
    return pipe.to(device)


def apply_loras(pipe, files, scale: float = 1.0, say=print) -> None:
    """Merge each LoRA file (kohya or diffusers names) into the pipeline's weights at `scale` (our merge, the
    same W += scale * alpha/rank * up @ down as diffusers' fuse_lora); a file made for another model is one
    clear line."""
    from trainer.formats import kohya_lora

    modules = {name: m for name, m in pipe.components.items()
               if m is not None and (name == "unet" or name.startswith("text_encoder"))}
    for f in files:
        sd, meta = kohya_lora.read_lora(f)
        try:  # (a failed merge ends the command: the half-merged pipeline is never used)
            n = kohya_lora.merge_into(modules, kohya_lora.lora_updates(sd, meta, modules), scale)
        except UserError as e:
            raise UserError(f"--lora {f}: {e}") from None
        say(f"LoRA {f}: {n} weights merged at scale {scale:g}")

