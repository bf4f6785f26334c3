"""The app's folders: every training run, sample batch and FABRIC session gets a new folder under --runs_dir
(never one a user made, never reused), and what a run wrote is read back from it (the step log, validation
grids, checkpoints). No Gradio here."""
from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
import time
from pathlib import Path

from trainer.options.checks import IMAGE_SUFFIXES

RUN_FILE = "ui-run.json"  # what the app started in a run folder: the command line, the steps, the method
_SAFE = re.compile(r"[^A-Za-z0-9._-]+")


def new_folder(root: Path, prefix: str) -> Path:
    """root/<prefix>-YYYYmmdd-HHMMSS[-k]: created here, so two starts in one second get two folders."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    for k in range(1000):
        path = root / (f"{prefix}-{stamp}" + (f"-{k}" if k else ""))
        try:
            path.mkdir()
            return path
        except FileExistsError:
            continue
    raise RuntimeError(f"no free folder name under {root}")


def safe_name(name: str) -> str:
    """A file name without folders or odd characters (uploads keep their stem: masks and captions match by it)."""
    stem, suffix = os.path.splitext(os.path.basename(name))
    stem = _SAFE.sub("_", stem).strip("._") or "image"
    return stem[:80] + _SAFE.sub("", suffix.lower())


def upload_paths(files) -> list[str]:
    """The paths of a gr.File value (file objects with .name, or plain paths; None: none)."""
    return [str(getattr(f, "name", f)) for f in (files or [])]


def copy_in(files: list[str], folder: Path) -> list[Path]:
    """Copies of the uploaded files in `folder` under their own names (a repeated name gets _2, _3, ...)."""
    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for f in files:
        name = safe_name(str(f))
        stem, suffix = os.path.splitext(name)
        dest, k = folder / name, 1
        while dest.exists():
            k += 1
            dest = folder / f"{stem}_{k}{suffix}"
        shutil.copyfile(f, dest)
        out.append(dest)
    return out


def images_in(folder: Path) -> list[Path]:
    folder = Path(folder)
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith("."))


def write_json(path: Path, data: dict) -> None:
    """Atomically: a reader never sees half a file (a temp file of its own per writer)."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(fd, "w") as f:
        f.write(json.dumps(data, indent=1))
    os.replace(tmp, path)


def read_json(path: Path) -> dict | None:
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None


def read_log(output_dir: Path, logging_dir: str = "logs") -> list[dict]:
    """The run's step records (output_dir/logs/train_log.jsonl; a line being written is skipped). A resumed run
    appends; a step logged twice (before a stop and after the resume) keeps its last record."""
    path = Path(output_dir) / logging_dir / "train_log.jsonl"
    by_step = {}
    try:
        text = path.read_text()
    except OSError:
        return []
    for line in text.splitlines():
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        if isinstance(rec, dict) and isinstance(rec.get("step"), int) and rec.get("loss") is not None:
            by_step[rec["step"]] = rec
    return [by_step[k] for k in sorted(by_step)]


def validation_images(output_dir: Path) -> list[Path]:
    """The validation grids written so far (output_dir/validation/step-NNNNNN.png), oldest first."""
    return [p for p in images_in(Path(output_dir) / "validation") if p.name.startswith("step-")]


def checkpoints(output_dir: Path) -> list[int]:
    """Steps of the checkpoint folders in output_dir (what --resume_from_checkpoint latest continues from)."""
    out = []
    for p in Path(output_dir).glob("checkpoint-*"):
        tail = p.name.split("-", 1)[1]
        if p.is_dir() and tail.isdigit():
            out.append(int(tail))
    return sorted(out)


def model_folders(root: Path) -> list[Path]:
    """The finished models of the app's runs (a run's model/ folder with its dreambooth.json), newest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = [p / "model" for p in root.iterdir() if (p / "model" / "dreambooth.json").is_file()]
    return sorted(found, key=lambda p: p.stat().st_mtime, reverse=True)


def latest_run(root: Path) -> dict | None:
    """The newest training run the app started under `root` ({"folder", "argv", "max_steps", ...}), so a restarted
    app shows it again and Resume continues it."""
    root = Path(root)
    if not root.is_dir():
        return None
    found = [(rec.get("created", 0), p, rec) for p in root.glob("train-*")
             if isinstance(rec := read_json(p / RUN_FILE), dict) and isinstance(rec.get("argv"), list)]
    if not found:
        return None
    _, folder, rec = max(found, key=lambda t: (t[0], t[1].name))
    return {"folder": str(folder), **rec}
