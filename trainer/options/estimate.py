"""`dbtrain estimate`: `dbtrain train`'s flags plus the model to build (--arch) and the ranks to estimate for.

No torch here. The model folder's config files are read by trainer.memory.estimate.model_configs.
"""
from __future__ import annotations

import argparse
import contextlib
import math
import sys
from dataclasses import dataclass, field

from trainer.errors import UserError
from trainer.options import checks, diffusers_flags, spec
from trainer.options.spec import flag
from trainer.options.train import TRAIN_LAYOUT, TrainOptions

ARCHES = ("sd15", "sd21", "sdxl")  # trainer/memory/arch_configs/<arch>.json


@dataclass
class EstimateOptions:
    """What to estimate: the training run's options, on which model, for which rank of how many."""

    train: TrainOptions = field(default_factory=TrainOptions)
    arch: str | None = flag(None, "a model built from the configs shipped in trainer/memory/arch_configs (instead of "
                            "--pretrained_model_name_or_path, whose config.json files are read, never its weights)",
                            metavar="|".join(ARCHES))
    json: bool = flag(False, "print one JSON object")
    world_size: int | None = flag(1, "one rank of N under torchrun (its share of the global batch; with --shard the "
                                  "rank holding the largest share of the optimizer state and gradients)", type=int,
                                  metavar="N")
    stock_recipe: bool = False  # bench memory: diffusers' own recipe (what it keeps on the GPU), not dbtrain's

    @classmethod
    def of_run(cls, train: TrainOptions) -> "EstimateOptions":
        """The estimate of a run about to train: its own model and ranks (dbtrain train's preflight)."""
        return cls(train=train, world_size=None)


def check_card(card_gb: float | None) -> None:
    """--card_gb: a positive number of GB (as cards are sold: 12 for a 12 GB card)."""
    if card_gb is not None and not (math.isfinite(card_gb) and card_gb > 0):
        raise UserError(f"--card_gb must be the card's memory in GB, a number > 0 such as 12, got {card_gb}")


def build_parser() -> argparse.ArgumentParser:
    p = spec.parser("dbtrain estimate", "Peak GPU memory of one training step of `dbtrain train` with these flags, "
                                        "computed on the CPU with fake tensors (no GPU, no weights).")
    # data does not matter here; --estimate_only is what this command always does (accepted, as train's flag)
    hidden = {"instance_data_dir", "instance_prompt", "class_prompt", "class_data_dir", "estimate_only"}
    layout = TRAIN_LAYOUT + (("estimate", ("arch", "json", "world_size")),)
    fields = {**TrainOptions.fields(), **spec.flag_fields(EstimateOptions)}
    return spec.build(p, layout, fields, helps=dict.fromkeys(hidden, argparse.SUPPRESS),
                      defaults={"instance_data_dir": "-", "instance_prompt": "a photo of [V]",
                                "class_prompt": "a photo", "class_data_dir": "-"})


def parse(argv: list[str]) -> EstimateOptions:
    p = build_parser()
    spec.config_file_defaults(p, argv)
    values = vars(p.parse_args(argv))
    opts = spec.pick(EstimateOptions, values, train=TrainOptions.from_flags(values))
    model = opts.train.model
    if opts.arch is not None and opts.arch not in ARCHES:
        raise UserError(f"--arch must be one of {', '.join(ARCHES)}, got {opts.arch!r}")
    if opts.arch and model.pretrained_model_name_or_path:
        raise UserError("give --arch or --pretrained_model_name_or_path, not both")
    check_card(opts.train.memory.card_gb)
    if opts.world_size < 1:
        raise UserError(f"--world_size must be >= 1, got {opts.world_size}")
    if opts.train.distributed.shard and opts.world_size < 2:
        raise UserError("--shard splits the optimizer state over torchrun's ranks: give --world_size N (N >= 2) "
                        "for the memory of one of them")
    if not opts.arch and not model.pretrained_model_name_or_path:
        raise UserError("give --arch sd15|sd21|sdxl or --pretrained_model_name_or_path DIR (its configs are read)")
    if not model.pretrained_model_name_or_path:
        model.pretrained_model_name_or_path = "-"
    # --diffusers_defaults changes what is estimated (the optimizer, the batch): set theirs as train does
    note = diffusers_flags.their_defaults(opts.train, "train", diffusers_flags.given_flags(p, argv))
    checks.check(opts.train)
    if note and opts.train.training.diffusers_defaults:
        diffusers_flags.say(note)
    with contextlib.redirect_stdout(sys.stderr):  # --json keeps stdout to one object
        diffusers_flags.apply(opts.train, simulated_ranks=True)  # diffusers' flags mapped as dbtrain train does
    if opts.arch is not None:
        model.pretrained_model_name_or_path = None
    return opts
