"""Checkpoints in output_dir/checkpoint-<step>/ (diffusers' naming), written atomically and verified.

A checkpoint is written into a hidden temporary folder beside it, checked (every file
reloaded: safetensors headers against the file sizes, the .pt files through torch.load(weights_only=True),
the sizes recorded in training_state.json), and renamed into place only then, so a run
killed at any moment leaves either a whole checkpoint or none (plus a temporary folder
the next run removes). Older checkpoints are pruned only after the new one checked out.
Free space is checked before writing; a failed write removes its temporary folder and
keeps every earlier checkpoint.
"""
from __future__ import annotations

import json
import os
import random
import shutil
import sys
from pathlib import Path

import numpy as np
import torch

from trainer.core import ema as averages
from trainer.core import resume as resume_options
from trainer.errors import UserError
from trainer.formats import diffusers_folder, io, outdir, safe_load
from trainer.formats.embedding_files import DIFFUSERS_FILE as EMBEDDING_FILE
from trainer.formats.outdir import list_checkpoints

_TMP_PREFIX = ".tmp-checkpoint-"


def remove_stale_temporaries(output_dir) -> None:
    """Temporary folders of a run that was killed while writing (only call on a folder of ours)."""
    out = Path(output_dir)
    if out.is_dir():
        for p in out.iterdir():
            if p.name.startswith(_TMP_PREFIX):
                shutil.rmtree(p, ignore_errors=True)


