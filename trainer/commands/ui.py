"""`dbtrain ui`: the trainer in a browser (trainer.ui, on Gradio: the [ui] extra). Without Gradio it says in one
line how to install it; `dbtrain train` and the other commands never need it."""
from __future__ import annotations

import importlib.util
import os
import sys

from trainer.errors import UserError
from trainer.options.ui import is_loopback, parse

INSTALL_UI = 'in the clone: pip install ".[ui]" (Gradio; docs/guide/ui.md)'


def run(argv: list[str]) -> int:
    opts = parse(argv)
    if importlib.util.find_spec("gradio") is None:
        raise UserError(f"dbtrain ui needs Gradio, which is not installed; {INSTALL_UI}")
    if not is_loopback(opts.host):
        print(f"dbtrain: warning: listening on {opts.host}:{opts.port}: anyone who can reach this port can start "
              f"runs and read the run folders; leave out --host to listen on this machine only",
              file=sys.stderr, flush=True)
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # (before Gradio loads) nothing leaves the machine
    from trainer.ui.app import launch

    print(f"dbtrain ui: http://{opts.host if is_loopback(opts.host) else 'THIS-MACHINE'}:{opts.port} "
          f"(runs go into {opts.runs_dir}; Ctrl-C stops the app and, as on the command line, its run)", flush=True)
    launch(opts)
    return 0
