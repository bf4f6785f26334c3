"""Prior preservation: the frozen model draws the class images before training.

Only the missing number is generated, into new files (never over one already there),
each written to a temporary name of this process (`.class-00003.png.tmp-<pid>`) and renamed,
so a run killed while generating resumes where it stopped (and removes what it left). The
folder was checked writable before the model loaded (trainer.core.inputs); a write that fails
anyway (a full disk) is one line.
"""
from __future__ import annotations

import os
import re
import sys
from pathlib import Path

import torch
from tqdm.auto import tqdm

from trainer.core.images import caption_suffix, list_images
from trainer.distributed import data_parallel as distributed
from trainer.families import family_of
from trainer.formats import io

_TEMPORARY = re.compile(r"^\.class-.*\.tmp(?:-(\d+))?$")  # (no pid: written before temporaries had one)

PRECISIONS = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}  # "no": the caller's dtype


def generate_class_images(opts, device: torch.device, dtype: torch.dtype, prompts: list[str] | None = None) -> int:
    """Make --class_data_dir hold --num_class_images images; returns how many were generated.

    Each is drawn from --class_prompt; with `prompts` (the demo's place-diverse class images), image i from
    prompts[i % len(prompts)], written with that prompt as its caption file (`class-00003.txt`, the suffix of
    --caption_extension, else .txt) so that training reads it back with --caption_extension.
    `dtype` is the pipeline's unless --prior_generation_precision (diffusers' flag) names another."""
    prior, ext = opts.prior, opts.data.caption_extension
    folder = Path(prior.class_data_dir)
    folder.mkdir(parents=True, exist_ok=True)
    if distributed.is_main():
        _remove_stale_temporaries(folder)
    have = len(list_images(folder, "class image", allow_empty=True,
                           captions=caption_suffix(ext) if ext else (".txt" if prompts else None)))
    distributed.barrier()  # torchrun: every rank has counted before any rank writes
    missing = prior.num_class_images - have
    if missing <= 0:
        return 0
    # torchrun: each rank draws every N-th missing image (seeded by its index, so the same images as one process)
    mine = distributed.share(list(range(have, have + missing)))
    made = _generate(opts, device, dtype, folder, mine, prompts) if mine else 0
    distributed.barrier()  # every rank's images are written before any rank lists the folder
    return distributed.sum_int(made)


def _generate(opts, device, dtype, folder: Path, mine: list[int], prompts: list[str] | None = None) -> int:
    prior, model = opts.prior, opts.model
    dtype = PRECISIONS.get(prior.prior_generation_precision or "no", dtype)
    if dtype == torch.float16 and device.type == "cpu":
        print("dbtrain: note: --prior_generation_precision fp16 on a CPU is slow (CPUs have no fast fp16 math); "
              "bf16 or fp32 is faster there", file=sys.stderr, flush=True)
    # SDXL: StableDiffusionXLPipeline (it runs a force_upcast VAE in float32 itself), no watermark
    pipe = family_of(model.pretrained_model_name_or_path).load_pipeline(
        model.pretrained_model_name_or_path, dtype=dtype, class_images=True,
        vae_path=model.pretrained_vae_model_name_or_path, **({"variant": model.variant} if model.variant else {}))
    pipe.set_progress_bar_config(disable=True)
    pipe.to(device)
    made = 0
    size = opts.data.resolution
    with tqdm(total=len(mine), desc="class images", unit="img") as bar:
        while made < len(mine):
            index = mine[made: made + prior.sample_batch_size]  # the images' indices: their seeds depend on them only
            n = len(index)
            gens = [torch.Generator("cpu").manual_seed(opts.training.seed * 1_000_003 + i) for i in index]
            texts = [prompts[i % len(prompts)] for i in index] if prompts else [prior.class_prompt] * n
            images = pipe(texts, num_inference_steps=prior.class_inference_steps, generator=gens,
                          height=size, width=size).images
            for k, img in enumerate(images):
                path = _free_name(folder, index[k])
                tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
                with io.one_line_write_errors(folder, "class images", 2 * size * size * 3 * len(images), tmp):
                    if prompts:  # the caption first: an image on disk always has its caption
                        path.with_suffix(caption_suffix(opts.data.caption_extension or ".txt")).write_text(
                            texts[k] + "\n")
                    img.save(tmp, format="PNG")
                    os.replace(tmp, path)
            made += n
            bar.update(n)
    del pipe
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return made


def _remove_stale_temporaries(folder: Path) -> None:
    """The temporaries of class images whose process is gone (a run killed while generating)."""
    for p in folder.iterdir():
        m = _TEMPORARY.match(p.name)
        if m and p.is_file() and io.is_stale(int(m.group(1)) if m.group(1) else None):
            p.unlink(missing_ok=True)


def _free_name(folder: Path, index: int) -> Path:
    k = 0
    while True:
        path = folder / (f"class-{index:05d}.png" if k == 0 else f"class-{index:05d}-{k}.png")
        if not path.exists():
            return path
        k += 1
