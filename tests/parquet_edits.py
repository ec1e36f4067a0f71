"""Edits to a written LeRobot dataset's parquet files, for tests that damage one value."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq


def rewrite_parquet(path: Path, edit: Callable[[pa.Table], pa.Table]) -> Path:
    pq.write_table(edit(pq.read_table(path)), path)
    return path


def edit_vector(table: pa.Table, col: str, row: int, value: float, element: int = 1) -> pa.Table:
    """Set ``element`` of vector column ``col`` at ``row`` to ``value``."""
    column = table.column(col).combine_chunks()
    values = column.flatten().to_numpy().copy()
    values[row * column.type.list_size + element] = value
    new = pa.FixedSizeListArray.from_arrays(pa.array(values), column.type.list_size)
    return table.set_column(table.schema.get_field_index(col), col, new)
