"""The operator's request that a run stop once the round in flight is committed.

``flwr stop`` ends the ServerApp wherever it is. In the middle of secure aggregation that
costs every member of the round the epsilon it spent on it: a node masks a round's update
once (masked again in a cohort composed otherwise, the sums could be solved for it), so on
resume each declines the round whose masked input already left, and the round commits
empty (a walkthrough lost a whole round of three members' budgets that way). A request
left in the run directory is read by the coordinator before each round instead: the round
in flight commits and is evaluated, and the run ends there, to be resumed like any run that
stopped short of its rounds.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
from pathlib import Path

STOP_REQUEST_FILE = "stop.request"


def request_stop(run_dir: Path | str) -> None:
    """Ask the coordinator running ``run_dir`` to stop before its next round."""
    requested = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
    (Path(run_dir) / STOP_REQUEST_FILE).write_text(json.dumps({"requested": requested}), encoding="utf-8")


def stop_requested(run_dir: Path | str) -> str | None:
    """When a stop was asked for ("" if the request cannot be read), None when none was."""
    path = Path(run_dir) / STOP_REQUEST_FILE
    if not path.is_file():
        return None
    with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
        return str(json.loads(path.read_text(encoding="utf-8"))["requested"])
    return ""


def clear_stop_request(run_dir: Path | str) -> None:
    """Forget a request: once honoured, and when a run is submitted again (one left by a stop
    that found its run already ended must not end the resumed run at once)."""
    (Path(run_dir) / STOP_REQUEST_FILE).unlink(missing_ok=True)
