"""Several subjects in one run: the --concepts file (JSON or TOML). No torch here."""
from __future__ import annotations


def check(opts) -> None:
    """UserError for the first bad concept (to be written)."""
    raise NotImplementedError
