"""Reading tensor files without running code from them.

A `.pt`/`.bin`/`.ckpt` file is a pickle, and unpickling can call any function the file
names. Every file dbtrain reads (embeddings from strangers, and its own checkpoint files)
goes through safetensors or `torch.load(weights_only=True)`, whose unpickler builds only
tensors, containers and plain values (plus the few numpy types listed below, which old
dbtrain checkpoints hold). A file that needs anything else is refused with one line.
"""
from __future__ import annotations

import pickle
from pathlib import Path

import torch

from trainer.errors import UserError

SAFETENSORS = (".safetensors",)


def _numpy_globals() -> list:
    """numpy's array reconstruction: the RNG state in rng_state.pt of checkpoints written before
    the state was stored as tensors. Only array/dtype builders, nothing that calls out."""
    import numpy as np

    core = getattr(np, "_core", None) or np.core
    found = [core.multiarray._reconstruct, np.ndarray, np.dtype]
    dtypes = getattr(np, "dtypes", None)
    if dtypes is not None:
        found += [getattr(dtypes, n) for n in ("UInt32DType", "Int64DType", "Float64DType") if hasattr(dtypes, n)]
    return found


class Refused(UserError):
    """A file that cannot be read without running code from it (or is not a tensor file at all)."""


def torch_load(path, *, map_location="cpu", mmap: bool = False, allow_numpy: bool = False):
    """torch.load with weights_only=True; a file that needs more is a one-line Refused naming it."""
    path = Path(path)
    kw = dict(map_location=map_location, weights_only=True)
    if mmap:
        kw["mmap"] = True
    try:
        if allow_numpy:
            with torch.serialization.safe_globals(_numpy_globals()):
                return torch.load(path, **kw)
        return torch.load(path, **kw)
    except pickle.UnpicklingError as e:
        what = _first_line(e)
        raise Refused(f"refused to load {path}: it is a pickle that would run code or build objects other than "
                      f"tensors ({what}); use a .safetensors file, or one you made yourself") from e


def _first_line(e: Exception) -> str:
    """The useful part of torch's weights_only message (it names the global the file wants)."""
    text = str(e)
    for line in text.splitlines():
        line = line.strip()
        if "GLOBAL" in line or "Unsupported" in line:
            return line[:200]
    return (text.strip().splitlines() or [type(e).__name__])[0][:200]


def load_tensors(path) -> dict:
    """The contents of a tensor file: safetensors by suffix (or by content), else a weights-only pickle.

    Raises a one-line UserError for a missing, damaged or refused file."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: no such file")
    if path.suffix.lower() in SAFETENSORS or _looks_like_safetensors(path):
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(path, device="cpu")
        except (SafetensorError, OSError, ValueError) as e:
            raise UserError(f"{path} is not a readable safetensors file ({_first_line(e)})") from e
    try:
        return torch_load(path)
    except Refused:
        raise
    except Exception as e:  # noqa: BLE001 - zip/pickle damage of every kind
        raise UserError(f"{path} does not load as a tensor file ({type(e).__name__}: {_first_line(e)})") from e


def _looks_like_safetensors(path: Path) -> bool:
    """A safetensors file starts with a little-endian header length and then '{'."""
    try:
        with open(path, "rb") as f:
            head = f.read(9)
    except OSError:
        return False
    return len(head) == 9 and head[8:9] == b"{" and int.from_bytes(head[:8], "little") < path.stat().st_size
