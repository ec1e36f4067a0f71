"""``kyodo-member plan``: the noise and spend a budget buys, from the node's own planner."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest

from member_node import supernode
from member_node.budget_plan import PlanSettings, noise_per_coordinate, pace_rows
from member_node.cli import main
from member_node.synthetic import generate_dataset
from privacy.accountant import Mechanism, epsilon
from privacy.budget import Budget, plan_noise
from privacy.keys import load_or_create_signing_key
from privacy.ledger import Ledger
from shared_model.config import load_config

EVALUATION = Mechanism(5.0, 1.0, 1)


def _settings(**kw) -> PlanSettings:
    base = dict(
        budget=Budget(8.0, 1e-5), budget_rounds=0, evaluation=EVALUATION, accountant="rdp", sample_rate=0.08,
        local_steps=25, run_rounds=4, max_noise_multiplier=10.0,
    )  # fmt: skip
    return PlanSettings(**{**base, **kw})


def test_the_node_row_is_what_the_node_plans_and_longer_paces_cost_more_noise():
    rows = pace_rows(_settings(budget_rounds=40), [], trained=0)
    (own,) = [r for r in rows if r.node_uses]
    assert own.spread == 40
    # planned after the run's initial held-out error, as the node plans it
    planned = plan_noise(Budget(8.0, 1e-5), [EVALUATION], 0.08, 25, 40, evaluation=EVALUATION, max_noise_multiplier=10)
    assert own.noise_multiplier == planned.noise_multiplier
    sigmas = [r.noise_multiplier for r in rows]
    assert sigmas == sorted(sigmas) and [r.spread for r in rows] == [10, 20, 40, 80, 160]
    # a member that already trained 30 rounds of its 40 spreads the rest over 10
    history = [Mechanism(own.noise_multiplier, 0.08, 25)] * 30
    later = [r for r in pace_rows(_settings(budget_rounds=40), history, trained=30) if r.node_uses]
    assert later[0].spread == 10 and later[0].epsilon_after_run <= 8.0
    assert noise_per_coordinate(0.9, 0.08, 1600) == pytest.approx(0.9 / 128)
    assert noise_per_coordinate(0.9, 0.08, 0) is None


def test_a_spent_budget_and_a_pace_above_the_cap_are_said():
    spent = [Mechanism(0.5, 1.0, 200)]
    assert all(r.noise_multiplier is None for r in pace_rows(_settings(), spent, trained=1))
    tight = pace_rows(_settings(budget=Budget(0.5, 1e-5), budget_rounds=160), [], trained=0)
    assert any(r.declines and r.node_uses for r in tight)


def test_plan_reads_the_members_budget_ledger_and_data(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "160")
    data = tmp_path / "data"
    cfg = load_config()
    generate_dataset(data, "so100", cfg.embodiments["so100"], episodes=30, episode_seconds=2.0, seed=3)
    setup = supernode.init_member(
        tmp_path / "sony", member="sony", embodiment="so100", data_dir=data, epsilon=8.0, delta=1e-5, budget_rounds=20
    )
    assert main(["plan", str(setup.dir)]) == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "sony (so100): budget ε=8 δ=1e-05; 0 training rounds and 0 held-out errors in its ledger" in out
    assert "training episodes" in out and "20 rounds" in out and "◀ this node" in out
    # One signed round in its ledger: it is spent, and counted.
    ledger = Ledger(Path(setup.state_dir) / "ledger.jsonl", load_or_create_signing_key(setup.signing_key))
    ledger.append(
        budget=(8.0, 1e-5), run="r", round=1, member="sony", shards=["adapter/emb/so100"],
        mechanism={"noise_multiplier": 1.2, "sample_rate": 0.08, "steps": 25, "clipping_norm": 1.0,
                   "opacus_mode": "bk", "noise_source": "chacha20"},
        dataset_fingerprint="sha256:" + "ab" * 32, epsilon=epsilon([Mechanism(1.2, 0.08, 25)], 1e-5), delta=1e-5,
        accountant="rdp", decision="full", release="dp-sgd",
    )  # fmt: skip
    assert main(["plan", str(setup.dir), "--epsilon", "4"]) == 0
    out = " ".join(capsys.readouterr().out.split())
    spent = epsilon([Mechanism(1.2, 0.08, 25)], 1e-5)
    assert "budget ε=4" in out and "1 training rounds" in out and f"ε spent so far {spent:.3f} of 4" in out
    assert "19 rounds" in out  # its pace of 20, one trained
    # The accountant the member pinned in member.yaml is the one its plan counts with.
    assert "(RDP, δ=1e-05)" in out
    supernode.save_setup(replace(setup, accountant="prv"))
    assert main(["plan", str(setup.dir), "--epsilon", "4"]) == 0
    assert "(PRV, δ=1e-05)" in " ".join(capsys.readouterr().out.split())


def test_plan_refuses_what_it_cannot_plan(tmp_path, capsys):
    assert main(["plan", str(tmp_path / "nobody")]) == 2
    assert "member.yaml does not exist" in capsys.readouterr().err
    assert main(["plan", "--epsilon", "-1"]) == 2
    assert "epsilon" in capsys.readouterr().err
    assert main(["plan", "--sample-rate", "2"]) == 2
    assert "sample" in capsys.readouterr().err
    assert main(["plan", "--rounds", "0"]) == 2
    assert "--rounds must be >= 1, got 0" in capsys.readouterr().err
    assert main(["plan", "--local-steps", "0"]) == 2
    assert "--local-steps must be >= 1, got 0" in capsys.readouterr().err
