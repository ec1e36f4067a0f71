"""One flat vector per shard: the unit that is quantized, masked and summed.

Member and coordinator must lay a shard's tensors out identically without talking about
it, so the order is fixed here once: the shard's trainable tensors in sorted name order.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import torch


def flatten_shard(tensors: Mapping[str, torch.Tensor]) -> np.ndarray:
    """Concatenate ``tensors`` (sorted by name) into one float32 vector."""
    if not tensors:
        return np.zeros(0, dtype=np.float32)
    parts = [tensors[name].detach().to("cpu", torch.float32).reshape(-1).numpy() for name in sorted(tensors)]
    return np.concatenate(parts)


def shard_length(shapes: Mapping[str, tuple[int, ...]]) -> int:
    return int(sum(int(np.prod(shape)) for shape in shapes.values()))


def unflatten_shard(vector: np.ndarray, shapes: Mapping[str, tuple[int, ...]]) -> dict[str, torch.Tensor]:
    """Inverse of :func:`flatten_shard` given the shard's tensor shapes (float32 tensors)."""
    expected = shard_length(shapes)
    if vector.shape != (expected,):
        raise ValueError(f"shard vector has shape {vector.shape}, the shard's tensors need ({expected},)")
    out: dict[str, torch.Tensor] = {}
    offset = 0
    for name in sorted(shapes):
        size = int(np.prod(shapes[name]))
        chunk = np.ascontiguousarray(vector[offset : offset + size], dtype=np.float32)
        out[name] = torch.from_numpy(chunk).reshape(shapes[name])
        offset += size
    return out
