"""The `dbtrain` commands, one module each: parse the flags into typed options (trainer.options), check
what they name, then call the library. No training logic here; nothing below imports this layer.

Each module's `run(argv)` parses and checks before torch or a model is imported, so `--help` and every
foreseeable mistake come back at once; trainer.cli turns errors into one line and an exit code.
May import: every other layer.
"""
from __future__ import annotations


def quiet_libraries() -> None:
    """diffusers/transformers info chatter (accelerate hints, dtype notes) off; warnings stay."""
    try:
        from diffusers.utils import logging as dl
        from transformers.utils import logging as tl

        dl.set_verbosity_error()
        tl.set_verbosity_error()
    except ImportError:
        pass
