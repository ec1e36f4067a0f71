"""Server optimisers: how a shard's aggregated delta becomes its next version.

Every optimiser treats the example-weighted mean delta of a shard as the (negative)
pseudo-gradient, as in Reddi et al. 2021, and acts on one shard at a time: a round updates
only the shards that reached their minimum cohort, and the optimiser state of every other
shard must stay exactly as it was. State is therefore kept per shard, per named tensor, and
exported as plain tensors (``state_dict(shard_id)``), so the coordinator can store it next to
the shard's weights as a safetensors object in its content-addressed store and restore it
bit-exactly after a restart (``load_state_dict``).

Arithmetic is float32 (the dtype of the shared model's trainable tensors), state included:
at trillion-parameter scale FedAdam's two moments already cost twice the model.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Mapping
from typing import Any, ClassVar

import torch

STEP_KEY = "step"  # int64 scalar in every non-empty state dict: how many times the shard was updated


def _check_lr(value: Any, name: str = "server_lr") -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value) or not value > 0:
        raise ValueError(f"{name} must be a positive finite number, got {value!r}")
    return float(value)


def _check_unit(value: Any, name: str) -> float:
    """A decay rate in [0, 1): at 1 the state would never forget, so it would never settle."""
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 <= value < 1:
        raise ValueError(f"{name} must be in [0, 1), got {value!r}")
    return float(value)


def _shards_of(mean_delta: Mapping[str, torch.Tensor], shard_id: str | None) -> dict[str, dict[str, torch.Tensor]]:
    """Group the delta's tensors by shard: all under ``shard_id`` if given, else by name rule."""
    if shard_id is not None:
        return {shard_id: dict(mean_delta)}
    from shared_model.shards import shard_of  # the naming rule lives with the model

    grouped: dict[str, dict[str, torch.Tensor]] = {}
    for name, delta in mean_delta.items():
        grouped.setdefault(shard_of(name), {})[name] = delta
    return grouped


def _check_shapes(params: Mapping[str, torch.Tensor], mean_delta: Mapping[str, torch.Tensor]) -> None:
    for name, delta in mean_delta.items():
        if name not in params:
            raise KeyError(f"mean delta names {name!r}, which is not a model tensor")
        if tuple(params[name].shape) != tuple(delta.shape):
            raise ValueError(f"{name}: delta shape {tuple(delta.shape)} != parameter shape {tuple(params[name].shape)}")


