"""Loads the CUDA extension `dbkernels._C` (our kernels in csrc/*.cu, bound in csrc/*.cpp).

Importing the extension registers its ops under `torch.ops.dbkernels` (`cuda_*`).
It is looked for, on first use only, in this order:

1. `dbkernels._C`, built by `pip install --no-build-isolation -e .` on a machine with a
   CUDA torch and nvcc;
2. a JIT build of csrc/ with `torch.utils.cpp_extension.load` (needs nvcc and ninja; the
   build is cached in $DBKERNELS_CACHE or ~/.cache/dbkernels/ext-<torch>-<cuda>;
   DBKERNELS_NO_JIT=1 turns this step off).

If neither works the CUDA backend stays off and `unavailable_reason()` says why.
Importing this module never imports the extension, probes the GPU or compiles anything,
and never fails; the first `load()` / `unavailable_reason()` does the work, once.
"""
from __future__ import annotations

import importlib
import importlib.util
import os
import shutil
import threading
from pathlib import Path

_PKG_DIR = Path(__file__).resolve().parent
_JIT_NAME = "dbkernels_C"
_REBUILD_HINT = ("rebuild with `pip install --no-build-isolation -e .` on a machine with nvcc "
                 "and a CUDA build of torch")

_lock = threading.Lock()
_attempted = False
_ops = None  # torch.ops.dbkernels once the extension is loaded
_source: str | None = None  # "compiled" (dbkernels._C) or "jit"
_reason: str | None = None
_detail: str | None = None  # full text of a JIT build error, for info()


def csrc_dir() -> Path | None:
    """The csrc/ folder of a source checkout or editable install, or None."""
    for cand in (_PKG_DIR.parent / "csrc", _PKG_DIR / "csrc"):
        if (cand / "ops.cpp").is_file():
            return cand
    return None


def _sources(csrc: Path) -> list[str]:
    return [str(p) for p in sorted(csrc.glob("*.cu")) + sorted(csrc.glob("*.cpp"))]


def cache_dir() -> Path:
    """Where the JIT build goes: $DBKERNELS_CACHE, or a per torch/CUDA version folder."""
    env = os.environ.get("DBKERNELS_CACHE")
    if env:
        return Path(env).expanduser()
    try:
        import torch

        tag = f"ext-{torch.__version__}-{torch.version.cuda or 'cpu'}"
    except Exception:  # torch missing or broken: the name only matters if we can build
        tag = "ext-unknown"
    return Path.home() / ".cache" / "dbkernels" / tag


def _short(err: BaseException) -> str:
    """One line out of a (possibly very long) build or import error."""
    lines = [ln.strip() for ln in str(err).splitlines() if ln.strip()]
    if not lines:
        return type(err).__name__
    picked = next((ln for ln in lines if "error" in ln.lower() and ln != lines[0]), lines[0])
    text = f"{type(err).__name__}: {picked}"
    return text if len(text) <= 300 else text[:297] + "..."


def _jit_flags() -> tuple[list[str], list[str]]:
    # Never --use_fast_math: the noise and loss must match the PyTorch reference.
    return ["-O3"], ["-O3", "-lineinfo"]


