"""The output folder of a run: where dbtrain may write, its marker file, and free space.

dbtrain writes only into a new folder, an empty one, or one that holds a run of its own,
recognised by the marker file `.dbtrain-run.json` that a run writes when it creates (or
claims an empty) folder. A folder with anything else in it is refused before a model is
loaded, so nothing a user put there is ever replaced. Nothing here imports torch.
"""
from __future__ import annotations

import fcntl
import json
import os
import re
import shlex
import shutil
import socket
import struct
import sys
import tempfile
import time
from pathlib import Path

from trainer.errors import UserError

MARKER = ".dbtrain-run.json"
LOCK = ".dbtrain-lock"  # held (flock) by the one process writing into the folder; see hold()
_CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")
MB = 2**20


class NoSpace(UserError):
    """Not enough free space (or a failed write) in `folder`; `need` and `free` in bytes."""

    def __init__(self, message: str, folder: Path, need: int, free: int):
        super().__init__(message)
        self.folder, self.need, self.free = folder, need, free


# ------------------------------------------------------------------ marker

def read_marker(out) -> dict | None:
    path = Path(out) / MARKER
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}  # ours, but the record is unreadable (e.g. written half on a full disk)


def write_marker(out, **fields) -> None:
    """Merge `fields` into the marker (written to a temporary name and renamed)."""
    out = Path(out)
    rec = read_marker(out) or {"dbtrain": 1, "created": time.strftime("%Y-%m-%d %H:%M:%S")}
    rec.update(fields)
    tmp = out / (MARKER + ".tmp")
    tmp.write_text(json.dumps(rec, indent=1))
    os.replace(tmp, out / MARKER)


def claim(out, config: dict) -> None:
    """Create the output folder (or take an empty one) and mark it as a dbtrain run."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    if read_marker(out) is None:
        write_marker(out, config=config, finished=False, exported=[])


def list_checkpoints(output_dir) -> list[tuple[int, Path]]:
    out = Path(output_dir)
    if not out.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in out.iterdir() if p.is_dir() and (m := _CHECKPOINT.match(p.name))]
    return sorted(found)


# ------------------------------------------------------------------ one writer per folder

_held: dict[str, object] = {}  # folder (resolved) -> the open lock file of this process


class InUse(UserError):
    """Another live process holds the folder's lock."""


def _holder(lock_file: Path) -> str:
    try:
        rec = json.loads(lock_file.read_text())
        return (f"pid {rec['pid']} on {rec['host']}, started {rec['started']}: {rec['command']}"
                if isinstance(rec, dict) else "another process")
    except (OSError, ValueError, KeyError):
        return "another process"


def hold(folder, flag: str = "--output_dir") -> Path:
    """Make this process the one writer of `folder` (created if missing) until it exits.

    An OS lock (flock) on folder/.dbtrain-lock: the kernel drops it when the process dies, however it
    dies, so a SIGKILL never leaves a stale lock and no one has to delete the file. A second process
    gets one line naming the holder. Taken again by the same process it is a no-op."""
    out = Path(folder)
    created = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    key, path = str(out.resolve()), out / LOCK
    if key in _held:
        try:
            if os.stat(path).st_ino == os.fstat(_held[key].fileno()).st_ino:
                return out
        except OSError:
            pass
        release(out)  # the folder was removed and made again meanwhile: take the new one
    f = open(path, "a+")  # never truncates: the holder's record stays readable until we own the lock
    try:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        f.close()
        raise InUse(f"{flag} {out} is in use by another dbtrain run ({_holder(path)}); wait for it to end, or "
                    f"choose another {flag}") from None
    f.seek(0)
    f.truncate()
    f.write(json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                        "started": time.strftime("%Y-%m-%d %H:%M:%S"),
                        "command": shlex.join(["dbtrain", *sys.argv[1:]])[:300]}))
    f.flush()
    _held[key] = f
    if created:
        _created.add(key)
    return out


