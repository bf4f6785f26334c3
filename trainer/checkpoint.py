"""Checkpoints in output_dir/checkpoint-<step>/ (diffusers' naming), written atomically.

A checkpoint is written into a hidden temporary folder beside it and renamed into
place only when complete, so a run killed at any moment leaves either the whole
checkpoint or none (plus a temporary folder the next run removes).
"""
from __future__ import annotations

import json
import os
import random
import re
import shutil
from pathlib import Path

import numpy as np
import torch

from .config import UserError

_NAME = re.compile(r"^checkpoint-(\d+)$")
_TMP_PREFIX = ".tmp-checkpoint-"


def list_checkpoints(output_dir) -> list[tuple[int, Path]]:
    out = Path(output_dir)
    if not out.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in out.iterdir() if p.is_dir() and (m := _NAME.match(p.name))]
    return sorted(found)


def remove_stale_temporaries(output_dir) -> None:
    out = Path(output_dir)
    if out.is_dir():
        for p in out.iterdir():
            if p.name.startswith(_TMP_PREFIX):
                shutil.rmtree(p, ignore_errors=True)


def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save(output_dir, step: int, *, models: dict, optimizer, lr_scheduler, scaler, config: dict,
         total_limit: int | None) -> Path:
    """Write checkpoint-<step> atomically, then prune to the newest `total_limit`."""
    out = Path(output_dir)
    final = out / f"checkpoint-{step}"
    tmp = out / f"{_TMP_PREFIX}{step}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for name, model in models.items():
        model.save_pretrained(tmp / name, safe_serialization=True)
    torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
    torch.save(lr_scheduler.state_dict(), tmp / "scheduler.pt")
    if scaler is not None:
        torch.save(scaler.state_dict(), tmp / "scaler.pt")
    torch.save(rng_state(), tmp / "rng_state.pt")
    (tmp / "training_state.json").write_text(json.dumps({"step": step, "config": config}, indent=1, default=str))
    _fsync_tree(tmp)
    if final.exists():  # the same step written again after a resume: swap, never leave neither
        old = out / f"{_TMP_PREFIX}old-{step}-{os.getpid()}"
        os.rename(final, old)
        os.rename(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.rename(tmp, final)
    if total_limit is not None and total_limit > 0:
        for _, p in list_checkpoints(out)[:-total_limit]:  # oldest first
            shutil.rmtree(p, ignore_errors=True)
    return final


def _fsync_tree(folder: Path) -> None:
    for p in folder.rglob("*"):
        if p.is_file():
            with open(p, "rb") as f:
                os.fsync(f.fileno())


def resolve(output_dir, resume: str | None) -> Path | None:
    """The checkpoint folder to resume from (None: start fresh)."""
    if not resume:
        return None
    if resume == "latest":
        ckpts = list_checkpoints(output_dir)
        return ckpts[-1][1] if ckpts else None
    path = Path(resume)
    if not path.is_absolute() and not path.exists():
        path = Path(output_dir) / resume
    if not (path / "training_state.json").is_file():
        raise UserError(f"--resume_from_checkpoint {resume}: {path} is not a checkpoint folder "
                        f"(no training_state.json)")
    return path


def load_state(path: Path) -> dict:
    return json.loads((path / "training_state.json").read_text())
