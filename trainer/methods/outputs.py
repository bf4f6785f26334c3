"""What a training run's output folder holds, read back for sampling: its LoRA and embedding files, the
subject it recorded (dreambooth.json), and its checkpoints (checkpoint-N: the trained parts, on the base model
the run records). Torch-free up to load_pipeline: the commands check these before anything loads."""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from trainer.errors import UserError
from trainer.formats import outdir
from trainer.formats.embedding_files import DIFFUSERS_FILE as EMBEDDING_FILE

LORA_FILE = "pytorch_lora_weights.safetensors"  # diffusers' LoRA file (trainer.methods.lora writes it)
SUBJECT_FILE = "dreambooth.json"
STATE_FILE = "training_state.json"  # a checkpoint's (trainer.core.checkpoint writes it)
ADAPTER_FILE = "adapter.safetensors"  # a LoRA checkpoint's per-model adapters (trainer.methods.lora.LoraWeights)


def _read_json(path: Path) -> dict:
    try:
        rec = json.loads(path.read_text()) if path.is_file() else {}
    except (OSError, ValueError):
        return {}
    return rec if isinstance(rec, dict) else {}


def recorded_base(out, base) -> str:
    """How a result in `out` records its base model `base`: relative to `out`, so the two still resolve when
    moved or copied together (the absolute path is recorded beside it for an output folder moved alone)."""
    base, out = Path(base).resolve(), Path(out).resolve()
    try:
        if Path(os.path.commonpath([base, out])) == Path(out.anchor):  # nothing shared to move together
            return str(base)
        return os.path.relpath(base, out)
    except ValueError:  # another drive
        return str(base)


def recorded_base_of(opts) -> dict:
    """dreambooth.json's fields naming a run's base model (see recorded_base)."""
    base = opts.model.pretrained_model_name_or_path
    return {"base_model": recorded_base(opts.checkpoints.output_dir, base),
            "base_model_absolute": str(Path(base).resolve())}


def base_of(model, rec: dict) -> Path | None:
    """The base model a result in `model` recorded (relative to `model`, or absolute in older folders), or None."""
    for key in ("base_model", "base_model_absolute"):
        if rec.get(key):
            p = (Path(model) / str(rec[key])).resolve()  # (an absolute path stays itself)
            if p.is_dir():
                return p
    return (Path(model) / str(rec["base_model"])).resolve() if rec.get("base_model") else None


def recorded_subject(model) -> dict:
    """The run's dreambooth.json ({} when there is none or it does not read). A checkpoint: its run's, or
    for a run still going what its options say (identifier, class noun)."""
    model = Path(model)
    if (model / STATE_FILE).is_file() and not (model / SUBJECT_FILE).is_file():
        rec = dict(_read_json(model.parent / SUBJECT_FILE))
        cfg = _read_json(model / STATE_FILE).get("config") or {}
        if not rec.get("identifier") and isinstance(cfg.get("identifier"), str):
            rec["identifier"] = cfg["identifier"]
        words = str(cfg.get("instance_prompt") or "").split()
        if not rec.get("class_noun") and "[V]" in words[:-1]:
            rec["class_noun"] = words[words.index("[V]") + 1]
        rec.pop("base_model", None)  # the run's output folder's, not this folder's
        return rec
    return _read_json(model / SUBJECT_FILE)


@dataclass
class Checkpoint:
    """A checkpoint-N folder as something to sample: the trained parts and the base model they go on."""

    folder: Path
    base: Path
    config: dict
    models: dict = field(default_factory=dict)      # {component: folder} (full DreamBooth, pivotal tuning)
    loras: dict = field(default_factory=dict)       # {component: adapter.safetensors} (LoRA)
    embeddings: dict = field(default_factory=dict)  # {text encoder: learned_embeds.safetensors} (TI, pivotal)


def checkpoint_of(model) -> Checkpoint | None:
    """The checkpoint `model` is (a folder with training_state.json and no model_index.json), else None. Its
    base model is the one its run recorded (training_state.json's options, else the output folder's marker);
    a base that is not there is one line naming it."""
    model = Path(model)
    if not (model / STATE_FILE).is_file() or (model / "model_index.json").is_file():
        return None
    cfg = _read_json(model / STATE_FILE).get("config")
    if not isinstance(cfg, dict) or not cfg.get("pretrained_model_name_or_path"):
        cfg = (outdir.read_marker(model.parent) or {}).get("config")
    if not isinstance(cfg, dict) or not cfg.get("pretrained_model_name_or_path"):
        raise UserError(f"{model / STATE_FILE} does not record the base model of its run (damaged?); sample the "
                        "finished output folder instead")
    given = Path(str(cfg["pretrained_model_name_or_path"]))
    base = next((p for p in (given, model.parent / given) if p.is_dir()), None)
    if base is None:
        raise UserError(f"{model} holds only the trained parts of a run on the base model {given}, which is not "
                        f"there; put that base model back at {given} to sample this checkpoint")
    ck = Checkpoint(model, base, cfg)
    for comp in ("unet", "text_encoder", "text_encoder_2"):
        if (model / comp / "config.json").is_file():
            ck.models[comp] = model / comp
        if (model / f"{comp}_lora" / ADAPTER_FILE).is_file():
            ck.loras[comp] = model / f"{comp}_lora" / ADAPTER_FILE
    for sub, enc in (("text_embedding", "text_encoder"), ("text_embedding_2", "text_encoder_2")):
        if (model / sub / EMBEDDING_FILE).is_file():
            ck.embeddings[enc] = model / sub / EMBEDDING_FILE
    if not (ck.models or ck.loras or ck.embeddings):
        raise UserError(f"checkpoint {model} holds no trained parts (unet/, unet_lora/ or text_embedding/)")
    return ck


