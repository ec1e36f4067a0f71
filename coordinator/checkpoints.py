"""Per-round model files and round records of a run directory.

Each committed round writes ``rounds/round-NNNN.safetensors`` (the whole model) and appends
one JSON line to ``rounds.jsonl``. Files are written to a temporary name, fsynced and renamed,
so a crash never leaves a half-written model under a round's name. (The content-addressed
shard store that writes only changed shards replaces the whole-model files later; the run
directory's interface stays.)
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from shared_model.durable import fsync_dir


def round_path(out_dir: Path, round_number: int) -> Path:
    return Path(out_dir) / "rounds" / f"round-{round_number:04d}.safetensors"


def save_round(out_dir: Path, round_number: int, model: dict[str, torch.Tensor], metadata: dict[str, str]) -> Path:
    path = round_path(out_dir, round_number)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    save_file(
        {k: v.contiguous() for k, v in model.items()}, str(tmp), metadata={**metadata, "round": str(round_number)}
    )
    with open(tmp, "rb+") as fh:
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)
    return path


def load_round(out_dir: Path, round_number: int) -> dict[str, torch.Tensor]:
    path = round_path(out_dir, round_number)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no model saved for round {round_number}")
    return load_file(str(path))


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
