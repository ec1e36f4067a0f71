"""Example-weighted mean of one shard's deltas over its cohort, accumulated in place.

Replies are folded in as they arrive and can be freed at once, so the coordinator holds one
running sum per open shard rather than every member's copy (memory follows the shard, not
the cohort size). The sum lives in a :class:`aggregation.sums.SumBuffer`, so a coordinator
with many open shards can keep them within a RAM budget (see that module for why).

Arithmetic: float32, folded in place, one pass per contribution. Folding is memory-bound,
so speed is bytes moved: per element a float32 fold reads the delta (4 B) and reads and
writes the sum (8 B), 12 B against 20 B for a float64 sum (which also needs a widened copy
or a cast per chunk). Each chunk of ``w * x`` is formed in a small float32 scratch that
stays in cache, then added into the sum; numpy runs single-threaded, which on a busy 2-core
coordinator beats torch's thread pool on many chunks and leaves a core to decode the next
reply. Measured (bench/aggregate.py, P=10M, N=8): 1.5-1.9x the ``np.add`` float64 roofline
and ~2.5x Flower's FedAvg aggregation; the float64 version reached 0.62-0.70x and 1.45-1.65x.

Accuracy of float32: each step rounds once (the product ``w * x``, then the sum), so the
error after N folds is at most about N ulps of the running sum and in practice ~sqrt(N).
Measured against a float64 reference (bench/aggregate.py, N=32 updates of N(0, 0.01)
values with example weights 100..36,000): max relative error 1.6e-7 of the mean's largest
value, about one float32 ulp, and the same order as Flower's own float32 aggregation. The
result is a float32 model update either way, which DP noise dominates by orders of
magnitude. Weights are rounded to float32 (exact for example counts below 2**24).

Finiteness is checked once, on the finished sum in :meth:`ShardMean.mean`, not per fold:
NaN and inf propagate through sums, so one pass over the result catches any bad input.
(On the coordinator, a reply is also checked when it is decoded,
``shared_model.protocol.record_to_tensors``, so a bad member is still left out on its own.)

Determinism: the same contributions folded in the same order give the same bits, whatever
the chunking or spilling (fixed chunk boundaries, elementwise numpy kernels, no FMA).
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import torch

from aggregation.sums import FOLD_CHUNK, SumBuffer, SumPool


class AggregationError(ValueError):
    """A contribution does not fit the shard it claims to update."""


# The finiteness pass only writes one byte per element into its scratch, so it takes bigger bites.
_CHECK_CHUNK = 1 << 18

# dtypes folded through numpy views; anything else (bfloat16, ints, non-CPU tensors) is first
# converted to a float32 copy by torch (correct, one temporary of the delta's size).
_NUMPY_FLOATS = (torch.float16, torch.float32, torch.float64)


def flat_numpy(tensor: torch.Tensor) -> np.ndarray | None:
    """A 1-D numpy view of ``tensor``'s memory (a copy only if it is not contiguous), or None
    where numpy cannot share it."""
    if tensor.device.type != "cpu" or tensor.dtype not in _NUMPY_FLOATS:
        return None
    return tensor.detach().numpy().reshape(-1)


def finite_array(flat: np.ndarray) -> bool:
    """True iff no element of the 1-D float array is NaN or +-inf (chunked, stops at the first bad chunk)."""
    mask = np.empty(min(_CHECK_CHUNK, flat.size), dtype=bool)
    for start in range(0, flat.size, _CHECK_CHUNK):
        part = flat[start : start + _CHECK_CHUNK]
        out = mask[: part.size]
        np.isfinite(part, out=out)
        if not out.all():
            return False
    return True


def all_finite(tensor: torch.Tensor) -> bool:
    """True iff no element is NaN or +-inf.

    ``torch.isfinite(t).all()`` materialises a full-size bool tensor and on CPU is several
    times slower than a fold; a chunked numpy pass reuses one small buffer.
    """
    flat = flat_numpy(tensor)
    if flat is None:
        return bool(torch.isfinite(tensor).all())
    return finite_array(flat)


class ShardMean:
    """Running example-weighted float32 sum of one shard's deltas; :meth:`mean` divides at the end.

    Memory: one float32 buffer of the shard's trainable size (from ``pool``, allocated on the
    first contribution), plus a fold scratch of ``FOLD_CHUNK`` values; nothing per member.
    The shard's tensors lie in the buffer in sorted name order (as ``aggregation.secagg.vectors``
    lays them out).
    """

    def __init__(
        self,
        shard_id: str,
        cohort: list[str],
        expected: Mapping[str, tuple[int, ...]],
        pool: SumPool | None = None,
    ):
        self.shard_id = shard_id
        self.cohort = list(cohort)
        self.expected = {name: tuple(expected[name]) for name in sorted(expected)}
        self._offsets: dict[str, int] = {}
        offset = 0
        for name, shape in self.expected.items():
            self._offsets[name] = offset
            offset += int(np.prod(shape, dtype=np.int64))
        self.numel = offset
        self._sum: SumBuffer = (pool or SumPool()).new(offset, np.float32, shard_id)
        self._scratch = np.empty(min(FOLD_CHUNK, max(offset, 1)), np.float32)
        self._mean: dict[str, torch.Tensor] | None = None
        self.total_weight = 0.0
        self.contributors: list[str] = []

    @property
    def nbytes(self) -> int:
        """Bytes of the running sum (what this shard costs the coordinator while it is open)."""
        return self._sum.nbytes

    def check(self, member: str, deltas: Mapping[str, torch.Tensor], weight: float) -> None:
        """Raise :class:`AggregationError` unless ``add`` would accept this contribution.

        Reads only metadata (names, shapes), never the data, so callers can check every shard
        of a reply before adding any: a reply is folded in whole or not at all.
        """
        if self._mean is not None or self._sum.released:
            raise AggregationError(f"{self.shard_id} is already finished")
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

    def add(self, member: str, deltas: Mapping[str, torch.Tensor], weight: float) -> None:
        """Fold one member's delta in. Refuses non-cohort members, wrong keys and shapes.

        Everything is checked before anything is folded, so a refused contribution leaves the
        sum untouched. Non-finite values are not looked for here (see the module docstring).
        """
        self.check(member, deltas, weight)
        w = float(weight)
        scratch = self._scratch

        def kernel(acc: np.ndarray, src: np.ndarray, first: bool) -> None:
            if first:
                np.multiply(src, w, out=acc, dtype=np.float32)
                return
            part = scratch[: src.size]
            np.multiply(src, w, out=part, dtype=np.float32)
            np.add(acc, part, out=acc)

        self._fold_each(self._sum, deltas, kernel)
        self.total_weight += w
        self.contributors.append(member)

    def mean(self) -> dict[str, torch.Tensor]:
        """The example-weighted mean (float32), computed in place in the sum's buffer.

        Finishes the shard: the sum is loaded into RAM once (if it was spilled), checked for
        non-finite values, divided, and handed over as views; no further ``add`` is accepted.
        Raises :class:`AggregationError` for no contributions or a non-finite sum.
        """
        if self._mean is not None:
            return self._mean
        if not self.contributors:
            self._sum.release()
            raise AggregationError(f"no contributions for {self.shard_id}")
        flat = self._sum.load()
        self._sum.release()
        if not finite_array(flat):
            bad = [
                name
                for name, shape in self.expected.items()
                if not finite_array(flat[self._offsets[name] : self._offsets[name] + int(np.prod(shape))])
            ]
            raise AggregationError(f"{self.shard_id}: sum has non-finite values in {bad}")
        np.divide(flat, self.total_weight, out=flat, dtype=np.float32)
        self._mean = self.views(flat)
        return self._mean

    def views(self, flat: np.ndarray) -> dict[str, torch.Tensor]:
        """The shard's tensors as views of a flat float32 vector in this shard's layout."""
        return {
            name: torch.from_numpy(flat[self._offsets[name] : self._offsets[name] + int(np.prod(shape))]).reshape(shape)
            for name, shape in self.expected.items()
        }

    def copy_into(self, buf: SumBuffer, deltas: Mapping[str, torch.Tensor]) -> None:
        """Write ``deltas`` (already checked) into ``buf`` as float32 in this shard's layout, so
        a contribution can wait in a pool (and be spilled) until its turn to be folded; folding
        it from there gives the same bits as folding ``deltas`` directly."""
        self._fold_each(buf, deltas, _copy_kernel)

    def _fold_each(self, buf: SumBuffer, deltas: Mapping[str, torch.Tensor], kernel) -> None:
        """Apply ``kernel`` to each tensor (as flat float32) at its offset in ``buf``."""
        for name in self.expected:
            tensor = deltas[name]
            src = flat_numpy(tensor)
            if src is None:
                src = tensor.detach().to(device="cpu", dtype=torch.float32).reshape(-1).numpy()
            if src.size:
                buf.fold(src, kernel, self._offsets[name])
        buf.mark_written()

    def discard(self) -> None:
        """Free the sum without finishing (a shard that will not be applied)."""
        self._sum.release()


def _copy_kernel(acc: np.ndarray, src: np.ndarray, first: bool) -> None:
    np.copyto(acc, src, casting="same_kind")
