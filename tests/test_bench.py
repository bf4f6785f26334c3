"""Tests of the benchmark harness (bench/): CPU smoke run, report, the eager baseline.

The smoke run is a subprocess of `python -m bench loss --device cpu --quick`; it
writes only into a temporary directory, never into bench/results/.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench import common, report  # noqa: E402
from bench import loss_providers as bench_loss  # noqa: E402

from dbkernels.ops.diffusion_loss import reference  # noqa: E402


def _bench(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    env["TRITON_INTERPRET"] = "1"
    env["PYTHONPATH"] = str(ROOT) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return subprocess.run([sys.executable, "-m", "bench", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)


def _read_rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


# ---------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU refusal")
def test_without_gpu_the_suite_refuses_with_exit_2(tmp_path):
    proc = _bench("loss", "--out", str(tmp_path))
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "no CUDA device" in proc.stderr and "--device cpu --quick" in proc.stderr
    assert not list(tmp_path.glob("*.jsonl"))


def test_unknown_suite_is_an_error():
    proc = _bench("no-such-suite")
    assert proc.returncode == 2
    assert "unknown suite" in proc.stderr


def test_cpu_smoke_run_writes_rows_and_report(tmp_path):
    out = tmp_path / "results"
    proc = _bench("loss", "--device", "cpu", "--quick", "--out", str(out))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    rows = _read_rows(out / "diffusion_loss.jsonl")
    assert rows, proc.stdout

    for row in rows:
        missing = [f for f in common.ROW_FIELDS if f not in row]
        assert not missing, f"row lacks {missing}: {row}"
        assert row["op"] == "diffusion_loss"
        assert row["device_type"] == "cpu"
        assert row["ms_p20"] <= row["ms_p50"] <= row["ms_p80"]
        assert row["gbps"] > 0 and row["tflops"] is None
        assert row["launches"] is None and row["peak_bytes"] is None  # CUDA-only measurements
        assert isinstance(row["shape"], list) and row["dtype"] in ("bf16", "fp32")
        extras = row["extras"]
        mask_bytes = 4 * extras["numel"] // row["shape"][1] if extras["masked"] else 0  # fp32 (B, 1, H, W)
        assert extras["bytes_model"] == (7 if row["mode"] == "full" else 6) * extras["numel"] * (
            2 if row["dtype"] == "bf16" else 4) + mask_bytes
        assert extras["speedup_vs_eager"] is not None
        assert extras["num_prior"] == row["shape"][0] // 2

    eager = [r for r in rows if r["provider"] == "eager"]
    combos = {(r["mode"], r["dtype"], r["variant"]) for r in eager}
    assert len(combos) == 2 * 2 * 2 * 4, combos  # modes x dtypes x (snr 5 / none) x (l2, mask, huber, mask+huber)
    assert {r["extras"]["loss_variant"] for r in eager} == {"l2", "mask", "huber", "mask+huber"}
    assert all(r["extras"]["speedup_vs_eager"] == 1.0 for r in eager)
    assert all("grad_rel_err" in r["extras"]["check"] for r in eager if r["mode"] == "full")
    assert len({r["run_id"] for r in rows}) == 1

    # default report leaves CPU rows out
    proc = _bench("report", "--results", str(out), "--no-plots")
    assert proc.returncode == 0, proc.stderr
    text = (out / "README.md").read_text()
    assert "| provider |" not in text and "--include-cpu" in text

    proc = _bench("report", "--results", str(out), "--include-cpu")
    assert proc.returncode == 0, proc.stderr
    text = (out / "README.md").read_text()
    assert "## diffusion_loss" in text
    assert "CPU smoke rows" in text
    assert "| provider | shape | dtype | mode |" in text
    assert text.count("| eager |") == len(eager)
    # the rows themselves are untouched by the report
    assert _read_rows(out / "diffusion_loss.jsonl") == rows


# ---------------------------------------------------------------------------------
# The eager baseline computes the spec
# ---------------------------------------------------------------------------------


def _inputs(shape, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    x0 = torch.randn(shape, generator=g).to(dtype)
    noise = torch.randn(shape, generator=g).to(dtype)
    pred = torch.randn(shape, generator=g).to(dtype)
    t = torch.randint(0, 1000, (shape[0],), generator=g)
    t[0], t[-1] = 0, 999  # the ends of the schedule
    return pred, x0, noise, t


def _loss_and_grad(fn, pred):
    pred = pred.detach().clone().requires_grad_(True)
    loss = fn(pred)
    loss.backward()
    return loss.detach(), pred.grad


@pytest.mark.parametrize("num_prior", [0, 2])
@pytest.mark.parametrize("snr_gamma", [None, 5.0])
@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_eager_recipe_equals_reference_fp32(prediction_type, snr_gamma, num_prior):
    shape = (4, 4, 5, 7)
    pred, x0, noise, t = _inputs(shape, torch.float32)
    abar = bench_loss.sd_alphas_cumprod()
    sched = bench_loss.DDPMSchedule(abar)
    kw = dict(prediction_type=prediction_type, num_prior=num_prior, prior_weight=0.7, snr_gamma=snr_gamma)

    got, got_grad = _loss_and_grad(
        lambda p: bench_loss.eager_dreambooth_loss(p, x0, noise, t, sched, **kw)[0], pred)
    want, want_grad = _loss_and_grad(lambda p: reference.diffusion_loss(p, x0, noise, t, abar, **kw), pred)
    assert got.dtype == torch.float32 and got.dim() == 0
    torch.testing.assert_close(got, want, rtol=1e-5, atol=0)
    torch.testing.assert_close(got_grad, want_grad, rtol=1e-5, atol=1e-9)

    _, x_t = bench_loss.eager_dreambooth_loss(pred, x0, noise, t, sched, **kw)
    torch.testing.assert_close(x_t, reference.add_noise(x0, noise, t, abar), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("snr_gamma", [None, 5.0])
def test_eager_recipe_equals_reference_bf16(snr_gamma):
    shape = (4, 4, 8, 8)
    pred, x0, noise, t = _inputs(shape, torch.bfloat16, seed=1)
    abar = bench_loss.sd_alphas_cumprod()
    sched = bench_loss.DDPMSchedule(abar)
    kw = dict(prediction_type="epsilon", num_prior=2, prior_weight=1.0, snr_gamma=snr_gamma)
    got, got_grad = _loss_and_grad(
        lambda p: bench_loss.eager_dreambooth_loss(p, x0, noise, t, sched, **kw)[0], pred)
    want, want_grad = _loss_and_grad(lambda p: reference.diffusion_loss(p, x0, noise, t, abar, **kw), pred)
    torch.testing.assert_close(got, want, rtol=1e-3, atol=0)
    assert got_grad.dtype == torch.bfloat16
    err = (got_grad.float() - want_grad.float()).abs().max() / want_grad.float().abs().max()
    assert err <= bench_loss.TOLERANCES[torch.bfloat16][1]


def test_stock_recipe_leaves_the_prior_half_unweighted():
    """snr_weight_prior=False is upstream's behaviour: differs from the spec only there."""
    shape = (4, 4, 6, 6)
    pred, x0, noise, t = _inputs(shape, torch.float32, seed=2)
    abar = bench_loss.sd_alphas_cumprod()
    sched = bench_loss.DDPMSchedule(abar)
    kw = dict(prediction_type="epsilon", num_prior=2, prior_weight=1.0, snr_gamma=5.0)
    stock, _ = bench_loss.eager_dreambooth_loss(pred, x0, noise, t, sched, snr_weight_prior=False, **kw)
    rows_w = reference.per_sample_loss(pred, x0, noise, t, abar, snr_gamma=5.0)
    rows_plain = reference.per_sample_loss(pred, x0, noise, t, abar, snr_gamma=None)
    torch.testing.assert_close(stock, rows_w[:2].mean() + rows_plain[2:].mean(), rtol=1e-5, atol=0)

    case = bench_loss.Case("t", shape, torch.float32, 5.0)
    inp = bench_loss.Inputs(pred.requires_grad_(True), pred.detach(), x0, noise, t, abar, sched)
    truth = bench_loss.reference_truth(case, inp, "stock")
    torch.testing.assert_close(truth.loss, stock.detach(), rtol=1e-5, atol=0)


