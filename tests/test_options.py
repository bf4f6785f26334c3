"""Typed options: every field is one flag, defined once; the parsed flags come back as the same values; what a
run records holds every option."""
from __future__ import annotations

import dataclasses

from trainer.options.estimate import build_parser as estimate_parser
from trainer.options.textual_inversion import TI_LAYOUT, build_ti_parser
from trainer.options.train import TI_ONLY, TRAIN_LAYOUT, TrainOptions, build_parser, parse

BASE = ["--pretrained_model_name_or_path", "m", "--instance_data_dir", "d", "--instance_prompt", "a [V] dog"]


def test_every_field_is_a_flag_of_train_or_textual_inversion_once():
    fields = set(TrainOptions.fields())
    train = [n for _, names in TRAIN_LAYOUT for n in names]
    ti = [n for _, names in TI_LAYOUT for n in names]
    assert len(train) == len(set(train)) and len(ti) == len(set(ti))  # none twice in a --help
    assert set(train) | set(ti) == fields  # none without a flag
    assert set(ti) - set(train) == set(TI_ONLY)
    dests = {a.dest for a in build_parser()._actions} - {"help"}
    assert dests == set(train)
    assert {a.dest for a in build_ti_parser()._actions} - {"help"} == set(ti)
    assert {a.dest for a in estimate_parser()._actions} >= dests  # estimate takes every train flag


def test_parsed_flags_land_in_their_concern():
    opts = parse(BASE + ["--learning_rate", "3e-5", "--rank", "8", "--gradient_checkpointing", "--seed", "7",
                         "--num_class_images", "12", "--device", "cpu", "--kernels", "off"])
    assert (opts.optim.learning_rate, opts.lora.lora_rank, opts.memory.gradient_checkpointing) == (3e-5, 8, True)
    assert (opts.training.seed, opts.prior.num_class_images, opts.distributed.device) == (7, 12, "cpu")
    assert opts.training.kernels is False and opts.uses_lora and opts.trains_unet
    defaults = TrainOptions()
    assert defaults.optim.learning_rate == 5e-6 and defaults.lora.lora_rank is None and defaults.training.kernels


def test_the_record_holds_every_option_flat():
    """What checkpoints and the run's marker record: one key per field, by its flag name."""
    opts = parse(BASE)
    rec = opts.to_dict()
    assert set(rec) == set(TrainOptions.fields()) | {"method", "prompt_templates"}
    assert rec["instance_prompt"] == "a [V] dog" and rec["method"] == "dreambooth"
    assert all(not dataclasses.is_dataclass(v) for v in rec.values())
