"""Writing a new .safetensors file: atomic, and never over a file that already exists."""
from __future__ import annotations

import os
from pathlib import Path

from trainer.errors import UserError


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
    if not os.access(parent, os.W_OK):
        raise UserError(f"cannot write into {parent}; choose another place for {what} {path}")
    return path


def write_new_safetensors(path, tensors: dict, metadata: dict | None = None) -> Path:
    """Save `tensors` to a temporary name next to `path`, then link it into place.

    os.link fails if `path` appeared meanwhile, so a file someone made is never replaced;
    a failed or killed write leaves at most the hidden temporary, which is removed on error.
    """
    from safetensors.torch import save_file

    path = check_new_file(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    meta = {str(k): str(v) for k, v in (metadata or {}).items()}
    try:
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp), metadata=meta)
        try:
            os.link(tmp, path)  # atomic, and refuses an existing destination
        except FileExistsError:
            raise UserError(f"output file {path} appeared while writing; nothing was overwritten") from None
        except OSError:  # file systems without hard links: rename (checked just above)
            if path.exists():
                raise UserError(f"output file {path} appeared while writing; nothing was overwritten") from None
            os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path
