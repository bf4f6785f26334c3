"""`dbtrain train`: DreamBooth fine-tuning (full, LoRA with --lora_rank, pivotal tuning with
--train_text_embedding) under diffusers' train_dreambooth.py flag names."""
from __future__ import annotations

from trainer.commands import quiet_libraries
from trainer.core import inputs
from trainer.options import train as train_options


def run(argv: list[str]) -> None:
    opts = train_options.parse(argv)  # flags, before torch
    inputs.check_paths(opts)
    quiet_libraries()
    train(opts)


def train(opts) -> None:
    """The training loop, with the memory estimate's preflight and log fields on a GPU."""
    from trainer.core import loop
    from trainer.memory import estimate

    loop.train(opts, preflight=estimate.preflight_of_run, log_estimate=estimate.log_fields_of_run)
