from collections import Counter

import pytest

from coordinator.planner import MemberInfo, plan_round


def members(n, embodiments=None):
    embodiments = embodiments or [f"emb{i}" for i in range(n)]
    return [MemberInfo(node_id=100 + i, name=f"m{i}", embodiments=(embodiments[i],), episodes=50) for i in range(n)]


def plan(ms, rnd=1, layers=2, experts=4, min_cohort=3, per_member=2, embodiments=None):
    embodiments = embodiments or sorted({e for m in ms for e in m.embodiments})
    return plan_round(
        rnd, ms, n_layers=layers, n_experts=experts, embodiments=embodiments,
        min_cohort=min_cohort, experts_per_member=per_member,
    )  # fmt: skip


def test_every_trained_shard_has_a_large_enough_cohort():
    p = plan(members(4))
    for shard, cohort in p.cohorts.items():
        if not shard.startswith("adapter/emb/"):
            assert len(cohort) >= 3, shard
        assert len(set(cohort)) == len(cohort)


def test_member_expert_budget_is_respected():
    p = plan(members(10), experts=8, per_member=2)
    for m in p.members:
        per_layer = Counter(s.split("/")[1] for s in p.shards_of(m) if s.startswith("expert/"))
        assert all(v <= 2 for v in per_layer.values())


def test_embodiment_adapters_go_to_owners_only():
    ms = members(4, ["a", "a", "b", "c"])
    p = plan(ms, embodiments=["a", "b", "c", "unowned"])
    assert p.cohorts["adapter/emb/a"] == ["m0", "m1"]
    assert p.cohorts["adapter/emb/b"] == ["m2"]
    assert "adapter/emb/unowned" not in p.cohorts


def test_too_few_members_skips_cohort_shards_with_reason():
    p = plan(members(2))
    assert "adapter/shared" in p.skipped and "min_cohort" in p.skipped["adapter/shared"]
    assert not any(s.startswith("expert/") for s in p.cohorts)
    assert all(s.startswith("adapter/emb/") for s in p.cohorts)


def test_experts_rotate_and_cover_everything():
    ms = members(4)
    seen = set()
    for rnd in range(1, 5):
        seen |= {s for s in plan(ms, rnd=rnd).cohorts if s.startswith("expert/")}
    assert seen == {f"expert/L{layer}/E{e}" for layer in range(2) for e in range(4)}


def test_plan_is_deterministic():
    ms = members(5)
    assert plan(ms, rnd=3).cohorts == plan(list(reversed(ms)), rnd=3).cohorts


def test_duplicate_member_names_refused():
    ms = members(3)
    ms.append(MemberInfo(node_id=999, name="m0", embodiments=("x",), episodes=1))
    with pytest.raises(ValueError, match="same member name"):
        plan(ms)


def test_trillion_scale_plan_is_fast():
    p = plan(members(10), layers=61, experts=384, per_member=8)
    experts = [s for s in p.cohorts if s.startswith("expert/")]
    assert len(experts) == 61 * (10 * 8 // 3)


def test_consortium_preset_gives_every_embodiment_adapter_two_owners():
    """The shared-body preset exists so that no adapter update goes out with a cohort of one."""
    from shared_model.config import load_config

    cfg = load_config(model="tiny", federation="consortium")
    ms = [MemberInfo(i, m.name, (m.embodiment,), m.episodes) for i, m in enumerate(cfg.federation.members)]
    p = plan(ms, layers=cfg.model.n_layers, experts=cfg.model.n_experts, min_cohort=cfg.train.min_cohort)
    adapters = {s: c for s, c in p.cohorts.items() if s.startswith("adapter/emb/")}
    assert len(adapters) == len({m.embodiment for m in cfg.federation.members}) == 4
    assert all(len(cohort) == 2 for cohort in adapters.values()), adapters
