"""The member-owned privacy budget and the decision, before each round, of how much to train.

The budget comes from the member's own configuration only: nothing in this module takes a
value from the coordinator except the *requested* number of steps, which can only be
shortened. The decision is made before training, against the composition of everything the
node already ran (its ledger's history), so the budget holds even if the node is restarted
or the coordinator asks for more rounds than were planned.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from dataclasses import dataclass

from privacy.accountant import Mechanism, check_accountant, check_delta, epsilon, search_steps

DECISIONS = ("full", "shortened", "declined")


@dataclass(frozen=True)
class Budget:
    """A member's (epsilon, delta) guarantee for everything its node ever trains on its episodes."""

    epsilon: float
    delta: float

    def __post_init__(self) -> None:
        if isinstance(self.epsilon, bool) or not isinstance(self.epsilon, numbers.Real):
            raise ValueError(f"budget epsilon must be a number, got {self.epsilon!r}")
        eps = float(self.epsilon)
        if not (math.isfinite(eps) and eps > 0):
            raise ValueError(f"budget epsilon must be finite and > 0, got {self.epsilon!r}")
        object.__setattr__(self, "epsilon", eps)
        object.__setattr__(self, "delta", check_delta(self.delta))


@dataclass(frozen=True)
class RoundAllowance:
    """What the node will do this round and why; ``reason`` is what the member and coordinator see."""

    decision: str  # "full" | "shortened" | "declined"
    steps: int  # steps the node will run (0 when declined)
    epsilon_before: float
    epsilon_after: float
    reason: str


def allow_round(
    budget: Budget,
    history: Sequence[Mechanism],
    noise_multiplier: float,
    sample_rate: float,
    planned_steps: int,
    accountant: str = "rdp",
    min_steps: int = 1,
) -> RoundAllowance:
    """Decide how many of ``planned_steps`` DP-SGD steps fit in the member's remaining budget.

    "full" when all fit; "shortened" when fewer fit but at least ``min_steps`` (a round of a
    handful of steps may not be worth the communication; a plan shorter than ``min_steps``
    runs in full or not at all); "declined" otherwise, with no step run and nothing to record. ``epsilon_after`` is the composed epsilon with the allowed
    steps, i.e. the value to write to the ledger.
    """
    if not isinstance(budget, Budget):
        raise TypeError(f"budget must be a Budget, got {type(budget).__name__}")
    check_accountant(accountant)
    _check_steps(planned_steps, "planned_steps")
    _check_steps(min_steps, "min_steps")
    # The coordinator may plan rounds shorter than the member's minimum: such a round runs in
    # full or not at all (min_steps only limits how far a round is shortened).
    min_steps = min(min_steps, planned_steps)
    check_delta(budget.delta)
    candidate = Mechanism(noise_multiplier, sample_rate, planned_steps)
    memo: dict[int, float] = {}
    steps, eps_steps = search_steps(history, candidate, budget.epsilon, budget.delta, accountant, memo)
    before = memo[0] if 0 in memo else epsilon(history, budget.delta, accountant)
    if steps == planned_steps:
        reason = (
            f"within budget {budget.epsilon:g}: epsilon {before:.4g} -> {eps_steps:.4g} "
            f"after {planned_steps} steps ({accountant}, delta {budget.delta:g})"
        )
        return RoundAllowance("full", steps, before, eps_steps, reason)
    full = memo[planned_steps]
    if before > budget.epsilon:
        reason = f"budget {budget.epsilon:g} already exhausted: {before:.4g} spent before this round; declined"
        return RoundAllowance("declined", 0, before, before, reason)
    exceeded = f"budget {budget.epsilon:g} would be exceeded: {full:.4g} after {planned_steps} steps"
    if steps >= min_steps:
        reason = f"{exceeded}; shortened to {steps} (epsilon {eps_steps:.4g})"
        return RoundAllowance("shortened", steps, before, eps_steps, reason)
    reason = f"{exceeded}; only {steps} steps fit (minimum {min_steps}); declined"
    return RoundAllowance("declined", 0, before, before, reason)


def _check_steps(value: int, name: str) -> None:
    """Step counts are integers >= 1: a zero-step round is not a round."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
