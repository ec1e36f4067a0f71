"""The node's accountant against Google's dp-accounting, the notes' measured table, and its own contracts."""

from __future__ import annotations

import warnings

import dp_accounting
import pytest
from dp_accounting.pld import PLDAccountant
from dp_accounting.rdp import RdpAccountant
from opacus.accountants import PRVAccountant

from privacy.accountant import (
    ACCOUNTANTS,
    PRV_EPS_ERROR,
    Mechanism,
    PrvFallbackWarning,
    epsilon,
    group,
    max_steps_within,
    noise_for_target,
)

M = Mechanism


def _dp_event(history: list[Mechanism]) -> dp_accounting.DpEvent:
    return dp_accounting.ComposedDpEvent(
        [
            dp_accounting.SelfComposedDpEvent(
                dp_accounting.PoissonSampledDpEvent(m.sample_rate, dp_accounting.GaussianDpEvent(m.noise_multiplier)),
                m.steps,
            )
            for m in history
        ]
    )


def google_rdp(history: list[Mechanism], delta: float) -> float:
    accountant = RdpAccountant()
    accountant.compose(_dp_event(history))
    return accountant.get_epsilon(delta)


def google_pld(history: list[Mechanism], delta: float) -> float:
    accountant = PLDAccountant(value_discretization_interval=1e-3)
    accountant.compose(_dp_event(history))
    return accountant.get_epsilon(delta)


# Single mechanisms and multi-round heterogeneous histories, all with epsilon in the range
# budgets live in (0.1 .. 40).
RDP_CASES = [
    ([M(1.0, 0.01, 1000)], 1e-5),
    ([M(5.0, 0.001, 100)], 1e-5),
    ([M(10.0, 0.01, 1000)], 1e-5),
    ([M(2.0, 0.2, 50)], 1e-3),
    ([M(0.8, 1.0, 5)], 1e-5),
    ([M(0.7, 0.05, 300)], 1e-6),
    ([M(1.0, 0.01, 200), M(1.3, 0.02, 100), M(0.9, 0.005, 500), M(1.0, 0.01, 150)], 1e-5),
    ([M(0.6 + 0.1 * (r % 3), 0.004, 80 + 10 * r) for r in range(6)] + [M(2.5, 0.3, 20)], 1e-6),
]


@pytest.mark.parametrize(("history", "delta"), RDP_CASES)
def test_rdp_agrees_with_dp_accounting_within_one_percent(history: list[Mechanism], delta: float) -> None:
    ours = epsilon(history, delta, "rdp")
    theirs = google_rdp(history, delta)
    assert 0.01 < theirs < 40
    assert ours == pytest.approx(theirs, rel=0.01)


def test_notes_table_sigma1_q001_1000_steps() -> None:
    history = [M(1.0, 0.01, 1000)]
    assert epsilon(history, 1e-5, "rdp") == pytest.approx(2.101, abs=5e-4)
    assert epsilon(history, 1e-5, "prv") == pytest.approx(1.838, abs=2e-3)


PRV_CASES = [
    ([M(1.0, 0.01, 1000)], 1e-5),
    ([M(1.0, 0.01, 200), M(1.3, 0.02, 100), M(0.9, 0.005, 300)], 1e-5),
    ([M(0.8, 1.0, 5)], 1e-5),
    ([M(2.0, 0.2, 50)], 1e-3),
]


@pytest.mark.parametrize(("history", "delta"), PRV_CASES)
def test_prv_close_to_pld_and_not_below_it_beyond_its_error(history: list[Mechanism], delta: float) -> None:
    ours = epsilon(history, delta, "prv")
    pld = google_pld(history, delta)
    assert ours == pytest.approx(pld, rel=0.03)
    assert ours >= pld - PRV_EPS_ERROR
    assert ours < epsilon(history, delta, "rdp")  # the reason to offer PRV at all


def test_prv_equals_opacus_prv_accountant() -> None:
    """Our PRV path sizes the grid itself; it must compute exactly what Opacus' accountant does."""
    history = [M(1.0, 0.01, 300), M(1.2, 0.02, 100)]
    reference = PRVAccountant()
    reference.history = [(m.noise_multiplier, m.sample_rate, m.steps) for m in history]
    assert epsilon(history, 1e-5, "prv") == pytest.approx(reference.get_epsilon(1e-5), rel=1e-9)


def test_prv_falls_back_to_rdp_when_hopeless() -> None:
    history = [M(0.3, 0.5, 300)]  # epsilon in the thousands: the PRV grid would not fit in memory
    with pytest.warns(PrvFallbackWarning):
        value = epsilon(history, 1e-5, "prv")
    assert value == epsilon(history, 1e-5, "rdp")