def model_and_embeddings(model, embedding_files=None) -> tuple[Path, list[Path]]:
    """What `dbtrain sample|eval --model DIR [--embedding FILE ...]` should load: (diffusers folder, embedding
    files). A Textual Inversion output folder (its dreambooth.json names the base model, no model_index.json)
    means that base model plus its learned_embeds.safetensors; a pivotal-tuning folder means itself plus its
    learned_embeds.safetensors; files given explicitly come after those."""
    model = Path(model)
    files = []
    ck = checkpoint_of(model)
    rec = {} if ck else recorded_subject(model)
    if ck:  # its own parts are load_pipeline's to add
        model = ck.base
    if (model / EMBEDDING_FILE).is_file() and rec.get("embedding"):
        files.append(model / EMBEDDING_FILE)
    if not (model / "model_index.json").is_file() and rec.get("base_model"):
        base = base_of(model, rec)
        if not base.is_dir():
            raise UserError(f"{model} is a Textual Inversion result for the base model {base}, which is not there; "
                            f"put it back there (or move both folders together)")
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
    if own.is_file() and not (Path(model) / "model_index.json").is_file() and not (Path(model) / STATE_FILE).is_file():
        files.append(own)
    for f in given or []:
        f = Path(f)
        if f.is_dir() and (f / LORA_FILE).is_file():
            f = f / LORA_FILE
        if not f.is_file():
            raise UserError(f"--lora {f}: no such file (a .safetensors LoRA, or a dbtrain LoRA output folder)")
        files.append(f)
    return files


def load_pipeline(model, device, embedding_files=None, lora_files=None, lora_scale: float = 1.0,
                  say=lambda _: None):
    """The pipeline of a model folder; a Textual Inversion / pivotal-tuning / LoRA output folder, a checkpoint
    (its trained parts on its run's base model), or `embedding_files` / `lora_files`, add their embeddings
    (read safely) and fused LoRAs on top. say: where the tokens to write in prompts are told."""
    from trainer.families import check_model_folder, family_of

    ck = checkpoint_of(model)
    loras = lora_files_of(model, lora_files)
    model, files = model_and_embeddings(model, embedding_files)
    check_model_folder(model)
    family = family_of(model)
    pipe = family.load_pipeline(model, **(checkpoint_models(ck, family) if ck else {}))
    pipe.set_progress_bar_config(disable=True)
    if ck:
        add_checkpoint_parts(pipe, family, ck, lora_scale, say)
    for f in files:
        say(f"embedding {f}: write {family.load_embedding(pipe, f)} in the prompt")
    apply_loras(pipe, loras, lora_scale, say=say)
    return pipe.to(device)


def checkpoint_models(ck: Checkpoint, family) -> dict:
    """The checkpoint's trained models (UNet, text encoders) as pipeline components, loaded and checked finite;
    with the VAE its run used (--pretrained_vae_model_name_or_path)."""
    from diffusers import UNet2DConditionModel

    from trainer.families.base import check_finite, loading

    classes = {"unet": UNet2DConditionModel, **dict(zip(family.text_encoder_names, family.text_encoder_classes()))}
    out = {}
    for comp, folder in ck.models.items():
        if comp not in classes:
            raise UserError(f"checkpoint {ck.folder} has {comp}/, which a {family.label} base model has not")
        with loading(folder):
            out[comp] = classes[comp].from_pretrained(folder)
        check_finite({"": out[comp]}, folder)
    vae = ck.config.get("pretrained_vae_model_name_or_path")
    if vae and Path(str(vae)).is_dir():
        out["vae_path"] = str(vae)
    return out


def add_checkpoint_parts(pipe, family, ck: Checkpoint, scale: float, say) -> None:
    """A checkpoint's new-token rows (each text encoder's, under the placeholder they were trained as) and its
    LoRA adapters (merged at the run's alpha, times `scale`) into the pipeline."""
    from trainer.formats import kohya_lora
    from trainer.formats.embedding_files import read_embedding

    tokenizers = dict(zip(family.text_encoder_names, family.tokenizer_names))
    for enc, f in ck.embeddings.items():
        token, rows = read_embedding(f)
        try:
            pipe.load_textual_inversion({token: rows}, token=token, text_encoder=getattr(pipe, enc),
                                        tokenizer=getattr(pipe, tokenizers[enc]))
        except ValueError as e:
            raise UserError(f"{f}: {str(e).splitlines()[0]}") from e
        say(f"embedding {f}: write {token} in the prompt")
    if ck.loras:
        sd, alpha, header = {}, ck.config.get("lora_alpha"), {}
        for comp, f in ck.loras.items():
            sd.update({f"{comp}.{k}": v for k, v in kohya_lora.read_lora(f)[0].items()})
            if alpha is not None:  # (None: alpha = rank, diffusers' reading of a file without a header)
                header[f"{comp}.lora_alpha"] = float(alpha)
        modules = {name: m for name, m in pipe.components.items()
                   if m is not None and (name == "unet" or name.startswith("text_encoder"))}
        meta = {"lora_adapter_metadata": json.dumps(header)} if header else None
        try:
            n = kohya_lora.merge_into(modules, kohya_lora.lora_updates(sd, meta, modules), scale)
        except UserError as e:
            raise UserError(f"checkpoint {ck.folder}: {e}") from None
        say(f"LoRA of {ck.folder}: {n} weights merged at scale {scale:g}")


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

