"""`dbtrain export`'s options: what to write (a single file, a merged folder, a kohya LoRA) from what.

Flag combinations are checked here; the files and folders they name by trainer.commands.export
(still before torch). No torch here.
"""
from __future__ import annotations

import argparse
import math
from dataclasses import dataclass

from trainer.errors import UserError
from trainer.options import spec
from trainer.options.spec import flag

DIFFUSERS_LORA = "pytorch_lora_weights.safetensors"


@dataclass
class ExportOptions:
    model: str | None = flag(None, "a diffusers Stable Diffusion folder (or a dbtrain output folder)")
    single_file: str | None = flag(None, "write the model as one original-layout checkpoint (a new file)",
                                   metavar="OUT.safetensors")
    half: bool = flag(False, "store the single file in float16 (half the size)")
    lora: str | None = flag(None, "a LoRA .safetensors file, kohya or diffusers format (or a folder holding "
                            f"{DIFFUSERS_LORA})", metavar="FILE")
    lora_scale: float = flag(1.0, "strength of the merged LoRA (default 1.0)", type=float)
    merge: bool = flag(False, "merge --lora into --model's weights (for UIs without LoRA support)")
    output_dir: str | None = flag(None, "with --merge: also write the merged model as a diffusers folder (new or "
                                  "empty)", metavar="NEWDIR")
    kohya: str | None = flag(None, "write --lora in kohya's format (lora_unet_/lora_te_ names, SDXL: "
                             "lora_te1_/lora_te2_; alphas, ss_* header)", metavar="OUT.safetensors")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="dbtrain export", formatter_class=spec.HelpFormatter,
        description="Write a diffusers SD1.x/SD2.x/SDXL folder (a dbtrain output folder is one) as a single-file "
                    "checkpoint for A1111/ComfyUI, merge a LoRA into it, or convert a diffusers LoRA to kohya's "
                    "format.")
    fields = spec.flag_fields(ExportOptions)
    for f in fields.values():
        spec.add_field(p.add_argument, f)
    return p


def parse(argv: list[str]) -> ExportOptions:
    """The flags, their combinations checked (not yet the files they name)."""
    a = spec.pick(ExportOptions, vars(build_parser().parse_args(argv)))
    if not (a.single_file or a.kohya or a.output_dir):
        raise UserError("say what to write: --single_file OUT.safetensors, --kohya OUT.safetensors (with --lora), "
                        "or --merge --output_dir NEWDIR")
    if a.kohya and (a.merge or a.single_file or a.output_dir):
        raise UserError("--kohya converts a LoRA file on its own; run --merge / --single_file as another command")
    if a.kohya and not a.lora:
        raise UserError("--kohya needs --lora FILE (a diffusers-format LoRA to convert)")
    if a.lora and not a.kohya and not a.merge:
        raise UserError("--lora with --single_file/--output_dir needs --merge (the LoRA merged into the weights)")
    if a.merge and not a.lora:
        raise UserError("--merge needs --lora FILE")
    if a.output_dir and not a.merge:
        raise UserError("--output_dir writes a merged model: add --lora FILE --merge")
    if (a.single_file or a.merge) and not a.model:
        raise UserError("--model DIR is needed (the diffusers folder to export)")
    if not math.isfinite(a.lora_scale):
        raise UserError(f"--lora_scale must be a finite number, got {a.lora_scale}")
    return a
