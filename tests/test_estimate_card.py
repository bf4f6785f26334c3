"""What would fit my card? `dbtrain estimate --card_gb N` and `dbtrain train --estimate_only` (issue 34, item 5):
for a run that does not fit, the flags that make it fit in order, each with the predicted peak of the run so far,
every number the real estimate of that run (fake tensors on the CPU, tiny model and --arch sd15)."""
from __future__ import annotations

import json

import pytest

from tests.cli_helpers import one_line_error, run_cli
from trainer.memory import estimate
from trainer.options.estimate import parse as parse_estimate

GIB = 1 << 30


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from trainer.world.tiny_sd import build_tiny_sd

    return build_tiny_sd(tmp_path_factory.mktemp("card") / "tiny")


def _flags(tiny, *more):
    return ["--pretrained_model_name_or_path", str(tiny), "--resolution", "32", "--with_prior_preservation",
            "--optimizer", "adamw", *more]


def _peak(tiny, *flags) -> int:
    """The predicted peak of the run with these flags, estimated on its own (not by the plan)."""
    return estimate.estimate(parse_estimate(_flags(tiny, *flags)))["peak_bytes"]


def _as_flags(step: str) -> list[str]:
    return step.split()


def test_plan_names_the_flags_that_fit_and_each_peak_is_the_real_estimate(tiny, capsys):
    every = ["--gradient_checkpointing", "--mixed_precision", "bf16", "--optimizer", "adamw8bit", "--step_in_backward",
             "--weights_dtype", "bf16"]
    base, least = _peak(tiny), _peak(tiny, *every)
    assert least < base
    card = (least + 1) / GIB  # only the same-training options together fit
    code, out, err = run_cli(["estimate", *_flags(tiny), "--card_gb", repr(card), "--json"], capsys)
    assert code == 0, err
    r = json.loads(out)
    assert r["peak_bytes"] == base and r["card_gb"] == card and r["fits_card"] is False
    assert r["margin_bytes"] == int(card * GIB) - base < 0
    plan = r["plan"]
    assert plan["fits"] and plan["steps"] and "alternative" not in plan  # the same training fits: no LoRA needed
    added: list[str] = []
    for k, step in enumerate(plan["steps"]):
        added += _as_flags(step["flag"])
        assert step["peak_bytes"] == _peak(tiny, *added), step  # the estimate of the run with the flags so far
        assert (step["peak_bytes"] <= card * GIB) == (k == len(plan["steps"]) - 1)  # stops at the first fit
    assert all(not f.startswith("without") and "batch" not in f for f in plan["flags"])
    text = estimate.report(r)
    assert f"does not fit the {card:.3g} GB card" in text and "add in this order" in text
    assert "so: " + " ".join(plan["flags"]) in text


def test_nothing_fits_says_so_with_the_smallest_peak_and_the_last_resorts(tiny, capsys):
    """The same training, then a smaller batch, then (the last resort, said so) the text encoder frozen; LoRA
    as the alternative; none fits a card smaller than what the GPU needs besides the step."""
    run = ("--train_text_encoder", "--train_batch_size", "2")
    code, out, err = run_cli(["estimate", *_flags(tiny, *run), "--card_gb", "0.5", "--json"], capsys)
    assert code == 0, err
    r = json.loads(out)
    plan = r["plan"]
    assert plan["fits"] is False and plan["flags"][-2:] == ["--train_batch_size 1", "without --train_text_encoder"]
    assert "last resort" in plan["steps"][-1]["cost"]
    alt = plan["alternative"]
    assert alt["flags"][0] == "--lora_rank 16" and alt["fits"] is False
    peaks = [s["peak_bytes"] for s in plan["steps"] + alt["steps"]] + [r["peak_bytes"]]
    assert plan["smallest_peak_bytes"] == min(peaks)
    assert _peak(tiny, *run, "--lora_rank", "16") == alt["steps"][0]["peak_bytes"]
    text = estimate.report(r)
    assert "nothing dbtrain has makes it fit the 0.5 GB card" in text
    assert f"the smallest predicted peak is {plan['smallest_peak_bytes'] / GIB:.2f} GiB" in text