_created: set[str] = set()  # folders hold() made: removed again by release() if nothing was written


def release(folder) -> None:
    """Give the folder up before the process ends (an in-process caller such as the tests; a failed run).
    A folder that hold() created and nothing was written into is removed, so a run refused for its
    input leaves nothing behind."""
    key = str(Path(folder).resolve())
    f = _held.pop(key, None)
    if f is None:
        return
    if key in _created:
        _created.discard(key)
        try:
            if not _own_entries(Path(folder)):  # still ours alone (the lock is held until close)
                os.unlink(Path(folder) / LOCK)
                os.rmdir(folder)
        except OSError:
            pass
    f.close()


PROBE = ".dbtrain-probe-"  # writable()'s file, there for an instant (another rank of a torchrun may be probing)


def _own_entries(out: Path) -> list[str]:
    """A folder's entries, without the lock file (which alone does not make a folder ours or not empty) and the
    write probes of other processes of the same run."""
    return sorted(p.name for p in out.iterdir() if p.name != LOCK and not p.name.startswith(PROBE))


# ------------------------------------------------------------------ where we may write

def nearest_existing(path) -> Path:
    p = Path(os.path.abspath(path))
    while not p.exists() and p != p.parent:
        p = p.parent
    return p


def writable(folder: Path) -> bool:
    """True if a file can be created in `folder` (permission bits and a real probe, so a
    read-only file system is caught for root as well)."""
    if not os.access(folder, os.W_OK | os.X_OK):
        return False
    try:
        fd, name = tempfile.mkstemp(prefix=PROBE, dir=folder)
    except OSError:
        return False
    os.close(fd)
    os.unlink(name)
    return True


def check_creatable(path, flag: str) -> None:
    """`path` does not exist: its nearest existing parent must be a writable folder."""
    parent = nearest_existing(path)
    if not parent.is_dir():
        raise UserError(f"cannot create {flag} {path}: {parent} is a file, not a folder")
    if not writable(parent):
        raise UserError(f"cannot create {flag} {path}: {parent} is not writable; choose a folder you can write to")


def _checked_folder(out: Path, flag: str, file_hint: str, writes: str) -> list[str] | None:
    """The entries of an existing folder dbtrain may write into (None: it does not exist yet and
    can be created); a file, a folder holding anything without dbtrain's marker, or an unwritable
    folder is a UserError."""
    if not out.exists():
        check_creatable(out, flag)
        return None
    if not out.is_dir():
        raise UserError(f"{flag} {out} is a file; pass a folder{file_hint}")
    entries = _own_entries(out)
    if entries and MARKER not in entries:
        shown = ", ".join(entries[:4]) + (", ..." if len(entries) > 4 else "")
        raise UserError(f"{flag} {out} holds files dbtrain did not write ({shown}); dbtrain writes {writes}: "
                        f"choose another {flag}")
    if not writable(out):
        raise UserError(f"{flag} {out} is not writable; choose a folder you can write to")
    return entries


def check_output_dir(path, *, resume: bool) -> str:
    """Whether dbtrain may write into --output_dir: "new", "empty" or "ours" (a run of ours
    that may continue). Anything else is a UserError saying what to do."""
    out = Path(path)
    entries = _checked_folder(out, "--output_dir", " (a new one, an empty one, or a previous dbtrain run)",
                              "only into a new folder, an empty one, or one of its own runs")
    if entries is None:
        return "new"
    if not entries:
        return "empty"
    previous = [p.name for _, p in list_checkpoints(out)][-2:]
    previous += [n for n in ("model_index.json",) if n in entries]
    if previous and not resume:
        raise UserError(f"--output_dir {out} holds a previous run ({', '.join(previous)}); pass "
                        f"--resume_from_checkpoint latest to continue it, or choose a new --output_dir")
    return "ours"


