"""Durability helpers shared by every writer that promises "a crash leaves old or new"."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path


def fsync_dir(directory: str | os.PathLike[str]) -> None:
    """Make a new or renamed directory entry durable (a file's own fsync does not cover its name)."""
    fd = os.open(Path(directory), os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def replace_json(path: Path, obj: object, indent: int | None = None) -> None:
    """Write ``obj`` beside ``path`` and rename it over: a reader sees the old file or the new one."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=indent), encoding="utf-8")
    tmp.replace(path)


def cannot_write(directory: Path) -> str:
    """Why a file cannot be created in ``directory`` (the OS's words), '' when it can: checked
    before a process that must write there starts, so it fails with a sentence, not mid-work."""
    try:
        with tempfile.NamedTemporaryFile(dir=directory, prefix=".write-check-"):
            pass
    except OSError as err:
        return err.strerror or type(err).__name__
    return ""
