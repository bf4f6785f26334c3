"""dbtrain estimate on the tiny model: the fake-tensor estimate against the same step on real CPU tensors
(tracked the same way), categories that add up, what each memory option saves, one-line errors."""
from __future__ import annotations

import json

import pytest

from tests.cli_helpers import one_line_error, run_cli
from trainer.memory import estimate
from trainer.options.estimate import parse as parse_estimate


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from trainer.world.tiny_sd import build_tiny_sd

    return build_tiny_sd(tmp_path_factory.mktemp("estimate") / "tiny")


def _cfg(tiny, *flags):
    return parse_estimate(["--pretrained_model_name_or_path", str(tiny), "--resolution", "32",
                           "--with_prior_preservation", *flags])


_runs: dict = {}


def _run(tiny, *flags, fake=True):
    """The estimate (fake) or the tracked real step, once per option set."""
    from trainer.families import load_components

    key = (str(tiny), flags, fake)
    if key not in _runs:
        _runs[key] = estimate.estimate(_cfg(tiny, *flags), load_components(tiny), fake=fake)
    return _runs[key]


def _close(a, b, rel=0.05):
    return abs(a - b) <= rel * max(a, b)


@pytest.mark.parametrize("flags", [("--optimizer", "adamw"),
                                   ("--mixed_precision", "bf16", "--gradient_checkpointing", "--train_text_encoder")])
def test_fake_step_matches_the_real_step(tiny, flags):
    fake, real = _run(tiny, *flags), _run(tiny, *flags, fake=False)
    for phase in ("forward", "backward"):
        assert _close(fake["phases"][phase]["peak_bytes"], real["phases"][phase]["peak_bytes"]), phase
    if "adamw" in flags:  # torch's fused AdamW runs the same ops on both; AdamW8bit's CPU step is not the GPU's
        assert _close(fake["tracked_peak_bytes"], real["tracked_peak_bytes"])
    assert fake["by_category"]["optimizer_state"] == real["by_category"]["optimizer_state"]


def test_categories_add_up(tiny):
    r = _run(tiny)
    for d in r["phases"].values():
        assert d["peak_bytes"] == sum(d["by_category"].values())
    assert r["tracked_peak_bytes"] == max(d["peak_bytes"] for d in r["phases"].values())
    assert r["peak_bytes"] == r["tracked_peak_bytes"] + sum(r["allowance_bytes"].values())
    assert r["fits_gib"] == [8, 12, 16, 24]
    n = r["trainable_params"]
    assert r["by_category"]["weights"] >= 4 * n  # fp32 UNet
    assert "forward" in estimate.report(r) and "predicted peak" in estimate.report(r)


def test_each_option_saves_what_it_should(tiny):
    from dbkernels.optim.quant import num_blocks
    from trainer.families import load_components

    adamw, eight = _run(tiny, "--optimizer", "adamw"), _run(tiny)
    sizes = [p.numel() for p in load_components(tiny).unet.parameters()]
    n = sum(sizes)
    # torch AdamW: two fp32 moments (8 B/param) and a step counter per tensor
    assert adamw["by_category"]["optimizer_state"] == 8 * n + 4 * len(sizes)
    # ours: 1 B per moment plus an fp32 absmax per 256 for tensors >= 4096 elements; fp32 moments below that
    want = sum(2 * s + 8 * num_blocks(s, 256) if s >= 4096 else 8 * s for s in sizes)
    assert eight["by_category"]["optimizer_state"] == want
    big = [s for s in sizes if s >= 4096]
    assert (2 * sum(big) + 8 * sum(num_blocks(s, 256) for s in big)) / sum(big) < 2.05  # ~2 B/param
    # the step in backward frees each gradient once applied: the full set is never alive
    sib = _run(tiny, "--step_in_backward")
    grads = eight["phases"]["optimizer"]["by_category"]["gradients"]
    assert grads >= 0.99 * 4 * n  # (a few parameters get no gradient in this forward)
    assert all(d["by_category"]["gradients"] <= 4 * max(sizes) for d in sib["phases"].values())
    after = {k: r["phases"]["optimizer"]["peak_bytes"] for k, r in (("8bit", eight), ("sib", sib))}
    assert after["8bit"] - after["sib"] >= 0.99 * grads
    # bf16 weights halve the weights
    bf16 = _run(tiny, "--weights_dtype", "bf16", "--mixed_precision", "bf16")
    assert bf16["by_category"]["weights"] <= 0.51 * eight["by_category"]["weights"]


def test_cli_json_and_preflight(tiny, capsys):
    code, out, err = run_cli(["estimate", "--pretrained_model_name_or_path", str(tiny), "--resolution", "32",
                              "--json"], capsys)
    assert code == 0, err
    r = json.loads(out)
    assert r["peak_bytes"] > r["tracked_peak_bytes"] > 0 and r["device"] == "estimate (fake tensors, CPU)"
    import torch

    assert estimate.preflight(_cfg(tiny), torch.device("cpu")) is None


