"""The run directory's round records (``rounds.jsonl``): one JSON line per round, appended
and fsynced once the round is committed to the shard store (``coordinator.run_state``).
Models live in the store (``<out_dir>/store``), not here."""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from shared_model.store import ROUND_RECORD_KEY, Manifest

log = logging.getLogger("kyodo.coordinator")


def append_record(out_dir: Path, record: dict[str, Any]) -> None:
    path = Path(out_dir) / "rounds.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    line = json.dumps(record, sort_keys=True) + "\n"
    with open(path, "a", encoding="utf-8") as fh:
        fh.write(line)
        fh.flush()
        os.fsync(fh.fileno())


def committed_record(manifest: Manifest) -> dict[str, Any] | None:
    """The round's record as committed with its manifest (who trained, cohorts, receipts), or
    None for a manifest without one (round 0, older runs) or one that is not this round's."""
    try:
        record = json.loads(manifest.extra[ROUND_RECORD_KEY])
    except (KeyError, TypeError, ValueError):
        return None
    return record if isinstance(record, dict) and record.get("round") == manifest.round else None


def read_records(out_dir: Path) -> list[dict[str, Any]]:
    path = Path(out_dir) / "rounds.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def earlier_runs_records(out_dir: Path) -> Iterator[list[dict[str, Any]]]:
    """The round records of the other runs beside ``out_dir`` (a deployment's ``runs/<time>/``).

    A run directory that cannot be read is skipped with a warning: an old run's damaged
    records must not stop a new one."""
    out_dir = Path(out_dir).resolve()
    if not out_dir.parent.is_dir():
        return
    for run_dir in sorted(out_dir.parent.iterdir()):
        if run_dir.resolve() == out_dir or not (run_dir / "rounds.jsonl").is_file():
            continue
        try:
            yield read_records(run_dir)
        except (OSError, ValueError) as err:
            log.warning("round records of %s not read: %s", run_dir, err)
