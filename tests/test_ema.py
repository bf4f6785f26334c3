"""--use_ema on the tiny model: the exported model (and the validation images) are the average of the trained weights
computed by hand from the weights after each step, --save_raw_weights writes the trained weights to raw/, a resumed
run's average is bitwise the uninterrupted one's, LoRA adapters with a bf16 average and the step inside backward, the
schedule against diffusers' EMAModel, the memory estimate, and bad input in one line."""
from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from safetensors.torch import load_file

from cli_helpers import one_line_error, run_cli
from test_trainer import make_images
from trainer.core import ema as ema_mod
from trainer.core import loop
from trainer.options import train as config
from trainer.world.tiny_sd import build_tiny_sd

UNET_FILE = "unet/diffusion_pytorch_model.safetensors"
LORA_FILE = "pytorch_lora_weights.safetensors"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("ema")
    return build_tiny_sd(root / "tiny-sd"), make_images(root / "inst")


def _args(tiny, out, *extra, steps=4):
    model, inst = tiny
    return ["--pretrained_model_name_or_path", str(model), "--instance_data_dir", str(inst),
            "--instance_prompt", "a photo of [V] toy", "--output_dir", str(out), "--resolution", "32",
            "--max_train_steps", str(steps), "--learning_rate", "2e-3", "--optimizer", "adamw", "--log_every", "100",
            "--seed", "3", "--device", "cpu", "--kernels", "off", "--use_ema", *extra]


def _train(argv, skip_at=None):
    """Train in this process; (the trained tensors after each step, with their names and whether the step was taken;
    the trained tensors at each validation)."""
    steps, validated = [], []
    real_step = loop.train_step

    def step(run, k):
        res = real_step(run, k)
        if k == skip_at:  # as if the step had been skipped: the average must not take it
            res = dataclasses.replace(res, stepped=False)
        names = [n for n, p in run.unet.named_parameters() if p.requires_grad]
        steps.append(([p.detach().clone() for p in run.params], names, res.stepped))
        return res

    def validate(run, prompt, folder, name):
        validated.append([p.detach().clone() for p in run.params])
        return folder / f"{name}.png"

    mp = pytest.MonkeyPatch()
    mp.setattr(loop, "train_step", step)
    mp.setattr(loop.validation, "validate", validate)
    try:
        loop.train(config.parse(argv))
    finally:
        mp.undo()
    return steps, validated


def _by_hand(steps, decay=0.9999):
    """diffusers' EMAModel in float64: update n uses 0 at n = 0, then min(decay, (1 + n) / (10 + n))."""
    avg, n, after = None, 0, []
    for params, _, stepped in steps:
        if stepped:
            d = 0.0 if n == 0 else min(decay, (1 + n) / (10 + n))
            avg = [p.double() for p in params] if avg is None else [d * a + (1 - d) * p.double()
                                                                   for a, p in zip(avg, params)]
            n += 1
        after.append(avg)
    return after


@pytest.fixture(scope="module")
def full_run(tiny, tmp_path_factory):
    out = tmp_path_factory.mktemp("full") / "out"
    steps, validated = _train(_args(tiny, out, "--save_raw_weights", "--checkpointing_steps", "2",
                                    "--validation_prompt", "a photo of [V] toy", "--validation_steps", "2"))
    return out, steps, validated


def _max_rel_error(got: list, want: list) -> float:
    got = torch.cat([g.reshape(-1).double() for g in got])
    want = torch.cat([w.reshape(-1) for w in want])
    return float((got - want).abs().max() / want.abs().max())


def test_export_is_the_average_and_raw_the_trained_weights(full_run):
    out, steps, validated = full_run
    params, names, _ = steps[-1]
    by_hand = _by_hand(steps)
    exported, raw = load_file(out / UNET_FILE), load_file(out / "raw" / UNET_FILE)
    assert _max_rel_error([exported[n] for n in names], by_hand[-1]) < 1e-6
    assert all(torch.equal(raw[n], p) for n, p in zip(names, params))  # the trained weights themselves
    assert sum(not torch.equal(exported[n], p) for n, p in zip(names, params)) > len(names) // 2
    assert _max_rel_error(params, by_hand[-1]) > 1e-4  # (so the first check tells the two apart)
    assert (out / "raw" / "model_index.json").is_file() and (out / "raw" / "dreambooth.json").is_file()
    # validation at steps 2 and 4 drew the average; the trained weights were put back after each
    assert len(validated) == 2
    assert _max_rel_error(validated[0], by_hand[1]) < 1e-6 and _max_rel_error(validated[1], by_hand[-1]) < 1e-6
    ckpt = load_file(out / "checkpoint-4" / ema_mod.FOLDER / ema_mod.FILE)
    assert all(torch.equal(ckpt[f"{i:05d}"], exported[n]) for i, n in enumerate(names))


