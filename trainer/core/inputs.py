"""The files and folders a training run's options name, checked before anything is loaded."""
from __future__ import annotations

import argparse
from pathlib import Path

from trainer.options import diffusers_flags as flag_notes
from trainer.errors import UserError


def _check_sdxl_options(cfg) -> None:
    """What an SDXL base folder cannot do yet, said before anything loads."""
    from trainer.families.sdxl import is_sdxl

    if not is_sdxl(cfg.pretrained_model_name_or_path):
        return
    for flag in ("tokenizer_name", "tokenizer_max_length", "text_encoder_use_attention_mask"):
        if getattr(cfg, flag, None):
            raise UserError(f"--{flag} is not supported for SDXL models (two tokenizers and text encoders, "
                            f"used as the model ships them); leave it out")


def check_paths(cfg: argparse.Namespace) -> None:
    """Errors in the files and folders the options name, found without loading anything."""
    from trainer.families.sd import check_model_folder
    from trainer.formats.outdir import check_output_dir, check_creatable

    check_model_folder(cfg.pretrained_model_name_or_path, variant=getattr(cfg, "variant", None),
                       what="--pretrained_model_name_or_path")
    _check_sdxl_options(cfg)
    flag_notes.check_model_extras(cfg, UserError)
    inst = Path(cfg.instance_data_dir)
    if not inst.is_dir():
        raise UserError(f"instance image folder {inst} does not exist" if not inst.exists() else
                        f"--instance_data_dir {inst} is a file, not a folder of images")
    if cfg.with_prior_preservation:
        cls = Path(cfg.class_data_dir)
        if cls.exists() and not cls.is_dir():
            raise UserError(f"--class_data_dir {cls} is a file, not a folder")
        if not cls.exists():
            check_creatable(cls, "--class_data_dir")
    res = cfg.resume_from_checkpoint
    if res and res != "latest" and not Path(res).exists() and not (Path(cfg.output_dir) / res).exists():
        raise UserError(f"--resume_from_checkpoint {res}: no such checkpoint folder (or pass latest)")
    check_output_dir(cfg.output_dir, resume=bool(res))
    logs = Path(cfg.output_dir) / getattr(cfg, "logging_dir", "logs")
    if logs.exists() and not logs.is_dir():
        raise UserError(f"--logging_dir {logs} is a file, not a folder")
    flag_notes.resolve_counts(cfg, UserError)
