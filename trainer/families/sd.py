"""Loading a local diffusers SD folder (1.x / 2.x, epsilon or v-prediction)."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from trainer.errors import UserError

EMBEDDING_FILE = "learned_embeds.safetensors"   # diffusers' Textual Inversion file (trainer.embeddings)
COMPONENTS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")
_WEIGHT_FILES = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin", "model.safetensors",
                 "pytorch_model.bin", "diffusion_pytorch_model.safetensors.index.json",
                 "model.safetensors.index.json")


def variant_name(file: str, variant: str | None) -> str:
    """diffusers' file name of a weight variant: model.safetensors -> model.fp16.safetensors."""
    if not variant:
        return file
    stem, dot, ext = file.partition(".")
    return f"{stem}.{variant}.{ext}"


def check_model_folder(path, variant: str | None = None, what: str = "model folder") -> Path:
    """The folder, or a UserError listing every missing component (with `variant`: its weight files).
    An SDXL folder (model_index.json says so) is checked by trainer.sdxl: a refiner, or a folder without
    text_encoder_2 / tokenizer_2, is refused there."""
    from trainer.families.sdxl import check_sdxl_folder, is_sdxl

    root = Path(path)
    components = COMPONENTS
    if root.is_dir() and is_sdxl(root):  # then the same file checks for all its parts (e.g. fp16-only downloads)
        check_sdxl_folder(root, what)
        components = COMPONENTS + ("text_encoder_2", "tokenizer_2")
    if not root.is_dir():
        raise UserError(f"model folder {root} does not exist (a local diffusers folder is required; "
                        f"nothing is downloaded)")
    missing = []
    for comp in components:
        d = root / comp
        if not d.is_dir():
            missing.append(comp)
        elif comp.startswith("tokenizer"):
            if not (d / "vocab.json").is_file() and not (d / "tokenizer.json").is_file():
                missing.append(f"{comp} (vocab.json)")
        elif comp == "scheduler":
            if not (d / "scheduler_config.json").is_file():
                missing.append("scheduler (scheduler_config.json)")
        elif not (d / "config.json").is_file() or not any((d / variant_name(f, variant)).is_file()
                                                            for f in _WEIGHT_FILES):
            missing.append(f"{comp} (config.json + {variant + ' ' if variant else ''}weights)")
    if missing:
        hint = ""
        if not variant:  # only variant files there (e.g. an fp16-only download): say which flag loads them
            found = sorted({f.name.split(".")[1] for comp in ("unet", "vae", "text_encoder", "text_encoder_2")
                            for f in (root / comp).glob("*.*.safetensors") if (root / comp).is_dir()})
            hint = f"; it has {'/'.join(found)} variant weights: add --variant {found[0]}" if found else ""
        raise UserError(f"model folder {root} is missing: {', '.join(missing)}{hint}")
    return root


@dataclass
class Components:
    unet: object
    vae: object
    text_encoder: object
    tokenizer: object
    noise_scheduler: object
    prediction_type: str
    text_encoder_2: object = None  # SDXL only (trainer.sdxl.SDXLComponents)
    tokenizer_2: object = None


def load_components(path, cfg=None):
    """The base model's parts; with cfg, its --variant weights (as fp32), --tokenizer_name folder and
    --pretrained_vae_model_name_or_path VAE. An SDXL folder gives trainer.sdxl.SDXLComponents (both text
    encoders and tokenizers)."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    from trainer.families.sdxl import is_sdxl, load_sdxl_components

    variant = getattr(cfg, "variant", None)
    vae_path = getattr(cfg, "pretrained_vae_model_name_or_path", None)
    if is_sdxl(path):
        return load_sdxl_components(path, vae_path=vae_path, variant=variant)
    root = check_model_folder(path, variant=variant)
    kw = {"variant": variant} if variant else {}
    sched_cfg = json.loads((root / "scheduler" / "scheduler_config.json").read_text())
    # Training always uses the DDPM forward process of the model's own beta schedule.
    noise_scheduler = DDPMScheduler.from_pretrained(root, subfolder="scheduler")
    prediction_type = sched_cfg.get("prediction_type", "epsilon")
    if prediction_type not in ("epsilon", "v_prediction", "sample"):
        raise UserError(f"{root}/scheduler: unsupported prediction_type {prediction_type!r}")
    tok = getattr(cfg, "tokenizer_name", None)
    comps = Components(
        unet=UNet2DConditionModel.from_pretrained(root, subfolder="unet", **kw),
        vae=(AutoencoderKL.from_pretrained(vae_path) if vae_path else
             AutoencoderKL.from_pretrained(root, subfolder="vae", **kw)),
        text_encoder=CLIPTextModel.from_pretrained(root, subfolder="text_encoder", **kw),
        tokenizer=CLIPTokenizer.from_pretrained(tok) if tok else CLIPTokenizer.from_pretrained(root,
                                                                                              subfolder="tokenizer"),
        noise_scheduler=noise_scheduler,
        prediction_type=prediction_type,
    )
    if variant:  # e.g. fp16 files: train from fp32 copies, as from the plain files (the loop picks its dtypes)
        for m in (comps.unet, comps.vae, comps.text_encoder):
            m.float()
    return comps


def pick_identifier(tokenizer, class_word: str | None, seed: int) -> str:
    """A rare single-token word, as the paper picks its identifier.

    Candidates: whole-word vocabulary entries of 2-3 lowercase letters that the tokenizer
    maps back to exactly one token; the rarest quarter of them by merge rank (BPE adds
    rarer merges later, so higher ids are rarer); then one chosen with `seed`.
    """
    import random

    vocab = tokenizer.get_vocab()
    cands = []
    for tok, idx in vocab.items():
        word = tok[:-4] if tok.endswith("</w>") else None
        if word and 2 <= len(word) <= 3 and word.isalpha() and word.islower() and word != class_word:
            if tokenizer.tokenize(word) == [tok]:
                cands.append((idx, word))
    if not cands:
        raise UserError("--identifier auto: the tokenizer has no rare 2-3 letter single-token word; "
                        "pass --identifier <word>")
    cands.sort()
    rare = cands[-max(1, len(cands) // 4):]
    return random.Random(seed).choice(rare)[1]


def model_and_embeddings(model, embedding_files=None) -> tuple[Path, list[Path]]:
    """What `dbtrain sample|eval --model DIR [--embedding FILE ...]` should load: (diffusers folder, embedding
    files). A Textual Inversion output folder (its dreambooth.json names the base model, no model_index.json)
    means that base model plus its learned_embeds.safetensors; a pivotal-tuning folder means itself plus its
    learned_embeds.safetensors; files given explicitly come after those."""
    model = Path(model)
    files = []
    rec = {}
    if (model / "dreambooth.json").is_file():
        try:
            rec = json.loads((model / "dreambooth.json").read_text())
        except (OSError, ValueError):
            rec = {}
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
