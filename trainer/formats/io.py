"""Writing files safely: a new .safetensors file atomically (never over one that exists, one line when the
disk is full), per-process temporaries that the next run cleans, and the user's normal permissions."""
from __future__ import annotations

import contextlib
import errno
import os
import re
import shutil
from pathlib import Path

from trainer.errors import UserError
from trainer.formats import outdir

_OS_ERROR = re.compile(r"os error (\d+)")  # how safetensors' Rust side names the OSError it wraps


# ------------------------------------------------------------------ permissions

def umask() -> int:
    """The process's umask, read without changing it (os.umask() can only be read by setting it, which
    would race with other threads creating files); the set-and-restore round trip only as a fallback."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def normal_permissions(path) -> Path:
    """Give `path` the permissions a file the user made would have: 0o666 & ~umask for a file; for a folder,
    0o777 & ~umask for it and each folder below, 0o666 & ~umask for each file in it. Symlinks are left alone.

    safetensors (so diffusers' save_pretrained too) writes through an owner-only (0600) temporary file, so
    without this the weights of a model could not be read by the people it is handed to, its configs could."""
    p = Path(path)
    mask = umask()
    file_mode, dir_mode = 0o666 & ~mask, 0o777 & ~mask
    if p.is_symlink() or not p.exists():
        return p
    if not p.is_dir():
        os.chmod(p, file_mode)
        return p
    os.chmod(p, dir_mode)
    for root, dirs, files in os.walk(p):
        for name in dirs + files:
            q = os.path.join(root, name)
            if not os.path.islink(q):
                os.chmod(q, dir_mode if name in dirs else file_mode)
    return p


# ------------------------------------------------------------------ temporaries of one process

def is_stale(pid: int | None) -> bool:
    """Whether a temporary that process `pid` made may be removed: its process is gone, or it is ours
    (left by an earlier write of this process), or it carries no pid (written before names had one)."""
    if pid is None or pid == os.getpid() or pid <= 0:
        return True
    try:
        os.kill(pid, 0)  # signal 0: only asks whether the process exists
    except PermissionError:  # it does, another user's
        return False
    except OSError:  # ProcessLookupError: gone
        return True
    return False


def temporary_pid(name: str, prefix: str) -> tuple[bool, int | None]:
    """(whether `name` is a temporary `prefix`<pid>[-rest], its pid); `prefix` alone: a temporary without one."""
    if name == prefix.rstrip("-"):
        return True, None
    if not name.startswith(prefix):
        return False, None
    m = re.match(r"(\d+)(?:$|-)", name[len(prefix):])
    return (True, int(m.group(1))) if m else (False, None)


def remove(p: Path) -> None:
    """Remove a file or a folder tree (what is already gone is fine)."""
    if p.is_dir() and not p.is_symlink():
        shutil.rmtree(p, ignore_errors=True)
    else:
        with contextlib.suppress(OSError):
            p.unlink()


def remove_stale(folder, prefix: str) -> list[Path]:
    """Remove the temporaries `prefix`<pid>... in `folder` whose process is gone (see is_stale); the removed."""
    folder, gone = Path(folder), []
    if not folder.is_dir():
        return gone
    for p in sorted(folder.iterdir()):
        match, pid = temporary_pid(p.name, prefix)
        if match and is_stale(pid):
            remove(p)
            gone.append(p)
    return gone


# ------------------------------------------------------------------ failed writes as one line

def os_error_of(e: BaseException) -> OSError | None:
    """The OSError behind a failed write: `e` itself, or the one a safetensors error (SafetensorError, not an
    OSError) wraps, as in "I/O error: No space left on device (os error 28)"; None for any other error."""
    if isinstance(e, OSError):
        return e
    if type(e).__name__ == "SafetensorError":
        m = _OS_ERROR.search(str(e))
        if m:
            n = int(m.group(1))
            return OSError(n, os.strerror(n))
    if isinstance(e, RuntimeError) and ("inline_container" in str(e) or "PytorchStreamWriter" in str(e)):
        # torch.save's writer reports a short write (a full disk) without the OS error
        return OSError(errno.EIO, "the write stopped short (is the disk full?)")
    return None


@contextlib.contextmanager
def one_line_write_errors(folder, what: str, need: int, temporary=None):
    """Inside: a write that fails with an OSError (a full disk, a read-only file system, ...) or a safetensors
    error wrapping one becomes outdir.failed_write's one line (how much is needed, how much is free), after
    `temporary` (a file or folder) is removed, so a failed write leaves nothing behind."""
    try:
        yield
    except Exception as e:
        err = os_error_of(e)
        if err is None:
            raise
        if temporary is not None:
            remove(Path(temporary))
        raise outdir.failed_write(folder, what, err, need) from e


# ------------------------------------------------------------------ sizes, torch-free

def tensors_bytes(tensors: dict, metadata: dict | None = None) -> int:
    """Size of the .safetensors file that holds `tensors`: their bytes plus the header (an upper bound)."""
    data = sum(t.numel() * t.element_size() for t in tensors.values())
    header = sum(200 + len(k) for k in tensors) + sum(len(k) + len(v) + 8 for k, v in (metadata or {}).items())
    return data + header


# ------------------------------------------------------------------ a new .safetensors file

def check_new_file(path, what: str = "output file") -> Path:
    """The path, if a new file may be written there (torch-free; the CLI calls it before loading)."""
    path = Path(path)
    if path.exists() or path.is_symlink():
        raise UserError(f"{what} {path} already exists; choose a new file name (nothing is overwritten)")
    if path.suffix != ".safetensors":
        raise UserError(f"{what} {path} must end in .safetensors")
    parent = path.parent if str(path.parent) else Path(".")
    if not parent.is_dir():
        raise UserError(f"the folder {parent} of {what} {path} does not exist; create it first")
    if not outdir.writable(parent):
        raise UserError(f"cannot write into {parent}; choose another place for {what} {path}")
    return path


def temporary_prefix(path: Path) -> str:
    """Temporaries of a write of `path` are `.<name>.tmp-<pid>` beside it (a folder: safetensors makes its
    own temporary file inside it, so a killed write leaves only this one recognisable name)."""
    return f".{path.name}.tmp-"


def write_new_safetensors(path, tensors: dict, metadata: dict | None = None) -> Path:
    """Save `tensors` to a temporary name next to `path`, then link it into place.

    os.link fails if `path` appeared meanwhile, so a file someone made is never replaced. The free space is
    checked first; a write that fails (full disk, ...) is outdir.NoSpace's one line and leaves nothing; a
    killed write leaves a temporary that the next write of the same file removes. The file gets the user's
    normal permissions."""
    from safetensors.torch import save_file

    path = check_new_file(path)
    parent = path.parent if str(path.parent) else Path(".")
    remove_stale(parent, temporary_prefix(path))
    tensors = {k: v.contiguous() for k, v in tensors.items()}
    meta = {str(k): str(v) for k, v in (metadata or {}).items()}
    need = tensors_bytes(tensors, meta)
    outdir.require_space(parent, need, path.name)
    staging = parent / f"{temporary_prefix(path)}{os.getpid()}"
    remove(staging)
    tmp = staging / path.name
    try:
        with one_line_write_errors(parent, path.name, need, staging):
            staging.mkdir()
            save_file(tensors, str(tmp), metadata=meta)
            normal_permissions(tmp)
            try:
                os.link(tmp, path)  # atomic, and refuses an existing destination
            except FileExistsError:
                raise UserError(f"output file {path} appeared while writing; nothing was overwritten") from None
            except OSError:  # file systems without hard links: rename (checked just above)
                if path.exists():
                    raise UserError(f"output file {path} appeared while writing; nothing was overwritten") from None
                os.replace(tmp, path)
    finally:
        remove(staging)
    return path
