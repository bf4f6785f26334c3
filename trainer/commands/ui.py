"""`dbtrain ui`: the trainer in a browser (trainer.ui, on Gradio: the [ui] extra). Without Gradio it says in one
line how to install it; `dbtrain train` and the other commands never need it."""
from __future__ import annotations

import importlib.metadata
import importlib.util
import os
import signal
import sys

from trainer.errors import UserError
from trainer.options.ui import is_loopback, parse

INSTALL_UI = 'in the clone: pip install ".[ui]" (Gradio; docs/guide/ui.md)'


def _hang_up(signum, frame):
    raise KeyboardInterrupt


def run(argv: list[str]) -> int:
    opts = parse(argv)
    if importlib.util.find_spec("gradio") is None:
        raise UserError(f"dbtrain ui needs Gradio, which is not installed; {INSTALL_UI}")
    version = importlib.metadata.version("gradio")
    if not version.startswith("6."):  # (A1111 and kohya_ss environments carry Gradio 3-5)
        raise UserError(f"dbtrain ui needs Gradio 6, this environment has {version}; use a venv of its own, then "
                        f"{INSTALL_UI}")
    if not is_loopback(opts.host):
        print(f"dbtrain: warning: listening on {opts.host}:{opts.port}: anyone who can reach this port can start "
              f"runs and read the run folders; leave out --host to listen on this machine only",
              file=sys.stderr, flush=True)
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # (before Gradio loads) nothing leaves the machine
    try:
        from trainer.ui.app import launch
    except ImportError as e:  # a package Gradio needs is missing or broken
        raise UserError(f"dbtrain ui cannot load Gradio ({e}); {INSTALL_UI}") from e
    # a closed terminal (SIGHUP) stops the app as Ctrl-C does, so its run stops with a checkpoint, not orphaned
    signal.signal(signal.SIGHUP, _hang_up)

    print(f"dbtrain ui: http://{opts.host if is_loopback(opts.host) else 'THIS-MACHINE'}:{opts.port} "
          f"(runs go into {opts.runs_dir}; Ctrl-C stops the app and, as on the command line, its run)", flush=True)
    try:
        launch(opts)
    except OSError as e:  # the port is taken, the address is not this machine's
        raise UserError(f"cannot listen on {opts.host}:{opts.port} ({e}); choose another --port or --host") from e
    return 0
