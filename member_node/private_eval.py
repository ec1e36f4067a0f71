"""The node's side of releasing its held-out error under DP: budget, ledger, and replay.

The mechanism itself is ``privacy.eval_release``. This module decides whether the member's
budget can pay for a release, records it in the ledger like a training round, and keeps
what it released so that a re-sent request (a coordinator resumed after a crash) gets the
same numbers again: answering it with fresh noise would be a second release of the same
round, which the ledger does not allow and the budget would pay for twice.

Order of writes: the released values are stored first, then the ledger entry is appended,
then the reply goes out. A crash between the two writes leaves stored values without an
entry; the next request appends the entry before sending them, so nothing ever leaves the
node unaccounted.
"""

from __future__ import annotations

import datetime as dt
import json
import os
from collections.abc import Callable
from pathlib import Path

from member_node.trainer import EvalResult
from privacy.budget import Budget, evaluation_leaves_room
from privacy.eval_release import EvalPrivacy, ReleasedEvaluation, release_evaluation
from privacy.ledger import RELEASE_EVALUATION, Ledger, receipt_to_json

EVALUATIONS_FILE = "evaluations.json"  # in the node's state directory: what it released, by run and round


def release_key(run: str, round_number: int) -> str:
    return f"{run}|{round_number}"


def released_evaluations(state_dir: Path) -> dict[str, dict]:
    """What the node released as its held-out error, by :func:`release_key` ({} if nothing yet)."""
    path = Path(state_dir) / EVALUATIONS_FILE
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}


class EvaluationReleaser:
    """Turns an exact held-out evaluation into what may leave the node under DP."""

    def __init__(
        self,
        state_dir: Path,
        ledger: Ledger,
        budget: Budget,
        privacy: EvalPrivacy,
        *,
        member: str,
        accountant: str,
        dataset_fingerprint: Callable[[], str],
    ) -> None:
        self.state_dir = Path(state_dir)
        self.ledger = ledger
        self.budget = budget
        self.privacy = privacy
        self.member = member
        self.accountant = accountant
        self.dataset_fingerprint = dataset_fingerprint

    def release(
        self, run: str, round_number: int, result: EvalResult, *, arrived: dt.datetime | None = None
    ) -> tuple[ReleasedEvaluation | None, str, str]:
        """``(released, receipt, withheld)``: the noised evaluation and its signed ledger entry,
        or ``None`` and the reason nothing was released. ``arrived``: when the request reached
        the node, the entry's time (so it does not time the evaluation: that grows with the
        held-out episodes)."""
        if not self.privacy.enabled:
            return None, "", "this member releases no held-out error under DP (eval noise multiplier 0)"
        if not run:
            return None, "", "the request names no run, so a release could not be recorded in the ledger"
        key = release_key(run, round_number)
        stored = released_evaluations(self.state_dir).get(key)
        entry = self.ledger.find(run, round_number, RELEASE_EVALUATION)
        if entry is not None:
            if stored is None:
                # Only possible if evaluations.json was lost: the spend stands, the numbers are gone.
                return None, "", f"round {round_number} of run {run} was already released; its values were not kept"
            return ReleasedEvaluation(**stored), receipt_to_json(entry), ""
        # Checked also for values stored before a crash: the ledger may have grown since.
        fits, after = evaluation_leaves_room(
            self.budget, self.ledger.history(), self.privacy.mechanism(), [], self.accountant
        )
        if not fits:
            reason = (
                f"releasing the held-out error would take epsilon to {after:.4g}, "
                f"over the member's budget {self.budget.epsilon:g}"
            )
            return None, "", reason
        if stored is None:
            released = release_evaluation(result.episode_mse, self.privacy)
            self._store(key, released)
        else:
            released = ReleasedEvaluation(**stored)
        entry = self._append(run, round_number, after, arrived)
        return released, receipt_to_json(entry), ""

    def _append(self, run: str, round_number: int, epsilon_after: float, arrived: dt.datetime | None) -> dict:
        return self.ledger.append(
            at=arrived,
            budget=(self.budget.epsilon, self.budget.delta),
            run=run,
            round=round_number,
            member=self.member,
            shards=[],
            privacy_unit="episode",
            mechanism=self.privacy.ledger_mechanism(),
            dataset_fingerprint=self.dataset_fingerprint(),
            epsilon=epsilon_after,
            delta=self.budget.delta,
            accountant=self.accountant,
            decision="full",
            release=RELEASE_EVALUATION,
        )

    def _store(self, key: str, released: ReleasedEvaluation) -> None:
        stored = released_evaluations(self.state_dir)
        stored[key] = {"action_mse": released.action_mse, "episodes": released.episodes}
        path = self.state_dir / EVALUATIONS_FILE
        tmp = path.with_suffix(".tmp")
        with open(tmp, "w", encoding="utf-8") as fh:
            json.dump(stored, fh, indent=2)
            fh.flush()
            os.fsync(fh.fileno())
        tmp.replace(path)
