"""Reading tensor files without running code from them.

A `.pt`/`.bin`/`.ckpt` file is a pickle, and unpickling can call any function the file
names. Every file dbtrain reads (embeddings from strangers, and its own checkpoint files)
goes through safetensors or `torch.load(weights_only=True)`, whose unpickler builds only
tensors, containers and plain values (plus the few numpy types listed below, which old
dbtrain checkpoints hold). A file that needs anything else is refused with one line.

Also here, torch-free: what a weight file really is (a truncated .safetensors, a pickle under a
.safetensors name), a model folder's configs (valid JSON, fields of the right type, no custom code:
we never run a model folder's code) and, with torch, whether loaded tensors are finite.
"""
from __future__ import annotations

import json
import math
import pickle
import struct
from pathlib import Path

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
    import torch

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

        problem = safetensors_problem(path)
        if problem is not None and not problem.startswith("is a pickle"):
            raise UserError(f"{path} is not a readable safetensors file (it {problem})")
        if problem is None:
            try:
                return load_file(path, device="cpu")
            except (SafetensorError, OSError, ValueError) as e:
                raise UserError(f"{path} is not a readable safetensors file ({_first_line(e)})") from e
        # a pickle under a .safetensors name: read as what it is, weights only (Refused if it needs code)
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


# ------------------------------------------------------------------ what a weight file is (torch-free)

def _kind_of(head: bytes) -> str | None:
    """'a pickle' / 'a zip archive (torch.save)' from a file's first bytes, None for neither."""
    if head[:1] == b"\x80" and head[1:2] in bytes(range(2, 6)):
        return "a pickle"
    if head[:4] == b"PK\x03\x04":
        return "a zip archive (torch.save's format)"
    return None


def safetensors_problem(path) -> str | None:
    """None if `path` is a whole .safetensors file (header and data), else what is wrong, to follow its name
    ("is truncated ...", "is a pickle ..."). Reads the header only."""
    path = Path(path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            kind = _kind_of(head)
            if kind:
                return (f"is {kind}, not a safetensors file: a pickle can run code when loaded; use the real "
                        f".safetensors file")
            if len(head) < 8:
                return f"is not a safetensors file ({size} bytes: empty or truncated)"
            (n,) = struct.unpack("<Q", head)
            if n > size - 8:
                return f"is truncated or not a safetensors file ({size} bytes, its header alone says {n + 8})"
            header = json.loads(f.read(n))
        ends = [t["data_offsets"][1] for k, t in header.items() if k != "__metadata__"]
    except OSError as e:
        return f"cannot be read ({e.strerror})"
    except (ValueError, TypeError, KeyError, IndexError, AttributeError):
        return "has no valid safetensors header (damaged, or not a safetensors file)"
    end = max(ends, default=0)
    if size < 8 + n + end:
        return f"is truncated ({size} of {8 + n + end} bytes); download or copy it again"
    return None


# ------------------------------------------------------------------ a model folder's configs (torch-free)

_INT, _NUM, _STR, _INTS, _STRS = "an integer", "a number", "a string", "a list of integers", "a list of strings"
_INT_OR_INTS = "an integer or a list of integers"
# fields diffusers / transformers compute with at once: a wrong type there is a traceback deep inside them
CONFIG_FIELDS = {
    "unet": {"in_channels": _INT, "out_channels": _INT, "sample_size": _INT_OR_INTS, "block_out_channels": _INTS,
             "down_block_types": _STRS, "up_block_types": _STRS, "layers_per_block": _INT_OR_INTS,
             "cross_attention_dim": _INT_OR_INTS, "attention_head_dim": _INT_OR_INTS, "norm_num_groups": _INT},
    "vae": {"in_channels": _INT, "out_channels": _INT, "latent_channels": _INT, "sample_size": _INT_OR_INTS,
            "block_out_channels": _INTS, "down_block_types": _STRS, "up_block_types": _STRS,
            "layers_per_block": _INT, "norm_num_groups": _INT, "scaling_factor": _NUM},
    "text_encoder": {"hidden_size": _INT, "intermediate_size": _INT, "num_hidden_layers": _INT,
                     "num_attention_heads": _INT, "vocab_size": _INT, "max_position_embeddings": _INT,
                     "projection_dim": _INT},
    "scheduler": {"num_train_timesteps": _INT, "beta_start": _NUM, "beta_end": _NUM, "beta_schedule": _STR,
                  "prediction_type": _STR},
}
CONFIG_FIELDS["text_encoder_2"] = CONFIG_FIELDS["text_encoder"]
LIBRARIES = ("diffusers", "transformers")  # where a component class may come from; anything else is code


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v > 0


def _fits(v, kind: str) -> bool:
    if kind == _INT:
        return _is_int(v)
    if kind == _NUM:
        return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
    if kind == _STR:
        return isinstance(v, str)
    if kind == _STRS:
        return isinstance(v, list) and bool(v) and all(isinstance(x, str) for x in v)
    ints = isinstance(v, list) and bool(v) and all(_is_int(x) for x in v)
    return ints or (kind == _INT_OR_INTS and _is_int(v))


def read_config(path) -> dict:
    """A config file's JSON object, or a one-line UserError naming the file (truncated, not JSON, not an object)."""
    path = Path(path)
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"{path} cannot be read ({getattr(e, 'strerror', None) or type(e).__name__})") from None
    try:
        cfg = json.loads(text)
    except ValueError as e:
        raise UserError(f"{path} is not valid JSON ({str(e).split(':')[0]}{'; truncated?' if text else ': empty'}); "
                        f"restore it from the model's download") from None
    if not isinstance(cfg, dict):
        raise UserError(f"{path} is not a JSON object of settings; restore it from the model's download")
    return cfg


