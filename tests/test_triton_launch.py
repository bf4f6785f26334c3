"""The Triton launch point (dbkernels/_triton.py) and the interpreter switch (dbkernels/_backend.py).

* every Triton launch of the library goes through `_triton.launch`, which runs it on the
  tensors' device (Triton launches on the *current* device otherwise);
* device queries (shared memory, architecture) ask the tensors' device;
* `import dbkernels` on a machine without a GPU turns the interpreter on in-process only:
  nothing is written to os.environ, so a child process that has a GPU compiles;
* out-of-range timesteps with validate=False give NaN on every backend (never an
  out-of-bounds read).
"""
from __future__ import annotations

import contextlib
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import dbkernels
from dbkernels import _backend, _triton

ROOT = Path(__file__).resolve().parent.parent


def _direct_launches(sources: dict[str, str]) -> list[str]:
    """`kernel[grid](...)` of a @triton.jit / autotuned kernel anywhere in `sources` (path -> text)."""
    names = set()
    for src in sources.values():
        names |= set(re.findall(r"@triton\.jit[^\n]*\ndef (\w+)", src))
        names |= set(re.findall(r"^(\w+) = (?:_tuned|triton\.autotune)\(", src, re.M))
    found = []
    for path, src in sources.items():
        for name in names:
            found += [f"{path}: {name}[...](" for _ in re.finditer(rf"\b{name}\[[^\]]*\]\(", src)]
    return found


def test_every_triton_launch_goes_through_the_launch_point():
    """A `kernel[grid](...)` anywhere else would skip the device guard and the AOT compile."""
    sources = {str(p.relative_to(ROOT)): p.read_text() for p in (ROOT / "dbkernels").rglob("*.py")
               if p.name != "_triton.py"}
    assert len([s for s in sources.values() if "@triton.jit" in s]) >= 3
    assert _direct_launches(sources) == []
    bad = dict(sources)
    bad["x.py"] = "@triton.jit\ndef _k(x):\n    pass\n\n_k[(1,)](t)\n"
    assert _direct_launches(bad) == ["x.py: _k[...]("]  # the check can fail


def test_launch_runs_on_the_tensors_device(monkeypatch):
    entered = []

    @contextlib.contextmanager
    def fake_device(dev):
        entered.append(torch.device(dev))
        yield

    class FakeKernel:
        device_caches = {}
        launched = []

        def __getitem__(self, grid):
            return lambda *a, **k: self.launched.append((grid, a, k))

    monkeypatch.setattr(torch.cuda, "device", fake_device)
    k = FakeKernel()
    _triton.launch(k, (3, 1), torch.device("cuda", 1), "arg", BLOCK=4)
    assert entered == [torch.device("cuda", 1)]
    assert k.launched == [((3, 1), ("arg",), {"BLOCK": 4})]
    _triton.launch(k, (1,), torch.device("cpu"), "x")  # CPU (interpreter): no CUDA guard
    assert entered == [torch.device("cuda", 1)]


def test_device_caps_ask_the_given_device(monkeypatch):
    asked = []

    class Props:
        major, minor, shared_memory_per_block_optin = 9, 0, 232448

    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda dev: asked.append(dev) or Props())
    caps = _triton.device_caps(torch.device("cuda", 1))
    assert asked == [torch.device("cuda", 1)]
    assert caps.arch == 90 and caps.smem_optin == 232448 and caps.hopper_or_newer
    assert _triton.device_caps(torch.device("cpu")).arch == 86
    with _triton.aot_mode(_triton.AotState(caps=_triton.DeviceCaps(90, 227 * 1024))):
        assert _triton.device_caps(torch.device("cuda", 0)).arch == 90  # the AOT target, not a device


def test_attention_prune_uses_the_tensors_device_and_the_curated_sets():
    from dbkernels.ops.attention import curated_configs
    from dbkernels.ops.attention import triton_kernels as TK

    q = torch.empty(1, 1, 8, 40)
    prune = TK._fwd_tuned.early_config_prune
    table = curated_configs._table()
    for arch, smem in ((86, 99 * 1024), (90, 227 * 1024)):
        with _triton.aot_mode(_triton.AotState(caps=_triton.DeviceCaps(arch, smem))):
            got = prune(TK._fwd_tuned.configs, {"Q": q, "D": 40}, PREC="tf32")
            model = None
            with _triton.aot_mode(_triton.AotState(caps=_triton.DeviceCaps(arch, smem), selection="model")):
                model = prune(TK._fwd_tuned.configs, {"Q": q, "D": 40}, PREC="tf32")
            uncurated = prune(TK._fwd_tuned.configs, {"Q": q, "D": 48}, PREC="tf32")  # no curated set for 48
        assert all(TK._fwd_smem(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], TK._width(c.kwargs), c.num_stages, 2,
                                arch >= 90) * 1.1 <= smem for c in model)
        assert uncurated and {(c.kwargs["BLOCK_D0"], c.kwargs["BLOCK_D1"], c.kwargs["HAS_HI"]) for c in uncurated} \
            <= set(TK.head_layouts(48))
        if table:
            assert 1 <= len(got) <= curated_configs.MAX_PER_SET < len(model)
            assert {curated_configs.config_key(c) for c in got} <= set(
                curated_configs.lookup("fwd", _triton.DeviceCaps(arch, smem), 40, 2))
        else:
            assert got == model


def test_curated_family_by_device():
    from dbkernels.ops.attention.curated_configs import family

    assert family(86, 99 * 1024) == "86" and family(89, 99 * 1024) == "86" and family(80, 163 * 1024) == "86"
    assert family(90, 227 * 1024) == "90" and family(120, 99 * 1024) == "86"


