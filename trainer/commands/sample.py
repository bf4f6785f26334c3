"""`dbtrain sample`: images from a trained output folder (or any diffusers SD / SDXL folder), with the
run's own embeddings and LoRA, and any given with --embedding / --lora."""
from __future__ import annotations

import math
from pathlib import Path

from trainer.commands import quiet_libraries
from trainer.errors import UserError
from trainer.families import check_model_folder
from trainer.formats import outdir
from trainer.methods.outputs import checkpoint_of, lora_files_of, model_and_embeddings
from trainer.options.sampling import SampleOptions, parse_sample


def check_checkpoint(model) -> None:
    """A checkpoint given as --model (OUT/checkpoint-N, a run in progress) must be whole: one line naming what
    is damaged (trainer.core.checkpoint.verify; torch is imported only for a checkpoint)."""
    if checkpoint_of(model) is None:
        return
    from trainer.core.checkpoint import verify

    problem = verify(Path(model))
    if problem is not None:
        raise UserError(f"checkpoint {model} is damaged: {problem}; sample another checkpoint or the finished "
                        f"output folder")


def check(a: SampleOptions) -> None:
    """Bad input as one line, before torch."""
    if a.num_images < 1 or a.steps < 1:
        raise UserError("--num_images and --steps must be >= 1")
    if a.resolution is not None and (a.resolution <= 0 or a.resolution % 8):
        raise UserError(f"--resolution must be a positive multiple of 8, got {a.resolution}")
    if not math.isfinite(a.guidance):
        raise UserError(f"--guidance must be a finite number, got {a.guidance}")
    if not math.isfinite(a.lora_scale):
        raise UserError(f"--lora_scale must be a finite number, got {a.lora_scale}")
    outdir.check_images_out(a.out)
    check_model_folder(model_and_embeddings(a.model, a.embedding)[0])
    lora_files_of(a.model, a.lora)
    check_checkpoint(a.model)


def run(argv: list[str]) -> Path:
    a = parse_sample(argv)
    check(a)
    quiet_libraries()
    import torch

    from trainer.core.images import make_grid
    from trainer.methods.outputs import load_pipeline

    device = torch.device(a.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    # (StableDiffusionXLPipeline for an SDXL folder; a checkpoint's trained parts on its run's base model)
    pipe = load_pipeline(a.model, device, a.embedding, a.lora, a.lora_scale, say=print)
    pipe.set_progress_bar_config(disable=False)
    gens = [torch.Generator("cpu").manual_seed(a.seed + k) for k in range(a.num_images)]
    kw = {"height": a.resolution, "width": a.resolution} if a.resolution else {}
    images = pipe([a.prompt] * a.num_images, negative_prompt=(
        [a.negative_prompt] * a.num_images if a.negative_prompt else None),
        num_inference_steps=a.steps, guidance_scale=a.guidance, generator=gens, **kw).images
    out = outdir.claim_images_out(a.out, "sample")
    for k, im in enumerate(images):
        im.save(out / f"{k:03d}.png")
    make_grid(images).save(out / "grid.png")
    print(f"wrote {len(images)} image(s) and grid.png to {out}")
    return out