def _try_load():
    """(ops namespace | None, source | None, reason | None, detail | None)."""
    try:
        import torch
    except Exception as e:  # noqa: BLE001 - any import failure means "no torch"
        return None, None, f"torch is not importable ({_short(e)})", None
    if torch.version.cuda is None:
        return None, None, (f"torch {torch.__version__} is a CPU build (torch.version.cuda is None); "
                            "install a CUDA build of torch to use the CUDA kernels"), None
    if not torch.cuda.is_available():
        return None, None, "no CUDA device is available (torch.cuda.is_available() is False)", None

    try:
        importlib.import_module("dbkernels._C")
        return torch.ops.dbkernels, "compiled", None, None
    except ImportError as e:
        compiled_err = e
    if importlib.util.find_spec("dbkernels._C") is not None:
        # Present but unloadable (e.g. built against another torch): JIT is the way out.
        not_built = f"dbkernels._C exists but failed to import ({_short(compiled_err)})"
    else:
        not_built = "dbkernels._C was not built"

    if os.environ.get("DBKERNELS_NO_JIT", "") == "1":
        return None, None, f"{not_built} and DBKERNELS_NO_JIT=1 disables the JIT build; {_REBUILD_HINT}", None
    csrc = csrc_dir()
    if csrc is None:
        return None, None, (f"{not_built} and the csrc/ sources for a JIT build were not found next to "
                            f"{_PKG_DIR}; {_REBUILD_HINT}"), None
    try:
        from torch.utils import cpp_extension
    except Exception as e:  # noqa: BLE001
        return None, None, f"{not_built} and torch.utils.cpp_extension failed to import ({_short(e)})", None
    if cpp_extension.CUDA_HOME is None:
        return None, None, (f"{not_built} and no CUDA toolkit was found for a JIT build "
                            f"(set CUDA_HOME or put nvcc on PATH); {_REBUILD_HINT}"), None
    if not cpp_extension.is_ninja_available():
        return None, None, (f"{not_built} and ninja is missing for a JIT build (pip install ninja); "
                            f"{_REBUILD_HINT}"), None
    build_dir = cache_dir()
    cflags, cuda_cflags = _jit_flags()
    try:
        build_dir.mkdir(parents=True, exist_ok=True)
        cpp_extension.load(
            name=_JIT_NAME,
            sources=_sources(csrc),
            extra_include_paths=[str(csrc)],
            extra_cflags=cflags,
            extra_cuda_cflags=cuda_cflags,
            build_directory=str(build_dir),
            verbose=False,
        )
    except Exception as e:  # noqa: BLE001 - compiler / linker / import errors
        return None, None, (f"{not_built} and JIT build failed: {_short(e)}; {_REBUILD_HINT}"), str(e)
    return torch.ops.dbkernels, "jit", None, None


def _ensure_loaded() -> None:
    global _attempted, _ops, _source, _reason, _detail
    if _attempted:
        return
    with _lock:
        if _attempted:
            return
        try:
            _ops, _source, _reason, _detail = _try_load()
        except Exception as e:  # noqa: BLE001 - never let a probe crash the caller
            _ops, _source, _reason, _detail = None, None, f"loading the CUDA extension failed: {_short(e)}", str(e)
        _attempted = True


def unavailable_reason() -> str | None:
    """None when the extension is loaded and usable, else a sentence saying why not."""
    _ensure_loaded()
    return _reason


def load():
    """The `torch.ops.dbkernels` namespace with the CUDA ops; RuntimeError if unavailable."""
    _ensure_loaded()
    if _ops is None:
        raise RuntimeError(f"dbkernels CUDA extension unavailable: {_reason}")
    return _ops


def info() -> dict:
    """Build facts for `python -m dbkernels`; loads nothing and compiles nothing."""
    try:
        compiled = importlib.util.find_spec("dbkernels._C") is not None
    except Exception:  # noqa: BLE001
        compiled = False
    csrc = csrc_dir()
    return {
        "compiled_extension": compiled,  # dbkernels._C is installed (not necessarily loadable)
        "load_attempted": _attempted,
        "loaded_from": _source,  # "compiled", "jit" or None
        "unavailable_reason": _reason if _attempted else "(not probed yet)",
        "jit_error": _detail,
        "jit_cache_dir": str(cache_dir()),
        "jit_enabled": os.environ.get("DBKERNELS_NO_JIT", "") != "1",
        "csrc_dir": str(csrc) if csrc is not None else None,
        "nvcc": shutil.which("nvcc"),
        "cuda_home": os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH"),
        "ninja": shutil.which("ninja"),
        "cuda_arch_list": os.environ.get("TORCH_CUDA_ARCH_LIST")
        or "(unset: setup.py builds 8.6;9.0, the JIT build targets the visible GPU)",
    }
