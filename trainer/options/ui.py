"""`dbtrain ui`'s options: where the web app listens, the base model its pages start from, and the folder its
runs go into. No torch, no Gradio here."""
from __future__ import annotations

import argparse
import ipaddress
import os
from dataclasses import dataclass
from pathlib import Path

from trainer.errors import UserError
from trainer.options import spec
from trainer.options.sampling import BUILTIN_MODEL
from trainer.options.spec import flag


@dataclass
class UiOptions:
    host: str = flag("127.0.0.1", "address to listen on (not given: loopback, this machine only; 0.0.0.0 lets "
                                  "anyone who can reach the port start runs)", metavar="ADDR")
    port: int = flag(7860, "port to listen on (Gradio's and A1111's default)", type=int)
    model: str = flag(str(BUILTIN_MODEL), "the base model the pages start from (a local diffusers folder; not "
                                          "given: the built-in tiny model)", metavar="DIR")
    runs_dir: str = flag("dbtrain-ui", "folder the app writes into: one new subfolder per training run, "
                                       "sample and FABRIC session (never a folder of yours)", metavar="DIR")


UI_LAYOUT = (("web app", ("host", "port", "model", "runs_dir")),)


def build_parser() -> argparse.ArgumentParser:
    p = spec.parser("dbtrain ui", "The trainer in a browser: a local web app (Gradio) with a Train page (photos "
                                  "in, 'will it fit?', live loss and validation images), a Sample page and a "
                                  "FABRIC page (like / dislike over rounds). Needs the [ui] extra.")
    return spec.build(p, UI_LAYOUT, spec.flag_fields(UiOptions))


def is_loopback(host: str) -> bool:
    """Whether only this machine can reach `host` (127.0.0.0/8, ::1, localhost)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def parse(argv: list[str]) -> UiOptions:
    a = spec.pick(UiOptions, vars(build_parser().parse_args(argv)))
    if not 0 < a.port < 65536:
        raise UserError(f"--port must be in 1..65535, got {a.port}")
    if not a.host:
        raise UserError("--host must be an address such as 127.0.0.1 or 0.0.0.0")
    if not (Path(a.model) / "model_index.json").is_file():
        raise UserError(f"--model {a.model}: not a diffusers model folder (no model_index.json); give a local "
                        f"folder such as one `dbtrain train` wrote, or leave it out for the built-in model")
    runs = Path(a.runs_dir)
    if runs.exists() and not runs.is_dir():
        raise UserError(f"--runs_dir {runs} is a file; give a folder (it is created if missing)")
    if runs.is_dir() and not os.access(runs, os.W_OK | os.X_OK):
        raise UserError(f"--runs_dir {runs} is not writable; give a folder you can write")
    return a