def check_images_out(path, flag: str = "--out") -> None:
    """Whether `dbtrain sample|fabric|eval` may write images into `path`: a new folder, an empty
    one, or one that dbtrain made (its marker), so a user's own 000.png is never replaced. The folder is
    then held by this process (hold()), so two commands never write into it at once."""
    _checked_folder(Path(path), flag, "", "images only into a new folder, an empty one, or one it made")
    hold(path, flag)


def claim_images_out(path, command: str, flag: str = "--out") -> Path:
    """Create (or take) the images folder checked by check_images_out, hold it and mark it as ours."""
    out = Path(path)
    check_images_out(out, flag)  # (again: a caller may not have checked it before)
    if read_marker(out) is None:
        write_marker(out, command=command)
    return out


# ------------------------------------------------------------------ free space

def fmt_bytes(n: float) -> str:
    return f"{n / 2**30:.2f} GB" if n >= 2**30 else f"{n / MB:.1f} MB"


def free_bytes(folder) -> int:
    return shutil.disk_usage(nearest_existing(folder)).free


def require_space(folder, need: int, what: str) -> None:
    """NoSpace unless `folder`'s file system has room for `need` bytes (plus 2% and 1 MB)."""
    free = free_bytes(folder)
    if free < need * 1.02 + MB:
        raise NoSpace(f"not enough free space in {nearest_existing(folder)} for {what}: needs about "
                      f"{fmt_bytes(need)}, {fmt_bytes(free)} free", Path(folder), need, free)


def failed_write(folder, what: str, err: OSError, need: int) -> NoSpace:
    """The one-line error of a write that failed (ENOSPC, EIO, ...)."""
    free = free_bytes(folder)
    return NoSpace(f"could not write {what} in {folder}: {err.strerror or err} (needs about {fmt_bytes(need)}, "
                   f"{fmt_bytes(free)} free)", Path(folder), need, free)


def safetensors_numel(path) -> int | None:
    """Number of elements in a .safetensors file, from its header alone (None: not readable as one)."""
    try:
        with open(path, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            if n > 100 * 2**20:
                return None
            header = json.loads(f.read(n))
        total = 0
        for name, t in header.items():
            if name != "__metadata__":
                k = 1
                for s in t["shape"]:
                    k *= int(s)
                total += k
        return total
    except (OSError, ValueError, struct.error, TypeError, KeyError, AttributeError):
        return None


def _component_numel(folder: Path) -> int:
    total = 0
    for f in folder.glob("*"):
        if f.suffix == ".safetensors":
            total += safetensors_numel(f) or f.stat().st_size // 2
        elif f.suffix == ".bin":
            total += f.stat().st_size // 2  # unknown dtype: assume half precision (an upper bound)
    return total


def run_bytes(opts) -> int:
    """About how much one checkpoint plus the exported model of a run (its TrainOptions) take on disk."""
    root = Path(opts.model.pretrained_model_name_or_path)
    n = {c: _component_numel(root / c) for c in ("unet", "vae", "text_encoder")}
    wbytes = 2 if opts.memory.weights_dtype == "bf16" else 4
    state = {"adamw": 2 * wbytes, "adamw8bit": 2.1, "adamw4bit": 1.1, "bnb8bit": 2.1}[opts.optim.optimizer]
    trained = n["unet"] + (n["text_encoder"] if opts.training.train_text_encoder else 0)
    small = sum(f.stat().st_size for c in ("tokenizer", "scheduler") for f in (root / c).glob("*") if f.is_file())
    ema = opts.ema
    if ema.use_ema:  # the checkpoint's average; --save_raw_weights: a second export in raw/
        state += 2 if ema.ema_dtype == "bf16" else 4
    exports = 2 if ema.use_ema and ema.save_raw_weights else 1
    return int(trained * (wbytes + state) + exports * (sum(n.values()) * wbytes + small))


def check_space(opts) -> None:
    """Before a model is loaded: room for at least one checkpoint and the final model."""
    require_space(opts.checkpoints.output_dir, run_bytes(opts), "a checkpoint and the trained model")
