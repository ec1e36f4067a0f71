"""Running sums under one RAM budget: the coordinator's aggregation working set.

Why this exists. A member's train (or masked-input) reply carries all of its shards in one
Flower message, and a shard's sum can only be finished once its whole cohort has answered
(under SecAgg+ only after the unmask stage, when *every* masked input of the round is in).
So however early finished shards are released, the sums still open at one moment can be
every shard of the round: the planner gives ``adapter/shared`` to all members and spreads
each member's experts over the layer's cohorts. Memory bounded by "the largest shard" then
needs one of: one message per shard (a protocol change on every member, and one Flower
round trip, seconds in a deployment, per shard), or a place other than RAM for the sums
that are waiting. This module does the latter: every running sum is a :class:`SumBuffer`
from a :class:`SumPool` with a byte budget; when a new or refolded sum would exceed it, the
least recently folded ones are written to an unlinked scratch file and folded there in
place, a chunk at a time (read, add, write back). RAM then holds at most the budget, while
the page cache, which the kernel can always reclaim, holds the rest. A sum that is finished
goes back to RAM once (:meth:`SumBuffer.load`), one shard at a time.

Bit-exactness: a fold runs the same numpy kernel on the same fixed chunk boundaries
(``FOLD_CHUNK`` elements from the start of the buffer) whether the buffer is in RAM or on
disk, so spilling never changes a result (``train.ordered_aggregation`` resumes stay
bit-identical).
"""

from __future__ import annotations

import os
import tempfile
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path

import numpy as np

# Elements per fold chunk: 64 Ki float32 = 256 KiB, inside a core's L2 with its scratch.
# Measured on the dev box (bench/aggregate.py): 16 Ki..256 Ki within noise, 4 Ki ~40 % slower.
FOLD_CHUNK = 1 << 16

# ``kernel(acc_chunk, src_chunk, first)``: fold ``src_chunk`` into ``acc_chunk`` in place;
# ``first`` says ``acc_chunk`` holds garbage and must be overwritten, not added to.
Kernel = Callable[[np.ndarray, np.ndarray, bool], None]


class SumPool:
    """Hands out :class:`SumBuffer` s and keeps their resident bytes within ``budget_bytes``.

    ``budget_bytes=None`` never spills (small models, tests of the arithmetic). ``scratch_dir``
    is where spilled sums go (unlinked files: nothing is left behind by a crash); it should not
    be a tmpfs, or spilling would only move the bytes to another part of RAM.
    The budget covers the sums only, not the replies being folded or the finished shard a
    caller is working on; the counters below let tests and benchmarks check it.
    """

    def __init__(self, budget_bytes: int | None = None, scratch_dir: Path | str | None = None):
        if budget_bytes is not None and budget_bytes < 0:
            raise ValueError(f"budget_bytes must be >= 0 or None, got {budget_bytes}")
        self.budget_bytes = budget_bytes
        self.scratch_dir = None if scratch_dir is None else Path(scratch_dir)
        self._resident: OrderedDict[int, SumBuffer] = OrderedDict()  # LRU order, oldest first
        self.resident_bytes = 0
        self.peak_resident_bytes = 0
        self.spilled_bytes = 0  # bytes written to scratch files, over the pool's life
        self.live_buffers = 0

    def new(self, length: int, dtype: np.dtype | type, name: str = "") -> SumBuffer:
        """An empty sum of ``length`` elements (no memory until its first fold)."""
        self.live_buffers += 1
        return SumBuffer(self, int(length), np.dtype(dtype), name)

    # -------------------------------------------------------------- budget bookkeeping
    def _admit(self, buf: SumBuffer) -> None:
        """Make room for ``buf`` in RAM (spilling others) and count it resident."""
        if self.budget_bytes is not None:
            while self._resident and self.resident_bytes + buf.nbytes > self.budget_bytes:
                _, victim = self._resident.popitem(last=False)
                victim._spill()
        self._resident[id(buf)] = buf
        self.resident_bytes += buf.nbytes
        self.peak_resident_bytes = max(self.peak_resident_bytes, self.resident_bytes)

    def _touch(self, buf: SumBuffer) -> None:
        self._resident.move_to_end(id(buf))

    def _forget(self, buf: SumBuffer) -> None:
        if self._resident.pop(id(buf), None) is not None:
            self.resident_bytes -= buf.nbytes

    def _fits(self, nbytes: int) -> bool:
        """Whether a buffer of ``nbytes`` could ever be resident (a shard larger than the
        budget is folded on disk and only loaded when finished)."""
        return self.budget_bytes is None or nbytes <= self.budget_bytes


