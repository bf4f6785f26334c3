"""Compiling for a GPU target on a machine that may have none.

A worker process (TRITON_INTERPRET=0, set before triton is imported) installs
`AotDriver(arch)` as Triton's active driver, enters `dbkernels._triton.aot_mode`, and
drives the library's public functions on CPU tensors that have the shapes, dtypes and
strides of the real calls. Every Triton launch inside then goes to
`JITFunction.warmup`: the JIT computes its own specialisation of those arguments
(dtypes, 16-byte alignment, integers divisible by 16 or equal to 1, constexprs), runs
the autotuner's prune step for the target, and compiles each config it could pick with
the target's ptxas. Nothing is launched; the outputs are left unwritten.

Registers, stack frame and spill-store bytes come from ptxas -v on the kernel's PTX (the
ptxas bundled with Triton, the flags Triton uses), shared memory from the compile's metadata.
"""
from __future__ import annotations

import os
import re
import subprocess
import tempfile
import time
import traceback

import torch

from .. import _triton
from . import calls as calls_mod


def _driver_class():
    from triton.backends.compiler import GPUTarget
    from triton.backends.driver import DriverBase

    class AotDriver(DriverBase):
        """Just enough of a Triton driver to specialise and compile for `arch` (no device)."""

        def __init__(self, arch: int):
            self.arch = arch

        @classmethod
        def is_active(cls):
            return False

        def map_python_to_cpp_type(self, ty):
            return ty

        def get_current_target(self):
            return GPUTarget("cuda", self.arch, 32)

        def get_active_torch_device(self):
            return torch.device("cpu")

        def get_benchmarker(self):
            raise RuntimeError("ahead-of-time compile: nothing is benchmarked")

        def get_current_device(self):
            return self.arch  # one JIT cache per target

        def get_current_stream(self, device=None):
            return 0

    return AotDriver


_USED = re.compile(r"Used (\d+) registers")
_FRAME = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")


def resource_usage(compiled, arch: int) -> dict:
    """{registers, stack, spill} of a compiled kernel: ptxas -v on its PTX, as Triton runs ptxas.

    The cubin alone does not separate spills from other stack use (libdevice's cosf keeps a small
    array on the stack), so the PTX is assembled once more with -v for the exact figures."""
    from triton import knobs

    ptxas = knobs.nvidia.ptxas.path
    fmad = [] if compiled.metadata.enable_fp_fusion else ["--fmad=false"]
    with tempfile.NamedTemporaryFile("w", suffix=".ptx", delete=False) as f:
        f.write(compiled.asm["ptx"])
        path = f.name
    try:
        proc = subprocess.run([ptxas, "-lineinfo", *fmad, "-v", f"--gpu-name=sm_{arch}{'a' if arch >= 90 else ''}",
                               path, "-o", os.devnull], capture_output=True, text=True, timeout=600)
    finally:
        os.unlink(path)
    log = proc.stdout + proc.stderr
    used, frame = _USED.search(log), _FRAME.search(log)
    if not used or not frame:
        return {"registers": None, "stack": None, "spill": None}
    return {"registers": int(used.group(1)), "stack": int(frame.group(1)), "spill": int(frame.group(2))}


def _explain(e: BaseException) -> str:
    """One line: the root cause first (e.g. the NameError under a CompilationError), then where."""
    chain = []
    while e is not None and len(chain) < 5:
        lines = [x.strip() for x in str(e).splitlines() if x.strip()]
        where = lines[0] if lines else ""
        if type(e).__name__ == "CompilationError" and lines:
            where = lines[0].rstrip(":")  # "at 19:15", the source snippet left out
        chain.append(f"{type(e).__name__}: {where}" if where else type(e).__name__)
        e = e.__cause__ or e.__context__
    return " <- ".join(reversed(chain))[:600]


def one_per_layout(name, configs):
    """The CI subset's configs: the first of each head-dim layout (both layouts of D=40 get compiled)."""
    seen, out = set(), []
    for c in configs:
        key = None if c is None else (c.kwargs.get("BLOCK_D0"), c.kwargs.get("BLOCK_D1"), c.kwargs.get("HAS_HI"))
        if key not in seen:
            seen.add(key)
            out.append(c)
    return out


def _config_text(cfg: dict) -> str:
    return " ".join(f"{k}={v}" for k, v in sorted(cfg.items()) if k not in ("num_ctas", "maxnreg"))


def run_items(items: list[tuple]) -> list[dict]:
    """Compile every (arch, call id, selection, one_config[, max_tile]) item in this process; one row per
    compiled kernel.

    selection: "jit" (the configs the JIT could pick now: curated sets or the
    shared-memory prune) or "all" (every config of the head-dim layouts: the sweep).
    one_config: compile only the first config of each autotuned launch (the CI subset).
    """
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        raise RuntimeError("ahead-of-time compile needs TRITON_INTERPRET=0 in the worker process")
    import triton
    from triton.runtime.driver import driver

    import dbkernels

    AotDriver = _driver_class()
    rows = []
    by_id = calls_mod.by_id()
    for arch, call_id, selection, one_config, *rest in items:
        call = by_id[call_id]
        limit = _triton.SMEM_OPTIN.get(arch, _triton.DEFAULT_SMEM)
        state = _triton.AotState(caps=_triton.DeviceCaps(arch, limit), selection=selection,
                                 max_tile=rest[0] if rest else None)
        if one_config:
            state.config_filter = one_per_layout
        previous = driver._active  # no reset_active(): without a GPU there is no default driver
        driver.set_active(AotDriver(arch))
        t0 = time.perf_counter()
        err = None
        try:
            with _triton.aot_mode(state), dbkernels.force_backend("triton"):
                call.run()
        except Exception as e:  # noqa: BLE001 - a compile failure is a row, reported by the caller
            err = _explain(e)
            if os.environ.get("DBKERNELS_AOT_TRACEBACK"):
                traceback.print_exc()
        finally:
            driver._active = previous
        wall = time.perf_counter() - t0
        for name, cfg, compiled in state.records:
            res = resource_usage(compiled, arch)
            shared = int(compiled.metadata.shared)
            rows.append(dict(arch=arch, op=call.op, call=call.id, shape=call.shape, dtype=call.dtype,
                             kernel=name, config=_config_text(cfg), cfg=cfg, binary=compiled.hash,
                             registers=res["registers"], spill_bytes=res["spill"], stack_bytes=res["stack"],
                             shared=shared,
                             shared_limit=limit, over_limit=shared > limit, error=None,
                             triton=triton.__version__, seconds=None))
        if err is not None:
            rows.append(dict(arch=arch, op=call.op, call=call.id, shape=call.shape, dtype=call.dtype,
                             kernel="?", config="", cfg={}, binary=None, registers=None, spill_bytes=None,
                             shared=None, shared_limit=limit, over_limit=False, error=err,
                             triton=triton.__version__, seconds=None))
        # the call's compile time, shared by its rows (configs compile one after another)
        for r in rows[len(rows) - len(state.records) - (err is not None):]:
            r["call_seconds"] = round(wall, 2)
    return rows
