"""The files and folders a training run's options name, checked before anything is loaded (torch-free).

Every folder the run will write into (--output_dir, --class_data_dir when class images must be generated,
--logging_dir, the validation grids' folder) must be writable, or be creatable, before a model loads, so a
read-only folder is one line at the start, not a traceback after minutes of work. With --concepts, each
concept's folders are checked as the flags' would be, and an error names the concept."""
from __future__ import annotations

import json
from pathlib import Path

from trainer.errors import UserError
from trainer.families import family_of
from trainer.formats.outdir import check_creatable, check_output_dir, writable
from trainer.options import concepts, diffusers_flags
from trainer.options.buckets import buckets_of, check_latent_sides
from trainer.options.checks import count_images


def class_images_to_generate(opts) -> int:
    """How many class images prior preservation will draw (--num_class_images minus those in --class_data_dir;
    with --concepts, of every concept's class folder)."""
    if not opts.prior.with_prior_preservation:
        return 0
    if opts.data.concepts:
        return sum(max(0, n - count_images(folder)) for folder, n in concepts.class_folders(opts).values())
    return max(0, opts.prior.num_class_images - count_images(opts.prior.class_data_dir))


def _check_writes_into(folder: Path, flag: str, why: str = "") -> None:
    """`folder` is a writable folder, or does not exist and can be created."""
    if not folder.exists():
        check_creatable(folder, flag)
    elif not folder.is_dir():
        raise UserError(f"{flag} {folder} is a file, not a folder")
    elif not writable(folder):
        raise UserError(f"{flag} {folder} is not writable{why}; choose a folder you can write to")


def check_paths(opts) -> None:
    """Errors in the files and folders the options name, found without loading anything; then the step
    counts that need the instance folder (--num_train_epochs, --validation_epochs). Idempotent."""
    model = opts.model.pretrained_model_name_or_path
    family = family_of(model)
    family.check_folder(model, variant=opts.model.variant, what="--pretrained_model_name_or_path")
    family.check_options(opts)
    diffusers_flags.check_model_extras(opts)
    _check_buckets(opts, Path(model))
    if not opts.data.concepts:
        _check_subject(opts)
    for k, c in enumerate(concepts.concepts_of(opts) if opts.data.concepts else [], 1):
        with concepts.said_of(opts, k, c):  # (each concept's folders, said of it)
            _check_subject(concepts.options_of(opts, c))
    out, res = Path(opts.checkpoints.output_dir), opts.checkpoints.resume_from_checkpoint
    if res and res != "latest" and not Path(res).exists() and not (out / res).exists():
        raise UserError(f"--resume_from_checkpoint {res}: no such checkpoint folder (or pass latest)")
    check_output_dir(out, resume=bool(res))
    _check_writes_into(out / opts.logging.logging_dir, "--logging_dir")
    if opts.logging.validation_prompt:
        _check_writes_into(out / "validation", "the validation folder (--validation_prompt)")
    diffusers_flags.resolve_counts(opts)


def _check_buckets(opts, model: Path) -> None:
    """Buckets whose latents this model's UNet cannot take, refused before it loads (from its configs' levels;
    the run checks again on the loaded model)."""
    sizes = buckets_of(opts.data)
    if not sizes:
        return
    levels = {}
    for part in ("vae", "unet"):
        try:
            levels[part] = len(json.loads((model / part / "config.json").read_text())["block_out_channels"])
        except (OSError, ValueError, KeyError, TypeError):  # (a model folder of another shape: checked on load)
            return
    check_latent_sides(sizes, 2 ** (levels["vae"] - 1), 2 ** (levels["unet"] - 1))


def _check_subject(opts) -> None:
    """The instance folder, and the class folder where class images must be generated."""
    inst = Path(opts.data.instance_data_dir)
    if not inst.is_dir():
        raise UserError(f"instance image folder {inst} does not exist" if not inst.exists() else
                        f"--instance_data_dir {inst} is a file, not a folder of images")
    if opts.prior.with_prior_preservation:
        cls = Path(opts.prior.class_data_dir)
        if cls.exists() and not cls.is_dir():
            raise UserError(f"--class_data_dir {cls} is a file, not a folder")
        missing = class_images_to_generate(opts)
        if missing:  # a read-only folder that already holds enough is fine: nothing is written there
            _check_writes_into(cls, "--class_data_dir",
                               f" and {missing} class image(s) must be generated there (it holds "
                               f"{count_images(cls)} of --num_class_images {opts.prior.num_class_images})")
