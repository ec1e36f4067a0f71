"""Example-weighted mean of one shard's deltas over its cohort, accumulated in place.

Replies are folded in as they arrive and can be freed at once, so the coordinator holds one
running sum per shard rather than every member's copy (memory follows the shard, not the
cohort size). Sums are kept in float64: with many members of very different weights a
float32 running sum loses the low bits of the small contributions.

Speed: folding is a memory-bound streaming pass, so what matters is how many bytes move and
whether the pass spawns full-size temporaries. ``acc.add_(x.to(float64), alpha=w)`` builds a
float64 copy of the whole delta (twice the input's bytes, written and read back), and on CPU
torch's mixed-dtype ``add_`` does the same internally. Instead, CPU float tensors are folded
through numpy views of the same memory, a cache-sized chunk at a time: ``w * x`` is formed in
a small float64 scratch buffer that stays in cache, then added into the running sum. The
finiteness check is chunked the same way. numpy runs this single-threaded, which on a busy
coordinator is faster than torch's thread pool for many small chunks (each torch call pays a
thread-team fork/join) and leaves the other cores to decode the next replies.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import torch


class AggregationError(ValueError):
    """A contribution does not fit the shard it claims to update."""


# Elements per chunk of the streaming passes. 64 Ki float64 = 512 KiB of scratch, which stays
# in a core's L2 cache; measured on the dev box, 16 Ki to 128 Ki are within noise of each other
# and 4 Ki is ~40 % slower (per-call overhead of the numpy ufuncs starts to show).
_FOLD_CHUNK = 1 << 16
# The finiteness pass only writes one byte per element into its scratch, so it can take bigger bites.
_CHECK_CHUNK = 1 << 18

# dtypes folded through numpy views; anything else (bfloat16, ints, non-CPU tensors) takes the
# plain torch path, which is correct but allocates a float64 copy of the delta.
_NUMPY_FLOATS = (torch.float16, torch.float32, torch.float64)


def flat_numpy(tensor: torch.Tensor) -> np.ndarray | None:
    """A 1-D numpy view of ``tensor``'s memory (a copy only if it is not contiguous), or None
    where numpy cannot share it."""
    if tensor.device.type != "cpu" or tensor.dtype not in _NUMPY_FLOATS:
        return None
    return tensor.detach().numpy().reshape(-1)


def all_finite(tensor: torch.Tensor) -> bool:
    """True iff no element is NaN or +-inf.

    ``torch.isfinite(t).all()`` materialises a full-size bool tensor and on CPU is several
    times slower than the fold itself; a chunked numpy pass reuses one small buffer and stops
    at the first bad chunk.
    """
    flat = flat_numpy(tensor)
    if flat is None:
        return bool(torch.isfinite(tensor).all())
    mask = np.empty(min(_CHECK_CHUNK, flat.size), dtype=bool)
    for start in range(0, flat.size, _CHECK_CHUNK):
        part = flat[start : start + _CHECK_CHUNK]
        out = mask[: part.size]
        np.isfinite(part, out=out)
        if not out.all():
            return False
    return True


def _empty(shape: tuple[int, ...], dtype: type[np.floating]) -> torch.Tensor:
    """An uninitialised CPU tensor in numpy-allocated memory.

    Not ``torch.empty``: numpy asks the kernel for transparent huge pages on large buffers
    (``madvise(MADV_HUGEPAGE)``), torch's CPU allocator does not. First-touching an 80 MB
    float64 sum costs ~20k page faults with 4 KiB pages against ~40 with 2 MiB ones; on the dev
    VM that alone made the first contribution ~4x slower than the others. Not zeros either:
    the first contribution overwrites every element, so the buffer is written once.
    """
    return torch.from_numpy(np.empty(shape, dtype=dtype))


class ShardMean:
    """Running example-weighted sum of one shard's deltas; :meth:`mean` divides at the end.

    Memory is one float64 buffer per trainable tensor of the shard (allocated on the first
    contribution), plus a fold scratch of at most ``_FOLD_CHUNK`` float64 values during
    :meth:`add`; nothing is kept per member.
    """

    def __init__(self, shard_id: str, cohort: list[str], expected: Mapping[str, tuple[int, ...]]):
        self.shard_id = shard_id
        self.cohort = list(cohort)
        self.expected = dict(expected)
        self._sums: dict[str, torch.Tensor] = {}
        self.total_weight = 0.0
        self.contributors: list[str] = []

    def check(self, member: str, deltas: Mapping[str, torch.Tensor], weight: float) -> None:
        """Raise :class:`AggregationError` unless ``add`` would accept this contribution.

        Callers check every shard of a reply before adding any, so a reply is folded in
        whole or not at all.
        """
        if member not in self.cohort:
            raise AggregationError(f"{member!r} is not in the cohort of {self.shard_id} ({self.cohort})")
        if member in self.contributors:
            raise AggregationError(f"{member!r} already contributed to {self.shard_id}")
        if not weight > 0:
            raise AggregationError(f"{member!r}: weight must be positive, got {weight}")
        if set(deltas) != set(self.expected):
            missing = sorted(set(self.expected) - set(deltas))
            extra = sorted(set(deltas) - set(self.expected))
            raise AggregationError(f"{member!r} delta for {self.shard_id}: missing {missing}, unexpected {extra}")
        for name, tensor in deltas.items():
            if tuple(tensor.shape) != tuple(self.expected[name]):
                raise AggregationError(
                    f"{member!r} delta {name}: shape {tuple(tensor.shape)} != expected {tuple(self.expected[name])}"
                )
        # Finiteness last: it is the only check that reads the data.
        for name, tensor in deltas.items():
            if not all_finite(tensor):
                raise AggregationError(f"{member!r} delta {name} has non-finite values")

    def add(self, member: str, deltas: Mapping[str, torch.Tensor], weight: float) -> None:
        """Fold one member's delta in. Refuses non-cohort members, wrong keys and shapes.

        Everything is checked before anything is folded, so a refused contribution leaves the
        sums untouched.
        """
        self.check(member, deltas, weight)
        w = float(weight)
        for name, tensor in deltas.items():
            self._fold(name, tensor, w)
        self.total_weight += w
        self.contributors.append(member)

    def _fold(self, name: str, tensor: torch.Tensor, weight: float) -> None:
        acc = self._sums.get(name)
        first = acc is None
        if acc is None:
            acc = self._sums[name] = _empty(tuple(self.expected[name]), np.float64)
        src = flat_numpy(tensor)
        if src is None:
            wide = tensor.detach().to(device="cpu", dtype=torch.float64)
            if first:
                torch.mul(wide, weight, out=acc)
            else:
                acc.add_(wide, alpha=weight)
            return
        dst = acc.numpy().reshape(-1)
        w = np.float64(weight)
        if first:
            # numpy casts float32 -> float64 in its own small internal buffers: one pass, no temporary.
            np.multiply(src, w, out=dst, dtype=np.float64)
            return
        scratch = np.empty(min(_FOLD_CHUNK, src.size), dtype=np.float64)
        for start in range(0, src.size, _FOLD_CHUNK):
            stop = start + _FOLD_CHUNK
            part = scratch[: min(_FOLD_CHUNK, src.size - start)]
            np.multiply(src[start:stop], w, out=part, dtype=np.float64)
            np.add(dst[start:stop], part, out=dst[start:stop])

    def mean(self) -> dict[str, torch.Tensor]:
        """The example-weighted mean in float32 (divided in float64, rounded once)."""
        if not self.contributors:
            raise AggregationError(f"no contributions for {self.shard_id}")
        out: dict[str, torch.Tensor] = {}
        for name, acc in self._sums.items():
            result = _empty(tuple(acc.shape), np.float32)
            # Same values as (acc / total).to(float32), without the float64 quotient temporary.
            np.divide(acc.numpy(), self.total_weight, out=result.numpy(), casting="same_kind")
            out[name] = result
        return out
