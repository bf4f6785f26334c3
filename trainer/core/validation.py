"""Validation grids during training: images of --validation_prompt from the model being trained."""
from __future__ import annotations

import os
from pathlib import Path

import torch

from trainer.core.images import make_grid
from trainer.formats import io
from trainer.methods.base import trained_pipeline


@torch.no_grad()
def validate(run, prompt: str, folder: Path, name: str) -> Path:
    """folder/<name>.png: a grid of --num_validation_images images (seeds seed + k) of `prompt`, drawn with the
    base model's pipeline holding the run's UNet and, when they train (or carry new tokens), its text encoders
    and tokenizers."""
    opts, unet = run.opts, run.unet
    new_tokens = bool(run.trainable.new_tokens)
    text_side = opts.training.train_text_encoder or new_tokens
    was_training = unet.training
    unet.eval()
    pipe = trained_pipeline(opts, unet, run.text_encoders if text_side else None,
                            run.batches.tokenizers if new_tokens else None).to(run.device)
    pipe.set_progress_bar_config(disable=True)
    sched = opts.logging.validation_scheduler
    if sched:  # diffusers' --validation_scheduler; learned variances are not trained, so sample fixed ones
        import diffusers

        extra = {}
        if pipe.scheduler.config.get("variance_type") in ("learned", "learned_range"):
            extra["variance_type"] = "fixed_small"
        pipe.scheduler = getattr(diffusers, sched).from_config(pipe.scheduler.config, **extra)
    n, res = opts.logging.num_validation_images, opts.data.resolution
    gens = [torch.Generator("cpu").manual_seed(opts.training.seed + k) for k in range(n)]
    images = pipe([prompt] * n, generator=gens, height=res, width=res, num_inference_steps=25).images
    path = folder / f"{name}.png"
    tmp = folder / f".{name}.png.tmp-{os.getpid()}"
    grid = make_grid(images)
    with io.one_line_write_errors(folder, f"the validation grid {path.name}", 3 * grid.width * grid.height, tmp):
        folder.mkdir(parents=True, exist_ok=True)
        grid.save(tmp, format="PNG")
        os.replace(tmp, path)  # a grid killed mid-write never stands under the final name
    unet.train(was_training)
    return path
