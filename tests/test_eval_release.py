"""The held-out error as a Gaussian mechanism (``privacy.eval_release``) and the node's side of it
(``member_node.private_eval``): noise of the stated size, clipping, accounting, replay."""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from member_node.private_eval import EvaluationReleaser
from member_node.trainer import EvalResult
from privacy.accountant import Mechanism, epsilon
from privacy.budget import Budget, allow_round
from privacy.eval_release import SENSITIVITY, EvalPrivacy, release_evaluation
from privacy.keys import load_or_create_signing_key
from privacy.ledger import RELEASE_EVALUATION, Ledger, receipt_from_json, verify_chain

PRIVACY = EvalPrivacy(noise_multiplier=5.0, loss_bound=0.02)


def test_settings_are_checked() -> None:
    for z, bound in ((-1.0, 0.02), (math.nan, 0.02), (5.0, 0.0), (5.0, math.inf)):
        with pytest.raises(ValueError, match="evaluation"):
            EvalPrivacy(z, bound)
    assert not EvalPrivacy(0.0, 0.02).enabled
    with pytest.raises(ValueError, match="disabled"):
        release_evaluation(np.ones(3), EvalPrivacy(0.0, 0.02))
    # Non-finite errors count as the bound, never as an error the coordinator could observe.
    zero = _Zero()
    assert release_evaluation(np.array([math.nan, math.inf]), PRIVACY, zero).action_mse == PRIVACY.loss_bound
    assert release_evaluation(np.array([0.0, -math.inf]), PRIVACY, zero).action_mse == PRIVACY.loss_bound / 2


def test_the_mechanism_is_one_full_batch_gaussian_step() -> None:
    assert PRIVACY.mechanism() == Mechanism(5.0, 1.0, 1)
    record = PRIVACY.ledger_mechanism()
    assert record == {
        "noise_multiplier": 5.0,
        "sample_rate": 1.0,
        "steps": 1,
        "clipping_norm": 0.02,
        "opacus_mode": "gaussian-sum-count",
        "noise_source": "os-csprng-gauss",
    }
    # RDP of the Gaussian mechanism at noise multiplier z is alpha / (2 z^2) at every order
    one = epsilon([PRIVACY.mechanism()], 1e-5)
    assert 0 < one < epsilon([Mechanism(2.0, 1.0, 1)], 1e-5)


def test_release_is_unbiased_with_the_stated_noise() -> None:
    """Over many releases: the count's noise has std z * sqrt(2), and the mean lands on the
    clipped mean (per-episode errors above the bound count as the bound)."""
    rng = random.Random(7)
    errors = np.array([0.004] * 300 + [0.5] * 100)  # 100 episodes far above the bound
    clipped_mean = (300 * 0.004 + 100 * 0.02) / 400
    releases = [release_evaluation(errors, PRIVACY, rng) for _ in range(4000)]
    counts = np.array([r.episodes for r in releases], dtype=float)
    means = np.array([r.action_mse for r in releases])
    assert counts.mean() == pytest.approx(400, abs=0.5)
    assert counts.std() == pytest.approx(5.0 * SENSITIVITY, rel=0.05)
    assert means.mean() == pytest.approx(clipped_mean, rel=0.02)
    assert means.std() == pytest.approx(PRIVACY.noise_std_of_mean(400), rel=0.15)
    assert all(0.0 <= m <= PRIVACY.loss_bound for m in means)


def test_release_draws_from_the_os_csprng_by_default(monkeypatch: pytest.MonkeyPatch) -> None:
    drawn: list[str] = []

    class Spy(random.SystemRandom):
        def gauss(self, mu: float = 0.0, sigma: float = 1.0) -> float:
            drawn.append("system")
            return super().gauss(mu, sigma)

    monkeypatch.setattr("privacy.eval_release.secrets.SystemRandom", Spy)
    release_evaluation(np.full(10, 0.01), PRIVACY)
    assert drawn == ["system", "system"]


# --------------------------------------------------------------------------- the node's side


def _releaser(tmp_path: Path, budget: float = 8.0, privacy: EvalPrivacy = PRIVACY) -> EvaluationReleaser:
    key = load_or_create_signing_key(tmp_path / "member_ed25519.pem")
    return EvaluationReleaser(
        tmp_path,
        Ledger(tmp_path / "ledger.jsonl", key),
        Budget(budget, 1e-5),
        privacy,
        member="sony",
        accountant="rdp",
        dataset_fingerprint=lambda: "fp",
    )


def _result(n: int = 50) -> EvalResult:
    return EvalResult(num_examples=4 * n, action_mse=0.01, action_mae=0.1, episode_mse=np.full(n, 0.01))


