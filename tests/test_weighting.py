"""FedAvg weights when DP members withhold their dataset size.

A count, even rounded, is not a DP release, so a DP node reports 0 episodes in query and 0
examples in train. Mixing counted and withheld members would let the counted ones outweigh
the rest, so the coordinator weighs every contribution of such a round equally (as
DP-FedAvg does); with every size known it keeps FedAvg's example weights. Checked on a real
RoundRunner round (plaintext aggregation, real store) over a fake grid.
"""

from __future__ import annotations

import pytest
import torch

from coordinator.federation import initial_model
from coordinator.rounds import RoundResult, RoundRunner
from coordinator.run_state import RunState
from shared_model.config import load_config
from tests.round_fakes import FakeGrid

SHARD = "adapter/shared"


@pytest.mark.parametrize("private", [(), ("sony",)])
def test_a_withheld_size_makes_the_round_weigh_members_equally(tmp_path, private):
    cfg = load_config(model="tiny", overrides=["secagg.enabled=false", "train.min_cohort=2"])
    members = {m.name: m.embodiment for m in cfg.federation.members}
    state = RunState(cfg, tmp_path)
    state.commit_initial(initial_model(cfg), {"run": "t"})
    grid = FakeGrid(members, state.layout, private=private)
    runner = RoundRunner(cfg, grid, state, run_id="t", timeout=30)
    runner.query(1)
    plan = runner.plan(1)
    result = RoundResult(round=1, plan=plan)
    runner.train_and_aggregate(1, plan, result)
    assert SHARD in result.updated_shards
    assert result.weighting == ("equal" if private else "examples")

    nodes = {name: node for node, name in grid.names.items() if name in plan.cohorts[SHARD]}
    weights = {name: 1.0 if private else float(grid.num_examples(node)) for name, node in nodes.items()}
    expected = {}
    for name, node in nodes.items():
        for key, delta in grid.deltas(node, plan.shards_of(name)).items():
            if key in {spec.name for spec in state.layout.shards[SHARD]}:
                expected[key] = expected.get(key, 0) + weights[name] * delta.double()
    assert expected
    before = initial_model(cfg)
    after = state.store.get_shard(runner.pending[SHARD], shard_id=SHARD)
    for key, total in expected.items():
        mean = (total / sum(weights.values())).float()
        torch.testing.assert_close(after[key] - before[key], mean, rtol=1e-4, atol=1e-7)
