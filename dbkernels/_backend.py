"""Which implementation runs an op: cuda (our extension), triton, or reference (PyTorch).

Order of precedence for one call:
  1. `with dbkernels.force_backend(name):` (thread-local; benchmarks and tests use it)
  2. the DBKERNELS_BACKEND environment variable (triton | cuda | reference)
  3. the op's preference list for the tensor's device (first one usable)
A forced backend that cannot run on the tensor's device raises BackendUnavailable
with the reason, never silently falls back.

On a machine without a CUDA device, `triton` means the Triton kernels under the
interpreter: importing dbkernels turns Triton's interpreter on in this process there if
triton has not been imported yet (Triton fixes the mode when each @triton.jit
function, its own standard library included, is defined; torch imports triton on the
first op call). The environment is left as it was, so child processes decide for
themselves; a TRITON_INTERPRET set by the user is obeyed.
"""
from __future__ import annotations

import contextlib
import importlib
import importlib.util
import os
import threading

from . import _triton

BACKENDS = ("cuda", "triton", "reference")

# op -> the backends it implements, in the order tried on a CUDA device. Each op
# module calls register_op() when imported; "reference" is always implemented.
GPU_PREFERENCE: dict[str, tuple[str, ...]] = {}
# CPU: the reference is the fast path (the Triton interpreter is for testing only).
CPU_PREFERENCE = ("reference",)

_local = threading.local()


class BackendUnavailable(RuntimeError):
    """A forced backend cannot run here; the message says why and what to do."""


@contextlib.contextmanager
def force_backend(name: str | None):
    """Run every dbkernels op in this thread with backend `name` (None: automatic)."""
    if name is not None and name not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS} or None, got {name!r}")
    prev = getattr(_local, "forced", None)
    _local.forced = name
    try:
        yield
    finally:
        _local.forced = prev


def register_op(op: str, gpu_preference: tuple[str, ...]) -> None:
    """Declare `op` and its backends, fastest first on a GPU (as measured, where measured)."""
    unknown = set(gpu_preference) - set(BACKENDS)
    if unknown:
        raise ValueError(f"unknown backend(s) {sorted(unknown)} for {op}; expected some of {BACKENDS}")
    GPU_PREFERENCE[op] = tuple(gpu_preference) + (() if "reference" in gpu_preference else ("reference",))


def forced_backend() -> str | None:
    name = getattr(_local, "forced", None)
    if name is not None:
        return name
    env = os.environ.get("DBKERNELS_BACKEND", "").strip().lower()
    if not env or env == "auto":
        return None
    if env not in BACKENDS:
        raise ValueError(f"DBKERNELS_BACKEND must be one of {BACKENDS} (or unset/auto), got {env!r}")
    return env


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def triton_installed() -> bool:
    return importlib.util.find_spec("triton") is not None


def triton_interpreting() -> bool:
    """True if Triton runs kernels in its interpreter in this process."""
    import sys

    if "triton" in sys.modules:
        try:
            from triton import knobs

            return bool(knobs.runtime.interpret)
        except ImportError:  # a triton without knobs: only the environment says
            pass
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def enable_interpreter_without_gpu() -> None:
    """Called at `import dbkernels`: no CUDA device -> Triton can only interpret.

    The switch is Triton's in-process knob, not the environment: TRITON_INTERPRET=1 left
    in os.environ would be inherited by child processes, and one that sees a GPU would
    then run every op on the reference (or every Triton kernel in the interpreter). A
    TRITON_INTERPRET the user set (to anything, 0 included) is their choice and is kept.
    """
    import sys

    if "TRITON_INTERPRET" in os.environ or "triton" in sys.modules or not triton_installed():
        return
    if _cuda_available():
        return
    os.environ["TRITON_INTERPRET"] = "1"  # read when triton defines its own @jit functions
    try:
        import triton  # noqa: F401  (triton.language is defined now, in interpreter mode)
        from triton import knobs

        knobs.runtime.interpret = True    # the in-process switch for our kernels, defined later
    finally:
        os.environ.pop("TRITON_INTERPRET", None)


_warned_interpret_on_gpu = False


def _warn_interpreting_on_gpu() -> None:
    global _warned_interpret_on_gpu
    if not _warned_interpret_on_gpu:
        _warned_interpret_on_gpu = True
        import warnings

        warnings.warn("dbkernels: TRITON_INTERPRET=1 is set, so the Triton kernels cannot run on this GPU and "
                      "their ops use the other backends (CUDA extension or PyTorch reference); unset "
                      "TRITON_INTERPRET to use them", stacklevel=4)


def _triton_built_for_interpreter() -> bool:
    """True if triton's own @jit functions were defined in interpreter mode."""
    import sys

    if "triton" not in sys.modules:
        return triton_interpreting()
    import triton.language as tl

    return type(tl.sum).__name__ == "InterpretedFunction"


def import_triton_kernels(module: str):
    """Import an op's Triton module (after choose() said triton can run)."""
    return importlib.import_module(module)


def unavailable_reason(backend: str, device_type: str) -> str | None:
    """None if `backend` can run on `device_type`, else a sentence saying why not."""
    if backend == "reference":
        return None
    if backend == "triton":
        if not triton_installed():
            return "triton is not installed (pip install triton)"
        if device_type == "cuda":
            if triton_interpreting():
                return "TRITON_INTERPRET=1 is set, so Triton kernels run on CPU tensors only"
            return None
        if device_type == "cpu":
            if _triton.aot_state() is not None:  # CPU tensors stand in for the GPU target being compiled
                return None
            if not (triton_interpreting() and _triton_built_for_interpreter()):
                return ("Triton runs CPU tensors only under its interpreter: set TRITON_INTERPRET=1 "
                        "before importing triton or dbkernels, or move the tensors to the GPU")
            return None
        return f"Triton does not support device type {device_type!r}"
    if backend == "cuda":
        if device_type != "cuda":
            return f"the CUDA extension needs CUDA tensors, got device type {device_type!r}"
        from . import _ext

        return _ext.unavailable_reason()
    raise ValueError(f"unknown backend {backend!r}; expected one of {BACKENDS}")


def choose(op: str, device_type: str) -> str:
    """The backend that runs `op` for tensors on `device_type`."""
    forced = forced_backend()
    if forced is not None:
        if op in GPU_PREFERENCE and forced not in GPU_PREFERENCE[op]:
            raise BackendUnavailable(f"dbkernels backend {forced!r} was forced but {op} has no {forced} "
                                     f"implementation (it has: {', '.join(GPU_PREFERENCE[op])})")
        why = unavailable_reason(forced, device_type)
        if why is not None:
            raise BackendUnavailable(f"dbkernels backend {forced!r} was forced for {op} but {why}")
        return forced
    prefs = GPU_PREFERENCE.get(op, BACKENDS) if device_type == "cuda" else CPU_PREFERENCE
    if device_type == "cuda" and "triton" in prefs and triton_interpreting():
        _warn_interpreting_on_gpu()
    for name in prefs:
        if unavailable_reason(name, device_type) is None:
            return name
    return "reference"


def report() -> dict[str, dict[str, str]]:
    """{op: {backend: 'ok' | reason}} for the CPU and (if present) the CUDA device."""
    devices = ["cpu"] + (["cuda"] if _cuda_available() else [])
    out = {}
    for op in GPU_PREFERENCE:
        for dev in devices:
            out[f"{op} [{dev}]"] = {b: (unavailable_reason(b, dev) or "ok") if b in GPU_PREFERENCE[op]
                                    else f"{op} has no {b} implementation" for b in BACKENDS}
    return out
