"""`dbtrain textual-inversion`: a new word for a concept, the model frozen, under diffusers'
textual_inversion.py flag names (the same training loop as `dbtrain train`)."""
from __future__ import annotations

from trainer.commands import quiet_libraries
from trainer.commands.train import train
from trainer.core import inputs
from trainer.options import textual_inversion


def run(argv: list[str]) -> None:
    opts = textual_inversion.parse(argv)  # flags, before torch
    inputs.check_paths(opts)
    quiet_libraries()
    train(opts)