def test_preflight_names_options_that_fit(tiny, monkeypatch):
    import torch

    cfg = _cfg(tiny, "--optimizer", "adamw")
    r = estimate.predicted_peak(cfg)
    need = r["peak_bytes"] - estimate.ALLOWANCE["cuda_context"]
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda _d=None: (need + 1, 24 << 30))
    assert estimate.preflight(cfg, torch.device("cuda")) is None
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda _d=None: (need - 1000, 24 << 30))
    line = estimate.preflight(cfg, torch.device("cuda"))
    assert line.startswith("warning:") and "--optimizer adamw8bit" in line and "\n" not in line
    assert set(estimate.log_fields(cfg)) == {"estimated_allocated_gb", "estimated_peak_gb"}


def test_world_size_and_shard(tiny, monkeypatch):
    """--world_size N: one rank's step (its rows of the global batch, a whole optimizer state and gradient set);
    with --shard the rank holding the most: its parameters' states only, other gradients dropped in backward."""
    from trainer.distributed import shard
    from trainer.families import load_components

    one, two = _run(tiny, "--optimizer", "adamw"), _run(tiny, "--optimizer", "adamw", "--world_size", "2")
    assert two["by_category"]["optimizer_state"] == one["by_category"]["optimizer_state"]
    assert two["world_size"] == 2 and "one rank of 2 under torchrun" in estimate.report(two)
    params = list(load_components(tiny).unet.parameters())
    n = sum(p.numel() for p in params)
    owner = shard.partition(params, 2)
    mine = [p.numel() for p, k in zip(params, owner) if k == 0]
    split = _run(tiny, "--optimizer", "adamw", "--world_size", "2", "--shard")
    assert split["rank"] == 0 and 0.45 * n <= sum(mine) <= 0.55 * n  # (the larger share: ties go to rank 0)
    assert split["by_category"]["optimizer_state"] == 8 * sum(mine) + 4 * len(mine)
    assert "its share of the optimizer state" in estimate.report(split)
    real = _run(tiny, "--optimizer", "adamw", "--world_size", "2", "--shard", fake=False)  # collectives left out
    assert real["by_category"]["optimizer_state"] == split["by_category"]["optimizer_state"]
    assert _close(real["tracked_peak_bytes"], split["tracked_peak_bytes"])
    # the other ranks' gradients live until their bucket is reduced: at most one bucket (here 1/8 of the model)
    from trainer.distributed import data_parallel as distributed
    from trainer.families import load_components as load

    bucket = n // 8
    monkeypatch.setattr(distributed, "BUCKET_ELEMS", bucket)
    small = estimate.estimate(_cfg(tiny, "--optimizer", "adamw", "--world_size", "2", "--shard"), load(tiny))
    big = max(p.numel() for p in params)
    assert all(d["by_category"]["gradients"] <= 4 * (sum(mine) + bucket + big) for d in small["phases"].values())
    assert max(d["by_category"]["gradients"] for d in small["phases"].values()) <= 0.85 * 4 * n
    assert one["phases"]["optimizer"]["by_category"]["gradients"] >= 0.99 * 4 * n


@pytest.mark.parametrize("argv,parts", [
    (["--arch", "sd3"], ("--arch must be one of sd15, sd21",)),
    (["--arch", "sd15", "--resolution", "500"], ("--resolution", "multiple of 8")),
    ([], ("--arch",)),
    (["--pretrained_model_name_or_path", "/nonexistent/model"], ("does not exist",)),
    (["--arch", "sd15", "--shard"], ("--shard", "--world_size N")),
    (["--arch", "sd15", "--world_size", "0"], ("--world_size must be >= 1",)),
])
def test_bad_input_one_line(argv, parts, capsys):
    import sys

    had_torch = "torch" in sys.modules
    code, _out, err = run_cli(["estimate", *argv], capsys)
    one_line_error(code, err, *parts)
    assert had_torch or "torch" not in sys.modules  # checked before torch loads


def test_lora_trains_only_the_adapters(tiny):
    full, lora = _run(tiny), _run(tiny, "--lora_rank", "4")
    assert 0 < lora["trainable_params"] < 0.2 * full["trainable_params"]
    assert lora["by_category"]["optimizer_state"] <= 8 * lora["trainable_params"] + 4096
    assert lora["tracked_peak_bytes"] < full["tracked_peak_bytes"]


def test_config_file_as_for_train(tmp_path):
    f = tmp_path / "run.toml"
    f.write_text('mixed_precision = "bf16"\ngradient_checkpointing = true\nresolution = 768\n')
    cfg = parse_estimate(["--arch", "sd21", "--config", str(f), "--resolution", "512"])
    t = cfg.train
    assert (t.memory.mixed_precision, t.memory.gradient_checkpointing, t.data.resolution) == ("bf16", True, 512)
    f.write_text("no_such_option = 1\n")
    with pytest.raises(estimate.UserError, match="unknown option"):
        parse_estimate(["--arch", "sd15", "--config", str(f)])