def test_fewer_mechanisms_joins_the_closest_noise_at_the_smaller_one() -> None:
    from privacy.accountant import _fewer_mechanisms

    totals = {(2.0, 0.08): 25, (2.02, 0.08): 50, (3.0, 0.08): 25, (2.5, 0.08): 10, (20.0, 1.0): 3, (21.0, 1.0): 1}
    assert _fewer_mechanisms(totals, 6) == totals
    assert _fewer_mechanisms(totals, 5) == {
        (2.0, 0.08): 75,
        (2.5, 0.08): 10,
        (3.0, 0.08): 25,
        (20.0, 1.0): 3,
        (21.0, 1.0): 1,
    }
    assert _fewer_mechanisms(totals, 4) == {(2.0, 0.08): 75, (2.5, 0.08): 10, (3.0, 0.08): 25, (20.0, 1.0): 4}
    assert _fewer_mechanisms(totals, 2) == {(2.0, 0.08): 110, (20.0, 1.0): 4}
    # Sample rates are never joined, so one mechanism per rate is the floor.
    assert _fewer_mechanisms(totals, 1) == _fewer_mechanisms(totals, 2)


def test_prv_over_many_runs_joins_mechanisms_into_a_valid_bound(monkeypatch: pytest.MonkeyPatch) -> None:
    """A node plans one noise multiplier per run: after many runs PRV composes the closest ones
    at the smaller noise, which bounds the exact composition from above and stays close to it,
    and never gives more than RDP."""
    import privacy.accountant as accountant

    history = [M(2.0 + 0.03 * run, 0.08, 25) for run in range(4) for _ in range(3)] + [M(20.0, 1.0, 1)] * 12
    monkeypatch.setattr(accountant, "PRV_MAX_MECHANISMS", 2)
    joined = epsilon(history, 1e-5, "prv")
    monkeypatch.setattr(accountant, "PRV_MAX_MECHANISMS", 100)
    exact = epsilon(history, 1e-5, "prv")
    assert exact <= joined <= exact * 1.05
    assert joined <= epsilon(history, 1e-5, "rdp")
    # Noise far apart: the joined composition is looser than RDP, and RDP is what counts.
    spread = [M(0.7, 0.08, 25), M(1.5, 0.08, 25), M(5.0, 0.08, 25)] * 4
    monkeypatch.setattr(accountant, "PRV_MAX_MECHANISMS", 1)
    assert epsilon(spread, 1e-5, "prv") == epsilon(spread, 1e-5, "rdp")


def test_empty_and_zero_step_histories_spend_nothing() -> None:
    for accountant in ACCOUNTANTS:
        assert epsilon([], 1e-5, accountant) == 0.0
        assert epsilon([M(1.0, 0.01, 0)], 1e-5, accountant) == 0.0


def test_order_and_splitting_of_rounds_do_not_matter() -> None:
    history = [M(1.0, 0.01, 100), M(2.0, 0.05, 30), M(1.0, 0.01, 200)]
    merged = [M(1.0, 0.01, 300), M(2.0, 0.05, 30)]
    assert group(history) == {(1.0, 0.01): 300, (2.0, 0.05): 30}
    assert epsilon(history, 1e-5) == epsilon(list(reversed(history)), 1e-5) == epsilon(merged, 1e-5)
    assert M(1, 0.5, 3) == M(1.0, 0.5, 3)  # ints normalised: one group


