"""`dbtrain eval`: the paper's metrics (DINO, CLIP-I, CLIP-T, PRES, DIV) and PLACE of a model, on images it
generates now (trainer.world.evaluate)."""
from __future__ import annotations

from trainer.commands import quiet_libraries
from trainer.options.sampling import parse_eval


def run(argv: list[str]) -> dict:
    opts = parse_eval(argv)  # flags, before torch
    quiet_libraries()
    from trainer.world import evaluate

    evaluate.check(opts)
    return evaluate.run(opts)
