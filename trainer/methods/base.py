"""What a training method is: what trains, in which optimizer groups, what a checkpoint holds and what is saved.

Full DreamBooth, LoRA, Textual Inversion and pivotal tuning are one training loop (trainer.core);
each is a `Method` that the loop asks, at fixed points, for the part that differs:
  weights_dtype the dtype the UNet is stored in (frozen bases: half precision where they can be)
  prompt_word   what [V] becomes in prompts (new tokens for the embedding methods)
  prepare       freeze the base, make the trained parts (adapters, new rows), return a Trainable
  on_step       files written during the run (Textual Inversion's --save_steps; rank 0 writes them)
  save          the final files; record: what dreambooth.json says of the result
"""
from __future__ import annotations

import shutil
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path

import torch

from trainer.families import family_of
from trainer.formats import diffusers_folder, outdir
from trainer.formats.embedding_files import file_stem


HALF = {"fp16": torch.float16, "bf16": torch.bfloat16}


def frozen_dtype(opts, device) -> torch.dtype:
    """The dtype of frozen weights: the autocast dtype on a GPU; bf16 on a CPU only when asked (CPUs lack fp16 math)."""
    if device.type == "cuda":
        return HALF.get(opts.memory.mixed_precision, torch.float32)
    return torch.bfloat16 if opts.memory.mixed_precision == "bf16" else torch.float32


@dataclass
class Trainable:
    """The trained parts of a run (Method.prepare)."""

    params: list  # the tensors the optimizer updates, in its order (that order is the checkpoints')
    models: dict  # checkpoint items by folder name: modules with save_pretrained / load_pretrained
    groups: list | None = None  # optimizer param groups when some parameters have their own learning rate
    new_tokens: list = field(default_factory=list)  # NewTokenEmbedding per text encoder (the embedding methods)
    freeze_at: int = 0  # the step from which the new token rows stay as they are (pivotal tuning)


class Method(ABC):
    """See the module docstring."""

    name = ""
    saved = ""  # what the final line says was saved
    trains_unet = True  # False: the UNet is frozen (Textual Inversion)

    def weights_dtype(self, opts, device) -> torch.dtype:
        """The dtype of the UNet (and of the text encoders that train) on `device`: --weights_dtype."""
        return torch.bfloat16 if opts.memory.weights_dtype == "bf16" else torch.float32

    def prompt_word(self, opts, comps, identifier: str) -> tuple[str, str]:
        """(what [V] becomes in prompts, the identifier the run records); comps' tokenizers may be extended."""
        print(f"identifier: {identifier}")
        return identifier, identifier

    @abstractmethod
    def prepare(self, opts, comps, device, weights_dtype) -> Trainable:
        """Freeze what does not train, move the trained parts to the device, return them."""

    def writes_at(self, opts, step: int) -> bool:
        """Whether on_step writes files at this step (--use_ema: they get the average)."""
        return False

    def on_step(self, run, out: Path, step: int) -> None:
        """Files written after optimizer step `step` (called on every rank; the files: rank 0 only)."""

    @abstractmethod
    def save(self, run, out: Path, step: int) -> None:
        """The final files into `out` (rank 0 only); a UserError leaves `out` as it was."""

    def record(self, opts, run) -> dict:
        """What dreambooth.json says of the result beyond the subject."""
        return {}


def train_mode_text_encoder(opts, encoder, device, dtype) -> None:
    encoder.to(device, dtype=dtype).train()
    if opts.memory.gradient_checkpointing:  # transformers 5 renamed it
        (getattr(encoder, "activation_checkpointing_enable", None) or encoder.gradient_checkpointing_enable)()


def trained_pipeline(opts, unet, text_encoders: dict | None = None, tokenizers: list | None = None):
    """The base model's pipeline with the run's UNet, trained text encoders ({component name: module}) and
    tokenizers with new tokens; a --tokenizer_name folder and a --pretrained_vae_model_name_or_path VAE replace
    the model's own, the base's parts not passed in come from its --variant files."""
    model = opts.model
    kw = {"unet": unet, **(text_encoders or {})}
    family = family_of(model.pretrained_model_name_or_path)
    if tokenizers:  # the run's tokenizers, with new tokens
        kw.update(zip(family.tokenizer_names, tokenizers))
    elif model.tokenizer_name:  # diffusers' --tokenizer_name
        from transformers import CLIPTokenizer

        kw["tokenizer"] = CLIPTokenizer.from_pretrained(model.tokenizer_name)
    if model.variant:
        kw["variant"] = model.variant
    return family.load_pipeline(model.pretrained_model_name_or_path, vae_path=model.pretrained_vae_model_name_or_path,
                                dtype=unet.dtype, **kw)


def result_name(out: Path) -> str:
    """The name a result's own files take (the single file, kohya's LoRA file): its output folder's; in
    output_dir/raw (--save_raw_weights, trainer.core.ema) the run's, so raw/ holds the same file names."""
    of = (outdir.read_marker(out) or {}).get("raw_weights_of")
    return Path(of).name if of else Path(out).resolve().name


def write_single_file(opts, out: Path, lora_file: Path | None = None) -> str:
    """`--save_single_file`: the exported folder (or the base model with the LoRA merged in) as one
    original-layout .safetensors file in `out`, for A1111 / ComfyUI; returns its name."""
    base = Path(opts.model.pretrained_model_name_or_path)
    family = family_of(base)
    name = file_stem(result_name(out), "model")
    if lora_file is None:
        model, parts, name = out, None, f"{name}.safetensors"
    else:  # the kohya LoRA file already has <name>.safetensors
        model, name = base, f"{name}-merged.safetensors"
        parts = family.merge_lora(model, lora_file)
        if opts.model.pretrained_vae_model_name_or_path:  # the VAE the run used, not the base's
            from diffusers import AutoencoderKL

            parts = (parts[0], AutoencoderKL.from_pretrained(opts.model.pretrained_vae_model_name_or_path), *parts[2:])
    half = opts.checkpoints.single_file_half
    need = (1 if half else 2) * sum(f.stat().st_size for f in model.rglob("*.safetensors")) + outdir.MB
    outdir.require_space(out, need, "the single-file checkpoint")
    tmp = diffusers_folder.staging(out)
    tmp.mkdir(parents=True)
    try:
        family.save_single_file(model, tmp / name, half=half, components=parts,
                                metadata={"dbtrain.base_model": str(base)})  # (the exported folder: the base's family)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise outdir.failed_write(out, "the single-file checkpoint", e, need) from e
    diffusers_folder.install(out, tmp)
    return name
