"""LoRA on a frozen linear layer, in the FFA-LoRA form (only B trains).

Why only B: federated averaging of LoRA factors is wrong in general, because
mean(B_i A_i) != mean(B_i) mean(A_i). If every member uses the *same* frozen A, the update
is B A and averaging B is exact: mean(B_i) A = mean(B_i A). A is derived from a public seed
(``lora_seed``) plus a stable per-layer key, so every node regenerates the identical A
without it ever being shipped, independent of the global RNG and of the init seed.

Trainable weights live in plain ``nn.Linear`` leaves: Opacus computes per-sample gradients
per leaf module and treats a custom module with a raw parameter as one opaque unit.
"""

from __future__ import annotations

import hashlib
import math
from typing import Any, TypeVar

import torch
from torch import nn

M = TypeVar("M", bound=nn.Module)


def _skip(*_args: Any, **_kwargs: Any) -> None:
    return None


def new_module(cls: type[M], *args: Any, device: torch.device | str | None = None, **kwargs: Any) -> M:
    """``cls(*args, device=device, **kwargs)``, skipping ``reset_parameters`` on the meta device.

    Why: the trillion layout has ~70k linear layers, and the stock constructors run their
    default init even on meta tensors (~100 us each, plus a one-off multi-second import for
    ``normal_`` on meta), which is pure waste: meta tensors hold no values, and real models
    are initialised by ``Policy.reset_parameters`` anyway. The module is still exactly
    ``cls`` (Opacus dispatches per-sample gradient rules on the exact type), built by its own
    ``__init__``; only the init method is shadowed on the instance while ``__init__`` runs.
    """
    if device is None or torch.device(device).type != "meta":
        return cls(*args, device=device, **kwargs)
    module = cls.__new__(cls)
    module.__dict__["reset_parameters"] = _skip
    try:
        cls.__init__(module, *args, device=device, **kwargs)
    finally:
        module.__dict__.pop("reset_parameters", None)
    return module


def stable_seed(seed: int, key: str) -> int:
    """A 63-bit seed derived from ``(seed, key)``, identical in every process and machine.

    Python's ``hash`` is salted per process, so it cannot be used for anything that must
    agree between consortium members.
    """
    digest = hashlib.sha256(f"{int(seed)}:{key}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


class LoRALinear(nn.Module):
    """``base(x) + (alpha / r) * lora_B(lora_A(x))`` with ``base`` and ``lora_A`` frozen.

    Args:
        base: the wrapped linear layer; its parameters are frozen here (they belong to the
            backbone shard, which is frozen during federated rounds).
        rank: LoRA rank ``r``.
        alpha: LoRA scaling numerator; the update is scaled by ``alpha / rank``.
        seed: the seed for ``lora_A``; callers pass ``stable_seed(lora_seed, layer_key)`` so
            each layer gets a different, reproducible A.
    """

    def __init__(self, base: nn.Linear, rank: int, alpha: float, seed: int) -> None:
        super().__init__()
        if rank <= 0:
            raise ValueError(f"LoRA rank must be positive, got {rank}")
        self.base = base
        self.rank = int(rank)
        self.alpha = float(alpha)
        self.scaling = self.alpha / self.rank
        self.seed = int(seed)
        device, dtype = base.weight.device, base.weight.dtype
        self.lora_A = new_module(nn.Linear, base.in_features, rank, bias=False, device=device, dtype=dtype)
        self.lora_B = new_module(nn.Linear, rank, base.out_features, bias=False, device=device, dtype=dtype)
        for p in self.base.parameters():
            p.requires_grad_(False)
        self.lora_A.weight.requires_grad_(False)
        self.reset_lora_parameters()

    @property
    def in_features(self) -> int:
        return self.base.in_features

    @property
    def out_features(self) -> int:
        return self.base.out_features

    @torch.no_grad()
    def reset_lora_parameters(self) -> None:
        """A from the layer's own seed (uniform, nn.Linear's fan-in bound), B = 0.

        A is drawn on the CPU with a private generator and then copied, so the values do not
        depend on the device, on the global RNG state, or on construction order. On the meta
        device there is nothing to fill.
        """
        if self.lora_A.weight.is_meta:
            return
        gen = torch.Generator(device="cpu").manual_seed(self.seed)
        bound = 1.0 / math.sqrt(self.base.in_features)
        a = torch.empty(self.lora_A.weight.shape, dtype=torch.float32).uniform_(-bound, bound, generator=gen)
        self.lora_A.weight.copy_(a)
        self.lora_B.weight.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + self.scaling * self.lora_B(self.lora_A(x))

    def extra_repr(self) -> str:
        return f"rank={self.rank}, alpha={self.alpha}, seed={self.seed}"
