"""`python -m dbkernels compile`: every Triton kernel compiled ahead of time for sm_86 and sm_90
without a GPU, specialised as the JIT specialises the real calls (dbkernels/aot).

The interpreter accepts code that the GPU compiler rejects (plain module ints used inside
@triton.jit, tl.static_range over a non-constexpr); only a real compile finds it. The
CI subset (--quick) reaches every kernel and every value of every constexpr branch once
per architecture, and the tests below show it fails when either of the two fixes it
guards is reverted.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

pytest.importorskip("triton")


def _compile(args, root=ROOT, timeout=900):
    env = dict(os.environ, PYTHONPATH=str(root))
    env.pop("TRITON_INTERPRET", None)
    return subprocess.run([sys.executable, "-m", "dbkernels", "compile", *args], cwd=root, env=env,
                          capture_output=True, text=True, timeout=timeout)


def _ptxas_missing(proc) -> bool:
    return proc.returncode != 0 and "ptxas" in proc.stderr and "not found" in proc.stderr.lower()


@pytest.fixture(scope="module")
def quick_rows(tmp_path_factory):
    out = tmp_path_factory.mktemp("aot")
    proc = _compile(["--quick", "--jobs", "2", "--out", str(out)])
    if _ptxas_missing(proc):
        pytest.skip("no ptxas for Triton's NVIDIA backend here")
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    rows = [json.loads(x) for x in (out / "aot-compile.jsonl").read_text().splitlines()]
    return rows, proc.stdout


KERNELS = {"_fwd_kernel", "_bwd_preprocess", "_bwd_dkdv_kernel", "_bwd_dq_kernel", "_diffusion_loss_kernel",
           "_add_noise_kernel", "_adamw8bit_kernel", "_adamw4bit_kernel", "_ema_kernel"}
BRANCHES = {  # kernel -> constexpr -> every value it takes in the library
    "_fwd_kernel": {"HAS_BIAS": {True, False}, "PREC": {"ieee", "tf32"}, "SM": {1, 8}, "HAS_HI": {True, False}},
    "_bwd_dkdv_kernel": {"HAS_BIAS": {True, False}, "PREC": {"ieee", "tf32"}, "SM": {1, 8}, "HAS_HI": {True, False}},
    "_bwd_dq_kernel": {"HAS_BIAS": {True, False}, "PREC": {"ieee", "tf32"}, "SM": {1, 8}, "HAS_HI": {True, False}},
    "_diffusion_loss_kernel": {"PRED_TYPE": {0, 1, 2}, "USE_SNR": {True, False}, "HAS_NOISE": {True, False},
                               "HAS_OFFSET": {True, False}, "WRITE_GRAD": {True, False}, "HAS_MASK": {True, False},
                               "LOSS_TYPE": {0, 1, 2}, "ROW_C": {True, False}},
    "_add_noise_kernel": {"HAS_NOISE": {True, False}, "HAS_OFFSET": {True, False}},
    "_adamw8bit_kernel": {"QUANT": {True, False}, "SR": {True, False}, "IS_BF16": {True, False}},
    "_adamw4bit_kernel": {"SR": {True, False}, "IS_BF16": {True, False}},
    "_ema_kernel": {"SR": {True, False}, "ALIGNED": {True, False}},
}


@pytest.mark.slow
def test_quick_subset_compiles_every_kernel_and_branch_for_both_archs(quick_rows):
    rows, stdout = quick_rows
    assert not [r for r in rows if r["error"]]
    for arch in (86, 90):
        mine = [r for r in rows if r["arch"] == arch]
        assert {r["kernel"] for r in mine} == KERNELS, arch
        for kernel, branches in BRANCHES.items():
            got = [r["constexprs"] for r in mine if r["kernel"] == kernel]
            for name, values in branches.items():
                assert {c[name] for c in got} == values, (arch, kernel, name)
        for r in mine:
            assert 0 <= r["shared"] <= r["shared_limit"], r
            assert r["registers"] and r["registers"] <= 255, r
            assert r["spill_bytes"] is not None and r["stack_bytes"] is not None, r  # ptxas -v was read
            if r["dtype"] != "fp32":
                assert r["spill_bytes"] == 0, r  # fp32 attention (FMA dots, no tensor cores) may spill
    assert "0 failed" in stdout


def _reverted_copy(tmp_path, rel, old, new) -> Path:
    """A copy of the library with one fix undone (the file must still contain `old`)."""
    root = tmp_path / "src"
    shutil.copytree(ROOT / "dbkernels", root / "dbkernels", ignore=shutil.ignore_patterns("__pycache__", "*.so"))
    path = root / "dbkernels" / rel
    text = path.read_text()
    assert old in text, f"{rel} no longer contains {old!r}: update this test"
    path.write_text(text.replace(old, new))
    return root


@pytest.mark.slow
@pytest.mark.parametrize("rel,old,new,op,message", [
    ("optim/triton_kernels.py", "MBITS = tl.constexpr(quant.MBITS)", "MBITS: tl.constexpr = quant.MBITS",
     "adamw8bit", "global variable MBITS"),
    ("optim/triton_kernels4.py", "V_MBITS = tl.constexpr(quant4.V_MBITS)", "V_MBITS = quant4.V_MBITS",
     "adamw4bit", "V_MBITS"),
    ("ops/diffusion_loss/triton_kernels.py", "PHILOX_ROUNDS = tl.constexpr(reference.PHILOX_ROUNDS)",
     "PHILOX_ROUNDS = reference.PHILOX_ROUNDS", "diffusion_loss", "PHILOX_ROUNDS"),
], ids=["adamw8bit-constexpr", "adamw4bit-constexpr", "philox-constexpr"])
def test_quick_subset_fails_when_a_fix_is_reverted(tmp_path, rel, old, new, op, message):
    """The two compile failures the interpreter never showed: the CI subset catches each one."""
    root = _reverted_copy(tmp_path, rel, old, new)
    proc = _compile(["--quick", "--arch", "86", "--op", op, "--jobs", "2"], root=root)
    if _ptxas_missing(proc):
        pytest.skip("no ptxas for Triton's NVIDIA backend here")
    assert proc.returncode == 1, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert message in proc.stderr and "FAILED sm_86" in proc.stderr, proc.stderr[-3000:]


def test_compile_cli_refuses_bad_options():
    for args, message in ((["--curate"], "--curate needs --full"), (["--calls", "no-such-call"], "no call matches"),
                          (["--jobs", "0"], "--jobs must be >= 1")):
        proc = _compile(args, timeout=120)
        assert proc.returncode == 2 and message in proc.stderr, (args, proc.stderr)


def test_calls_cover_the_models_and_the_quick_subset():
    from dbkernels.aot import calls

    every = calls.all_calls()
    assert len({c.id for c in every}) == len(every)
    att = [c for c in every if c.op == "attention" and c.models]
    assert {c.head_dim for c in att} == {40, 64, 80, 160}
    assert {m for c in att for m in c.models} == {"sd15", "sd21", "sdxl"}
    assert {c.dtype for c in att} == {"fp32", "bf16", "fp16"}
    assert any("Lk77" in c.shape for c in att) and any("bias" in c.shape for c in att)
    quick = calls.select(quick=True)
    assert {c.op for c in quick} == {"attention", "diffusion_loss", "add_noise", "adamw8bit", "adamw4bit",
                                     "ema_update"}
    assert len(quick) <= 17
    assert calls.select(models=["sdxl"], ops=["attention"]) and all(
        "sdxl" in c.models for c in calls.select(models=["sdxl"], ops=["attention"]))


def test_curation_picks_spill_free_configs_that_fit_every_call():
    from dbkernels.aot import curate
    from dbkernels.ops.attention import curated_configs

    def row(call, dtype, bm, bn, d0, d1, hi, warps, stages, shared, regs, spill=0, over=False):
        cfg = dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_D0=d0, BLOCK_D1=d1, HAS_HI=hi, num_warps=warps, num_stages=stages)
        return dict(arch=86, op="attention", kernel="_fwd_kernel", call=call, calls=[call], dtype=dtype,
                    shape="B2 H8 Lq4096 Lk4096 D40", cfg=cfg, error=None, spill_bytes=spill, over_limit=over,
                    shared=shared, registers=regs)

    rows = []
    for call, dt in (("a", "bf16"), ("b", "fp16")):
        rows += [row(call, dt, 128, 64, 32, 16, True, 8, 2, 40_000, 160),
                 row(call, dt, 64, 64, 64, 16, False, 4, 2, 30_000, 120),
                 row(call, dt, 128, 128, 64, 16, False, 8, 3, 90_000, 200)]
    rows.append(row("a", "bf16", 64, 32, 32, 16, True, 4, 2, 20_000, 255, spill=64))   # spills
    rows.append(row("a", "bf16", 64, 128, 32, 16, True, 4, 3, 200_000, 100, over=True))  # too much smem
    rows.append(row("a", "bf16", 32, 32, 32, 16, True, 4, 2, 10_000, 90))              # not compiled for "b"
    sets, spilling = curate.build(rows)
    assert spilling == []
    chosen = sets["86"]["fwd"]["40"]["2"]
    assert set(chosen) == {"128x64/32+16hi/w8/s2", "64x64/64+16/w4/s2", "128x128/64+16/w8/s3"}
    assert chosen["128x128/64+16/w8/s3"] == 90_000
    assert len(chosen) <= curated_configs.MAX_PER_SET
    # a group where everything spills keeps the least-spilling configs and says so
    for call, spill in (("a", 600), ("b", 640)):
        rows.append(dict(row(call, "fp32", 32, 32, 32, 16, True, 8, 2, 30_000, 255, spill=spill)))
        rows.append(dict(row(call, "fp32", 64, 64, 32, 16, True, 4, 2, 50_000, 255, spill=3000)))
    sets, spilling = curate.build(rows)
    assert spilling == ["sm_86 fwd D40 32-bit"]
    assert list(sets["86"]["fwd"]["40"]["4"]) == ["32x32/32+16hi/w8/s2"]
    # a config that spilled in another real call (the default run's rows) is dropped from its set
    checked = [row("c", "fp16", 128, 128, 64, 16, False, 8, 3, 90_000, 255, spill=8)]
    sets, _ = curate.build(rows, checked)
    assert set(sets["86"]["fwd"]["40"]["2"]) == {"128x64/32+16hi/w8/s2", "64x64/64+16/w4/s2"}


def test_curated_table_entries_are_configs_the_autotuner_has():
    from dbkernels.ops.attention import curated_configs
    from dbkernels.ops.attention import triton_kernels as TK

    table = curated_configs._table()
    if not table:
        pytest.skip("no curated_configs.json yet")
    known = {name: {curated_configs.config_key(c) for c in tuned.configs}
             for name, tuned in (("fwd", TK._fwd_tuned), ("dkdv", TK._dkdv_tuned), ("dq", TK._dq_tuned))}
    for fam, kernels in table.items():
        assert fam in ("86", "90")
        for kernel, by_d in kernels.items():
            for d, by_size in by_d.items():
                for esize, entry in by_size.items():
                    assert 1 <= len(entry) <= curated_configs.MAX_PER_SET, (fam, kernel, d, esize)
                    assert set(entry) <= known[kernel], (fam, kernel, d, esize, set(entry) - known[kernel])
                    for key, shared in entry.items():  # a layout of this head dim, within the family's smem
                        d0, d1 = key.split("/")[1].removesuffix("hi").split("+")
                        assert (int(d0), int(d1), key.split("/")[1].endswith("hi")) in TK.head_layouts(int(d)), key
                        assert 0 < shared <= (99 if fam == "86" else 227) * 1024, (key, shared)