def test_a_run_that_fits_says_so_with_the_margin(tiny, capsys):
    code, out, err = run_cli(["estimate", *_flags(tiny), "--card_gb", "12"], capsys)
    assert code == 0, err
    assert "GB card, " in out and "fits the 12 GB card" in out and "GiB to spare" in out
    assert "add in this order" not in out
    code, out, _ = run_cli(["estimate", *_flags(tiny), "--json"], capsys)  # no card: the common sizes, no plan
    r = json.loads(out)
    assert r["card_gb"] is None and "plan" not in r and r["fits_gib"] == [8, 12, 16, 24]


def test_sd15_on_an_8_gb_card(capsys):
    """SD1.5 at 512 (dbtrain's defaults: AdamW8bit, fp32) needs more than 8 GiB; the plan fits it."""
    code, out, err = run_cli(["estimate", "--arch", "sd15", "--card_gb", "8", "--json"], capsys)
    assert code == 0, err
    r = json.loads(out)
    assert r["fits_card"] is False and r["plan"]["fits"]
    last = r["plan"]["steps"][-1]
    assert last["peak_bytes"] <= 8 * GIB < r["peak_bytes"]
    assert set(r["plan"]["flags"]) <= {lv.flag for lv in estimate.SAME_TRAINING}


def test_train_estimate_only_prints_the_report_and_writes_nothing(tiny, tmp_path, monkeypatch, capsys):
    from PIL import Image

    import trainer.families as families
    from trainer.core import loop

    photos = tmp_path / "photos"
    photos.mkdir()
    Image.new("RGB", (32, 32), (200, 40, 40)).save(photos / "a.png")
    out = tmp_path / "run"
    monkeypatch.setattr(loop, "train", lambda *a, **k: pytest.fail("--estimate_only trained"))
    monkeypatch.setattr(families, "load_components", lambda *a, **k: pytest.fail("--estimate_only loaded weights"))
    argv = ["train", "--pretrained_model_name_or_path", str(tiny), "--instance_data_dir", str(photos),
            "--instance_prompt", "a [V] dog", "--output_dir", str(out), "--resolution", "32", "--optimizer", "adamw",
            "--with_prior_preservation", "--class_prompt", "a dog", "--class_data_dir", str(tmp_path / "class"),
            "--estimate_only"]
    code, text, err = run_cli(argv, capsys)
    assert code == 0, err
    assert "predicted peak" in text and "fits a 8 GB card" in text  # no card, no GPU: the common sizes
    code, text, err = run_cli(argv + ["--card_gb", "0.5"], capsys)
    assert code == 0, err
    assert "does not fit the 0.5 GB card" in text and "nothing dbtrain has makes it fit" in text
    monkeypatch.setattr(estimate, "gpu_card_gb", lambda train: 24.0)  # on a GPU: its memory
    code, text, err = run_cli(argv, capsys)
    assert code == 0 and "fits the 24 GB card" in text
    assert not out.exists() and not (tmp_path / "class").exists()


def test_gpu_card_gb_is_the_cards_memory(monkeypatch):
    import types

    import torch

    from trainer.options.train import TrainOptions

    train = TrainOptions()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda d: types.SimpleNamespace(total_memory=12 * GIB))
    assert estimate.gpu_card_gb(train) == 12.0
    train.distributed.device = "cpu"
    assert estimate.gpu_card_gb(train) is None


@pytest.mark.parametrize("argv", [["estimate", "--arch", "sd15", "--card_gb", "0"],
                                  ["estimate", "--arch", "sd15", "--card_gb", "nan"],
                                  ["train", "--pretrained_model_name_or_path", "x", "--instance_data_dir", "x",
                                   "--instance_prompt", "a [V] dog", "--estimate_only", "--card_gb", "-12"]])
def test_bad_card_one_line(argv, capsys):
    code, _out, err = run_cli(argv, capsys)
    one_line_error(code, err, "--card_gb", "such as 12")


def test_estimate_help_hides_estimate_only(capsys):
    with pytest.raises(SystemExit):
        run_cli(["estimate", "--help"], capsys)
    out = capsys.readouterr().out
    assert "--card_gb" in out and "--estimate_only" not in out
    assert parse_estimate(["--arch", "sd15", "--estimate_only"]).arch == "sd15"  # accepted, as train's flag
