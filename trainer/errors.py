"""Errors every layer may raise: bad input the user can fix, and a run that stopped resumably.

The command line prints either as one line and exits with its code (2, or 128 + a signal);
never a traceback. This module imports nothing of the project.
"""
from __future__ import annotations


class UserError(Exception):
    """Bad input the user can fix; the CLI prints the message as one line and exits 2."""


class Resumable(UserError):
    """A run that stopped with its state saved; the CLI adds the command that continues it.

    `kind` is "error" or "interrupted"; `exit_code` 2, or 128 + the signal number.
    """

    def __init__(self, message: str, *, kind: str = "error", exit_code: int = 2):
        super().__init__(message)
        self.kind, self.exit_code = kind, exit_code