def test_eager_recipe_rejects_uneven_prior_split():
    pred, x0, noise, t = _inputs((4, 4, 4, 4), torch.float32)
    sched = bench_loss.DDPMSchedule(bench_loss.sd_alphas_cumprod())
    with pytest.raises(ValueError, match="num_prior"):
        bench_loss.eager_dreambooth_loss(pred, x0, noise, t, sched, num_prior=1)


def test_check_provider_catches_a_wrong_loss():
    case = bench_loss.Case("tiny", (2, 4, 8, 8), torch.float32, 5.0)
    inp = bench_loss.make_inputs(case, torch.device("cpu"))
    truth = bench_loss.reference_truth(case, inp)
    good = bench_loss._eager_make(True)(case, inp)
    errs = bench_loss.check_provider(good, case, inp, truth, "full")
    assert errs["loss_rel_err"] <= 1e-5 and errs["grad_rel_err"] <= 1e-5

    def wrong(pred):
        loss, x_t = good(pred)
        return loss * 1.001, x_t
    with pytest.raises(AssertionError, match="loss_rel_err"):
        bench_loss.check_provider(wrong, case, inp, truth, "fwd")


def test_sd_schedule_values():
    abar = bench_loss.sd_alphas_cumprod()
    assert abar.shape == (1000,) and abar.dtype == torch.float32
    assert abs(abar[0].item() - (1 - 0.00085)) < 1e-7
    assert abs(abar[-1].item() - 0.00466) < 2e-5  # SD 1.x final alpha-bar


