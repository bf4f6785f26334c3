"""`dbtrain train`: DreamBooth fine-tuning (full, LoRA with --lora_rank, pivotal tuning with
--train_text_embedding) under diffusers' train_dreambooth.py flag names."""
from __future__ import annotations

from trainer.commands import quiet_libraries
from trainer.core import inputs
from trainer.options import train as train_options
from trainer.options.estimate import check_card


def run(argv: list[str]) -> None:
    opts = train_options.parse(argv)  # flags, before torch
    check_card(opts.memory.card_gb)
    inputs.check_paths(opts)  # reads, never writes: --estimate_only too names a bad folder in one line
    quiet_libraries()
    if opts.memory.estimate_only:
        return estimate_only(opts)
    train(opts)


def train(opts) -> None:
    """The training loop, with the memory estimate's preflight and log fields on a GPU."""
    from trainer.core import loop
    from trainer.memory import estimate

    loop.train(opts, preflight=estimate.preflight_of_run, log_estimate=estimate.log_fields_of_run)


def estimate_only(opts) -> None:
    """--estimate_only: `dbtrain estimate`'s report for this run (its model folder's configs, never its weights),
    fitted to --card_gb, else to this machine's GPU, else to the common card sizes; nothing is written."""
    from trainer.memory import estimate
    from trainer.options.estimate import EstimateOptions

    estimate.model_configs(opts.model.pretrained_model_name_or_path)  # its configs, before the step runs
    estimate.run(EstimateOptions.of_run(opts), card_gb=opts.memory.card_gb or estimate.gpu_card_gb(opts))