def test_epsilon_grows_with_steps_and_shrinks_with_noise() -> None:
    values = [epsilon([M(1.0, 0.02, s)], 1e-5) for s in (1, 10, 100, 1000)]
    assert values == sorted(values) and len(set(values)) == 4
    assert epsilon([M(2.0, 0.02, 100)], 1e-5) < epsilon([M(1.0, 0.02, 100)], 1e-5)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"noise_multiplier": 0.0, "sample_rate": 0.1, "steps": 1}, "noise_multiplier"),
        ({"noise_multiplier": -1.0, "sample_rate": 0.1, "steps": 1}, "noise_multiplier"),
        ({"noise_multiplier": float("nan"), "sample_rate": 0.1, "steps": 1}, "noise_multiplier"),
        ({"noise_multiplier": 1.0, "sample_rate": 0.0, "steps": 1}, "sample_rate"),
        ({"noise_multiplier": 1.0, "sample_rate": 1.5, "steps": 1}, "sample_rate"),
        ({"noise_multiplier": 1.0, "sample_rate": 0.1, "steps": -1}, "steps"),
        ({"noise_multiplier": 1.0, "sample_rate": 0.1, "steps": 2.5}, "steps"),
        ({"noise_multiplier": 1.0, "sample_rate": 0.1, "steps": True}, "steps"),
        ({"noise_multiplier": "1", "sample_rate": 0.1, "steps": 1}, "noise_multiplier"),
    ],
)
def test_mechanism_validation(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        Mechanism(**kwargs)


def test_epsilon_validation() -> None:
    history = [M(1.0, 0.01, 10)]
    for bad in (0.0, 1.0, -1e-5, float("nan")):
        with pytest.raises(ValueError, match="delta"):
            epsilon(history, bad)
    with pytest.raises(ValueError, match="unknown accountant 'gdp'"):
        epsilon(history, 1e-5, "gdp")
    with pytest.raises(TypeError, match="Mechanism"):
        epsilon([(1.0, 0.01, 10)], 1e-5)  # type: ignore[list-item]


@pytest.mark.parametrize("budget", [0.5, 1.0, 2.0, 3.5, 50.0])
def test_max_steps_within_is_the_largest_fitting_step_count(budget: float) -> None:
    history = [M(1.0, 0.01, 300), M(1.5, 0.05, 40)]
    candidate = M(1.1, 0.02, 500)
    s = max_steps_within(history, candidate, budget, 1e-5)
    assert 0 <= s <= candidate.steps
    if s > 0 or epsilon(history, 1e-5) <= budget:
        assert epsilon([*history, M(1.1, 0.02, s)], 1e-5) <= budget
    if s < candidate.steps:
        assert epsilon([*history, M(1.1, 0.02, s + 1)], 1e-5) > budget


def test_max_steps_within_edges() -> None:
    history = [M(1.0, 0.01, 1000)]  # ~2.1
    assert max_steps_within(history, M(1.0, 0.01, 100), 1.0, 1e-5) == 0  # already over budget
    assert max_steps_within(history, M(1.0, 0.01, 0), 5.0, 1e-5) == 0
    assert max_steps_within([], M(1.0, 0.01, 100), 100.0, 1e-5) == 100
    with pytest.raises(ValueError, match="epsilon_budget"):
        max_steps_within([], M(1.0, 0.01, 100), 0.0, 1e-5)


def test_max_steps_within_prv() -> None:
    history = [M(1.0, 0.02, 100)]
    candidate = M(1.0, 0.02, 200)
    budget = 1.5
    s = max_steps_within(history, candidate, budget, 1e-5, "prv")
    assert 0 < s < candidate.steps
    assert epsilon([*history, M(1.0, 0.02, s)], 1e-5, "prv") <= budget
    assert epsilon([*history, M(1.0, 0.02, s + 1)], 1e-5, "prv") > budget
    assert s > max_steps_within(history, candidate, budget, 1e-5, "rdp")


def test_noise_for_target_meets_the_notes_value() -> None:
    sigma = noise_for_target(8.0, 1e-5, 0.01, steps_per_round=100, rounds=10)
    assert sigma == pytest.approx(0.616, abs=1e-3)  # notes: eps 8, RDP -> sigma 0.616
    assert epsilon([M(sigma, 0.01, 1000)], 1e-5) <= 8.0
    assert epsilon([M(sigma * (1 - 3e-4), 0.01, 1000)], 1e-5) > 8.0  # smallest, to the search precision


def test_noise_for_target_counts_the_history() -> None:
    history = [M(1.0, 0.01, 1000)]  # ~2.1 already spent
    fresh = noise_for_target(4.0, 1e-5, 0.01, 100, 10)
    after = noise_for_target(4.0, 1e-5, 0.01, 100, 10, history=history)
    assert after > fresh
    assert epsilon([*history, M(after, 0.01, 1000)], 1e-5) <= 4.0


def test_noise_for_target_prv_needs_less_noise() -> None:
    rdp_sigma = noise_for_target(4.0, 1e-5, 0.05, 50, 2)
    prv_sigma = noise_for_target(4.0, 1e-5, 0.05, 50, 2, accountant="prv")
    assert prv_sigma < rdp_sigma
    assert epsilon([M(prv_sigma, 0.05, 100)], 1e-5, "prv") <= 4.0
    assert epsilon([M(prv_sigma * 0.998, 0.05, 100)], 1e-5, "prv") > 4.0


def test_noise_for_target_unreachable() -> None:
    with pytest.raises(ValueError, match="unreachable.*already spent"):
        noise_for_target(1.0, 1e-5, 0.01, 100, 5, history=[M(1.0, 0.01, 1000)])
    with pytest.raises(ValueError, match="unreachable"):
        noise_for_target(1e-4, 1e-5, 1.0, 100, 50)
    with pytest.raises(ValueError, match="rounds"):
        noise_for_target(1.0, 1e-5, 0.01, 100, 0)
    with pytest.raises(ValueError, match="target_epsilon"):
        noise_for_target(float("inf"), 1e-5, 0.01, 100, 1)


def test_no_stray_warnings_from_rdp() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        epsilon([M(0.3, 0.5, 300)], 1e-5)  # optimum at the smallest order: valid, and quiet
        epsilon([M(50.0, 0.001, 1)], 1e-5)  # optimum at the largest order