def rng_state() -> dict:
    # numpy's key array as a tensor, so the file loads with torch.load(weights_only=True) and no allow-list
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {"python": random.getstate(), "numpy": (kind, torch.from_numpy(keys.astype(np.int64)), int(pos),
                                                    int(has_gauss), float(gauss)),
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    kind, keys, *rest = state["numpy"]
    if isinstance(keys, torch.Tensor):
        keys = keys.numpy().astype(np.uint32)
    np.random.set_state((kind, keys, *rest))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _tensor_bytes(obj) -> int:
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(_tensor_bytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(_tensor_bytes(v) for v in obj)
    return 0


def size_of(models: dict, optimizer) -> int:
    """Bytes a checkpoint takes: the trained weights plus the optimizer state (and 1 MB of small files)."""
    weights = sum(_tensor_bytes(m.state_dict()) for m in models.values())
    return weights + _tensor_bytes(optimizer.state_dict()["state"]) + outdir.MB


def save(output_dir, step: int, *, models: dict, optimizer, lr_scheduler, scaler, config: dict,
         total_limit: int | None, extra: dict | None = None) -> Path:
    """Write checkpoint-<step> atomically and verify it, then prune to the newest `total_limit`.

    Raises outdir.NoSpace (a one-line UserError) when the space is missing or a write fails;
    every earlier checkpoint is then still there and no temporary folder is left.
    """
    out = Path(output_dir)
    final = out / f"checkpoint-{step}"
    need = size_of(models, optimizer)
    outdir.require_space(out, need, f"checkpoint-{step}")
    tmp = out / f"{_TMP_PREFIX}{step}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    with io.one_line_write_errors(out, f"checkpoint-{step}", need, tmp):  # (a SafetensorError on a full disk too)
        tmp.mkdir(parents=True)
        for name, model in models.items():
            model.save_pretrained(tmp / name, safe_serialization=True)
        torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        torch.save(lr_scheduler.state_dict(), tmp / "scheduler.pt")
        if scaler is not None:
            torch.save(scaler.state_dict(), tmp / "scaler.pt")
        torch.save(rng_state(), tmp / "rng_state.pt")
        files = {p.relative_to(tmp).as_posix(): p.stat().st_size for p in sorted(tmp.rglob("*")) if p.is_file()}
        record = {"step": step, "config": config, "files": files, **(extra or {})}
        (tmp / "training_state.json").write_text(json.dumps(record, indent=1, default=str))
        io.normal_permissions(tmp)  # the user's umask, not safetensors' owner-only files
        _fsync_tree(tmp)
    problem = verify(tmp)
    if problem is not None:
        shutil.rmtree(tmp, ignore_errors=True)
        raise UserError(f"checkpoint-{step} did not read back after writing ({problem}); the disk of {out} "
                        f"may be failing")
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


# ------------------------------------------------------------------ reading back

def verify(folder: Path) -> str | None:
    """None if the checkpoint loads, else what is wrong with it, naming the file."""
    folder = Path(folder)
    state_file = folder / "training_state.json"
    try:
        state = json.loads(state_file.read_text())
        int(state["step"])
    except (OSError, ValueError, KeyError, TypeError) as e:
        return f"{state_file} is missing or unreadable ({type(e).__name__})"
    for rel, size in state.get("files", {}).items():
        p = folder / rel
        if not p.is_file():
            return f"{p} is missing"
        if p.stat().st_size != size:
            return f"{p} is truncated or changed ({p.stat().st_size} of {size} bytes)"
    if not list(folder.glob("*/*.safetensors")):  # unet/ (DreamBooth) or text_embedding/ (Textual Inversion)
        return f"{folder} has no .safetensors weights (unet/ or text_embedding/)"
    for p in sorted(folder.rglob("*.safetensors")):
        if (problem := safe_load.safetensors_problem(p)) is not None:
            return f"{p} {problem}"
    for name in ("optimizer.pt", "scheduler.pt", "rng_state.pt", "scaler.pt"):
        p = folder / name
        if name == "scaler.pt" and not p.exists():
            continue
        try:
            load_pt(p, mmap=True)
        except safe_load.Refused as e:  # not damaged: it would run code, so it is never loaded
            return str(e)
        except Exception as e:  # noqa: BLE001 - any failure to load means the file is damaged
            return f"{p} does not load ({type(e).__name__}: {str(e).splitlines()[0][:120] if str(e) else ''})"
    return None


def load_pt(path: Path, mmap: bool = False):
    """A checkpoint's .pt file, weights only (rng_state.pt of older runs holds numpy arrays)."""
    return safe_load.torch_load(path, mmap=mmap, allow_numpy=Path(path).name == "rng_state.pt")


def newest_intact(output_dir, below: int | None = None) -> Path | None:
    for step, p in reversed(list_checkpoints(output_dir)):
        if (below is None or step < below) and verify(p) is None:
            return p
    return None


def warn(message: str) -> None:
    print(f"dbtrain: warning: {message}", file=sys.stderr, flush=True)


def resolve(output_dir, resume: str | None) -> Path | None:
    """The checkpoint folder to resume from (None: start fresh).

    "latest" is the newest checkpoint that loads; damaged ones are skipped with a warning
    naming the file. A damaged checkpoint named explicitly is an error pointing to the
    newest intact earlier one.
    """
    if not resume:
        return None
    if resume == "latest":
        ckpts = list_checkpoints(output_dir)
        damaged = []
        for step, p in reversed(ckpts):
            problem = verify(p)
            if problem is None:
                return p
            warn(f"skipping {p.name}, it is damaged: {problem}")
            damaged.append(p.name)
        if damaged:
            raise UserError(f"no intact checkpoint in {output_dir} ({', '.join(damaged)} damaged); choose a new "
                            f"--output_dir to start again")
        return None
    path = Path(resume)
    if not path.is_absolute() and not path.exists():
        path = Path(output_dir) / resume
    if not (path / "training_state.json").is_file() and not (path / "unet").is_dir() \
            and not (path / "text_embedding").is_dir():
        raise UserError(f"--resume_from_checkpoint {resume}: {path} is not a checkpoint folder "
                        f"(no training_state.json)")
    problem = verify(path)
    if problem is not None:
        try:
            step = int(path.name.rsplit("-", 1)[1])
        except (IndexError, ValueError):
            step = None
        earlier = newest_intact(path.parent, below=step) if step is not None else None
        hint = (f"{earlier} is intact: pass --resume_from_checkpoint {earlier}" if earlier is not None else
                "no earlier checkpoint is intact")
        raise UserError(f"checkpoint {path} is damaged: {problem}; {hint}")
    return path


def load_state(path: Path) -> dict:
    return json.loads((path / "training_state.json").read_text())


def prepare_output_dir(opts) -> Path | None:
    """Check that output_dir may be written (a new, empty, or our own folder; see outdir) and
    return the checkpoint to resume from (None: start at step 0)."""
    out, resume_from = Path(opts.checkpoints.output_dir), opts.checkpoints.resume_from_checkpoint
    state = outdir.check_output_dir(out, resume=bool(resume_from))
    outdir.hold(out)  # one run per folder, from here until the process ends (a second run stops here)
    state = outdir.check_output_dir(out, resume=bool(resume_from))  # again: it may have changed meanwhile
    if state == "ours":
        remove_stale_temporaries(out)
        diffusers_folder.remove_temporaries(out)
    resume = resolve(out, resume_from)
    if resume is not None:
        _check_resume(opts, out, resume)
    if resume is None and state == "ours":
        if (out / "model_index.json").exists() or (out / EMBEDDING_FILE).exists():
            raise UserError(f"--output_dir {out} holds a finished run and no checkpoint to continue from; choose "
                            f"a new --output_dir")
        print(f"{out} holds a run that stopped before its first checkpoint: starting it again at step 0",
              flush=True)
    elif resume is None and resume_from:
        print(f"{out} holds no checkpoint yet: starting at step 0", flush=True)
    return resume


def concepts_record(opts) -> list[dict]:
    """--concepts as read (folders resolved), as a checkpoint keeps it."""
    import dataclasses

    from trainer.options.concepts import concepts_of

    return [dataclasses.asdict(c) for c in concepts_of(opts)]


def _check_resume(opts, out: Path, folder: Path) -> None:
    """Before a model loads: the options may continue this checkpoint (trainer.core.resume), and a finished
    run is continued only to train more."""
    state = load_state(folder)
    resume_options.check(opts, folder, state.get("config") or {})
    then = state.get("concepts")
    now = concepts_record(opts) if opts.data.concepts and then is not None else then
    if now != then:
        k = next((i for i, (a, b) in enumerate(zip(now, then)) if a != b), min(len(now), len(then)))
        what = (f"it lists {len(now)} concept(s), {folder.name} was trained on {len(then)}" if len(now) != len(then)
                else f"concept {k + 1}: " + ", ".join(key for key in now[k] if now[k][key] != then[k].get(key)))
        raise UserError(f"--concepts {opts.data.concepts} changed since {folder.name} was saved ({what}); "
                        f"put it back as it was, or train the new concepts into a new --output_dir")
    marker = outdir.read_marker(out) or {}
    total, step = opts.training.max_train_steps, int(state["step"])
    if marker.get("finished") and step >= total:
        raise UserError(f"--output_dir {out} holds a run that finished at step {step}; pass a --max_train_steps "
                        f"above {step} to train it more, or choose a new --output_dir")
    final = marker.get("final_step")
    if marker.get("finished") and (final is None or step < final):
        print(f"{out} holds a finished run whose final state was not kept (written before dbtrain kept it); "
              f"continuing from {folder.name}, its newest saved state, so the steps after {step} run again",
              flush=True)


def load_weights(model, folder: Path) -> None:
    from safetensors.torch import load_file

    if hasattr(model, "load_pretrained"):  # LoRA adapters, new token rows (trainer.methods)
        model.load_pretrained(folder)
        return
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise UserError(f"checkpoint folder {folder} has no .safetensors weights")
    state = {}
    for f in files:
        state.update(load_file(f))
    model.load_state_dict(state)


def _resume_average(run, folder: Path) -> None:
    """--use_ema: the checkpoint's average (and its number of updates); one written without it starts again."""
    if run.ema is None:
        return
    if (folder / averages.FOLDER / averages.FILE).is_file():
        run.ema.load_pretrained(folder / averages.FOLDER)
        return
    run.ema.reset()
    print(f"{folder.name} holds no average of the weights (written without --use_ema): the EMA starts from its "
          f"weights", flush=True)


def resume_run(run, folder: Path) -> int:
    """Load a checkpoint into the run; returns its step.

    torchrun: every rank loads the same checkpoint (rank 0's; the ranks' weights and optimizer states are
    identical copies in data parallel), so one saved on any number of ranks resumes on any other number;
    only the global batch (ranks x --train_batch_size) changes with it, and with it the later steps' draws.
    --shard: the checkpoint holds the whole optimizer state (trainer.distributed.shard gathers it to rank 0), each rank
    keeps its own parameters' part, so sharded and unsharded runs resume each other's checkpoints."""
    fresh_lrs = [g["initial_lr"] for g in run.optimizer.param_groups]  # of this run's options
    changed = resume_options.differences(run.opts.to_dict(), load_state(folder).get("config") or {})[0]
    try:
        for name, model in run.models.items():
            load_weights(model, folder / name)
        _resume_average(run, folder)
        # weights only: a checkpoint folder may come from elsewhere, and unpickling runs code
        state = load_pt(folder / "optimizer.pt")
        if run.shard is not None:  # --shard: this rank keeps its own parameters' states
            state = run.shard.own_state(state)
        run.optimizer.load_state_dict(state)
        run.lr_scheduler.load_state_dict(load_pt(folder / "scheduler.pt"))
        if run.scaler is not None and (folder / "scaler.pt").exists():
            run.scaler.load_state_dict(load_pt(folder / "scaler.pt"))
        set_rng_state(load_pt(folder / "rng_state.pt"))
        step = load_state(folder)["step"]
        if any(k in changed for k in resume_options.RESCHEDULE):  # the new schedule, at this step
            resume_options.reschedule(run, fresh_lrs, step)
    except UserError:
        raise
    except Exception as e:  # noqa: BLE001 - a checkpoint of another model or options, or damaged
        first = str(e).strip().splitlines()[0][:200] if str(e).strip() else ""
        raise UserError(f"checkpoint {folder} does not fit this run ({type(e).__name__}: {first}); resume with "
                        f"the options it was made with, or choose a new --output_dir") from e
    print(f"resumed from {folder} at step {step}")
    return step