class SumBuffer:
    """One flat running sum, in RAM or in a scratch file; see the module docstring."""

    def __init__(self, pool: SumPool, length: int, dtype: np.dtype, name: str):
        self.pool, self.length, self.dtype, self.name = pool, length, dtype, name
        self.nbytes = length * dtype.itemsize
        self._array: np.ndarray | None = None  # resident copy
        self._file = None  # scratch file object once spilled
        self._written = False  # False until the first fold: the contents are garbage
        self._scratch: np.ndarray | None = None
        self._released = False

    @property
    def resident(self) -> bool:
        return self._array is not None

    @property
    def released(self) -> bool:
        return self._released

    @property
    def spilled(self) -> bool:
        return self._array is None and self._file is not None

    def fold(self, src: np.ndarray, kernel: Kernel, offset: int = 0) -> None:
        """Fold the flat ``src`` into elements ``[offset, offset + src.size)`` with ``kernel``.

        The first fold of a buffer must cover it whole (in one or several calls before any
        refold of a region; :meth:`mark_written` ends that phase).
        """
        if src.ndim != 1 or offset < 0 or offset + src.size > self.length:
            raise ValueError(f"{self.name}: fold of {src.shape} at {offset} does not fit {self.length} elements")
        first = not self._written
        if self._array is None and self._file is None and self.pool._fits(self.nbytes):
            self._array = np.empty(self.length, self.dtype)
            self.pool._admit(self)
        elif self._array is not None:
            self.pool._touch(self)
        elif self._file is None:  # larger than the whole budget: straight to disk
            self._open_file()
        if self._array is not None:
            acc = self._array
            for start in range(0, src.size, FOLD_CHUNK):
                stop = min(start + FOLD_CHUNK, src.size)
                kernel(acc[offset + start : offset + stop], src[start:stop], first)
            return
        chunk = self._chunk_buffer()
        itemsize = self.dtype.itemsize
        fd = self._file.fileno()
        for start in range(0, src.size, FOLD_CHUNK):
            stop = min(start + FOLD_CHUNK, src.size)
            part = chunk[: stop - start]
            pos = (offset + start) * itemsize
            if not first:
                _read_into(fd, part, pos)
            kernel(part, src[start:stop], first)
            _write_from(fd, part, pos)

    def mark_written(self) -> None:
        """Every element has been written once: later folds add to what is there."""
        self._written = True

    def load(self) -> np.ndarray:
        """The finished sum in RAM (read back once if it was spilled); call :meth:`release` after.

        Loading does not evict other sums for it: a finished shard is the caller's working
        memory, outside the budget (see :class:`SumPool`).
        """
        if self._array is None:
            self._array = np.empty(self.length, self.dtype)
            if self._file is not None:
                _read_into(self._file.fileno(), self._array, 0)
                self._file.close()
                self._file = None
        else:
            self.pool._forget(self)
        self._scratch = None
        return self._array

    def release(self) -> None:
        """Free the sum (RAM and scratch file). Idempotent."""
        if self._released:
            return
        self._released = True
        self.pool._forget(self)
        if self._file is not None:
            self._file.close()
            self._file = None
        self._array = None
        self._scratch = None
        self.pool.live_buffers -= 1

    # -------------------------------------------------------------- spilling
    def _open_file(self) -> None:
        # Closed by release() or load(); unlinked at creation, so a crash leaves nothing behind.
        self._file = tempfile.TemporaryFile(dir=self.pool.scratch_dir, prefix="kyodo-sum-")  # noqa: SIM115
        os.ftruncate(self._file.fileno(), self.nbytes)

    def _spill(self) -> None:
        """Move the resident sum to a scratch file (the pool has already un-counted it)."""
        assert self._array is not None
        self.pool.resident_bytes -= self.nbytes
        self._open_file()
        _write_from(self._file.fileno(), self._array, 0)
        self.pool.spilled_bytes += self.nbytes
        self._array = None

    def _chunk_buffer(self) -> np.ndarray:
        if self._scratch is None:
            self._scratch = np.empty(min(FOLD_CHUNK, self.length), self.dtype)
        return self._scratch


def _read_into(fd: int, out: np.ndarray, pos: int) -> None:
    view = memoryview(out).cast("B")
    done = 0
    while done < len(view):
        n = os.preadv(fd, [view[done:]], pos + done)
        if n <= 0:
            raise OSError(f"short read from a spilled sum at byte {pos + done}")
        done += n


def _write_from(fd: int, data: np.ndarray, pos: int) -> None:
    view = memoryview(np.ascontiguousarray(data)).cast("B")
    done = 0
    while done < len(view):
        n = os.pwrite(fd, view[done:], pos + done)
        if n <= 0:
            raise OSError(f"short write to a spilled sum at byte {pos + done}")
        done += n
