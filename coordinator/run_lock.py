"""One coordinator per run directory.

Two coordinators on one run directory (a resume submitted while the run still goes on, or
the same command run twice) both read HEAD, both run its next round, and the members train
it once: one commits an empty round, the other fails its commit, and the records hold the
same round twice (a walkthrough lost a trained round and its budget that way, and the run
failed every audit after). The coordinator holds an exclusive ``flock`` on a file in the run
directory for as long as it runs: the kernel drops it when the process ends, however it
ends, so a crashed coordinator never leaves a stale lock behind.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import fcntl
import json
import os
from collections.abc import Iterator
from pathlib import Path

LOCK_FILE = ".coordinator.lock"


class RunInUseError(RuntimeError):
    """Another coordinator is running this run directory right now (``holder``: "pid .., since ..", or "")."""

    def __init__(self, message: str, holder: str = "") -> None:
        super().__init__(message)
        self.holder = holder


def _holder(path: Path) -> str:
    try:
        held = json.loads(path.read_text(encoding="utf-8"))
        return f"pid {held['pid']}, since {held['since']}"
    except (OSError, ValueError, KeyError, TypeError):
        return ""


def _in_use(run_dir: Path, holder: str) -> RunInUseError:
    return RunInUseError(
        f"{run_dir} is being run by another coordinator{f' ({holder})' if holder else ''}: wait for it to end "
        "(kyodo-coordinator status shows it) or stop it (kyodo-coordinator stop, in a deployment) before resuming",
        holder,
    )


@contextlib.contextmanager
def holding_run(run_dir: Path) -> Iterator[None]:
    """Hold the run directory's lock while the body runs; RunInUseError if another holds it."""
    path = Path(run_dir) / LOCK_FILE
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise _in_use(run_dir, _holder(path)) from None
        since = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps({"pid": os.getpid(), "since": since}).encode(), 0)
        yield
    finally:
        os.close(fd)


def run_holder(run_dir: Path) -> str | None:
    """Who holds ``run_dir`` now ("pid 12, since ..."; "" if unknown), None when nobody does."""
    path = Path(run_dir) / LOCK_FILE
    if not path.is_file():
        return None
    fd = os.open(path, os.O_RDONLY)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return _holder(path)
        return None
    finally:
        os.close(fd)


def check_not_running(run_dir: Path) -> None:
    """RunInUseError if a coordinator holds ``run_dir`` now (checked before submitting a resume)."""
    holder = run_holder(run_dir)
    if holder is not None:
        raise _in_use(run_dir, holder)