_CHILD = r"""
import os, subprocess, sys
import dbkernels
from dbkernels import _backend
print("interpreting", _backend.triton_interpreting())
print("env", os.environ.get("TRITON_INTERPRET"))
child = subprocess.run([sys.executable, "-c", "import os; print(os.environ.get('TRITON_INTERPRET'))"],
                       capture_output=True, text=True)
print("child", child.stdout.strip())
"""


def _run_child(env_value):
    env = dict(os.environ, PYTHONPATH=str(ROOT), CUDA_VISIBLE_DEVICES="")
    env.pop("TRITON_INTERPRET", None)
    if env_value is not None:
        env["TRITON_INTERPRET"] = env_value
    out = subprocess.run([sys.executable, "-c", _CHILD], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    return dict(line.split(" ", 1) for line in out.stdout.strip().splitlines())


def test_interpreter_switch_is_not_inherited_by_child_processes():
    pytest.importorskip("triton")
    got = _run_child(None)
    assert got == {"interpreting": "True", "env": "None", "child": "None"}


def test_a_user_set_triton_interpret_is_obeyed():
    pytest.importorskip("triton")
    assert _run_child("0")["interpreting"] == "False"  # e.g. `python -m dbkernels compile` workers
    got = _run_child("1")
    assert got["interpreting"] == "True" and got["child"] == "1"  # the user's choice, passed on as set


def test_interpreting_on_a_gpu_warns_once(monkeypatch):
    monkeypatch.setattr(_backend, "triton_interpreting", lambda: True)
    monkeypatch.setattr(_backend, "_warned_interpret_on_gpu", False)
    with pytest.warns(UserWarning, match="TRITON_INTERPRET=1 is set"):
        _backend.choose("attention", "cuda")
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _backend.choose("attention", "cuda")  # once per process


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_out_of_range_timesteps_give_nan_without_validation(backend, request):
    if backend == "triton":
        request.getfixturevalue("cpu_triton")
    g = torch.Generator().manual_seed(0)
    x0, noise, pred = (torch.randn(3, 4, 5, 6, generator=g) for _ in range(3))
    ac = torch.linspace(0.999, 0.01, 1000)
    t = torch.tensor([5, 1000, -3])
    for pt in ("epsilon", "v_prediction", "sample"):
        for snr in (None, 5.0):
            p = pred.clone().requires_grad_()
            with dbkernels.force_backend(backend):
                loss = dbkernels.diffusion_loss(p, x0, noise, t, ac, prediction_type=pt, snr_gamma=snr, validate=False)
                loss.backward()
            assert torch.isnan(loss), (pt, snr)
            assert torch.isfinite(p.grad[0]).all() and torch.isnan(p.grad[1:]).all(), (pt, snr)
    with dbkernels.force_backend(backend):
        xt = dbkernels.add_noise(x0, noise, t, ac, validate=False)
    assert torch.isfinite(xt[0]).all() and torch.isnan(xt[1:]).all()
    with pytest.raises(ValueError, match="timesteps must lie"):
        dbkernels.add_noise(x0, noise, t, ac)  # validate=True (the default) still refuses them


def test_first_call_stats_are_counters():
    stats = _triton.first_call_stats()
    assert set(stats) == {"compile_tune_s", "launches_compiled"}
    assert stats["compile_tune_s"] >= 0 and stats["launches_compiled"] >= 0


@pytest.mark.gpu
def test_gpu_first_call_compiles_once_and_is_counted():
    q = torch.randn(1, 2, 200, 40, device="cuda", dtype=torch.bfloat16)
    before = _triton.first_call_stats()["launches_compiled"]
    dbkernels.attention(q, q, q)
    mid = _triton.first_call_stats()["launches_compiled"]
    dbkernels.attention(q, q, q)
    assert mid > before and _triton.first_call_stats()["launches_compiled"] == mid


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_gpu_tensors_on_another_device_than_the_current_one():
    torch.cuda.set_device(0)
    dev = torch.device("cuda", 1)
    q, k, v = (torch.randn(1, 2, 130, 64, device=dev, dtype=torch.bfloat16) for _ in range(3))
    out = dbkernels.attention(q, k, v)
    ref = torch.nn.functional.scaled_dot_product_attention(q.float(), k.float(), v.float())
    assert out.device == dev and (out.float() - ref).abs().max() < 2e-2
    x0 = torch.randn(2, 4, 8, 8, device=dev)
    ac = torch.linspace(0.999, 0.01, 1000, device=dev)
    t = torch.tensor([3, 500], device=dev)
    with dbkernels.force_backend("triton"):
        xt = dbkernels.add_noise(x0, torch.zeros_like(x0), t, ac)
    torch.testing.assert_close(xt, x0 * ac[t].sqrt().view(-1, 1, 1, 1))


def test_trainer_reports_first_step_compile_time(monkeypatch):
    # the trainer's one line after step 1: only when a launch compiled or autotuned
    from dbkernels import _triton
    from trainer.core import loop

    lines = []

    class Bar:
        def write(self, s):
            lines.append(s)

    monkeypatch.setattr(_triton, "first_call_stats", lambda: {"compile_tune_s": 0.0, "launches_compiled": 0})
    loop._note_first_step_compile(Bar())
    assert lines == []
    monkeypatch.setattr(_triton, "first_call_stats", lambda: {"compile_tune_s": 42.25, "launches_compiled": 7})
    loop._note_first_step_compile(Bar())
    assert lines == ["first step: 42.2 s compiling/autotuning 7 Triton kernel launch(es); cached for later "
                     "steps and runs"]
