"""When a DP node may release, and with how much noise: its noise plan per run, and the
rules its held-out error releases follow.

The node's budget covers every run it ever trains, so the noise of a run's rounds is planned
once per run (``noise_plan.json``) to spread what is left over the rounds to come, with room
kept for the held-out errors the run will ask for; the coordinator names the run and round
of every request, so these rules, not the coordinator, decide whether a release fits. Kept
apart from ``member_node.node``, which answers the messages: everything here reads only the
ledger, the member's own settings and the plans file.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from member_node.identity import MemberIdentity
from member_node.release_schedule import ReleaseSchedule
from privacy.accountant import Mechanism
from privacy.budget import Budget, evaluation_leaves_room, plan_noise, rounds_to_spread
from privacy.eval_release import EvalPrivacy
from privacy.ledger import RELEASE_EVALUATION, RELEASE_TRAIN, Ledger, release_of
from shared_model.config import PrivacyConfig
from shared_model.durable import replace_json

NOISE_PLAN_FILE = "noise_plan.json"  # the node's noise plans, one per run and budget setting


def plan_key(run: str, depends_on: tuple) -> str:
    """A noise plan's key in ``noise_plan.json``: the run, then everything else the plan
    depends on; ``plan_key(run, ())`` is the prefix every plan of that run starts with."""
    return "|".join(map(repr, (run, *depends_on))) + ("" if depends_on else "|")


def last_plan(plans: dict[str, Any], run: str | None = None) -> dict[str, Any] | None:
    """The plan in use, which ``noise_plan.json`` keeps last: of ``run``, or of any run. None
    when there is none, or when it is a bare number from before plans were records."""
    of_run = [plan for key, plan in plans.items() if run is None or key.startswith(plan_key(run, ()))]
    return of_run[-1] if of_run and isinstance(of_run[-1], dict) else None


class ReleasePlanner:
    """The noise plans of one member's node and the rules for its held-out error releases.

    ``privacy`` is the run's settings with the member's own in their place
    (``MemberIdentity.privacy_settings``); ``evaluations`` the member's held-out error release.
    """

    def __init__(
        self,
        ledger: Ledger,
        budget: Budget,
        identity: MemberIdentity,
        privacy: PrivacyConfig,
        evaluations: EvalPrivacy,
        state_dir: Path,
    ) -> None:
        self.ledger = ledger
        self.budget = budget
        self.identity = identity
        self.privacy = privacy
        self.evaluations = evaluations
        self.path = Path(state_dir) / NOISE_PLAN_FILE

    def rounds_to_plan(self, planned_rounds: int, round_number: int) -> int:
        """How many training rounds, this one included, the rest of the budget is spread over."""
        trained = sum(1 for entry in self.ledger.entries() if release_of(entry) == RELEASE_TRAIN)
        return rounds_to_spread(planned_rounds, round_number, self.identity.budget_rounds, trained)

    def noise_multiplier(
        self,
        history: list[Mechanism],
        sample_rate: float,
        run: str,
        round_number: int,
        local_steps: int,
        planned_rounds: int,
        *,
        persist: bool = True,
    ) -> float:
        """The member's own sigma, or one planned once per run to spend the budget evenly.

        Evenly over the run's remaining rounds, or over the rounds the member's own
        ``budget-rounds`` has left when those are more: the budget covers every run the
        node ever trains, and a coordinator that plans a short run must not be able to make
        the member spend all of it there.

        Planned once and kept (``noise_plan.json``): one mechanism per run keeps the
        accountant's history short (PRV's cost grows with distinct mechanisms) and the
        plan survives a node restart.
        """
        if self.identity.noise_multiplier > 0:
            return self.identity.noise_multiplier
        plans = json.loads(self.path.read_text()) if self.path.is_file() else {}
        evaluations = self.evaluations
        # Everything the plan depends on that the member can change between restarts: a
        # member that lowers its budget must not keep a sigma planned for the larger one.
        depends_on = (
            sample_rate,
            local_steps,
            self.budget.epsilon,
            self.budget.delta,
            self.privacy.accountant,
            evaluations.enabled and evaluations.mechanism(),
            self.identity.budget_rounds,
            # The member's own noise cap, when it set one, may change between restarts within a
            # run (the run's cannot); unset, plans keep the keys they were written under.
            *(
                (("max_noise_multiplier", self.identity.max_noise_multiplier),)
                if self.identity.max_noise_multiplier
                else ()
            ),
        )
        key = plan_key(run, depends_on)
        if key not in plans:
            plan = plan_noise(
                self.budget,
                history,
                sample_rate,
                local_steps,
                self.rounds_to_plan(planned_rounds, round_number),
                accountant=self.privacy.accountant,
                evaluation=evaluations.mechanism() if evaluations.enabled else None,
                max_noise_multiplier=self.privacy.max_noise_multiplier,
            )
            # What evaluation_room needs to keep the plan's training rounds (plans written
            # before it are bare numbers: their runs release as before).
            plans[key] = {
                "noise_multiplier": plan.noise_multiplier,
                "run": run,
                "first_round": round_number,
                "rounds": plan.rounds,
                "evaluations": plan.evaluations,
                "sample_rate": sample_rate,
                "local_steps": local_steps,
                "run_rounds": planned_rounds,
            }
            if not persist:
                return plan.noise_multiplier
            replace_json(self.path, plans, indent=2)
        elif persist and list(plans)[-1] != key:
            # The plan in use goes last: evaluation_room judges a release by the run's last
            # plan, and a member that changed its budget and back trains with an older one.
            plans[key] = plans.pop(key)
            replace_json(self.path, plans, indent=2)
        planned = plans[key]
        return float(planned["noise_multiplier"] if isinstance(planned, dict) else planned)

    def evaluation_room_unless_released(self, run: str, round_number: int) -> str:
        if self.ledger.find(run, round_number, RELEASE_EVALUATION) is not None:
            return ""  # already released: the request is answered from the ledger
        return self.evaluation_room(run, round_number)

    def evaluation_room(self, run: str, round_number: int) -> str:
        """Why a held-out error release now would cut into the training this run's noise plan
        holds ('' when it would not).

        The plan reserves room for a release per round only where that costs training little
        (``privacy.budget.plan_noise``); a release beyond that room would spend epsilon the
        plan counts on for a later training round, and the node would stop training before
        its member's pace says. A re-sent request is answered from the ledger before this."""
        if self.identity.noise_multiplier > 0 or not self.evaluations.enabled or not self.path.is_file():
            return ""
        plans = json.loads(self.path.read_text())
        plan = last_plan(plans, run)
        if plan is None:
            # A run this node has not trained in yet (its initial release): the newest plan,
            # whichever run made it, still holds its training rounds (a review, without a pace,
            # cut 20 promised rounds to 8 with a fresh run's release after each one).
            plan = last_plan(plans)
        if plan is None:
            return ""  # no training planned yet, or a plan from before rooms
        past_last = plan["run"] == run and "run_rounds" in plan and round_number > int(plan["run_rounds"])
        if past_last and self.ledger.find(run, round_number) is None:  # a round it trained is its own evidence
            return f"round {round_number} is past the {plan['run_rounds']} rounds run {run} was planned with"
        spread = self._release_not_due(plan, run, round_number)
        if spread:
            return spread
        trained = len(self._rounds_released(RELEASE_TRAIN, plan["run"], int(plan["first_round"])))
        left = max(0, int(plan["rounds"]) - trained)
        if float(plan["noise_multiplier"]) > self.privacy.max_noise_multiplier:
            left = 0  # the node declines every round of this plan (mostly noise): none is kept for
        if not self.identity.budget_rounds and "run_rounds" in plan:
            # Without a pace the plan is its run's alone: no round after its last trains, and
            # a member left out of rounds must not be kept from releasing for rounds it will not get.
            at = round_number if plan["run"] == run else self._last_trained_round(plan["run"], plan["first_round"] - 1)
            left = min(left, max(0, int(plan["run_rounds"]) - at))
        training = Mechanism(float(plan["noise_multiplier"]), float(plan["sample_rate"]), int(plan["local_steps"]))
        fits, after = evaluation_leaves_room(
            self.budget,
            self.ledger.history(),
            self.evaluations.mechanism(),
            [training] * left,
            self.privacy.accountant,
        )
        if fits:
            return ""
        if left == 0:
            return (
                f"releasing the held-out error would take epsilon to {after:.4g}, over the member's budget "
                f"{self.budget.epsilon:g}"
            )
        return (
            f"the held-out error would leave too little of the budget for the {left} training rounds this node's "
            f"plan still holds (epsilon {after:.4g} over {self.budget.epsilon:g}): its plan made room for "
            f"{plan['evaluations']} releases beside {plan['rounds']} rounds, and training comes first"
        )

    def _rounds_released(self, release: str, run: str, from_round: int = 0) -> list[int]:
        """The rounds of ``run`` from ``from_round`` on with a ledger entry of kind ``release``."""
        return [
            e["round"]
            for e in self.ledger.releases()
            if release_of(e) == release and e["run"] == run and e["round"] >= from_round
        ]

    def _last_trained_round(self, run: str, default: int) -> int:
        return max(self._rounds_released(RELEASE_TRAIN, run), default=default)

    def _release_not_due(self, plan: dict[str, Any], run: str, round_number: int) -> str:
        """Why this run's next release falls at a later round ('' when it is due now): the
        plan's room is spread over the run, the last at its last round (``ReleaseSchedule.in_run``)."""
        over_cap = float(plan["noise_multiplier"]) > self.privacy.max_noise_multiplier
        if plan["run"] != run or over_cap:
            return ""
        schedule = ReleaseSchedule.in_run(json.loads(self.path.read_text()), plan)
        if schedule is None or round_number < schedule.first_round:
            return ""
        released = len(self._rounds_released(RELEASE_EVALUATION, run, schedule.first_round))
        if released < schedule.due(round_number):
            return ""
        following = schedule.next_round(released)
        then = f"the next at round {following}" if following is not None else "all of them made"
        return (
            f"this node spreads its held-out errors over the run: its noise plan has room for {schedule.releases} in "
            f"rounds {schedule.first_round}-{schedule.last_round} of run {run}, the last at round "
            f"{schedule.last_round} ({released} released, {then})"
        )

    def evaluation_follows_training(self, run: str, round_number: int) -> str:
        """Why a held-out error release now would not follow this node's training ('' when it
        would).

        A run the node has not trained in gets one release, its initial one, and only one such
        run at a time since the node last trained: the run and round of a request are the
        coordinator's words, and a review drained a paced node's whole budget on 58 releases,
        each under a fresh run name (and, without a pace, 55 under rounds past the run's
        last). Releases of a run the node trained in are bounded by its plan's room and its
        planned rounds (:meth:`evaluation_room`). A re-sent request is answered from the
        ledger as always."""
        if self.ledger.find(run, round_number, RELEASE_EVALUATION) is not None:
            return ""
        releases = self.ledger.releases()
        of_run = [release_of(e) for e in releases if e["run"] == run]
        if RELEASE_TRAIN in of_run:
            return ""
        if RELEASE_EVALUATION in of_run:
            return (
                f"this node has not trained in run {run}: it releases only the run's initial held-out error, "
                "then one per round it trains"
            )
        last_trained = max((i for i, e in enumerate(releases) if release_of(e) == RELEASE_TRAIN), default=-1)
        trained_run = releases[last_trained]["run"] if last_trained >= 0 else None
        untrained = [
            e["run"]
            for e in releases[last_trained + 1 :]
            if release_of(e) == RELEASE_EVALUATION and e["run"] != trained_run
        ]
        if untrained:
            return (
                f"run {untrained[0]} released its initial held-out error since this node last trained and it never "
                "trained there: one run's initial release at a time until the node trains again"
            )
        return ""

    def evaluation_pace(self, run: str, round_number: int) -> str:
        """Why a new held-out error release would break the member's pace ('' when it would not).

        Under ``budget-rounds`` a run gets one release per round the node trained in it, plus
        its initial one: the noise plan reserves no more, and evaluations asked for beyond
        that (60 rounds of a one-round run) would spend the budget the pace keeps for later
        runs. A re-sent request is answered from the ledger as always."""
        if not self.identity.budget_rounds or self.ledger.find(run, round_number, RELEASE_EVALUATION) is not None:
            return ""
        releases = [release_of(e) for e in self.ledger.releases() if e["run"] == run]
        trained, evaluated = releases.count(RELEASE_TRAIN), releases.count(RELEASE_EVALUATION)
        if evaluated <= trained:
            return ""
        return (
            f"budget-rounds paces this member: one held-out error per round it trained in run {run} and the "
            f"initial one ({evaluated} released, {trained} trained)"
        )