def test_resume_continues_the_average_bitwise(tiny, full_run, tmp_path):
    out, _, _ = full_run
    resumed = tmp_path / "resumed"  # steps 3 and 4 again, from checkpoint-2 of the 4-step run
    _train(_args(tiny, resumed, "--checkpointing_steps", "2", "--resume_from_checkpoint", str(out / "checkpoint-2")))
    for f in (UNET_FILE, f"checkpoint-4/{ema_mod.FOLDER}/{ema_mod.FILE}"):
        a, b = load_file(out / f), load_file(resumed / f)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), f


def test_lora_bf16_average_step_in_backward_and_a_skipped_step(tiny, tmp_path):
    """LoRA adapters, a bf16 average (stochastic rounding: the same update as dbkernels' on the recorded weights),
    AdamW8bit's step inside backward; the step reported skipped is left out of the average."""
    import dbkernels

    out = tmp_path / "lora"
    steps, _ = _train(_args(tiny, out, "--lora_rank", "2", "--ema_dtype", "bf16", "--optimizer", "adamw8bit",
                            "--step_in_backward", "--save_raw_weights", steps=3), skip_at=1)
    averages, n = None, 0
    for params, _, stepped in steps:
        if stepped:
            if averages is None:
                averages = [p.to(torch.bfloat16) for p in params]
            dbkernels.ema_update_(averages, params, ema_mod.warmup_decay(n, 0.9999), step=n)
            n += 1
    assert n == 2
    exported, raw = load_file(out / LORA_FILE), load_file(out / "raw" / LORA_FILE)
    names = [n.replace(".default", "") for n in steps[-1][1]]
    for name, avg, p in zip(names, averages, steps[-1][0]):
        assert torch.equal(exported[f"unet.{name}"], avg.float()), name
        assert torch.equal(raw[f"unet.{name}"], p), name
    assert any(not torch.equal(exported[f"unet.{n}"], raw[f"unet.{n}"]) for n in names)
    rec = json.loads((out / "raw" / "dreambooth.json").read_text())
    assert rec["lora"] == LORA_FILE


def test_schedule_and_update_equal_diffusers_ema_model():
    from diffusers.training_utils import EMAModel

    g = torch.Generator().manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(n, generator=g)) for n in (5, 300)]
    ours = ema_mod.Ema(params, decay=0.99, device=torch.device("cpu"), dtype=torch.float32)
    theirs = EMAModel(params, decay=0.99)
    for _ in range(30):
        with torch.no_grad():
            for p in params:
                p.add_(0.1 * torch.randn(p.shape, generator=g))
        ours.update()
        theirs.step(params)
    for a, b in zip(ours.averages, theirs.shadow_params):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
    assert ours.decay_at(29) == theirs.cur_decay_value


def test_memory_estimate_counts_the_average(tiny):
    from trainer.families import load_components
    from trainer.memory import estimate, fake_step
    from trainer.options.estimate import parse

    model, _ = tiny

    def opts(*flags):
        return parse(["--pretrained_model_name_or_path", str(model), "--resolution", "32", "--lora_rank", "4", *flags])

    plain, with_ema = (estimate.estimate(opts(*f), load_components(model)) for f in ((), ("--use_ema",)))
    n = plain["trainable_params"]
    assert "ema" not in plain["by_category"] and with_ema["by_category"]["ema"] == 4 * n
    assert with_ema["tracked_peak_bytes"] == plain["tracked_peak_bytes"] + 4 * n
    params = [torch.zeros(n)]
    assert fake_step.ema_sizes(opts("--use_ema", "--ema_dtype", "bf16").train, params) == [2 * n]
    assert fake_step.ema_sizes(opts("--use_ema", "--ema_device", "cpu").train, params) == []
    assert ("--ema_device cpu", 4 * n) in estimate.savings(with_ema, opts("--use_ema").train)
    assert "--ema_device cpu" in [lv.flag for lv in estimate.SAME_TRAINING if lv.applies(opts("--use_ema").train)]


def test_bad_ema_input_gets_one_line(tiny, full_run, tmp_path, capsys):
    base = _args(tiny, tmp_path / "o")
    without_ema = [a for a in base if a != "--use_ema"]
    for argv, flag in ((base + ["--ema_decay", "1"], "--ema_decay"),
                       (without_ema + ["--save_raw_weights"], "--save_raw_weights needs --use_ema"),
                       (base + ["--ema_device", "cuda"], "--ema_device cuda")):
        code, _, err = run_cli(["train", *argv], capsys)
        one_line_error(code, err, flag)
    out, _, _ = full_run  # a run with an average cannot continue without one (or with another dtype)
    for argv, flag in ((without_ema, "--use_ema"), (base + ["--ema_dtype", "bf16"], "--ema_dtype")):
        code, _, err = run_cli(["train", *argv, "--resume_from_checkpoint", str(out / "checkpoint-2")], capsys)
        one_line_error(code, err, "cannot resume", flag)