class ServerOptimizer:
    """Common interface. Subclasses set ``slots`` (per-tensor state names) and implement ``_step``.

    ``apply`` returns new tensors for the names in ``mean_delta`` and leaves ``params`` alone,
    so the caller decides when the new version replaces the old one.
    """

    name: ClassVar[str] = ""
    slots: ClassVar[tuple[str, ...]] = ()

    def __init__(self, server_lr: float):
        self.server_lr = _check_lr(server_lr)
        self._state: dict[str, dict[str, torch.Tensor]] = {}

    def hparams(self) -> dict[str, float | bool]:
        """The hyper-parameters, as ``make_server_optimizer`` takes them (for run records)."""
        return {"server_lr": self.server_lr}

    # ------------------------------------------------------------------ update
    def apply(
        self,
        params: Mapping[str, torch.Tensor],
        mean_delta: Mapping[str, torch.Tensor],
        shard_id: str | None = None,
    ) -> dict[str, torch.Tensor]:
        """Return the updated tensors named in ``mean_delta`` (others are untouched).

        ``shard_id`` names the shard the delta belongs to; without it each tensor's shard is
        derived from its name (``shared_model.shards.shard_of``). Shapes are checked before any
        state changes, so a refused call leaves the optimiser as it was.
        """
        _check_shapes(params, mean_delta)
        # A stateless optimiser needs no shard: it works on any tensor names.
        groups = _shards_of(mean_delta, shard_id) if self.slots else {shard_id or "": dict(mean_delta)}
        for shard, deltas in groups.items():
            self._check_state_fits(shard, deltas)
        out: dict[str, torch.Tensor] = {}
        for shard, deltas in groups.items():
            out.update(self._apply_shard(shard, params, deltas))
        return out

    def _apply_shard(
        self, shard_id: str, params: Mapping[str, torch.Tensor], deltas: Mapping[str, torch.Tensor]
    ) -> dict[str, torch.Tensor]:
        if not self.slots:
            return {name: self._step(params[name], delta.to(torch.float32), {}, 1) for name, delta in deltas.items()}
        state = self._state.setdefault(shard_id, {})
        step = int(state[STEP_KEY]) + 1 if STEP_KEY in state else 1
        out = {}
        for name, delta in deltas.items():
            slots = {slot: self._slot(state, slot, name, delta) for slot in self.slots}
            out[name] = self._step(params[name], delta.to(torch.float32), slots, step)
        state[STEP_KEY] = torch.tensor(step, dtype=torch.int64)
        return out

    def _slot(self, state: dict[str, torch.Tensor], slot: str, name: str, delta: torch.Tensor) -> torch.Tensor:
        key = f"{slot}/{name}"
        if key not in state:
            state[key] = self._initial(slot, delta)
        return state[key]

    def _initial(self, slot: str, delta: torch.Tensor) -> torch.Tensor:
        return torch.zeros(delta.shape, dtype=torch.float32)

    def _step(
        self, param: torch.Tensor, delta: torch.Tensor, slots: dict[str, torch.Tensor], step: int
    ) -> torch.Tensor:
        """Update ``slots`` in place and return the new parameter (in ``param``'s dtype)."""
        raise NotImplementedError

    def _check_state_fits(self, shard_id: str, deltas: Mapping[str, torch.Tensor]) -> None:
        state = self._state.get(shard_id, {})
        for name, delta in deltas.items():
            for slot in self.slots:
                held = state.get(f"{slot}/{name}")
                if held is not None and tuple(held.shape) != tuple(delta.shape):
                    raise ValueError(
                        f"{shard_id}: {slot} state of {name} has shape {tuple(held.shape)}, delta {tuple(delta.shape)}"
                    )

    # ------------------------------------------------------------------ state
    def state_dict(self, shard_id: str) -> dict[str, torch.Tensor]:
        """The shard's optimiser state as tensors only: ``"step"`` (int64 scalar) and
        ``"<slot>/<tensor name>"`` (float32). Empty for a shard never updated (and for FedAvg).

        Copies, so later rounds cannot change what the caller is storing.
        """
        return {key: tensor.clone() for key, tensor in self._state.get(shard_id, {}).items()}

    def load_state_dict(self, shard_id: str, tensors: Mapping[str, torch.Tensor]) -> None:
        """Replace the shard's state with ``tensors`` (as ``state_dict`` returned them); an empty
        mapping resets the shard. Refuses keys this optimiser does not keep, so state written by
        another optimiser is not silently misread."""
        tensors = dict(tensors)
        if not tensors:
            self._state.pop(shard_id, None)
            return
        if not self.slots:
            raise ValueError(f"{self.name} keeps no state, got keys {sorted(tensors)} for {shard_id}")
        step = tensors.get(STEP_KEY)
        if step is None or step.dtype != torch.int64 or step.numel() != 1 or int(step) < 1:
            raise ValueError(f"{shard_id}: state needs {STEP_KEY!r} as a positive int64 scalar, got {step!r}")
        names: dict[str, set[str]] = {}
        for key, tensor in tensors.items():
            if key == STEP_KEY:
                continue
            slot, sep, name = key.partition("/")
            if not sep or slot not in self.slots or not name:
                raise ValueError(f"{shard_id}: unexpected {self.name} state key {key!r} (slots {list(self.slots)})")
            if tensor.dtype != torch.float32:
                raise ValueError(f"{shard_id}: state {key!r} must be float32, got {tensor.dtype}")
            if not bool(torch.isfinite(tensor).all()):
                raise ValueError(f"{shard_id}: state {key!r} has non-finite values")
            names.setdefault(name, set()).add(slot)
        for name, slots in names.items():
            if slots != set(self.slots):
                raise ValueError(f"{shard_id}: state of {name!r} has slots {sorted(slots)}, needs {list(self.slots)}")
        self._state[shard_id] = {
            key: t.detach().to("cpu").reshape(()).clone() if key == STEP_KEY else t.detach().to("cpu").clone()
            for key, t in tensors.items()
        }

    def shards_with_state(self) -> list[str]:
        """Shards that have been updated (or restored) and hold state."""
        return sorted(self._state)


class FedAvg(ServerOptimizer):
    """``w <- w + server_lr * mean_delta`` (McMahan et al. 2017; server_lr 1 is plain FedAvg).

    Stateless: ``state_dict`` is always empty.
    """

    name = "fedavg"

    def __init__(self, server_lr: float = 1.0):
        super().__init__(server_lr)

    def _step(
        self, param: torch.Tensor, delta: torch.Tensor, slots: dict[str, torch.Tensor], step: int
    ) -> torch.Tensor:
        return (param.to(torch.float32) + self.server_lr * delta).to(param.dtype)


