"""The app's child processes: every run is `python -m trainer COMMAND ...`, the command line a user would type,
so a stopped run saves its checkpoint and resumes exactly as on the command line, and bad input comes back as
the CLI's own one-line message. One process at a time (a GPU holds one run): a second start is refused.
No Gradio here."""
from __future__ import annotations

import json
import os
import re
import shlex
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
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


def last_lines(path: Path, n: int = 20, max_bytes: int = 64 * 1024, start: int = 0) -> list[str]:
    """The last n lines of a log from byte `start` on (progress bars' carriage returns count as line ends)."""
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            size = f.tell()
            f.seek(max(start, size - max_bytes))
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
    offset: int = 0

    def start(self) -> "Job":
        self.log.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log, "a") as f:
            self.offset = f.tell()  # this run's output starts here (a resumed run appends to the same log)
            f.write(f"$ {command_line(self.argv)}\n")
            f.flush()
            # a new session: a Ctrl-C in the app's terminal does not reach the run; the app stops it (stop())
            self.proc = subprocess.Popen([sys.executable, "-m", "trainer", *self.argv], stdout=f,
                                         stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=child_env(),
                                         cwd=os.getcwd(), start_new_session=True)
        self.started = time.time()
        # for an app restarted while this child still runs (the app was killed): it finds the child by this file
        write_pid(pid_file(self.log), self.proc.pid, self.argv)
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
            try:
                self.proc.send_signal(signal.SIGINT)  # (Popen's: no signal to a pid already reaped and reused)
            except ProcessLookupError:
                pass

    def wait(self, timeout: float | None = None) -> int | None:
        try:
            return self.proc.wait(timeout) if self.proc is not None else None
        except subprocess.TimeoutExpired:
            return None

    def message(self) -> str | None:
        """The CLI's one line when the run ended other than well (bad input, a stop, a crash): from this run's
        own output, not an earlier run's in the same log."""
        rc = self.returncode
        if rc is None or rc == 0:
            return None
        lines = last_lines(self.log, 40, start=self.offset)
        return error_line(lines) or (lines[-1] if lines else f"exited with code {rc}")


def pid_file(log: Path) -> Path:
    return log.with_suffix(".pid")


def write_pid(path: Path, pid: int, argv: list[str]) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(fd, "w") as f:
        json.dump({"pid": pid, "argv": argv}, f)
    os.replace(tmp, path)


def alive_child(path: Path) -> int | None:
    """The pid in a pid file if that process still runs and is the `dbtrain` child it names (its command line
    holds the same arguments: a pid reused by another program does not count)."""
    try:
        rec = json.loads(path.read_text())
        pid, argv = int(rec["pid"]), list(rec["argv"])
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().rstrip(b"\0").split(b"\0")
    except (OSError, ValueError, KeyError, TypeError):
        return None
    args = [a.decode("utf-8", "replace") for a in cmdline]
    return pid if args[-len(argv):] == argv and "trainer" in args else None


class Slot:
    """At most one child process at a time; the last one stays readable after it ends. A child of an earlier
    app that still runs (that app was killed) holds the slot too, until it ends (`adopt`)."""

    def __init__(self):
        self._lock = threading.Lock()
        self.job: Job | None = None
        self.adopted: tuple[int, Path] | None = None  # (pid, its pid file)

    def adopt(self, pid_files) -> None:
        for path in pid_files:
            pid = alive_child(path)
            if pid is not None:
                self.adopted = (pid, path)
                return

    def orphan(self) -> int | None:
        """The pid of an earlier app's child that still runs."""
        if self.adopted is not None and alive_child(self.adopted[1]) == self.adopted[0]:
            return self.adopted[0]
        self.adopted = None
        return None

    def busy(self) -> str | None:
        """Why nothing can start now (a run is going), or None."""
        if self.job is not None and self.job.running:
            return f"a {self.job.kind} run is going"
        pid = self.orphan()
        if pid is not None:
            return f"a run started by an earlier dbtrain ui is still going (pid {pid}, {self.adopted[1].parent})"
        return None

    def start(self, job: Job) -> Job:
        with self._lock:
            why = self.busy()
            if why:
                raise Busy(f"{why}; stop it (Stop on the Train page) or wait for it to end, then try again")
            self.job = job.start()
            return job

    def run(self, job: Job, timeout: float | None = None) -> Job:
        """Start `job` and wait for it to end (sample, fabric: the page waits for its pictures)."""
        self.start(job).wait(timeout)
        return job

    def stop(self) -> str | None:
        """Stop what is going (as Ctrl-C); None, or why nothing was stopped."""
        if self.job is not None and self.job.running:
            self.job.stop()
            return None
        pid = self.orphan()
        if pid is not None:
            os.kill(pid, signal.SIGINT)
            return None
        return "nothing is running"

    def stop_all(self, timeout: float = 900.0) -> None:
        """When the app exits: the running child stops as a Ctrl-C stops it (a training run saves its
        checkpoint first, which can take a while); a second Ctrl-C leaves it running, and says so."""
        job = self.job
        if job is None or not job.running:
            return
        print(f"dbtrain ui: stopping the {job.kind} run (pid {job.proc.pid}) as Ctrl-C does; a training run saves a "
              f"checkpoint first", file=sys.stderr, flush=True)
        job.stop()
        try:
            if job.wait(timeout) is None:
                print(f"dbtrain ui: the run (pid {job.proc.pid}) did not stop in {timeout:.0f} s; it goes on: "
                      f"kill -INT {job.proc.pid} stops it", file=sys.stderr, flush=True)
        except KeyboardInterrupt:
            print(f"dbtrain ui: left the run (pid {job.proc.pid}) going: kill -INT {job.proc.pid} stops it",
                  file=sys.stderr, flush=True)
