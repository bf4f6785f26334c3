"""`dbtrain train|textual-inversion|sample|eval|demo|fabric|export|estimate|ui ...` (also `python -m trainer ...`).

Flags are parsed and checked, and the folders they name looked at, before torch or a
model is imported: `--help` and every foreseeable mistake come back at once. Bad input
ends with exit code 2 and one line saying what to fix, never a traceback. A run stopped
by Ctrl-C / SIGTERM saves its state and prints the exact command that continues it.
"""
from __future__ import annotations

import importlib.util
import os
import shlex
import sys

from trainer.commands import demo, estimate, evaluate, export, fabric, sample, textual_inversion, train, ui
from trainer.core import interrupts
from trainer.errors import Resumable, UserError

USAGE = """usage: dbtrain demo [options]      DreamBooth on the built-in tiny model and subject, before/after
       dbtrain train [options]     DreamBooth fine-tuning (dbtrain train --help)
       dbtrain textual-inversion [options]   a new word for a concept, the model frozen (embedding files)
       dbtrain sample [options]    images from a trained output folder (dbtrain sample --help)
       dbtrain eval [options]      the paper's metrics (DINO, CLIP-I, CLIP-T, PRES, DIV) of a model
       dbtrain fabric [options]    images steered by liked / disliked images, no training (FABRIC)
       dbtrain export [options]    a model folder as one .safetensors file (A1111/ComfyUI), LoRA formats
       dbtrain estimate [options]  peak GPU memory of a training step, computed on the CPU
       dbtrain ui [options]        the trainer in a browser: train, sample, FABRIC (needs the [ui] extra)"""
# each command's module: run(argv) parses and checks the flags (before torch loads), then does the work
COMMANDS = {"train": train, "textual-inversion": textual_inversion, "sample": sample, "eval": evaluate,
            "demo": demo, "fabric": fabric, "export": export, "estimate": estimate, "ui": ui}

# The torch that bootstrap.sh installs and CI runs (pyproject.toml's [train] bounds admit it; a test checks both).
# It goes in first: left to `pip install ".[train]"`, pip takes PyPI's CUDA build, GBs of wheels, on a CPU machine.
TORCH_PIN = "2.13.0"
INSTALL_TORCH = (f"on a CPU machine: pip install torch=={TORCH_PIN} --index-url https://download.pytorch.org/whl/cpu "
                 f"(PyPI's build pulls GBs of CUDA wheels), on an NVIDIA GPU machine: pip install torch=={TORCH_PIN}; "
                 f"then, in the clone: pip install \".[train]\" (docs/install.md)")
INSTALL_TRAIN = "in the clone: pip install \".[train]\" (docs/install.md)"
# what every command imports (the rest of [train], peft, only some runs); what a package install brings
NEEDED = ("torch", "diffusers", "transformers")
INSTALLED_BY_US = {"torch", "diffusers", "transformers", "peft", "accelerate", "safetensors", "numpy", "PIL", "tqdm"}


def _installed(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None  # looks for it, imports nothing
    except (ImportError, ValueError):
        return False


def missing_packages_line(missing: list[str]) -> str:
    """The one line that says how to install what is missing (torch first: the [train] extra would pull
    PyPI's CUDA build)."""
    if "torch" in missing:
        return f"torch is not installed; {INSTALL_TORCH}"
    return f"{', '.join(missing)} {'is' if len(missing) == 1 else 'are'} not installed; {INSTALL_TRAIN}"


def _without_resume(args: list[str]) -> list[str]:
    """The arguments minus any --resume_from_checkpoint (also abbreviated or with =)."""
    out, skip = [], False
    for a in args:
        if skip:
            skip = False
            continue
        name = a.split("=", 1)[0]
        if name.startswith("--resu") and "--resume_from_checkpoint".startswith(name):
            skip = "=" not in a
            continue
        out.append(a)
    return out


def continue_command(cmd: str, rest: list[str]) -> str:
    """The exact command that continues a stopped `cmd` (empty for commands that cannot)."""
    if cmd in ("train", "textual-inversion"):
        args = shlex.join(_without_resume(rest) + ["--resume_from_checkpoint", "latest"])
        world = os.environ.get("WORLD_SIZE", "1")
        if world.isdigit() and int(world) > 1:  # started by torchrun: continue under the same launcher
            per_node = os.environ.get("LOCAL_WORLD_SIZE", world)
            return f"resume with: torchrun --nproc_per_node {per_node} -m trainer {cmd} {args}"
        return f"resume with: dbtrain {cmd} {args}"
    if cmd == "demo":
        return "continue with: " + " ".join(["dbtrain", "demo", shlex.join(rest)]).strip()
    return ""


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0 if argv else 2
    cmd, rest = argv[0], argv[1:]
    if cmd not in COMMANDS:
        print(f"dbtrain: unknown command {cmd!r}\n{USAGE}", file=sys.stderr)
        return 2
    missing = [name for name in NEEDED if not _installed(name)]
    if missing:  # (a `pip install .` without torch or the [train] extra)
        print(f"dbtrain: error: {missing_packages_line(missing)}", file=sys.stderr, flush=True)
        return 2
    interrupts.terminate_raises()
    try:
        COMMANDS[cmd].run(rest)
    except ModuleNotFoundError as e:
        root = (e.name or "").split(".")[0]
        if root not in INSTALLED_BY_US:
            raise
        print(f"dbtrain: error: {missing_packages_line([root])}", file=sys.stderr, flush=True)
        return 2
    except Resumable as e:
        hint = continue_command(cmd, rest)
        print(f"dbtrain: {e.kind}: {e}" + (f"; {hint}" if hint else ""), file=sys.stderr, flush=True)
        return e.exit_code
    except UserError as e:
        print(f"dbtrain: error: {e}", file=sys.stderr, flush=True)
        return 2
    except KeyboardInterrupt:
        sig = interrupts.last_signal or 2
        hint = continue_command(cmd, rest)
        print(f"dbtrain: interrupted ({interrupts.signal_name(sig)}), stopped at once" + (f"; {hint}" if hint else ""),
              file=sys.stderr, flush=True)
        return 128 + sig
    return 0


if __name__ == "__main__":
    sys.exit(main())