class FedAvgM(ServerOptimizer):
    """Server momentum (Hsu et al. 2019, "Measuring the effects of non-identical data
    distribution"): ``v <- momentum * v + mean_delta``, ``w <- w + server_lr * v``.

    Momentum averages the pseudo-gradient over rounds, which damps the round-to-round swings
    that partial, non-IID cohorts cause. Per shard, a round where the shard is not updated is
    not a step: its momentum neither decays nor moves.
    """

    name = "fedavgm"
    slots = ("momentum",)

    def __init__(self, server_lr: float = 1.0, momentum: float = 0.9):
        super().__init__(server_lr)
        self.momentum = _check_unit(momentum, "momentum")

    def hparams(self) -> dict[str, float | bool]:
        return {**super().hparams(), "momentum": self.momentum}

    def _step(
        self, param: torch.Tensor, delta: torch.Tensor, slots: dict[str, torch.Tensor], step: int
    ) -> torch.Tensor:
        v = slots["momentum"]
        v.mul_(self.momentum).add_(delta)
        return torch.add(param.to(torch.float32), v, alpha=self.server_lr).to(param.dtype)


class FedAdam(ServerOptimizer):
    """Adam on the server (Reddi et al. 2021, "Adaptive Federated Optimization", Algorithm 2),
    with the mean delta as pseudo-gradient:

    ``m <- beta1 m + (1 - beta1) d``, ``v <- beta2 v + (1 - beta2) d^2``,
    ``w <- w + server_lr * m / (sqrt(v) + tau)``.

    As in the paper, ``m`` starts at 0 and ``v`` at ``tau**2`` (the paper asks ``v_{-1} >= tau^2``),
    and there is no bias correction; ``bias_correction=True`` scales the step by
    ``sqrt(1 - beta2^t) / (1 - beta1^t)`` with ``t`` the shard's own update count (Flower's
    FedAdam does this with the global round). ``tau`` bounds the per-coordinate step by
    ``server_lr * |m| / tau`` where ``v`` is tiny, so it is a stability knob, not just an epsilon.
    """

    name = "fedadam"
    slots = ("m", "v")

    def __init__(
        self,
        server_lr: float = 0.1,
        beta1: float = 0.9,
        beta2: float = 0.99,
        tau: float = 1e-3,
        bias_correction: bool = False,
    ):
        super().__init__(server_lr)
        self.beta1 = _check_unit(beta1, "beta1")
        self.beta2 = _check_unit(beta2, "beta2")
        self.tau = _check_lr(tau, "tau")
        if not isinstance(bias_correction, bool):
            raise ValueError(f"bias_correction must be a bool, got {bias_correction!r}")
        self.bias_correction = bias_correction

    def hparams(self) -> dict[str, float | bool]:
        return {
            **super().hparams(),
            "beta1": self.beta1,
            "beta2": self.beta2,
            "tau": self.tau,
            "bias_correction": self.bias_correction,
        }

    def _initial(self, slot: str, delta: torch.Tensor) -> torch.Tensor:
        if slot == "v":
            return torch.full(delta.shape, self.tau**2, dtype=torch.float32)
        return super()._initial(slot, delta)

    def _step(
        self, param: torch.Tensor, delta: torch.Tensor, slots: dict[str, torch.Tensor], step: int
    ) -> torch.Tensor:
        m, v = slots["m"], slots["v"]
        m.mul_(self.beta1).add_(delta, alpha=1 - self.beta1)
        v.mul_(self.beta2).addcmul_(delta, delta, value=1 - self.beta2)
        lr = self.server_lr
        if self.bias_correction:
            lr *= math.sqrt(1 - self.beta2**step) / (1 - self.beta1**step)
        denom = v.sqrt().add_(self.tau)
        return torch.addcdiv(param.to(torch.float32), m, denom, value=lr).to(param.dtype)


SERVER_OPTIMIZERS: dict[str, type[ServerOptimizer]] = {cls.name: cls for cls in (FedAvg, FedAvgM, FedAdam)}


def make_server_optimizer(name: str, **hparams: Any) -> ServerOptimizer:
    """Build a server optimiser by name (``fedavg``, ``fedavgm``, ``fedadam``; case-insensitive).

    Unknown names and unknown or out-of-range hyper-parameters raise ``ValueError`` naming
    what is accepted, so a typo in a run config fails at start-up, not after a round of training.
    """
    cls = SERVER_OPTIMIZERS.get(str(name).lower())
    if cls is None:
        raise ValueError(f"unknown server optimizer {name!r}; choose one of {sorted(SERVER_OPTIMIZERS)}")
    accepted = [p for p in inspect.signature(cls.__init__).parameters if p != "self"]
    unknown = sorted(set(hparams) - set(accepted))
    if unknown:
        raise ValueError(f"{cls.name} does not take {unknown}; its hyper-parameters are {accepted}")
    return cls(**hparams)
