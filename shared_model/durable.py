"""Durability helpers shared by every writer that promises "a crash leaves old or new"."""

from __future__ import annotations

import os
from pathlib import Path


def fsync_dir(directory: str | os.PathLike[str]) -> None:
    """Make a new or renamed directory entry durable (a file's own fsync does not cover its name)."""
    fd = os.open(Path(directory), os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
