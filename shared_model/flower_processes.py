"""What the coordinator's and the member's process launchers share: finding Flower's
executables in this interpreter's environment, and logging tenacity retries.

Lives here because ``coordinator`` and ``member_node`` never import each other.
"""

from __future__ import annotations

import logging
import os
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


def log_retry(log: logging.Logger, what: str) -> Callable[[RetryCallState], None]:
    """A tenacity ``before_sleep`` hook: one warning line per retry, with the error and the wait."""

    def before_sleep(state: RetryCallState) -> None:
        err = state.outcome.exception() if state.outcome else None
        wait = state.next_action.sleep if state.next_action else 0.0
        log.warning("%s (attempt %d): %s; retrying in %.1f s", what, state.attempt_number, err, wait)

    return before_sleep
