"""Writing into a run's output folder without risk: a staging folder, then each item moved into place.

An export (the trained pipeline, the LoRA files, a single-file checkpoint) is written into
output_dir/.tmp-export-<pid> first (after a free-space check), then each item is moved into place. An
item already in output_dir is replaced only if an earlier export of this run wrote it (the run's
marker lists what each export wrote); anything else there is never touched, and a failed write
leaves no temporary behind. The temporaries carry the writing process's id, so two processes never
remove each other's, and the next run removes those of processes that are gone (a killed export).
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path

from trainer.errors import UserError
from trainer.formats import io, outdir

_TMP = ".tmp-export-"  # + pid: the staging folder of one process
_OLD = ".tmp-old-"  # + pid-name: an item moved aside while its new version moves in


def model_bytes(base_model, pipe) -> int:
    """About the size of an exported pipeline folder: every module's tensors plus the small files."""
    import torch

    n = 0
    for comp in pipe.components.values():
        if isinstance(comp, torch.nn.Module):
            n += sum(t.numel() * t.element_size() for t in comp.state_dict().values())
    tok = Path(base_model) / "tokenizer"
    return n + sum(f.stat().st_size for f in tok.glob("*") if f.is_file()) + outdir.MB


def _moved_aside(name: str) -> tuple[int | None, str] | None:
    """(pid, item name) of an item `.tmp-old-<pid>-<name>` (`.tmp-old-<name>`: written before names had a pid)."""
    if not name.startswith(_OLD):
        return None
    rest = name[len(_OLD):]
    pid, sep, item = rest.partition("-")
    return (int(pid), item) if sep and pid.isdigit() and item else (None, rest)


def remove_temporaries(out: Path) -> None:
    """Undo what an export killed in `out` left (only call on a folder of ours): the staging folders and
    moved-aside items of processes that are gone; a live process's (another run's) are not touched."""
    out = Path(out)
    io.remove_stale(out, _TMP)
    for old in sorted(out.glob(_OLD + "*")):
        pid, item = _moved_aside(old.name)
        if not io.is_stale(pid):
            continue
        dest = out / item
        if dest.exists():
            io.remove(old)
        else:  # killed between moving the old item aside and the new one in: put the old one back
            os.rename(old, dest)


def staging(out: Path) -> Path:
    """An empty staging folder of this process inside `out` for an export (see install); stale ones of
    processes that are gone are removed."""
    out = Path(out)
    io.remove_stale(out, _TMP)
    tmp = out / f"{_TMP}{os.getpid()}"
    io.remove(tmp)
    return tmp


def install(out: Path, tmp: Path) -> None:
    """Move every item of the staging folder `tmp` into `out`: an item already there is replaced only if an
    earlier export of this run wrote it (UserError otherwise, nothing moved); `tmp` is removed. Every file
    gets the user's normal permissions (the weights too, which safetensors writes owner-only)."""
    items = sorted(tmp.iterdir())
    ours = set((outdir.read_marker(out) or {}).get("exported", []))
    foreign = [i.name for i in items if (out / i.name).exists() and i.name not in ours]
    if foreign:
        shutil.rmtree(tmp, ignore_errors=True)
        raise UserError(f"{out} holds {', '.join(foreign)}, which dbtrain did not write, so the model was not "
                        f"saved over it; move it away")
    io.normal_permissions(tmp)
    outdir.write_marker(out, exported=sorted(ours | {i.name for i in items}))
    for item in items:
        dest = out / item.name
        if dest.exists():
            old = out / f"{_OLD}{os.getpid()}-{item.name}"
            io.remove(old)
            os.rename(dest, old)
            os.rename(item, dest)
            io.remove(old)
        else:
            os.rename(item, dest)
    shutil.rmtree(tmp, ignore_errors=True)
