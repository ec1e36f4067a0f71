"""The member-owned budget: the per-round decision, and a property test that it is never exceeded."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from privacy.accountant import Mechanism, epsilon, max_steps_within, noise_for_target
from privacy.budget import (
    EVALUATION_NOISE_INCREASE,
    Budget,
    NoisePlan,
    RoundAllowance,
    allow_round,
    evaluation_leaves_room,
    plan_noise,
)

DELTA = 1e-5


def test_full_round_when_it_fits() -> None:
    a = allow_round(Budget(8.0, DELTA), [], 1.0, 0.01, 100)
    assert a == RoundAllowance("full", 100, 0.0, epsilon([Mechanism(1.0, 0.01, 100)], DELTA), a.reason)
    assert "within budget 8" in a.reason


def test_shortened_round_names_the_overshoot() -> None:
    history = [Mechanism(1.0, 0.01, 1000)]  # ~2.10
    a = allow_round(Budget(2.5, DELTA), history, 1.0, 0.01, 1000)
    expected = max_steps_within(history, Mechanism(1.0, 0.01, 1000), 2.5, DELTA)
    assert a.decision == "shortened" and 0 < a.steps == expected < 1000
    assert a.epsilon_before == epsilon(history, DELTA)
    assert a.epsilon_after == epsilon([*history, Mechanism(1.0, 0.01, a.steps)], DELTA) <= 2.5
    over = epsilon([*history, Mechanism(1.0, 0.01, 1000)], DELTA)
    assert (
        a.reason
        == f"budget 2.5 would be exceeded: {over:.4g} after 1000 steps; shortened to {a.steps} (epsilon {a.epsilon_after:.4g})"
    )


def test_declined_when_fewer_than_min_steps_fit() -> None:
    history = [Mechanism(1.0, 0.01, 1000)]
    fit = max_steps_within(history, Mechanism(1.0, 0.01, 1000), 2.2, DELTA)
    assert fit > 0
    a = allow_round(Budget(2.2, DELTA), history, 1.0, 0.01, 1000, min_steps=fit + 1)
    assert (a.decision, a.steps) == ("declined", 0)
    assert a.epsilon_after == a.epsilon_before == epsilon(history, DELTA)
    assert f"only {fit} steps fit (minimum {fit + 1}); declined" in a.reason


def test_plan_shorter_than_min_steps_runs_in_full_or_not_at_all() -> None:
    history = [Mechanism(1.0, 0.01, 1000)]
    fit = max_steps_within(history, Mechanism(1.0, 0.01, 1000), 2.2, DELTA)
    full = allow_round(Budget(2.2, DELTA), history, 1.0, 0.01, fit, min_steps=fit + 5)
    assert (full.decision, full.steps) == ("full", fit)
    declined = allow_round(Budget(2.2, DELTA), history, 1.0, 0.01, fit + 1, min_steps=fit + 5)
    assert (declined.decision, declined.steps) == ("declined", 0)


def test_declined_when_budget_already_exhausted() -> None:
    history = [Mechanism(0.7, 0.05, 500)]
    a = allow_round(Budget(1.0, DELTA), history, 1.0, 0.01, 10)
    assert (a.decision, a.steps) == ("declined", 0)
    assert "already exhausted" in a.reason


def test_prv_allows_more_steps_than_rdp() -> None:
    history = [Mechanism(1.0, 0.02, 50)]
    rdp = allow_round(Budget(1.64, DELTA), history, 1.0, 0.02, 100, accountant="rdp")
    prv = allow_round(Budget(1.64, DELTA), history, 1.0, 0.02, 100, accountant="prv")
    assert rdp.decision == prv.decision == "shortened"
    assert prv.steps > rdp.steps
    assert prv.epsilon_after == epsilon([*history, Mechanism(1.0, 0.02, prv.steps)], DELTA, "prv") <= 1.64


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"planned_steps": 0}, ValueError, "planned_steps"),
        ({"min_steps": 0}, ValueError, "min_steps"),
        ({"accountant": "gdp"}, ValueError, "unknown accountant"),
        ({"noise_multiplier": 0.0}, ValueError, "noise_multiplier"),
        ({"sample_rate": 2.0}, ValueError, "sample_rate"),
    ],
)
def test_allow_round_validation(kwargs: dict, error: type, match: str) -> None:
    args = {"noise_multiplier": 1.0, "sample_rate": 0.01, "planned_steps": 10} | kwargs
    with pytest.raises(error, match=match):
        allow_round(Budget(1.0, DELTA), [], **args)


@pytest.mark.parametrize(
    ("eps", "delta"),
    [(0.0, 1e-5), (-1.0, 1e-5), (float("inf"), 1e-5), (float("nan"), 1e-5), (1.0, 0.0), (1.0, 1.0), (True, 1e-5)],
)
def test_budget_validation(eps: float, delta: float) -> None:
    with pytest.raises(ValueError, match="epsilon|delta"):
        Budget(eps, delta)


# A few values per axis, spanning the ranges: RDP curves are cached per (noise, rate), so
# the property test stays fast while schedules still mix mechanisms from round to round.
NOISES = (0.3, 0.55, 1.0, 1.8, 3.0, 5.0)
RATES = (0.001, 0.006, 0.04, 0.15, 0.5)
rounds_strategy = st.lists(
    st.tuples(st.sampled_from(NOISES), st.sampled_from(RATES), st.integers(1, 300), st.integers(1, 5)),
    min_size=1,
    max_size=15,
)


@settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    budget_eps=st.floats(0.5, 20.0),
    delta_exp=st.floats(-7.0, -3.0),
    schedule=rounds_strategy,
)
def test_budget_is_never_exceeded(budget_eps: float, delta_exp: float, schedule: list[tuple]) -> None:
    budget = Budget(budget_eps, 10.0**delta_exp)
    history: list[Mechanism] = []
    for noise, rate, planned, min_steps in schedule:
        min_steps = min(min_steps, planned)
        a = allow_round(budget, history, noise, rate, planned, min_steps=min_steps)
        event(a.decision)
        assert a.epsilon_before == epsilon(history, budget.delta)
        if a.decision == "declined":
            assert a.steps == 0 and a.epsilon_after == a.epsilon_before
            # Declining was necessary: not even the minimum round fits.
            assert epsilon([*history, Mechanism(noise, rate, min_steps)], budget.delta) > budget.epsilon
            continue  # nothing is appended
        assert (a.decision == "full") == (a.steps == planned)
        assert min_steps <= a.steps <= planned
        history.append(Mechanism(noise, rate, a.steps))
        spent = epsilon(history, budget.delta)
        assert spent == a.epsilon_after <= budget.epsilon
        if a.decision == "shortened":  # and shortening was as little as possible
            assert epsilon([*history[:-1], Mechanism(noise, rate, a.steps + 1)], budget.delta) > budget.epsilon
    assert epsilon(history, budget.delta) <= budget.epsilon


# ----------------------------------------------------------------------------- noise plans

EVALUATION = Mechanism(5.0, 1.0, 1)  # a node's default held-out error release
Q, STEPS = 0.08, 25


def _live_a_pace(pace: int) -> tuple[int, int, float]:
    """A node's life over its pace, as the node runs it: the initial held-out error, then
    each round trained at the planned noise and its held-out error released only when the
    rest of the plan still fits. (training rounds, releases, epsilon spent)."""
    budget, history = Budget(8.0, 1e-5), []
    if epsilon([EVALUATION], budget.delta) <= budget.epsilon:
        history.append(EVALUATION)
    plan = plan_noise(budget, history, Q, STEPS, pace, evaluation=EVALUATION)
    training = Mechanism(plan.noise_multiplier, Q, STEPS)
    trained = released = 0
    for done in range(1, pace + 1):
        allowance = allow_round(budget, history, plan.noise_multiplier, Q, STEPS)
        if allowance.decision != "full":
            break
        history.append(training)
        trained += 1
        fits, _ = evaluation_leaves_room(budget, history, EVALUATION, [training] * (pace - done))
        if fits:
            history.append(EVALUATION)
            released += 1
    return trained, released, epsilon(history, budget.delta)


@pytest.mark.parametrize("pace", [4, 40, 60, 80, 160])
def test_a_pace_trains_every_round_it_promises_whatever_the_evaluations(pace: int) -> None:
    """Before the evaluation room was capped and checked, held-out error releases asked for
    every round spent what the plan counted on for training: a pace of 80 trained 35 rounds,
    and one of 60 planned a noise above the node's cap and trained none."""
    trained, released, spent = _live_a_pace(pace)
    assert trained == pace and 1 <= released <= pace and spent <= 8.0
    plan = plan_noise(Budget(8.0, 1e-5), [EVALUATION], Q, STEPS, pace, evaluation=EVALUATION)
    assert plan.noise_multiplier < 10.0, "below privacy.max_noise_multiplier: the node trains"