def test_a_release_is_recorded_before_it_leaves_and_replayed_unchanged(tmp_path: Path) -> None:
    releaser = _releaser(tmp_path)
    released, receipt, withheld = releaser.release("run-1", 0, _result())
    assert released is not None and not withheld
    entry = receipt_from_json(receipt)
    assert entry["release"] == RELEASE_EVALUATION and entry["shards"] == [] and entry["round"] == 0
    assert entry["epsilon"] == pytest.approx(epsilon([PRIVACY.mechanism()], 1e-5))
    # a re-sent request (a resumed coordinator) gets the same numbers and spends nothing more
    again, receipt_again, _ = releaser.release("run-1", 0, _result())
    assert again == released and receipt_again == receipt
    assert len(releaser.ledger.releases()) == 1
    # the next round is a new release
    releaser.release("run-1", 1, _result())
    entries = releaser.ledger.releases()
    assert [e["round"] for e in entries] == [0, 1]
    everything = releaser.ledger.entries()
    assert not verify_chain(everything, entries[0]["public_key"])
    # the budget the release was made under is declared before it, once
    assert [e["release"] for e in everything] == ["budget", RELEASE_EVALUATION, RELEASE_EVALUATION]


def test_values_stored_before_a_crash_are_recorded_before_they_are_sent(tmp_path: Path) -> None:
    """Crash between storing the values and appending the entry: the next request appends first."""
    releaser = _releaser(tmp_path)
    stored = {"run-1|3": {"action_mse": 0.0123, "episodes": 51}}
    (tmp_path / "evaluations.json").write_text(json.dumps(stored))
    released, receipt, _ = releaser.release("run-1", 3, _result())
    assert released is not None and released.action_mse == 0.0123 and released.episodes == 51
    assert receipt_from_json(receipt) == releaser.ledger.find("run-1", 3, RELEASE_EVALUATION)


def test_a_release_over_budget_is_withheld_and_spends_nothing(tmp_path: Path) -> None:
    releaser = _releaser(tmp_path, budget=0.5)
    released, receipt, withheld = releaser.release("run-1", 0, _result())
    assert released is None and receipt == "" and "over the member's budget 0.5" in withheld
    assert releaser.ledger.releases() == [] and not (tmp_path / "evaluations.json").exists()


def test_disabled_release_and_unnamed_run_are_withheld(tmp_path: Path) -> None:
    released, _, withheld = _releaser(tmp_path, privacy=EvalPrivacy(0.0, 0.02)).release("run-1", 0, _result())
    assert released is None and "releases no held-out error" in withheld
    released, _, withheld = _releaser(tmp_path).release("", 0, _result())
    assert released is None and "names no run" in withheld


def test_a_release_whose_values_were_lost_is_not_made_twice(tmp_path: Path) -> None:
    releaser = _releaser(tmp_path)
    releaser.release("run-1", 0, _result())
    (tmp_path / "evaluations.json").unlink()
    released, _, withheld = releaser.release("run-1", 0, _result())
    assert released is None and "already released" in withheld
    assert len(releaser.ledger.releases()) == 1


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    budget_eps=st.floats(0.5, 10.0),
    eval_noise=st.sampled_from((1.0, 3.0, 5.0)),
    schedule=st.lists(
        st.one_of(st.just("eval"), st.tuples(st.sampled_from((0.6, 1.0, 2.0)), st.integers(1, 200))),
        min_size=1,
        max_size=12,
    ),
)
def test_training_and_evaluations_together_never_exceed_the_budget(
    tmp_path_factory: pytest.TempPathFactory, budget_eps: float, eval_noise: float, schedule: list
) -> None:
    """Random interleavings of DP-SGD rounds (allow_round) and evaluation releases on one ledger."""
    state = tmp_path_factory.mktemp("interleaved")
    releaser = _releaser(state, budget=budget_eps, privacy=EvalPrivacy(eval_noise, 0.05))
    ledger, budget = releaser.ledger, releaser.budget
    for rnd, step in enumerate(schedule):
        before = len(ledger.releases())
        if step == "eval":
            released, _, withheld = releaser.release("run", rnd, _result())
            assert (released is None) == bool(withheld)
            assert len(ledger.releases()) == before + (released is not None)
        else:
            noise, steps = step
            allowance = allow_round(budget, ledger.history(), noise, 0.05, steps, min_steps=1)
            if allowance.decision != "declined":
                mechanism = {"noise_multiplier": noise, "sample_rate": 0.05, "steps": allowance.steps}
                mechanism |= {"clipping_norm": 0.1, "opacus_mode": "bk", "noise_source": "chacha20-box-muller-f64"}
                ledger.append(
                    run="run", round=rnd, member="sony", shards=["adapter/shared"], mechanism=mechanism,
                    dataset_fingerprint="fp", epsilon=allowance.epsilon_after, delta=budget.delta,
                    accountant="rdp", decision=allowance.decision,
                )  # fmt: skip
        assert epsilon(ledger.history(), budget.delta) <= budget.epsilon * (1 + 1e-9)


class _Zero:
    """A noise source that draws 0: the release's arithmetic, without its noise."""

    def gauss(self, mu: float, sigma: float) -> float:
        return mu
