"""Run a training program with a clock on its optimizer steps: the same for diffusers' scripts and for ours.

    python -m bench.peer_run --times FILE -- path/to/train_dreambooth.py --flag ...
    python -m bench.peer_run --times FILE -m trainer train --flag ...

A global optimizer step hook (torch.optim.optimizer.register_optimizer_step_post_hook: every torch Optimizer,
ours included) notes the time after each step; FILE gets {"step_times": [...], "start": t0} when the program
ends, however it ends. bench/peers.py reads steps/s from it, so model loading, class images and saving count
for neither side.
"""
from __future__ import annotations

import json
import runpy
import sys
import time
from pathlib import Path


def main(argv: list[str]) -> int:
    if len(argv) < 4 or argv[0] != "--times" or argv[2] not in ("--", "-m"):
        print("usage: python -m bench.peer_run --times FILE -- SCRIPT.py ARGS... | -m MODULE ARGS...",
              file=sys.stderr)
        return 2
    out, how, target, rest = argv[1], argv[2], argv[3], argv[4:]
    from torch.optim.optimizer import register_optimizer_step_post_hook

    start = time.perf_counter()
    times: list[float] = []
    register_optimizer_step_post_hook(lambda *_: times.append(time.perf_counter()))
    code = 0
    sys.argv = [target, *rest]
    try:
        if how == "-m":
            runpy.run_module(target, run_name="__main__", alter_sys=True)
        else:  # as `python script.py` would: its folder first on the path
            sys.path.insert(0, str(Path(target).resolve().parent))
            runpy.run_path(target, run_name="__main__")
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    finally:
        with open(out, "w") as f:
            json.dump({"start": start, "step_times": times}, f)
    return code


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
