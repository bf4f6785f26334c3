"""`python -m dbkernels check`: every usable backend against the spec on this device (CPU here:
the Triton kernels under the interpreter). It must pass on a correct build and fail on a wrong
kernel."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dbkernels import check

ROOT = Path(__file__).resolve().parent.parent


def test_check_quick_passes_on_cpu(tmp_path):
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    out = tmp_path / "check.jsonl"
    proc = subprocess.run([sys.executable, "-m", "dbkernels", "check", "--quick", "--json", str(out)], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    lines = out.read_text().splitlines()
    assert len(lines) >= 40 and "FAIL" not in proc.stdout
    backends = {(r.split('"op": "')[1].split('"')[0], r.split('"backend": "')[1].split('"')[0]) for r in lines}
    if check._backend.unavailable_reason("triton", "cpu") is None:
        for op in ("attention", "diffusion_loss", "add_noise", "adamw8bit", "adamw4bit"):
            assert (op, "triton") in backends and (op, "reference") in backends, op


def test_check_fails_on_a_wrong_attention_kernel(monkeypatch, cpu_triton):
    from dbkernels.ops.attention import triton_kernels as TK

    real = TK.attention_bwd

    def wrong_bwd(*args):
        dq, dk, dv = real(*args)
        return dq, dk * 1.01, dv  # a 1% error in dK only
    monkeypatch.setattr(TK, "attention_bwd", wrong_bwd)
    results = check.check_attention(torch.device("cpu"), quick=True)
    bad = [r for r in results if not r.passed]
    assert bad and all(r.backend == "triton" for r in bad)
    assert all(r.passed for r in results if r.backend == "reference")


def test_check_fails_on_a_wrong_loss_gradient(monkeypatch, cpu_triton):
    from dbkernels.ops.diffusion_loss import triton_kernels as TK

    real = TK.loss_fwd

    def wrong(*args, **kw):
        loss, grad = real(*args, **kw)
        return loss, (None if grad is None else grad * 1.001)
    monkeypatch.setattr(TK, "loss_fwd", wrong)
    results = check.check_loss(torch.device("cpu"), quick=True)
    assert [r for r in results if not r.passed and r.op == "diffusion_loss" and r.backend == "triton"]


@pytest.mark.parametrize("name", ["AdamW8bit", "AdamW4bit"])
def test_check_reports_an_exception_as_a_failed_line(monkeypatch, name):
    from dbkernels import optim

    optimizer = getattr(optim, name)
    real = optimizer.step

    def boom(self, *a, **k):
        if check._backend.forced_backend() != "reference":
            raise RuntimeError("no kernel image is available for execution on the device")
        return real(self, *a, **k)
    monkeypatch.setattr(optimizer, "step", boom)
    results = getattr(check, f"check_{name.lower()}")(torch.device("cpu"), quick=True)
    failed = [r for r in results if not r.passed]
    assert failed and all(r.backend != "reference" and "no kernel image" in r.note for r in failed)


@pytest.mark.gpu
def test_gpu_check_quick_passes():
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.run([sys.executable, "-m", "dbkernels", "check", "--quick"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-4000:]