# ---------------------------------------------------------------- SDXL (issue 19's memory target)

@pytest.fixture(scope="module")
def tiny_xl(tmp_path_factory):
    from trainer.world.tiny_sdxl import build_tiny_sdxl

    root = tmp_path_factory.mktemp("estimate_xl")
    return {"base": build_tiny_sdxl(root / "xl"), "refiner": build_tiny_sdxl(root / "refiner", refiner=True)}


def test_sdxl_fake_step_matches_the_real_step(tiny_xl):
    """Both text encoders trained (full), torch AdamW: the fake estimate equals the real CPU step, phase by
    phase, including the pooled embeddings and time ids the SDXL UNet takes."""
    flags = ("--optimizer", "adamw", "--train_text_encoder", "--resolution", "16")
    fake, real = _run(tiny_xl["base"], *flags), _run(tiny_xl["base"], *flags, fake=False)
    for phase in ("forward", "backward", "optimizer"):
        assert _close(fake["phases"][phase]["peak_bytes"], real["phases"][phase]["peak_bytes"]), phase
    assert _close(fake["tracked_peak_bytes"], real["tracked_peak_bytes"])
    from trainer.families import load_components

    comps = load_components(tiny_xl["base"])
    n = sum(p.numel() for m in (comps.unet, comps.text_encoder, comps.text_encoder_2) for p in m.parameters())
    assert fake["trainable_params"] == fake["params"] == n  # UNet and both encoders train
    # torch AdamW: 8 B/param for those that get a gradient (not the encoders' unused last layers)
    assert fake["by_category"]["optimizer_state"] == real["by_category"]["optimizer_state"] >= 0.95 * 8 * n


def test_sdxl_lora_on_both_encoders(tiny_xl):
    flags = ("--lora_rank", "4", "--train_text_encoder", "--mixed_precision", "bf16", "--gradient_checkpointing",
             "--resolution", "16")
    fake = _run(tiny_xl["base"], *flags)  # (fake only: the real step is checked above, and slow here)
    assert 0 < fake["trainable_params"] < 0.2 * fake["params"]
    assert fake["by_category"]["gradients"] <= 4 * fake["trainable_params"]
    assert fake["by_category"]["optimizer_state"] < fake["by_category"]["weights"] // 4


def test_sdxl_arch_parses_and_refiner_refused(tiny_xl, capsys):
    cfg = parse_estimate(["--arch", "sdxl", "--resolution", "1024", "--train_text_encoder"])
    assert cfg.train.model.pretrained_model_name_or_path is None and cfg.arch == "sdxl"
    confs = estimate.model_configs(arch="sdxl")
    assert len(confs["text_encoder"]) == 2 and confs["unet"]["addition_embed_type"] == "text_time"
    assert len(estimate.model_configs(tiny_xl["base"])["text_encoder"]) == 2
    code, _out, err = run_cli(["estimate", "--pretrained_model_name_or_path", str(tiny_xl["refiner"])], capsys)
    one_line_error(code, err, "refiner")
    # the folder's configs only (no weights): the same numbers as the components loaded from it
    code, out, err = run_cli(["estimate", "--pretrained_model_name_or_path", str(tiny_xl["base"]), "--resolution",
                              "32", "--with_prior_preservation", "--json"], capsys)
    assert code == 0, err
    r = json.loads(out)
    assert r["tracked_peak_bytes"] == _run(tiny_xl["base"])["tracked_peak_bytes"] > 0


def test_run_log_puts_the_estimate_beside_the_measured_peak(tmp_path, monkeypatch):
    """On a GPU every step-log record holds the estimate next to torch.cuda.max_memory_allocated."""
    import json
    import types

    import torch

    from trainer.core import runlog

    cfg = types.SimpleNamespace(logging=types.SimpleNamespace(logging_dir="logs", report_to="none"))
    log = runlog.RunLog(tmp_path, cfg)
    log.estimate = {"estimated_allocated_gb": 4.2, "estimated_peak_gb": 5.0}
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda device=None: 4 * 2**30)
    rec = log.write(1, 0.5, (0.5, None), 1e-4, 10.0, types.SimpleNamespace(type="cuda"), 0)
    cpu = log.write(2, 0.5, (0.5, None), 1e-4, 10.0, torch.device("cpu"), 0)
    log.close()
    assert rec["peak_vram_gb"] == 4.0 and rec["estimated_allocated_gb"] == 4.2 and "estimated_peak_gb" in rec
    assert "estimated_allocated_gb" not in cpu
    lines = [json.loads(x) for x in (tmp_path / "logs" / "train_log.jsonl").read_text().splitlines()]
    assert lines[0]["estimated_peak_gb"] == 5.0
