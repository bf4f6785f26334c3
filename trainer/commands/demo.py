"""`dbtrain demo`: DreamBooth with prior preservation on the built-in tiny model and subject, measured before
and after (trainer.world.demo)."""
from __future__ import annotations

from trainer.commands import quiet_libraries
from trainer.options.sampling import parse_demo


def run(argv: list[str]) -> dict:
    opts = parse_demo(argv)  # --help and flag errors before torch loads
    quiet_libraries()
    from trainer.world import demo

    return demo.run(opts)
