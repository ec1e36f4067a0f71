"""What a round costs at a given model size: bytes per shard kind, per member and per round.

Derived from the meta-device layout and the real planner, so the numbers follow whatever
the code would actually do (``kyodo-coordinator plan``). Storage and model transfer are
counted in bf16 (how a model of this size is kept); a member's upload is its masked
update, which travels as one unsigned 32-bit integer per trainable parameter under secure
aggregation (``secagg.bits`` <= 32 - log2(cohort)), else as bf16.

Transfer model (ARCHITECTURE.md, "Shard store"): a member keeps a replica of the model and
fetches only objects it lacks. It needs every shard for its forward passes (tokens may
route to any expert), so after the one-time initial download, a round costs it exactly the
shards that changed in the previous round. The store grows by the same changed shards.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from coordinator.planner import MemberInfo, RoundPlan, plan_round
from shared_model.config import KyodoConfig
from shared_model.shards import SHARED_ADAPTER, ShardLayout, shard_kind

BF16 = torch.bfloat16.itemsize
MASKED_BYTES_PER_PARAM = 4  # uint32 ring element per trainable parameter


@dataclass
class KindSize:
    shards: int = 0
    params: int = 0
    smallest: int = 0  # bytes (bf16) of the smallest shard of the kind
    largest: int = 0


@dataclass
class MemberCost:
    member: str
    embodiment: str
    shards: int
    trainable_params: int
    upload_bytes: int  # masked update (or bf16 plaintext with secagg off)
    download_bytes: int  # steady state: the shards changed by the previous round


@dataclass
class CapacityReport:
    model: str
    total_params: int
    total_bytes: int  # bf16
    kinds: dict[str, KindSize] = field(default_factory=dict)
    members: list[MemberCost] = field(default_factory=list)
    round_plan: RoundPlan | None = None
    updated_shards: int = 0
    store_growth_bytes: int = 0  # per round
    largest_shard_bytes: int = 0
    # Aggregation memory on the coordinator as implemented: a running sum for every shard of
    # the round at once (uint32 under secure aggregation, float64 without), plus the one
    # reply being folded in (the largest member upload).
    accumulator_bytes: int = 0
    reply_in_flight_bytes: int = 0


def trainable_numel(layout: ShardLayout, shard: str) -> int:
    """Parameters a round actually changes in ``shard`` (LoRA A is frozen, from a seed)."""
    return sum(s.numel for s in layout.shards[shard] if not (shard == SHARED_ADAPTER and ".lora_A." in s.name))


def synthetic_members(cfg: KyodoConfig, n: int) -> list[MemberInfo]:
    """``n`` members cycling over the consortium's embodiments (for planning only)."""
    embodiments = sorted(cfg.embodiments)
    return [MemberInfo(i, f"member-{i:02d}", (embodiments[i % len(embodiments)],), 1000) for i in range(n)]


def capacity(
    cfg: KyodoConfig, n_members: int, round_number: int = 1, layout: ShardLayout | None = None
) -> CapacityReport:
    layout = layout or ShardLayout.from_config(cfg.model, cfg.embodiments)
    report = CapacityReport(cfg.model.name, layout.total_numel(), layout.total_numel() * BF16)
    for shard, specs in layout.shards.items():
        size = sum(s.numel for s in specs) * BF16
        kind = report.kinds.setdefault(shard_kind(shard), KindSize(smallest=size))
        kind.shards += 1
        kind.params += sum(s.numel for s in specs)
        kind.smallest = min(kind.smallest, size)
        kind.largest = max(kind.largest, size)
        report.largest_shard_bytes = max(report.largest_shard_bytes, size)
    members = synthetic_members(cfg, n_members)
    t = cfg.train
    plan = plan_round(
        round_number,
        members,
        n_layers=cfg.model.n_layers,
        n_experts=cfg.model.n_experts,
        embodiments=sorted(cfg.embodiments),
        min_cohort=t.min_cohort,
        experts_per_member=t.experts_per_member,
    )
    report.round_plan = plan
    changed = sorted(plan.cohorts)
    report.updated_shards = len(changed)
    report.store_growth_bytes = sum(layout.numel(s) * BF16 for s in changed)
    per_param = MASKED_BYTES_PER_PARAM if cfg.secagg.enabled else BF16
    sum_bytes = MASKED_BYTES_PER_PARAM if cfg.secagg.enabled else 8
    report.accumulator_bytes = sum(trainable_numel(layout, s) * sum_bytes for s in changed)
    for m in members:
        mine = plan.shards_of(m.name)
        trainable = sum(trainable_numel(layout, s) for s in mine)
        report.members.append(
            MemberCost(m.name, m.embodiments[0], len(mine), trainable, trainable * per_param, report.store_growth_bytes)
        )
    report.reply_in_flight_bytes = max((m.upload_bytes for m in report.members), default=0)
    return report
