"""The app's child processes: every run is `python -m trainer COMMAND ...`, the command line a user would type,
so a stopped run saves its checkpoint and resumes exactly as on the command line, and bad input comes back as
the CLI's own one-line message. One process at a time (a GPU holds one run): a second start is refused.
No Gradio here."""
from __future__ import annotations

import os
import re
import shlex
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]  # the folder holding the trainer package
ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")  # progress bars' cursor moves


class Busy(Exception):
    """A run is going; its message says which and what to do."""


def command_line(argv: list[str]) -> str:
    """What a user would type for `argv` (the arguments after `python -m trainer`)."""
    return "dbtrain " + shlex.join(argv)


def child_env() -> dict:
    """The app's environment, with this trainer first on the path and output unbuffered (lines as they come)."""
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT)] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    return env


def last_lines(path: Path, n: int = 20, max_bytes: int = 64 * 1024) -> list[str]:
    """The last n lines of a log (progress bars' carriage returns count as line ends)."""
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            size = f.tell()
            f.seek(max(0, size - max_bytes))
            text = f.read().decode("utf-8", "replace")
    except OSError:
        return []
    lines = [ln.rstrip() for ln in ANSI.sub("", text).replace("\r", "\n").split("\n")]
    return [ln for ln in lines if ln][-n:]


def error_line(lines: list[str]) -> str | None:
    """The CLI's one-line message for bad input or a stop (its lines start with 'dbtrain: error:' / 'dbtrain: ')."""
    for ln in reversed(lines):
        if ln.startswith("dbtrain: error:") or ln.startswith("dbtrain: interrupted") or "dbtrain: stopped" in ln:
            return ln
    for ln in reversed(lines):  # argparse's own errors ("dbtrain train: error: ...")
        if ln.startswith("dbtrain") and ": error:" in ln:
            return ln
    return None


@dataclass
class Job:
    """One `dbtrain COMMAND ...` child process, its output appended to `log`."""

    kind: str  # "train", "sample", "fabric": what the page calls it
    argv: list[str]
    log: Path
    proc: subprocess.Popen | None = None
    started: float = 0.0
    ended: float | None = None
    stop_requested: bool = False
    meta: dict = field(default_factory=dict)

    def start(self) -> "Job":
        self.log.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log, "a") as f:
            f.write(f"$ {command_line(self.argv)}\n")
            f.flush()
            # a new session: a Ctrl-C in the app's terminal does not reach the run; the app stops it (stop())
            self.proc = subprocess.Popen([sys.executable, "-m", "trainer", *self.argv], stdout=f,
                                         stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=child_env(),
                                         cwd=os.getcwd(), start_new_session=True)
        self.started = time.time()
        return self

    @property
    def running(self) -> bool:
        if self.proc is None or self.proc.poll() is not None:
            if self.proc is not None and self.ended is None:
                self.ended = time.time()
            return False
        return True

    @property
    def returncode(self) -> int | None:
        return None if self.proc is None else self.proc.poll()

    def stop(self) -> None:
        """As Ctrl-C on the command line: the run finishes its step, saves a checkpoint and exits."""
        if self.running:
            self.stop_requested = True
            os.kill(self.proc.pid, signal.SIGINT)

    def wait(self, timeout: float | None = None) -> int | None:
        try:
            return self.proc.wait(timeout) if self.proc is not None else None
        except subprocess.TimeoutExpired:
            return None

    def lines(self, n: int = 20) -> list[str]:
        return last_lines(self.log, n)

    def message(self) -> str | None:
        """The CLI's one line when the run ended other than well (bad input, a stop, a crash)."""
        rc = self.returncode
        if rc is None or rc == 0:
            return None
        lines = self.lines(40)
        return error_line(lines) or (lines[-1] if lines else f"exited with code {rc}")


class Slot:
    """At most one child process at a time; the last one stays readable after it ends."""

    def __init__(self):
        self._lock = threading.Lock()
        self.job: Job | None = None

    def start(self, job: Job) -> Job:
        with self._lock:
            if self.job is not None and self.job.running:
                raise Busy(f"a {self.job.kind} run is going ({command_line(self.job.argv)[:80]}...); stop it on "
                           f"the Train page or wait for it to end, then try again")
            self.job = job.start()
            return job

    def run(self, job: Job, timeout: float | None = None) -> Job:
        """Start `job` and wait for it to end (sample, fabric: the page waits for its pictures)."""
        self.start(job).wait(timeout)
        return job

    def stop_all(self, timeout: float = 120.0) -> None:
        """When the app exits: the running child stops as a Ctrl-C stops it (its checkpoint saved)."""
        job = self.job
        if job is not None and job.running:
            job.stop()
            if job.wait(timeout) is None:
                job.proc.kill()