def test_a_plan_reserves_the_releases_that_cost_training_little() -> None:
    budget = Budget(8.0, 1e-5)
    bare = plan_noise(budget, [], Q, STEPS, 40)
    assert bare == NoisePlan(noise_for_target(8.0, 1e-5, Q, STEPS, 40), 40, 0)
    short = plan_noise(budget, [], Q, STEPS, 4, evaluation=EVALUATION)
    assert short.evaluations == 4  # a release after every round: 2% more noise
    long = plan_noise(budget, [], Q, STEPS, 40, evaluation=EVALUATION)
    assert 0 < long.evaluations < 40
    assert long.noise_multiplier <= bare.noise_multiplier * (1 + EVALUATION_NOISE_INCREASE)
    more = noise_for_target(8.0, 1e-5, Q, STEPS, 40, "rdp", [EVALUATION] * (long.evaluations + 1))
    assert more > bare.noise_multiplier * (1 + EVALUATION_NOISE_INCREASE), "the largest such reserve"
    sigmas = [plan_noise(budget, [], Q, STEPS, n, evaluation=EVALUATION).noise_multiplier for n in (10, 40, 80, 160)]
    assert sigmas == sorted(sigmas), "a longer pace never plans less noise"
    with pytest.raises(ValueError, match="already spent"):
        plan_noise(budget, [Mechanism(0.5, 1.0, 100)], Q, STEPS, 4, evaluation=EVALUATION)


