"""Which rounds of a run get the held-out error releases a node's noise plan has room for.

A plan over many rounds has room for fewer releases than rounds (``privacy.budget.plan_noise``
keeps the releases to what costs training little). Taken first come, first served, a 40-round
run released its first 12 held-out errors and withheld the rest, the final model's among them:
the one a member most wants to know. The releases are now spread evenly over the rounds the
plan holds of the run, the last at the run's last round. A plan that spans several runs (a
member's ``budget-rounds`` pace) gives each run its share, at least one, so a short run inside
a long pace still releases its final error; each run plans again, so the shares follow the
budget that is left.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class ReleaseSchedule:
    first_round: int  # the run's round the plan starts at
    rounds: int  # the run's rounds the plan holds, from ``first_round`` to the run's last
    releases: int  # the held-out error releases among them

    @classmethod
    def of_plan(cls, plan: Mapping[str, Any], *, at_least_one: bool = True) -> ReleaseSchedule | None:
        """The schedule of a noise plan record (``member_node.node``'s ``noise_plan.json``);
        None for a plan with no room for releases or one written before plans knew their run's
        rounds (those release first come, first served, as they did)."""
        try:
            first, plan_rounds = int(plan["first_round"]), int(plan["rounds"])
            room, run_rounds = int(plan["evaluations"]), int(plan["run_rounds"])
        except (KeyError, TypeError, ValueError):
            return None
        return cls.of(first, plan_rounds, room, run_rounds, at_least_one=at_least_one)

    @classmethod
    def in_run(cls, plans: Mapping[str, Any], plan: Mapping[str, Any]) -> ReleaseSchedule | None:
        """The schedule ``plan`` gives its run, among the node's ``plans`` (``noise_plan.json``):
        only the run's first plan rounds its share up to one. The coordinator's hyper-parameters
        are part of a plan's key, and a review re-made the plan every round by nudging the sample
        rate, each new plan releasing again (4 releases for a room of 1, 25% more noise)."""
        earlier = any(
            isinstance(other, dict)
            and other.get("run") == plan.get("run")
            and int(other.get("first_round", 0)) < int(plan["first_round"])
            for other in plans.values()
        )
        return cls.of_plan(plan, at_least_one=not earlier)

    @classmethod
    def of(
        cls, first_round: int, plan_rounds: int, room: int, run_rounds: int, *, at_least_one: bool = True
    ) -> ReleaseSchedule | None:
        """A plan from ``first_round`` over ``plan_rounds`` training rounds with ``room``
        releases, in a run of ``run_rounds`` (None: no room). ``at_least_one``: the run's share
        is rounded up to one (its final error); not for a plan re-made within a run, or a
        coordinator that re-made it every round would get a release every round."""
        if room < 1 or plan_rounds < 1:
            return None
        rounds = max(1, min(plan_rounds, run_rounds - first_round + 1))
        share = round(room * rounds / plan_rounds)
        return cls(first_round, rounds, min(rounds, max(1, share) if at_least_one else share))

    @property
    def last_round(self) -> int:
        return self.first_round + self.rounds - 1

    def due(self, round_number: int) -> int:
        """How many releases the run may have made by ``round_number``'s (from ``first_round``)."""
        position = min(round_number - self.first_round + 1, self.rounds)
        return self.releases * position // self.rounds if position >= 1 else 0

    def next_round(self, released: int) -> int | None:
        """The round at which release number ``released + 1`` falls due (None: all are made)."""
        if released >= self.releases:
            return None
        return self.first_round + math.ceil((released + 1) * self.rounds / self.releases) - 1
