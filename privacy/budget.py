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

from privacy.accountant import (
    Mechanism,
    UnreachableTarget,
    check_accountant,
    check_delta,
    epsilon,
    noise_for_target,
    search_steps,
)

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


def rounds_to_spread(planned_rounds: int, round_number: int, budget_rounds: int, trained: int) -> int:
    """How many training rounds, this one included, the rest of a budget is spread over.

    The run's remaining rounds, or the rounds the member's own pace (``budget-rounds``,
    counted over every run its node ever trains) has left when those are more: a coordinator
    that plans a short run must not be able to make the member spend all of its budget there.
    """
    return max(1, planned_rounds - round_number + 1, budget_rounds - trained)


# How much the held-out error releases a plan reserves room for may raise the training noise.
# Measured (epsilon 8, delta 1e-5, q 0.08, 25 steps, release noise multiplier 5): room for a
# release after every round costs 2% more noise over 4 rounds, 16% over 20, 58% over 40, and
# over 60 rounds the releases take nearly the whole budget (sigma 12.8 against 2.1: above
# privacy.max_noise_multiplier, so the node declined every round); from about 70 rounds
# they alone exceed it. Before the cap, that case planned training without them, and the
# releases then spent what the plan had counted on: a pace of 80 rounds trained 35.
EVALUATION_NOISE_INCREASE = 0.10


@dataclass(frozen=True)
class NoisePlan:
    """A noise multiplier that spreads what is left of a budget over ``rounds`` training
    rounds, with room for ``evaluations`` held-out error releases beside them."""

    noise_multiplier: float
    rounds: int
    evaluations: int


def plan_noise(
    budget: Budget,
    history: Sequence[Mechanism],
    sample_rate: float,
    local_steps: int,
    rounds: int,
    *,
    accountant: str = "rdp",
    evaluation: Mechanism | None = None,
    max_noise_multiplier: float = math.inf,
) -> NoisePlan:
    """The noise multiplier that spends what is left of ``budget`` evenly over ``rounds``
    rounds of ``local_steps`` steps after ``history``, and room for held-out error releases.

    Training comes first: the plan reserves room for as many releases of ``evaluation`` as
    raise the training noise by at most ``EVALUATION_NOISE_INCREASE`` (one per round where
    they are cheap, fewer over long paces) and never above ``max_noise_multiplier`` (the
    node's cap, above which it declines to train: releases must not be why it does), and
    :func:`evaluation_leaves_room` withholds any release beyond that room. UnreachableTarget when
    no noise level lets the rounds fit at all.
    """

    solved: dict[int, float] = {}

    def sigma(releases: int) -> float:
        if releases not in solved:
            reserved = [*history, *([evaluation] * releases)]  # releases is 0 without an evaluation
            solved[releases] = noise_for_target(
                budget.epsilon, budget.delta, sample_rate, local_steps, rounds, accountant, reserved
            )
        return solved[releases]

    if evaluation is None:
        return NoisePlan(sigma(0), rounds, 0)
    if accountant != "rdp":
        # How many releases to make room for is chosen with RDP, the noise then solved with
        # the member's accountant: PRV's solve is ~10x dearer, and the search over the
        # releases took 13 s per plan over 40 rounds against 2.2 s for one solve.
        try:
            releases = plan_noise(
                budget,
                history,
                sample_rate,
                local_steps,
                rounds,
                accountant="rdp",
                evaluation=evaluation,
                max_noise_multiplier=max_noise_multiplier,
            ).evaluations
        except UnreachableTarget:  # RDP is looser: PRV may still fit the rounds alone
            releases = 0
        return NoisePlan(sigma(releases), rounds, releases)
    bare = sigma(0)
    limit = max(bare, min(bare * (1 + EVALUATION_NOISE_INCREASE), max_noise_multiplier))

    def fits(releases: int) -> bool:
        try:
            return sigma(releases) <= limit
        except UnreachableTarget:  # the releases alone exceed the budget
            return False

    if fits(rounds):
        return NoisePlan(sigma(rounds), rounds, rounds)
    lo, hi = 0, rounds  # fits(lo), not fits(hi): the noise grows with the releases reserved
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    return NoisePlan(sigma(lo), rounds, lo)


def evaluation_leaves_room(
    budget: Budget,
    history: Sequence[Mechanism],
    evaluation: Mechanism,
    training_left: Sequence[Mechanism],
    accountant: str = "rdp",
) -> tuple[bool, float]:
    """Whether releasing one held-out error now still leaves room for the training rounds the
    node's plan holds (``training_left``), and the epsilon that would then be spent in all.

    Without this check a release only had to fit the budget by itself, so releases asked for
    every round spent what the plan had counted on for training, and the node stopped
    training before the rounds its member's pace promised."""
    after = epsilon([*history, evaluation, *training_left], budget.delta, accountant)
    return after <= budget.epsilon, after


def _check_steps(value: int, name: str) -> None:
    """Step counts are integers >= 1: a zero-step round is not a round."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
