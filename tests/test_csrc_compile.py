"""Checks of the CUDA sources that need no GPU.

* every csrc/*.cu compiles with nvcc for sm_86 and sm_90 (ptxas register report printed);
* the op schemas in csrc/ops.cpp parse;
* dbkernels._ext stays off with a clear reason on a CPU build of torch, and importing it
  loads / compiles nothing.

The diffusion_loss kernels compiled for the host against a CUDA emulation are checked in
test_csrc_compile_emulated.py.
"""
from __future__ import annotations

import importlib
import os
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
CSRC = ROOT / "csrc"
CU_FILES = sorted(CSRC.glob("*.cu"))
NVCC = shutil.which("nvcc")

# What torch.utils.cpp_extension adds to every nvcc call, so this compile sees the same code.
TORCH_NVCC_FLAGS = [
    "-D__CUDA_NO_HALF_OPERATORS__", "-D__CUDA_NO_HALF_CONVERSIONS__",
    "-D__CUDA_NO_BFLOAT16_CONVERSIONS__", "-D__CUDA_NO_HALF2_OPERATORS__", "--expt-relaxed-constexpr",
]


# --------------------------------------------------------------------------------------
# nvcc compile of every .cu
# --------------------------------------------------------------------------------------
def _demangle(names: list[str]) -> list[str]:
    tool = shutil.which("c++filt")
    if not tool or not names:
        return names
    res = subprocess.run([tool], input="\n".join(names), capture_output=True, text=True)
    out = res.stdout.splitlines()
    if res.returncode != 0 or len(out) != len(names):
        return names
    return [n.replace("(anonymous namespace)::", "").split("(")[0] for n in out]


def _ptxas_summary(log: str) -> str:
    """One 'sm_XX kernel: regs, smem, spill stores' line per kernel from -Xptxas -v output."""
    rows, cur, spill = [], None, "?"
    for line in log.splitlines():
        m = re.search(r"Compiling entry function '(\w+)' for '(sm_\d+)'", line)
        if m:
            cur, spill = (m.group(2), m.group(1)), "?"
            continue
        m = re.search(r"(\d+) bytes spill stores", line)
        if m and cur:
            spill = m.group(1)
            continue
        m = re.search(r"Used (\d+) registers(?:.*?(\d+) bytes smem)?", line)
        if m and cur:
            rows.append((cur[0], cur[1], m.group(1), m.group(2) or "0", spill))
            cur = None
    names = _demangle([r[1] for r in rows])
    return "\n".join(f"{r[0]} {n}: {r[2]} regs, {r[3]} B smem, {r[4]} B spill stores"
                     for r, n in zip(rows, names))


@pytest.mark.skipif(NVCC is None, reason="nvcc is not on PATH: cannot compile-check the CUDA sources")
@pytest.mark.parametrize("cu", CU_FILES, ids=[p.name for p in CU_FILES])
def test_nvcc_compiles(cu, tmp_path):
    cmd = [NVCC, "-c", str(cu), "-o", str(tmp_path / (cu.stem + ".o")), "-std=c++17", f"-I{CSRC}",
           "-O3", "-lineinfo", "-Xptxas", "-v", "--threads", "0",
           "-gencode", "arch=compute_86,code=sm_86", "-gencode", "arch=compute_90,code=sm_90",
           *TORCH_NVCC_FLAGS]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    log = res.stdout + res.stderr
    print(" ".join(cmd))
    print(_ptxas_summary(log) or log)
    assert res.returncode == 0, f"nvcc failed on {cu.name}:\n{log[-6000:]}"
    warnings = [ln for ln in log.splitlines() if "warning" in ln.lower()]
    assert not warnings, "nvcc warnings:\n" + "\n".join(warnings)


def test_ops_cpp_schemas_parse():
    text = (CSRC / "ops.cpp").read_text()
    defs = re.findall(r"m\.def\(\s*((?:\"[^\"]*\"\s*)+)\)", text)
    assert defs, "no m.def(...) found in csrc/ops.cpp"
    names = []
    for chunk in defs:
        schema = "".join(re.findall(r"\"([^\"]*)\"", chunk))
        parsed = torch._C.parse_schema("dbkernels::" + schema)
        names.append(parsed.name)
    assert {"dbkernels::cuda_add_noise", "dbkernels::cuda_diffusion_loss_fwd"} <= set(names)
    assert len(names) == len(set(names)), f"an op is defined twice: {names}"
    assert "TORCH_LIBRARY_FRAGMENT(dbkernels" in text and "TORCH_LIBRARY(dbkernels" not in text


# --------------------------------------------------------------------------------------
# dbkernels._ext on this machine
# --------------------------------------------------------------------------------------
@pytest.mark.skipif(torch.version.cuda is not None, reason="torch is a CUDA build here")
def test_ext_reason_on_cpu_build():
    from dbkernels import _ext

    reason = _ext.unavailable_reason()
    assert isinstance(reason, str) and reason
    assert "CPU build" in reason
    with pytest.raises(RuntimeError, match="CPU build"):
        _ext.load()
    info = _ext.info()
    assert info["load_attempted"] and info["loaded_from"] is None
    assert {"compiled_extension", "jit_cache_dir", "nvcc", "cuda_arch_list"} <= set(info)


def _cuda_glue():
    for name in ("dbkernels.diffusion_loss.cuda", "dbkernels.ops.diffusion_loss.cuda"):
        try:
            return importlib.import_module(name)
        except ModuleNotFoundError:
            continue
    pytest.skip("the diffusion_loss CUDA glue module is missing")


def test_cuda_glue_seed_and_cpu_error():
    glue = _cuda_glue()
    # Seeds travel as int64 with the reference's low 64 bits (its key words).
    for seed in (0, 5, 2 ** 63 - 1, 2 ** 63, 2 ** 64 - 1, -1, -(2 ** 63)):
        s64 = glue._seed_i64(seed)
        assert -(2 ** 63) <= s64 < 2 ** 63 and s64 % (1 << 64) == seed % (1 << 64)
    if torch.version.cuda is None:
        x = torch.zeros(2, 4, 3, 3)
        with pytest.raises(RuntimeError, match="CPU build"):
            glue.add_noise(x, None, None, torch.zeros(2, dtype=torch.int64), torch.ones(10), seed=0)


def test_import_ext_is_lazy(tmp_path):
    cache = tmp_path / "cache"
    cache.mkdir()
    code = textwrap.dedent("""
        import sys
        import dbkernels._ext as ext
        info = ext.info()
        assert not ext._attempted, "import or info() attempted a load"
        assert not info["load_attempted"]
        for mod in ("dbkernels._C", "dbkernels_C"):
            assert mod not in sys.modules, mod + " was imported"
        if "torch" in sys.modules:
            import torch
            assert not torch.cuda.is_initialized(), "CUDA was initialised"
        print("ok")
    """)
    env = dict(os.environ, DBKERNELS_CACHE=str(cache), PYTHONPATH=str(ROOT))
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=ROOT,
                         timeout=120)
    assert res.returncode == 0 and res.stdout.strip().endswith("ok"), res.stdout + res.stderr
    assert not any(cache.iterdir()), "something was built into the JIT cache at import time"
