"""An in-process stand-in for the Flower Grid whose members answer instantly with random
deltas, so the coordinator's round runner (query, train, aggregation, store writes,
evaluate) runs for real without Ray or training. Used by tests/test_streaming_round.py and
bench/round_memory.py. Replies are built when pulled and handed over one per pull, as
replies trickle in from real members."""

from __future__ import annotations

import uuid
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from types import SimpleNamespace

import numpy as np
import torch
from flwr.common.constant import SUPERLINK_NODE_ID
from flwr.supercore.task_identity import TaskIdentity

from shared_model.protocol import (
    EVALUATE,
    QUERY,
    SEATING,
    TRAIN,
    EvaluateReply,
    EvaluateRequest,
    QueryReply,
    QueryRequest,
    SeatingNoted,
    SeatingNotice,
    TrainReply,
    TrainRequest,
)
from shared_model.shards import ShardLayout


@dataclass
class _Reply:
    content: object
    metadata: SimpleNamespace
    error: SimpleNamespace | None = None

    def has_error(self) -> bool:
        return self.error is not None


class FakeGrid:
    """``members`` maps member name -> embodiment. ``reverse`` delivers train replies in
    reverse member order (the worst order for sorted-order folding). ``held``: the object ids
    every member's replica reports in ``query`` (e.g. the current manifest's, so requests
    carry no objects, as after a member's first round). ``answers_as`` maps a member to the
    name its node claims in ``query``; ``public_keys`` a member to the ledger key it reports.
    ``private``: members that, as DP nodes do, withhold their dataset size (0 in query and train).
    ``sitting_out``: member -> the reason its node gives in ``query`` for not being able to train.
    ``withholding``: member -> the reason its node gives for releasing no held-out error.
    ``pinned``: member -> the members whose identity keys its node reports pinned in ``query``.
    ``budgets``: member -> the (epsilon spent, epsilon budget) its node reports in ``query``.
    Every query request received is kept in ``queries``, and every request's ``ledger_head``
    in ``ledger_heads`` as (message type, member, head). ``script`` (set at any time) maps a
    member to how its node answers its next queries, one item each: the name it claims, a
    (name, reason it cannot train) pair, or None for no answer at all. ``gone``: member -> the
    message types its node is gone for, answered as Flower's SuperLink answers for a node that
    stopped heartbeating: an error reply whose source is the SuperLink, not the node."""

    def __init__(
        self,
        members: dict[str, str],
        layout: ShardLayout,
        seed: int = 0,
        reverse: bool = True,
        held: Iterable[str] = (),
        answers_as: Mapping[str, str] | None = None,
        public_keys: Mapping[str, str] | None = None,
        private: Iterable[str] = (),
        sitting_out: Mapping[str, str] | None = None,
        withholding: Mapping[str, str] | None = None,
        gone: Mapping[str, Iterable[str]] | None = None,
        pinned: Mapping[str, Iterable[str]] | None = None,
        budgets: Mapping[str, tuple[float, float]] | None = None,
    ):
        self.budgets = dict(budgets or {})
        self.pinned = {name: sorted(names) for name, names in (pinned or {}).items()}
        self.gone = {name: set(kinds) for name, kinds in (gone or {}).items()}
        self.private = set(private)
        self.withholding = dict(withholding or {})
        self.sitting_out = dict(sitting_out or {})
        self.queries: list[QueryRequest] = []
        self.notices: dict[str, SeatingNotice] = {}  # member -> the seating notice its node was sent
        self.ledger_heads: list[tuple[str, str, str]] = []
        self.held = sorted(set(held))
        self.answers_as, self.public_keys = dict(answers_as or {}), dict(public_keys or {})
        # Flower's Message() reads the running task's identity; a ServerApp has one, set it here.
        TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, SUPERLINK_NODE_ID
        self.names = dict(enumerate(sorted(members), start=1))
        self.members, self.layout, self.seed, self.reverse = members, layout, seed, reverse
        self.script: dict[str, list[str | tuple[str, str] | None]] = {}
        self._queue: dict[str, tuple] = {}  # message id -> (node, kind, shards, scripted answer)

    def get_node_ids(self) -> list[int]:
        return list(self.names)

    def push_messages(self, messages: Iterable) -> list[str]:
        ids = []
        for msg in messages:
            mid = uuid.uuid4().hex
            kind = msg.metadata.message_type
            name = self.names[msg.metadata.dst_node_id]
            if kind == SEATING:
                self.notices[name] = SeatingNotice.from_content(msg.content)
                ids.append(mid)
                self._queue[mid] = (msg.metadata.dst_node_id, kind, None, "")
                continue
            parsed = {QUERY: QueryRequest, TRAIN: TrainRequest, EVALUATE: EvaluateRequest}[kind].from_content(
                msg.content
            )
            request = parsed.shards if kind == TRAIN else None
            if kind == QUERY:
                self.queries.append(parsed)
            self.ledger_heads.append((kind, name, parsed.ledger_head))
            ids.append(mid)
            scripted = self.script[name].pop(0) if kind == QUERY and self.script.get(name) else ""
            if scripted is not None:  # None: this node never answers
                self._queue[mid] = (msg.metadata.dst_node_id, kind, request, scripted)
        return ids

    def pull_messages(self, ids: Iterable[str]) -> Iterator[_Reply]:
        ready = sorted(
            (mid for mid in ids if mid in self._queue),
            key=lambda m: self.names[self._queue[m][0]],
            reverse=self.reverse,
        )
        for mid in ready[:1]:  # one reply per pull
            node, kind, shards, scripted = self._queue.pop(mid)
            if kind in self.gone.get(self.names[node], ()):
                error = SimpleNamespace(code=5, reason="Error: Node Unavailable - the node did not heartbeat")
                yield _Reply(None, SimpleNamespace(src_node_id=SUPERLINK_NODE_ID, reply_to_message_id=mid), error)
                continue
            yield _Reply(
                self._answer(node, kind, shards, scripted), SimpleNamespace(src_node_id=node, reply_to_message_id=mid)
            )

    def _answer(self, node: int, kind: str, shards: list[str] | None, scripted: str | tuple[str, str] = ""):
        name = self.names[node]
        if kind == SEATING:
            return SeatingNoted(name).to_content()
        if kind == QUERY:
            claimed = self.answers_as.get(name, name)
            key = self.public_keys.get(name, "")
            episodes = 0 if name in self.private else 100
            reason = self.sitting_out.get(name, "")
            if scripted:
                claimed, reason = scripted if isinstance(scripted, tuple) else (scripted, "")
            return QueryReply(
                claimed, [self.members[name]], episodes, objects=self.held, public_key=key,
                can_train=not reason, reason=reason, pinned=self.pinned.get(name, []),
                epsilon_spent=self.budgets.get(name, (0.0, 0.0))[0], epsilon_budget=self.budgets.get(name, (0.0, 0.0))[1],
            ).to_content()  # fmt: skip
        if kind == EVALUATE:
            if name in self.withholding:
                return EvaluateReply(name, 0, float("nan"), float("nan"), withheld=self.withholding[name]).to_content()
            return EvaluateReply(name, 10, 0.5, 0.5).to_content()
        assert kind == TRAIN
        deltas = self.deltas(node, shards)
        examples = 0 if name in self.private else self.num_examples(node)
        return TrainReply(name, list(shards), deltas, num_examples=examples, loss=0.1, steps=1).to_content()

    @staticmethod
    def num_examples(node: int) -> int:
        return 50 + 10 * node

    def deltas(self, node: int, shards: Iterable[str]) -> dict[str, torch.Tensor]:
        """What member ``node`` answers for ``shards`` (the same every time)."""
        rng = np.random.default_rng([self.seed, node])
        return {
            spec.name: torch.from_numpy(rng.standard_normal(tuple(spec.shape), dtype=np.float32) * 1e-3)
            for shard in sorted(shards)
            for spec in self.layout.shards[shard]
            if not (shard == "adapter/shared" and ".lora_A." in spec.name)
        }
