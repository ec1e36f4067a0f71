"""What the coordinator's and the member's process launchers share: finding Flower's
executables in this interpreter's environment, logging (tenacity retries, progress on
stderr), and asking whether a Flower process still handles a stop signal.

Lives here because ``coordinator`` and ``member_node`` never import each other.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
from collections.abc import Callable
from pathlib import Path

from tenacity import RetryCallState


def flower_path() -> str:
    """PATH with this interpreter's bin directory first: Flower's SuperLink and SuperNode start
    ``flower-superexec``, ``flwr-serverapp`` and ``flwr-clientapp`` by name, which a virtual
    environment that is used without being activated (``.venv/bin/python -m ...``, as CI does)
    would otherwise not find."""
    return os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])


def flower_executable(name: str) -> str:
    """Flower's entry point next to this interpreter (the venv's), else whatever PATH finds."""
    candidate = Path(sys.executable).with_name(name)
    return str(candidate) if candidate.is_file() else name


def log_retry(log: logging.Logger, what: str, level: int = logging.WARNING) -> Callable[[RetryCallState], None]:
    """A tenacity ``before_sleep`` hook: one line per retry, with the error and the wait
    (``level`` INFO where waiting is what normally happens, e.g. a server starting up)."""

    def before_sleep(state: RetryCallState) -> None:
        err = state.outcome.exception() if state.outcome else None
        wait = state.next_action.sleep if state.next_action else 0.0
        log.log(level, "%s (attempt %d): %s; retrying in %.1f s", what, state.attempt_number, err, wait)

    return before_sleep


def log_to_stderr(logger_name: str) -> None:
    """Progress and retry lines of the deployment commands on stderr. Not ``basicConfig``: Opacus
    calls it at import, after which it does nothing (and its root handler is WARNING-only)."""
    logger = logging.getLogger(logger_name)
    if not logger.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False


def still_catches(pid: int, signum: int) -> bool:
    """Whether process ``pid`` still has a handler for ``signum`` (Flower restores the default
    after the first); read from Linux ``/proc``, elsewhere assumed True."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("SigCgt:"):
                return bool(int(line.split()[1], 16) >> (signum - 1) & 1)
    except (OSError, ValueError):
        pass
    return True


def pids_running(program: str, argument: str) -> list[int]:
    """The pids of this user's processes running ``program`` (an executable's base name) with
    ``argument`` among their arguments, from Linux ``/proc`` ([] elsewhere). An operator told
    to stop "its" SuperLink needs its pid: ``pkill -f flower-superlink`` ends every operator's
    on a shared host."""
    found = []
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            argv = [a.decode(errors="replace") for a in (proc / "cmdline").read_bytes().split(b"\0") if a]
        except OSError:
            continue
        launched = [Path(a).name for a in argv[:2]]  # the executable, or a Python running its script
        if program in launched and argument in argv:
            found.append(int(proc.name))
    return sorted(found)


def parent_running(pid: int, *arguments: str) -> int | None:
    """The parent of ``pid`` when its command line holds every one of ``arguments`` (None
    otherwise, or off Linux): a SuperLink a live ``kyodo-coordinator start`` runs is not one
    left behind by a start that was killed, and its operator must not be told to kill it."""
    try:
        ppid = int((Path("/proc") / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()[1])
        argv = [a.decode(errors="replace") for a in (Path("/proc") / str(ppid) / "cmdline").read_bytes().split(b"\0")]
    except (OSError, ValueError, IndexError):
        return None
    return ppid if ppid > 1 and all(any(arg in a for a in argv) for arg in arguments) else None


def process_ended(code: int) -> str:
    """How a process ended, from its return code (negative: the signal that killed it)."""
    if code >= 0:
        return f"exited with status {code}"
    try:
        return f"was killed by signal {signal.Signals(-code).name}"
    except ValueError:
        return f"was killed by signal {-code}"
