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
    return generate_per_concept([opts], device, dtype, prompts)[0]


def generate_per_concept(options: list, device: torch.device, dtype: torch.dtype,
                         prompts: list[str] | None = None) -> list[int]:
    """generate_class_images for each concept's options (trainer.options.concepts.options_of): its folder, its
    class prompt, its count; the pipeline loads once. Concepts that share a folder (and so its prompt) share its
    images: it is filled to the largest of their counts, said of the first of them. Returns each one's count."""
    todo, first_of = [], {}  # (concept, folder, the indices this rank draws); each folder's first concept
    for k, opts in enumerate(options):
        folder = Path(opts.prior.class_data_dir)
        key = os.path.realpath(folder)
        if key in first_of:
            continue
        first_of[key] = k
        want = max(o.prior.num_class_images for o in options if os.path.realpath(o.prior.class_data_dir) == key)
        folder.mkdir(parents=True, exist_ok=True)
        ext = opts.data.caption_extension
        if distributed.is_main():
            _remove_stale_temporaries(folder)
        have = len(list_images(folder, "class image", allow_empty=True,
                               captions=caption_suffix(ext) if ext else (".txt" if prompts else None)))
        distributed.barrier()  # torchrun: every rank has counted before any rank writes
        if want - have > 0:
            # torchrun: each rank draws every N-th missing image (seeded by its index, so the same images as one
            # process)
            todo.append((k, folder, distributed.share(list(range(have, want)))))
    if not todo:
        return [0] * len(options)
    made = _generate(options, device, dtype, todo, prompts) if any(mine for _, _, mine in todo) else {}
    distributed.barrier()  # every rank's images are written before any rank lists the folder
    return [distributed.sum_int(made.get(k, 0)) if any(k == j for j, _, _ in todo) else 0
            for k in range(len(options))]


def _generate(options: list, device, dtype, todo: list, prompts: list[str] | None = None) -> dict[int, int]:
    opts = options[0]
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
    made = {}
    with tqdm(total=sum(len(mine) for _, _, mine in todo), desc="class images", unit="img") as bar:
        for k, folder, mine in todo:
            made[k] = _draw(pipe, options[k], folder, mine, prompts, bar)
    del pipe
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return made


def _draw(pipe, opts, folder: Path, mine: list[int], prompts: list[str] | None, bar) -> int:
    """Images `mine` (their indices: their seeds depend on them only) of one class folder."""
    prior, made, size = opts.prior, 0, opts.data.resolution
    while made < len(mine):
        index = mine[made: made + prior.sample_batch_size]
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
