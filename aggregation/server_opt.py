"""Server optimisers: how a shard's aggregated delta becomes its next version."""

from __future__ import annotations

from collections.abc import Mapping

import torch


class FedAvg:
    """``w <- w + server_lr * mean_delta`` (McMahan et al. 2017; server_lr 1 is plain FedAvg)."""

    def __init__(self, server_lr: float = 1.0):
        if not server_lr > 0:
            raise ValueError(f"server_lr must be positive, got {server_lr}")
        self.server_lr = server_lr

    def apply(
        self, params: Mapping[str, torch.Tensor], mean_delta: Mapping[str, torch.Tensor]
    ) -> dict[str, torch.Tensor]:
        """Return the updated tensors named in ``mean_delta`` (others are untouched)."""
        out = {}
        for name, delta in mean_delta.items():
            base = params[name]
            out[name] = (base.to(torch.float32) + self.server_lr * delta.to(torch.float32)).to(base.dtype)
        return out