def _no_custom_code(path: Path, cfg: dict) -> None:
    """A config naming code to import (auto_map, a module path as class) is refused: we never run it."""
    name = cfg.get("_class_name")
    if "auto_map" in cfg or "custom_pipeline" in cfg or (name is not None and (
            not isinstance(name, str) or not name.isidentifier())):
        what = "auto_map" if "auto_map" in cfg else ("custom_pipeline" if "custom_pipeline" in cfg
                                                     else f"_class_name {name!r}")
        raise UserError(f"{path} asks for the model's own code ({what}); dbtrain never runs code from a model "
                        f"folder: use a folder of standard diffusers / transformers classes")


def check_model_index(root) -> None:
    """model_index.json (if there): JSON, and every component a class of diffusers or transformers."""
    path = Path(root) / "model_index.json"
    if not path.is_file():
        return
    index = read_config(path)
    _no_custom_code(path, index)
    for comp, entry in index.items():
        if comp.startswith("_") or not isinstance(entry, list):
            continue
        lib, cls = (entry + [None, None])[:2]
        if len(entry) == 2 and lib is None and cls is None:  # a component the pipeline does without
            continue
        if len(entry) != 2 or lib not in LIBRARIES or not isinstance(cls, str) or not cls.isidentifier():
            raise UserError(f"{path}: {comp} is {entry!r}, not a diffusers or transformers class; dbtrain never "
                            f"runs code from a model folder: use a folder of standard components")


def check_config(path, component: str) -> dict:
    """A component's config.json: JSON, no custom code, the fields it computes with of the right type."""
    path = Path(path)
    cfg = read_config(path)
    _no_custom_code(path, cfg)
    for key, kind in CONFIG_FIELDS.get(component, {}).items():
        if key in cfg and cfg[key] is not None and not _fits(cfg[key], kind):
            raise UserError(f"{path}: {key} is {cfg[key]!r}, it must be {kind}; restore the file from the "
                            f"model's download")
    blocks = [cfg.get(k) for k in ("block_out_channels", "down_block_types", "up_block_types")]
    if all(isinstance(b, list) for b in blocks) and len({len(b) for b in blocks}) != 1:
        raise UserError(f"{path}: block_out_channels, down_block_types and up_block_types must be as long as each "
                        f"other ({', '.join(str(len(b)) for b in blocks)}); restore the file from the model's download")
    return cfg


def check_weight_files(folder, files) -> None:
    """Every .safetensors file (and every shard an index names) among `files` in `folder` is whole; a .bin
    file is read later, weights only."""
    folder = Path(folder)
    for name in files:
        p = folder / name
        if not p.is_file():
            continue
        if name.endswith(".index.json"):
            shards = read_config(p).get("weight_map")
            if not isinstance(shards, dict):
                raise UserError(f"{p} has no weight_map; restore it from the model's download")
            for shard in sorted({str(s) for s in shards.values()}):
                if not (folder / shard).is_file():
                    raise UserError(f"{folder / shard} is missing (named in {p.name})")
                if shard.endswith(".safetensors") and (problem := safetensors_problem(folder / shard)):
                    raise UserError(f"{folder / shard} {problem}")
        elif name.endswith(".safetensors") and (problem := safetensors_problem(p)):
            raise UserError(f"{p} {problem}")


def check_model_files(root, components, weight_files=()) -> None:
    """The files of a model folder that loading would read, checked torch-free: model_index.json, each
    component's config (scheduler: scheduler_config.json) and its weight files among `weight_files`. One line
    naming the file and what is wrong; a folder that asks for custom code is refused."""
    root = Path(root)
    check_model_index(root)
    for comp in components:
        d = root / comp
        if comp.startswith("tokenizer") or not d.is_dir():
            continue
        if comp == "scheduler":
            if (d / "scheduler_config.json").is_file():
                check_config(d / "scheduler_config.json", comp)
            continue
        if (d / "config.json").is_file():
            check_config(d / "config.json", comp)
        check_weight_files(d, weight_files)


# ------------------------------------------------------------------ finite tensors

def first_non_finite(tensors: dict) -> str | None:
    """The name of the first floating tensor holding NaN or inf (None: all finite)."""
    import torch

    for name, t in tensors.items():
        if isinstance(t, torch.Tensor) and t.is_floating_point() and t.numel() and not bool(torch.isfinite(t).all()):
            return name
    return None


def require_finite(tensors: dict, where, what: str = "tensor") -> None:
    """UserError naming the first NaN/inf tensor of `tensors` and `where` (the file) it came from."""
    bad = first_non_finite(tensors)
    if bad is not None:
        raise UserError(f"{where}: {what} {bad} holds NaN or inf values; the file is damaged or came from a run "
                        f"that diverged, it is not used")