# ---------------------------------------------------------------------------------
# Common pieces and the report
# ---------------------------------------------------------------------------------


@pytest.mark.parametrize("name,peak", [
    ("NVIDIA GeForce RTX 3090", "RTX 3090"),
    ("NVIDIA GeForce RTX 3090 Ti", None),
    ("NVIDIA A100-SXM4-80GB", "A100 80GB"),
    ("NVIDIA A100 80GB PCIe", "A100 80GB"),
    ("NVIDIA A100-SXM4-40GB", None),
    ("NVIDIA H100 80GB HBM3", "H100 SXM"),
    ("NVIDIA H100 PCIe", "H100 PCIe"),
    ("NVIDIA H200", "H200"),
    ("NVIDIA L4", None),
    ("CPU (x86_64)", None),
])
def test_device_peak_matching(name, peak):
    got = common.device_peak(name)
    assert (got.name if got else None) == peak


def test_quantiles_interpolate():
    assert common.quantiles([4.0, 1.0, 3.0, 2.0, 5.0]) == [1.8, 3.0, 4.2]
    assert common.quantiles([2.0]) == [2.0, 2.0, 2.0]


def _row(provider, ts, ms, device="NVIDIA H100 80GB HBM3", device_type="cuda", sha="abc1234"):
    env = {"device": device, "device_type": device_type, "torch": "2.x", "triton": "3.x", "cuda": "12.x",
           "git_sha": sha, "run_id": "r"}
    row = common.make_row(op="diffusion_loss", provider=provider, shape=(2, 4, 64, 64), dtype=torch.bfloat16,
                          mode="full", ms=(ms * 0.9, ms, ms * 1.1), env=env, variant="v",
                          bytes_moved=7 * 32768 * 2, extras={"speedup_vs_eager": 1.0})
    row["timestamp"] = ts
    return row


def test_make_row_derives_bandwidth_and_peak_fraction():
    row = _row("eager", "2026-01-01T00:00:00+00:00", 0.001)
    assert row["gbps"] == pytest.approx(7 * 32768 * 2 / 1e-6 / 1e9)
    assert row["frac_peak_bw"] == pytest.approx(row["gbps"] / 3350.0)
    assert set(common.ROW_FIELDS) <= set(row)


