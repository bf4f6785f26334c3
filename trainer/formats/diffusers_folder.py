"""Writing into a run's output folder without risk: a staging folder, then each item moved into place.

An export (the trained pipeline, the LoRA files, a single-file checkpoint) is written into
output_dir/.tmp-export first (after a free-space check), then each item is moved into place. An
item already in output_dir is replaced only if an earlier export of this run wrote it (the run's
marker lists what each export wrote); anything else there is never touched, and a failed write
leaves no temporary behind.
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path

from trainer.errors import UserError
from trainer.formats import outdir

_TMP = ".tmp-export"
_OLD = ".tmp-old-"


def model_bytes(base_model, pipe) -> int:
    """About the size of an exported pipeline folder: every module's tensors plus the small files."""
    import torch

    n = 0
    for comp in pipe.components.values():
        if isinstance(comp, torch.nn.Module):
            n += sum(t.numel() * t.element_size() for t in comp.state_dict().values())
    tok = Path(base_model) / "tokenizer"
    return n + sum(f.stat().st_size for f in tok.glob("*") if f.is_file()) + outdir.MB


def remove_temporaries(out: Path) -> None:
    """Undo what a run killed during its export left (only call on a folder of ours)."""
    shutil.rmtree(out / _TMP, ignore_errors=True)
    for old in out.glob(_OLD + "*"):
        dest = out / old.name[len(_OLD):]
        if dest.exists():
            shutil.rmtree(old, ignore_errors=True) if old.is_dir() else old.unlink(missing_ok=True)
        else:  # killed between moving the old item aside and the new one in: put the old one back
            os.rename(old, dest)


def _remove(p: Path) -> None:
    shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)


def staging(out: Path) -> Path:
    """An empty staging folder inside `out` for an export (see install)."""
    tmp = out / _TMP
    shutil.rmtree(tmp, ignore_errors=True)
    return tmp


def install(out: Path, tmp: Path) -> None:
    """Move every item of the staging folder `tmp` into `out`: an item already there is replaced only if an
    earlier export of this run wrote it (UserError otherwise, nothing moved); `tmp` is removed."""
    items = sorted(tmp.iterdir())
    ours = set((outdir.read_marker(out) or {}).get("exported", []))
    foreign = [i.name for i in items if (out / i.name).exists() and i.name not in ours]
    if foreign:
        shutil.rmtree(tmp, ignore_errors=True)
        raise UserError(f"{out} holds {', '.join(foreign)}, which dbtrain did not write, so the model was not "
                        f"saved over it; move it away")
    outdir.write_marker(out, exported=sorted(ours | {i.name for i in items}))
    for item in items:
        dest = out / item.name
        if dest.exists():
            old = out / f"{_OLD}{item.name}"
            _remove(old)
            os.rename(dest, old)
            os.rename(item, dest)
            _remove(old)
        else:
            os.rename(item, dest)
    shutil.rmtree(tmp, ignore_errors=True)
