"""Example-weighted mean of one shard's deltas over its cohort, accumulated in place.

Replies are folded in as they arrive and can be freed at once, so the coordinator holds one
running sum per shard rather than every member's copy (memory follows the shard, not the
cohort size). Sums are kept in float64: with many members of very different weights a
float32 running sum loses the low bits of the small contributions.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch


class AggregationError(ValueError):
    """A contribution does not fit the shard it claims to update."""


class ShardMean:
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
            if not torch.isfinite(tensor).all():
                raise AggregationError(f"{member!r} delta {name} has non-finite values")

    def add(self, member: str, deltas: Mapping[str, torch.Tensor], weight: float) -> None:
        """Fold one member's delta in. Refuses non-cohort members, wrong keys and shapes."""
        self.check(member, deltas, weight)
        for name, tensor in deltas.items():
            acc = self._sums.get(name)
            if acc is None:
                self._sums[name] = tensor.to(torch.float64) * weight
            else:
                acc.add_(tensor.to(torch.float64), alpha=weight)
        self.total_weight += weight
        self.contributors.append(member)

    def mean(self) -> dict[str, torch.Tensor]:
        if not self.contributors:
            raise AggregationError(f"no contributions for {self.shard_id}")
        return {name: (acc / self.total_weight).to(torch.float32) for name, acc in self._sums.items()}
