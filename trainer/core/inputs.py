"""The files and folders a training run's options name, checked before anything is loaded (torch-free)."""
from __future__ import annotations

from pathlib import Path

from trainer.errors import UserError
from trainer.families import family_of
from trainer.formats.outdir import check_creatable, check_output_dir
from trainer.options import diffusers_flags


def check_paths(opts) -> None:
    """Errors in the files and folders the options name, found without loading anything; then the step
    counts that need the instance folder (--num_train_epochs, --validation_epochs). Idempotent."""
    model = opts.model.pretrained_model_name_or_path
    family = family_of(model)
    family.check_folder(model, variant=opts.model.variant, what="--pretrained_model_name_or_path")
    family.check_options(opts)
    diffusers_flags.check_model_extras(opts)
    inst = Path(opts.data.instance_data_dir)
    if not inst.is_dir():
        raise UserError(f"instance image folder {inst} does not exist" if not inst.exists() else
                        f"--instance_data_dir {inst} is a file, not a folder of images")
    if opts.prior.with_prior_preservation:
        cls = Path(opts.prior.class_data_dir)
        if cls.exists() and not cls.is_dir():
            raise UserError(f"--class_data_dir {cls} is a file, not a folder")
        if not cls.exists():
            check_creatable(cls, "--class_data_dir")
    out, res = Path(opts.checkpoints.output_dir), opts.checkpoints.resume_from_checkpoint
    if res and res != "latest" and not Path(res).exists() and not (out / res).exists():
        raise UserError(f"--resume_from_checkpoint {res}: no such checkpoint folder (or pass latest)")
    check_output_dir(out, resume=bool(res))
    logs = out / opts.logging.logging_dir
    if logs.exists() and not logs.is_dir():
        raise UserError(f"--logging_dir {logs} is a file, not a folder")
    diffusers_flags.resolve_counts(opts)
