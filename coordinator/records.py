"""The run directory's round records (``rounds.jsonl``): one JSON line per round, appended
and fsynced once the round is committed to the shard store (``coordinator.run_state``).
Models live in the store (``<out_dir>/store``), not here."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any


def append_record(out_dir: Path, record: dict[str, Any]) -> None:
    path = Path(out_dir) / "rounds.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    line = json.dumps(record, sort_keys=True) + "\n"
    with open(path, "a", encoding="utf-8") as fh:
        fh.write(line)
        fh.flush()
        os.fsync(fh.fileno())


def read_records(out_dir: Path) -> list[dict[str, Any]]:
    path = Path(out_dir) / "rounds.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
