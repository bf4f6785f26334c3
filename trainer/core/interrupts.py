"""Ctrl-C (SIGINT) and SIGTERM: stop at a clean point instead of in the middle of anything.

`terminate_raises()` makes SIGTERM behave like Ctrl-C (a KeyboardInterrupt) for the whole
command. Inside `with StopRequests() as stop:` the first signal only sets `stop.signum`;
the training loop finishes its step, saves a checkpoint and stops. A second signal stops
at once (KeyboardInterrupt).
"""
from __future__ import annotations

import os
import signal
import threading

SIGNALS = (signal.SIGINT, signal.SIGTERM)
last_signal: int | None = None  # the signal behind the last KeyboardInterrupt we raised


def _raise(signum, frame):
    global last_signal
    last_signal = signum
    raise KeyboardInterrupt


def _main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()


def terminate_raises() -> None:
    if _main_thread():
        signal.signal(signal.SIGTERM, _raise)


def signal_name(signum: int | None) -> str:
    return signal.Signals(signum).name if signum else "SIGINT"


class StopRequests:
    def __init__(self):
        self.signum: int | None = None
        self._old = {}

    def _handle(self, signum, frame):
        if self.signum is not None:
            _raise(signum, frame)
        self.signum = signum
        # os.write, not print: the main thread may be inside a write to stderr (the progress bar)
        os.write(2, f"\ndbtrain: {signal_name(signum)} received: finishing this step and saving a checkpoint "
                    f"(send it again to stop at once, without saving)\n".encode())

    def __enter__(self):
        if _main_thread():
            for s in SIGNALS:
                self._old[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc):
        for s, h in self._old.items():
            signal.signal(s, h)
        return False
