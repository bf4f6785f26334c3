"""`dbtrain estimate`: the peak GPU memory of one training step, computed on the CPU (trainer.memory)."""
from __future__ import annotations

from trainer.commands import quiet_libraries
from trainer.memory import estimate
from trainer.options.estimate import parse


def run(argv: list[str]) -> dict:
    opts = parse(argv)  # flags, before torch
    if opts.arch is None:
        estimate.model_configs(opts.train.model.pretrained_model_name_or_path)  # the folder and its configs
    quiet_libraries()
    return estimate.run(opts)