def test_a_prv_plan_makes_room_as_rdp_would_and_solves_its_own_noise() -> None:
    budget = Budget(8.0, 1e-5)
    rdp = plan_noise(budget, [], Q, STEPS, 40, evaluation=EVALUATION)
    prv = plan_noise(budget, [], Q, STEPS, 40, accountant="prv", evaluation=EVALUATION)
    assert prv.evaluations == rdp.evaluations
    reserved = [EVALUATION] * rdp.evaluations
    assert prv.noise_multiplier == pytest.approx(noise_for_target(8.0, 1e-5, Q, STEPS, 40, "prv", reserved))
    assert prv.noise_multiplier < rdp.noise_multiplier  # PRV's tighter accounting buys less noise


def test_releases_that_cost_too_much_get_no_room_and_none_push_the_noise_over_the_cap() -> None:
    budget = Budget(8.0, 1e-5)
    assert plan_noise(budget, [], Q, STEPS, 40, evaluation=Mechanism(1.0, 1.0, 1)).evaluations == 0
    # epsilon 2 over 110 rounds: 9.13 without releases, under the node's cap of 10; room for
    # the 15 releases the 10% rule allows would take it to 10.04 and the node would train nothing.
    cheap = Mechanism(20.0, 1.0, 1)
    small = Budget(2.0, 1e-5)
    initial = [cheap]  # the run's round-0 release, made before the plan
    bare = plan_noise(small, initial, Q, STEPS, 110)
    capped = plan_noise(small, initial, Q, STEPS, 110, evaluation=cheap, max_noise_multiplier=10.0)
    assert bare.noise_multiplier < 10.0 and bare.noise_multiplier < capped.noise_multiplier <= 10.0
    assert plan_noise(small, initial, Q, STEPS, 110, evaluation=cheap).noise_multiplier > 10.0
    # Over the cap anyway: no room for releases (the node declines for the noise, not for them).
    over = plan_noise(Budget(0.5, 1e-5), [], Q, STEPS, 400, evaluation=EVALUATION, max_noise_multiplier=10.0)
    assert over.evaluations == 0


def test_a_prv_plan_where_rdp_has_no_room_left_still_plans_the_rounds() -> None:
    history = [Mechanism(1.0, 0.08, 180)]  # RDP 8.28, PRV 7.45
    assert epsilon(history, 1e-5) > 8.0 > epsilon(history, 1e-5, "prv")
    plan = plan_noise(Budget(8.0, 1e-5), history, Q, STEPS, 4, accountant="prv", evaluation=EVALUATION)
    assert plan.evaluations == 0 and plan.noise_multiplier > 0
