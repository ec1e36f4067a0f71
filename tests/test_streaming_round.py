"""The coordinator's aggregation memory follows the largest shard (issue 5, item 4).

A real RoundRunner round (plaintext aggregation, every reply through its wire form, shard
objects written to a real store) over a fake grid whose members answer at once. Checked:
the running sums never take more RAM than the pool's budget of two largest shards while the
round's sums together are many times that; spilling changes no bit of the result; every
sum is freed by the end of the round. Counted in bytes, never timed.
"""

from __future__ import annotations

import math

import pytest

from coordinator.federation import initial_model
from coordinator.rounds import RoundResult, RoundRunner
from coordinator.run_state import RunState
from shared_model.config import load_config
from tests.round_fakes import FakeGrid

OVERRIDES = [
    "model.n_layers=4",
    "model.n_experts=8",
    "secagg.enabled=false",
    "train.min_cohort=2",
    "train.experts_per_member=4",
]


def _round(tmp_path, budget: int | None, ordered: bool):
    cfg = load_config(model="tiny", overrides=[*OVERRIDES, f"train.ordered_aggregation={str(ordered).lower()}"])
    members = {m.name: m.embodiment for m in cfg.federation.members}
    state = RunState(cfg, tmp_path)
    state.commit_initial(initial_model(cfg), {"run": "t"})
    grid = FakeGrid(members, state.layout)
    runner = RoundRunner(cfg, grid, state, run_id="t", timeout=30, sum_budget_bytes=budget)
    runner.query(1)
    plan = runner.plan(1)
    result = RoundResult(round=1, plan=plan)
    runner.train_and_aggregate(1, plan, result)
    return runner, plan, result


def _shard_bytes(runner: RoundRunner, shard: str) -> int:
    return 4 * sum(math.prod(s) for s in runner._trainable_shapes(shard).values())


@pytest.mark.parametrize("ordered", [False, True])
def test_sums_stay_within_two_largest_shards_and_spilling_changes_no_bit(tmp_path, ordered):
    reference, plan, ref_result = _round(tmp_path / "ram", None, ordered)
    sizes = {shard: _shard_bytes(reference, shard) for shard in plan.cohorts}
    budget = 2 * max(sizes.values())
    assert sum(sizes.values()) > 8 * budget, "the round must touch far more than the budget"
    assert len(ref_result.updated_shards) == len(plan.cohorts) >= 30, ref_result.failed

    runner, _, result = _round(tmp_path / "spill", budget, ordered)
    pool = runner.last_pool
    assert pool.peak_resident_bytes <= budget
    assert pool.spilled_bytes > 0, "with this budget some sums must have waited on disk"
    assert pool.live_buffers == 0 and pool.resident_bytes == 0, "every sum is freed by the end of the round"
    assert result.updated_shards == ref_result.updated_shards
    assert runner.pending == reference.pending, "spilled and in-RAM sums must give the same shard objects"
    # Without a budget the round holds (nearly) every shard's sum at once: that is what the budget bounds.
    assert reference.last_pool.peak_resident_bytes > 4 * budget


def test_round_objects_are_written_but_head_moves_only_at_commit(tmp_path):
    runner, plan, result = _round(tmp_path, None, True)
    assert runner.state.store.head().round == 0
    assert set(runner.pending) == set(result.updated_shards)
    assert all(runner.state.store.has(oid) for oid in runner.pending.values())
    manifest = runner.state.commit_objects(1, runner.pending, runner.pending_state, {"run": "t"})
    assert manifest.round == 1 and {s: manifest.shards[s] for s in runner.pending} == runner.pending
