"""Round planning: which member trains which shards, in cohorts large enough to aggregate.

Rules (ARCHITECTURE.md, "Rounds"):
- an expert shard or ``adapter/shared`` is trained only by a cohort of at least
  ``min_cohort`` members; a shard that cannot get one is skipped this round, with a reason;
- each member trains at most ``experts_per_member`` experts per layer (its compute budget);
- an embodiment adapter is trained by the members that own that embodiment;
- the experts trained each round rotate, so every expert is trained over successive rounds.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from shared_model.shards import SHARED_ADAPTER, embodiment_shard, expert_shard


@dataclass(frozen=True)
class MemberInfo:
    """What the coordinator knows of a node after ``query`` (nothing about its data but scale)."""

    node_id: int
    name: str
    embodiments: tuple[str, ...]
    episodes: int
    can_train: bool = True  # False: the member reports no privacy budget left


@dataclass
class RoundPlan:
    round: int
    cohorts: dict[str, list[str]] = field(default_factory=dict)  # shard -> member names
    skipped: dict[str, str] = field(default_factory=dict)  # shard -> why it is not trained

    def shards_of(self, member: str) -> list[str]:
        return [shard for shard, cohort in self.cohorts.items() if member in cohort]

    @property
    def members(self) -> list[str]:
        return sorted({m for cohort in self.cohorts.values() for m in cohort})


def plan_round(
    round_number: int,
    members: list[MemberInfo],
    *,
    n_layers: int,
    n_experts: int,
    embodiments: list[str],
    min_cohort: int,
    experts_per_member: int,
) -> RoundPlan:
    """Deterministic plan for one round from the members that answered ``query``."""
    plan = RoundPlan(round=round_number)
    names = sorted(m.name for m in members)
    if len(set(names)) != len(names):
        raise ValueError(f"two nodes claim the same member name: {names}")

    if len(names) >= min_cohort:
        plan.cohorts[SHARED_ADAPTER] = list(names)
    else:
        plan.skipped[SHARED_ADAPTER] = f"{len(names)} members available, min_cohort is {min_cohort}"

    per_member = min(experts_per_member, n_experts)
    slots = len(names) * per_member
    per_layer = min(n_experts, slots // min_cohort) if min_cohort > 0 else n_experts
    for layer in range(n_layers):
        if per_layer == 0:
            for e in range(n_experts):
                plan.skipped[expert_shard(layer, e)] = (
                    f"{len(names)} members x {per_member} experts cannot fill a cohort of {min_cohort}"
                )
            continue
        start = (round_number * per_layer + layer) % n_experts
        chosen = [(start + t) % n_experts for t in range(per_layer)]
        per_member_here = min(per_member, per_layer)
        cohorts: dict[int, list[str]] = {e: [] for e in chosen}
        # Rotate which member starts so that pairings change from round to round.
        offset = round_number % max(len(names), 1)
        ordered = names[offset:] + names[:offset]
        for i, name in enumerate(ordered):
            for j in range(per_member_here):
                cohorts[chosen[(i * per_member_here + j) % per_layer]].append(name)
        for e in range(n_experts):
            shard = expert_shard(layer, e)
            cohort = sorted(cohorts.get(e, []))
            if e not in cohorts:
                plan.skipped[shard] = "not scheduled this round (experts rotate)"
            elif len(cohort) < min_cohort:
                plan.skipped[shard] = f"cohort of {len(cohort)} < min_cohort {min_cohort}"
            else:
                plan.cohorts[shard] = cohort

    for emb in sorted(embodiments):
        owners = sorted(m.name for m in members if emb in m.embodiments)
        if owners:
            plan.cohorts[embodiment_shard(emb)] = owners
    return plan