def test_report_keeps_newest_row_and_groups_by_device_and_sha(tmp_path):
    rows = [
        _row("eager", "2026-01-01T00:00:00+00:00", 1.0),
        _row("eager", "2026-01-02T00:00:00+00:00", 2.0),          # newer: shown
        _row("eager", "2026-01-03T00:00:00+00:00", 3.0, sha="def5678"),
        _row("eager", "2026-01-04T00:00:00+00:00", 4.0, device="CPU (x86_64)", device_type="cpu"),
    ]
    (tmp_path / "diffusion_loss.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows) + "not json\n")
    assert report.main(["--results", str(tmp_path), "--no-plots"]) == 0
    text = (tmp_path / "README.md").read_text()
    assert "### NVIDIA H100 80GB HBM3 - git abc1234" in text
    assert "### NVIDIA H100 80GB HBM3 - git def5678" in text
    assert text.index("git def5678") < text.index("git abc1234")  # newest group first
    assert "2.0000 (" in text and "1.0000 (" not in text
    assert "CPU (x86_64)" not in text and "1 CPU smoke row(s) left out" in text
    assert "Unreadable lines" in text

    assert report.main(["--results", str(tmp_path), "--no-plots", "--include-cpu"]) == 0
    text = (tmp_path / "README.md").read_text()
    assert "### CPU smoke rows (not performance data) - CPU (x86_64)" in text


def test_cpu_rows_default_to_the_ignored_smoke_dir(tmp_path, monkeypatch, capsys):
    from bench.__main__ import main

    monkeypatch.setattr(common, "DEFAULT_CPU_RESULTS", tmp_path / "cpu-smoke")
    code = main(["loss", "--device", "cpu", "--quick", "--dtype", "fp32", "--modes", "fwd", "--snr-gamma", "none",
                 "--providers", "eager", "--losses", "l2"])
    assert code == 0, capsys.readouterr().out
    rows = _read_rows(tmp_path / "cpu-smoke" / "diffusion_loss.jsonl")
    assert [(r["provider"], r["mode"], r["dtype"]) for r in rows] == [("eager", "fwd", "fp32")]
    assert "eager" in capsys.readouterr().out  # the summary table


def test_launch_count_keeps_only_device_work():
    from types import SimpleNamespace as E

    cuda, cpu = torch.autograd.DeviceType.CUDA, torch.autograd.DeviceType.CPU
    events = [E(device_type=cuda, activity_type="kernel", name="k"),
              E(device_type=cuda, activity_type="gpu_memset", name="Memset (Device)"),
              E(device_type=cuda, activity_type="gpu_memcpy", name="Memcpy DtoD"),
              E(device_type=cuda, activity_type="gpu_user_annotation", name="CompiledFunction"),
              E(device_type=cuda, activity_type="cuda_sync", name="Context Sync"),
              E(device_type=cpu, activity_type="cuda_runtime", name="cudaLaunchKernel"),
              E(device_type=cpu, activity_type="cpu_op", name="aten::add")]
    assert sum(common._is_device_work(e) for e in events) == 3


def test_train_suite_cpu_smoke(tmp_path):
    """bench train runs our real train_step and the stock recipe (tiny architecture on CPU)."""
    proc = _bench("train", "--device", "cpu", "--quick", "--settings", "ours-fast,ours-lowmem,stock-fast",
                  "--text-encoder", "on", "--steps", "1", "--out", str(tmp_path), timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = _read_rows(tmp_path / "train.jsonl")
    assert {r["provider"] for r in rows} == {"ours-fast", "ours-lowmem", "stock-fast"}
    assert all(r["mode"] == "train_te" and r["ms_p50"] > 0 for r in rows)


def test_train_suite_lora_and_sdxl_cpu_smoke(tmp_path):
    """bench train's LoRA settings (ours and diffusers' train_dreambooth_lora[_sdxl] step) on the tiny SDXL."""
    proc = _bench("train", "--device", "cpu", "--quick", "--arch", "sdxl", "--settings", "ours-lora,stock-lora",
                  "--text-encoder", "on", "--steps", "1", "--out", str(tmp_path), timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = _read_rows(tmp_path / "train.jsonl")
    assert {r["provider"] for r in rows} == {"ours-lora", "stock-lora"}
    assert all(r["extras"]["arch"] == "sdxl" and r["extras"]["lora_rank"] == 4 for r in rows)
