"""One federated round on a Flower Grid: query, plan, train, aggregate, save, evaluate.

Memory follows the largest shard, not the model and not members x model (ARCHITECTURE.md,
"Scale"):

* The model is never in the coordinator's RAM. Members get it by reference (manifest plus
  the objects they lack, ``coordinator.sync``), and requests are built and pushed one at a
  time (:func:`exchange`), so at most one request's objects exist at once.
* Replies are pulled as they arrive and folded into per-shard running sums at once
  (:class:`aggregation.weighted_mean.ShardMean`), so a reply's tensors are freed before the
  next one is read.
* A shard is *finished* as soon as every member of its cohort has either contributed or is
  known not to (error, decline, invalid reply, time-out): mean, validation, server optimiser
  step on its weights and optimiser state read from ``HEAD``, new objects written to the
  store, everything freed. The shard with its optimiser state is the only model-sized thing
  held, one shard at a time.
* Sums still waiting for a cohort member live in one :class:`aggregation.sums.SumPool`
  with a budget of a few largest shards; beyond it they spill to scratch files. Why a
  budget and not only early finishing: one train reply carries all of a member's shards,
  ``adapter/shared`` has everyone in its cohort and experts are spread over cohorts, so in
  the worst case every shard of the round is waiting at once; the alternative, one message
  per shard, costs a Flower round trip (seconds in a deployment) per shard and a protocol
  change on every member. Under SecAgg+ the masked sums go to the same pool (they cannot be
  finished before the unmask stage, see ``aggregation.secagg.server``), and shards are then
  unmasked and finished one at a time.

Nothing moves ``HEAD`` here: objects written during a round are unreferenced until the
federation loop commits the round (``coordinator.run_state``), so a crash mid-round
resumes exactly from the previous round.

A node that fails, replies with an error, or returns something that does not validate is
left out of the round with a log line; the round goes on with the rest.
"""

from __future__ import annotations

import datetime as dt
import gc
import logging
import secrets
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field

import numpy as np
import torch
from flwr.app import Message
from flwr.common.constant import SUPERLINK_NODE_ID
from flwr.serverapp import Grid

from aggregation.secagg.errors import SecAggError
from aggregation.secagg.server import SecAggServer, build_setup
from aggregation.secagg.vectors import shard_length
from aggregation.server_opt import ServerOptimizer, make_server_optimizer
from aggregation.sums import SumBuffer, SumPool
from aggregation.validate import check_aggregate
from aggregation.weighted_mean import AggregationError, ShardMean
from coordinator.pinning import not_pinned_by, unpinned_members
from coordinator.planner import MemberInfo, RoundPlan, plan_round
from coordinator.run_state import RunState
from coordinator.secure_round import mean_update, secure_aggregate
from coordinator.sync import ModelSync
from privacy.keys import load_public_key
from privacy.ledger import (
    RELEASE_EVALUATION,
    RELEASE_TRAIN,
    LedgerError,
    entry_hash,
    receipt_from_json,
    release_of,
    verify_entry,
)
from shared_model.config import KyodoConfig
from shared_model.protocol import (
    EVALUATE,
    QUERY,
    SEATING,
    TRAIN,
    EvaluateReply,
    EvaluateRequest,
    ProtocolError,
    QueryReply,
    QueryRequest,
    SeatingNotice,
    TrainDeclined,
    TrainHyperParams,
    TrainReply,
    TrainRequest,
)
from shared_model.shards import ShardLayout, shard_of

log = logging.getLogger("kyodo.coordinator")

POLL_INTERVAL_S = 0.2
# How long a node left out of a round has to acknowledge why (it answered its query just
# before; the round waits this long at most, and only when someone was left out so).
SEATING_NOTICE_TIMEOUT_S = 30.0
# RAM budget of the running sums: this many of the round's largest shard, but never less
# than the floor (small models never spill; at 1e12 parameters the largest shard sets it).
SUM_BUDGET_SHARDS = 4
SUM_BUDGET_FLOOR_BYTES = 256 << 20


@dataclass(frozen=True)
class _Head:
    """The newest ledger entry of a member the coordinator holds a receipt of."""

    time: dt.datetime  # when the entry's request reached the node (UTC)
    epsilon: float
    hash: str
    prev_hash: str
    entry: dict = field(compare=False, repr=False)  # the signed receipt itself, for the round record


@dataclass
class RoundResult:
    round: int
    plan: RoundPlan
    train: dict[str, TrainReply] = field(default_factory=dict)  # member -> reply (deltas dropped)
    receipts: dict[str, dict] = field(default_factory=dict)  # member -> verified signed ledger entry
    declined: dict[str, str] = field(default_factory=dict)  # member -> the node's reason
    absent: dict[str, str] = field(default_factory=dict)  # consortium member -> why it is in no part of it
    evaluation: dict[str, EvaluateReply] = field(default_factory=dict)
    updated_shards: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)  # member or shard -> why
    rejected: dict[str, str] = field(default_factory=dict)  # shard -> why its aggregate was refused
    # shard -> how it was aggregated: "secagg" (the coordinator saw only the cohort sum),
    # "single" (a cohort of one under secagg: its sum is its update), "plaintext" (secagg off)
    aggregation: dict[str, str] = field(default_factory=dict)
    # "examples": FedAvg by each member's (coarse) episode count; "equal": a member of the
    # round withholds its count under DP, so every contribution weighs the same (DP-FedAvg)
    weighting: str = "examples"
    seconds: float = 0.0


def exchange(
    grid: Grid,
    messages: Iterable[Message],
    timeout: float,
    on_reply: Callable[[Message, int], None],
) -> set[int]:
    """Push messages, hand each reply to ``on_reply`` as soon as it arrives, with the node
    the request went to: an error reply the SuperLink makes for a node that went away
    (``Node Unavailable``) does not come from that node, so its source does not say whose it is.

    Messages are pushed one at a time as ``messages`` yields them, so a generator that
    builds each request (with the model objects that member lacks) keeps only one request
    in the coordinator's memory. Returns the node ids that did not answer in time.
    """
    waiting: dict[str, int] = {}
    for msg in messages:
        dst = msg.metadata.dst_node_id
        for mid in grid.push_messages([msg]):
            if mid:
                waiting[mid] = dst
        del msg
    deadline = time.monotonic() + timeout
    while waiting and time.monotonic() < deadline:
        for reply in grid.pull_messages(list(waiting)):
            node = waiting.pop(reply.metadata.reply_to_message_id, reply.metadata.src_node_id)
            on_reply(reply, node)
            # Flower 1.42's RecordDict keeps its arrays in a reference cycle: without a young-
            # generation collection a reply's tensors outlive the fold that freed them, and
            # the coordinator's memory grows by one update per reply (measured in bench/aggregate.py).
            del reply
            gc.collect(1)
        if waiting:
            time.sleep(POLL_INTERVAL_S)
    return set(waiting.values())


def server_optimizer(cfg: KyodoConfig) -> ServerOptimizer:
    t = cfg.train
    hparams: dict[str, float] = {"server_lr": t.server_lr}
    if t.server_optimizer == "fedavgm":
        hparams["momentum"] = t.server_momentum
    elif t.server_optimizer == "fedadam":
        hparams.update(beta1=t.server_beta1, beta2=t.server_beta2, tau=t.server_tau)
    return make_server_optimizer(t.server_optimizer, **hparams)


class RoundRunner:
    """Runs rounds against a Grid; the model stays in the store (``state``), see the module docstring.

    After :meth:`train_and_aggregate`, ``pending`` and ``pending_state`` name the objects the
    round wrote (shard -> object id, weights and optimiser state) for
    :meth:`coordinator.run_state.RunState.commit_objects`; ``last_pool`` is the round's
    sum pool, whose counters say how much RAM the sums took.
    """

    def __init__(
        self,
        cfg: KyodoConfig,
        grid: Grid,
        state: RunState,
        run_id: str = "run",
        timeout: float | None = None,
        sync: ModelSync | None = None,
        sum_budget_bytes: int | None = None,
    ):
        self.cfg = cfg
        self.state = state
        # The model travels by reference: each node gets only the objects it lacks.
        self.sync = sync if sync is not None else ModelSync(state.store)
        self.run_id = run_id
        self.grid = grid
        self.timeout = cfg.train.reply_timeout if timeout is None else timeout
        self.layout = ShardLayout.from_config(cfg.model, cfg.embodiments)
        self.optimizer = server_optimizer(cfg)
        if sum_budget_bytes is None:
            largest = max(
                (4 * sum(int(torch.Size(s).numel()) for s in self._trainable_shapes(shard).values()))
                for shard in self.layout.shards
            )
            sum_budget_bytes = max(SUM_BUDGET_SHARDS * largest, SUM_BUDGET_FLOOR_BYTES)
        self.sum_budget_bytes = sum_budget_bytes
        self.pending: dict[str, str] = {}
        self.pending_state: dict[str, str] = {}
        self.last_pool: SumPool | None = None
        self.members: dict[int, MemberInfo] = {}
        self.public_keys: dict[str, str] = {}  # member -> hex Ed25519 key from query
        self.epsilon: dict[str, tuple[float, float]] = {}  # member -> (spent, budget) as reported
        self.sits_out: dict[str, str] = {}  # member -> why it cannot train this round (its query reply)
        # consortium member -> why it is not in this round at all (no answer of its node was taken)
        self.absent: dict[str, str] = {}
        self._budget_warned: set[str] = set()  # members told of once per run: over their published budget
        self._not_pinned_by: dict[str, list[str]] = {}  # member left out -> the seated members that did not pin it
        self.eval_withheld: dict[str, str] = {}  # member -> why it released no held-out error (last evaluate)
        # member -> the newest receipt it sent: every request carries its hash, and a node
        # whose ledger lacks it (restored from a backup) spends nothing more.
        self.ledger_heads: dict[str, _Head] = {}

    # ------------------------------------------------------------------ query
    def query(self, round_number: int) -> dict[int, MemberInfo]:
        node_ids = list(self.grid.get_node_ids())
        replies: dict[int, QueryReply] = {}
        refused: dict[int, str] = {}  # node -> why its answer was not taken

        def on_reply(reply: Message, node: int) -> None:
            if reply.has_error():
                # The SuperLink answers for a node that stopped heartbeating: the node is down,
                # it did not refuse (a walkthrough read "declined" as the member's choice).
                down = reply.metadata.src_node_id == SUPERLINK_NODE_ID
                who = f"node {node}" + (f" ({known[node]})" if node in known else "")
                log.warning("%s %s: %s", who, "is unavailable" if down else "declined query", reply.error.reason)
                refused[node] = (
                    f"its node was unavailable when the round began (the SuperLink answered for it: "
                    f"{reply.error.reason})"
                    if down
                    else f"its node answered the query with an error: {reply.error.reason}"
                )
                return
            try:
                info = QueryReply.from_content(reply.content)
            except ProtocolError as err:
                log.warning("node %s: %s", node, err)
                refused[node] = f"its node's query answer was malformed: {err}"
                return
            refusal = self._impersonation(node, info)
            if refusal:
                log.error("node %s is left out: %s", node, refusal)
                return
            replies[node] = info

        # The round's plan goes with the query, so a DP node answers whether it would train it.
        # Whose node is whose: the last query's answers, or the consortium's registrations
        # (after a restart the runner has not heard from anyone yet).
        known = {m.node_id: m.name for m in self.cfg.federation.members if m.node_id}
        known |= {node: m.name for node, m in self.members.items()}
        sent = {n: self.ledger_head(known.get(n, "")) for n in node_ids}
        for node in self._exchange_queries(round_number, sent, on_reply):
            log.warning("node %s did not answer query in time", node)
            refused[node] = "its node did not answer the query in time"
        # A node whose member turned out to be another than the head was sent for (node ids
        # not pinned, after a restart) is asked again with its own member's head: a rolled-back
        # node then sits the round out now, instead of declining at train and breaking its cohorts.
        # Its first claim still counts for duplicates, and it must answer as the same member again.
        claimed = {node: info.member for node, info in replies.items()}
        again = {n: self.ledger_head(name) for n, name in claimed.items() if self.ledger_head(name) != sent[n]}
        if again:
            for node in again:
                del replies[node]
            log.info("asking nodes %s again with their members' ledger heads", sorted(again))
            for node in self._exchange_queries(round_number, again, on_reply):
                log.warning("node %s did not answer its second query in time: left out of round %d", node, round_number)
                refused[node] = "its node did not answer its second query in time"
            for node in again:
                if node in replies and replies[node].member != claimed[node]:
                    log.error(
                        "node %s answered as %r, then as %r: left out", node, claimed[node], replies.pop(node).member
                    )
        names = [info.member for info in replies.values()] + [claimed[n] for n in again if n not in replies]
        duplicated = {n for n in names if names.count(n) > 1}
        if duplicated:
            log.error("nodes claim the same member name %s: they are left out", sorted(duplicated))
        self.members = self._admit({node: info for node, info in replies.items() if info.member not in duplicated})
        self.absent = self._absent(known, set(node_ids), refused, duplicated)
        self._tell_unseated(round_number)
        return self.members

    def _absent(
        self, known: Mapping[int, str], online: set[int], refused: Mapping[int, str], duplicated: set[str]
    ) -> dict[str, str]:
        """Why each consortium member is in no part of the round: the participation table's
        "-" said only that it was not there, and the reason was in the coordinator's log alone.
        A node is tied to its member by its registered node id or an earlier answer; a member
        whose node nobody knows yet is "not connected"."""
        present = {m.name for m in self.members.values()}
        node_of = {name: node for node, name in known.items()}
        # Nodes that gave no usable answer and were never tied to a member: one of them may be
        # the member's, so "not connected" would be a guess.
        anonymous = sorted({why for node, why in refused.items() if node not in known})
        absent = {}
        for member in sorted(m.name for m in self.cfg.federation.members):
            if member in present:
                continue
            node = node_of.get(member)
            if member in duplicated:
                absent[member] = "two nodes answered as this member: both were left out"
            elif node is not None and node in refused:
                absent[member] = refused[node]
            elif node is not None and node in online:
                absent[member] = "its node's answer was refused (the coordinator's log says why)"
            elif node is None and anonymous:
                absent[member] = (
                    f"no node answered as it; connected nodes of unknown members gave: {'; '.join(anonymous)}"
                )
            else:
                absent[member] = "its node was not connected when the round began"
        return absent

    def _tell_unseated(self, round_number: int) -> None:
        """Tell each member left out because others did not pin it why, on its own node: its
        file is the newest, so nothing there would say why it is never asked to train."""
        notices = [
            Message(SeatingNotice(round_number, self.run_id, self._not_pinned_by[m.name]).to_content(), node, SEATING)
            for node, m in self.members.items()
            if m.name in self._not_pinned_by
        ]
        if not notices:
            return

        def on_reply(reply: Message, node: int) -> None:
            if reply.has_error():
                log.info("node %s did not take its seating notice: %s", node, reply.error.reason)

        # The node answered its query moments ago and the notice touches nothing but its log.
        for node in exchange(self.grid, notices, min(self.timeout, SEATING_NOTICE_TIMEOUT_S), on_reply):
            log.info("node %s did not acknowledge its seating notice", node)

    def _admit(self, replies: Mapping[int, QueryReply]) -> dict[int, MemberInfo]:
        """The round's members from their final query answers. Only here does an answer touch
        what the runner keeps per member (its key, objects, epsilon): an answer that was
        withdrawn or duplicated must not leave its key as the member's."""
        members: dict[int, MemberInfo] = {}
        self._not_pinned_by = {}
        self.sits_out = {
            info.member: info.reason or "no privacy budget left" for info in replies.values() if not info.can_train
        }
        if self.cfg.secagg.enabled:
            # Only masked rounds check pinned keys; a member that would refuse its cohorts there,
            # after training, sits out now (coordinator.pinning).
            candidates = {i.member: frozenset(i.pinned) if i.pinned else None for i in replies.values() if i.can_train}
            unpinned = unpinned_members(candidates)
            self.sits_out |= unpinned
            self._not_pinned_by = not_pinned_by(candidates, unpinned)
        for node, info in replies.items():
            members[node] = MemberInfo(
                node, info.member, tuple(info.embodiments), info.episodes, can_train=info.member not in self.sits_out
            )
            self.public_keys[info.member] = info.public_key
            self.sync.reported(info.member, info.objects)
            self.epsilon[info.member] = (info.epsilon_spent, info.epsilon_budget)
            self._warn_over_published(info)
        return members

    def _warn_over_published(self, info: QueryReply) -> None:
        """A deployed node enforces the budget of its own config; auditors hold the member to the
        one it published (``federation.members[].epsilon`` here). A walkthrough's member raised
        its budget without publishing it, spent 7.2 against a published 2, and only ``status``
        and the audit said so, after the run."""
        published = next((m.epsilon for m in self.cfg.federation.members if m.name == info.member), None)
        if published is None or info.member in self._budget_warned or not info.epsilon_budget:
            return
        if info.epsilon_spent > published * (1 + 1e-9):
            state = f"has spent epsilon {info.epsilon_spent:.4g}, over the {published:g} it published"
        elif info.epsilon_budget > published * (1 + 1e-9):
            state = f"holds an epsilon budget of {info.epsilon_budget:g}, above the {published:g} it published"
        else:
            return
        self._budget_warned.add(info.member)
        log.warning(
            "%s %s: the audit fails its releases past %g. The member publishes its budget (kyodo-member budget), "
            "the operator admits it again (add-member --update) before the next run",
            info.member,
            state,
            published,
        )

    def _exchange_queries(
        self, round_number: int, heads: Mapping[int, str], on_reply: Callable[[Message, int], None]
    ) -> list[int]:
        """Query each node with the ledger head it is sent; returns the nodes that did not answer."""
        roster = sorted(m.name for m in self.cfg.federation.members)
        msgs = [
            Message(
                QueryRequest(
                    round_number, self.run_id, self._hparams(), self.cfg.train.rounds, head, roster=roster
                ).to_content(),
                node,
                QUERY,
            )
            for node, head in heads.items()
        ]
        return list(exchange(self.grid, msgs, self.timeout, on_reply))

    def _impersonation(self, node: int, info: QueryReply) -> str:
        """Why a node may not answer as the member it names ('' if it may). Flower checks a
        SuperNode's key; which member that key belongs to is the consortium's to say."""
        roster = {m.name: m for m in self.cfg.federation.members}
        pinned = any(m.node_id or m.ledger_public_key for m in roster.values())
        member = roster.get(info.member)
        if member is None:
            return f"it names {info.member!r}, who is not a consortium member" if pinned else ""
        if member.node_id and node != member.node_id:
            return f"it names {info.member!r}, whose SuperNode is registered as node {member.node_id}"
        if member.ledger_public_key and info.public_key != member.ledger_public_key:
            return f"it names {info.member!r} but its ledger key is not the one {info.member!r} registered"
        return ""

    def plan(self, round_number: int) -> RoundPlan:
        available = [m for m in self.members.values() if m.can_train]
        for m in self.members.values():
            if not m.can_train:
                log.info("round %d: %s sits out (%s)", round_number, m.name, self.sits_out.get(m.name, "?"))
        plan = plan_round(
            round_number,
            available,
            n_layers=self.cfg.model.n_layers,
            n_experts=self.cfg.model.n_experts,
            embodiments=sorted(self.cfg.embodiments),
            min_cohort=self.cfg.train.min_cohort,
            experts_per_member=self.cfg.train.experts_per_member,
        )
        if available and all(shard.startswith("adapter/emb/") for shard in plan.cohorts):
            # Warned, not refused: a robot's adapter is still worth training, but every member
            # pays a round of its budget for it, which the operator should see coming.
            log.warning(
                "round %d trains embodiment adapters only: %d member(s) can train, fewer than "
                "train.min_cohort (%d), so no expert or shared adapter has a cohort; each of them "
                "still spends its budget on its own robot's adapter",
                round_number,
                len(available),
                self.cfg.train.min_cohort,
            )
        return plan

    # ------------------------------------------------------------------ train + aggregate
    def _trainable_shapes(self, shard: str) -> dict[str, tuple[int, ...]]:
        return {
            spec.name: tuple(spec.shape)
            for spec in self.layout.shards[shard]
            if not (shard == "adapter/shared" and ".lora_A." in spec.name)
        }

    def _hparams(self) -> TrainHyperParams:
        t = self.cfg.train
        return TrainHyperParams(
            lr=t.lr,
            local_steps=t.local_steps,
            batch_size=t.batch_size,
            weight_decay=t.weight_decay,
            seed=t.seed,
            max_grad_norm=self.cfg.privacy.max_grad_norm,
            sample_rate=self.cfg.privacy.sample_rate,
        )

    def train_and_aggregate(self, round_number: int, plan: RoundPlan, result: RoundResult) -> None:
        t = self.cfg.train
        hp = self._hparams()
        by_name = {m.name: node for node, m in self.members.items()}
        # Mixing counts with withheld ones would let the counted members outweigh the rest.
        equal = any(m.episodes == 0 for m in self.members.values() if m.name in plan.members)
        result.weighting = "equal" if equal else "examples"
        self.pending, self.pending_state = {}, {}
        pool = self.last_pool = SumPool(self.sum_budget_bytes, self.state.scratch_dir)
        secure = self.cfg.secagg.enabled
        setup = None
        server: SecAggServer | None = None
        if secure:
            sa = self.cfg.secagg
            setup = build_setup(
                plan.cohorts,
                bits=sa.bits,
                clip_range=sa.clip_range,
                degree=sa.degree,
                threshold=sa.threshold,
                graph_seed=secrets.token_bytes(16),
            )
            lengths = {shard: shard_length(self._trainable_shapes(shard)) for shard in plan.cohorts}
            server = SecAggServer(self.run_id, round_number, setup, lengths, pool=pool)
        fold = None if server is not None else _PlainFold(self, plan, result, pool, t.ordered_aggregation)

        def requests() -> Iterator[Message]:
            for member in plan.members:
                request = TrainRequest(
                    round_number,
                    plan.shards_of(member),
                    hp,
                    None,
                    run=self.run_id,
                    planned_rounds=t.rounds,
                    secagg=setup,
                    model_ref=self.sync.ref_for(member),
                    ledger_head=self.ledger_head(member),
                )
                yield Message(request.to_content(), by_name[member], TRAIN)

        node_to_name = {node: m.name for node, m in self.members.items()}

        def on_reply(reply: Message, node: int) -> None:
            member = node_to_name.get(node, f"node {node}")
            if reply.has_error():
                result.failed[member] = f"train error {reply.error.code}: {reply.error.reason}"
                log.warning("%s: %s", member, result.failed[member])
                if fold is not None:
                    fold.resolve(member)
                return
            receipt = None
            try:
                if TrainDeclined.is_declined(reply.content):
                    declined = TrainDeclined.from_content(reply.content)
                    result.declined[member] = declined.reason
                    log.info("%s sits round %d out: %s", member, round_number, declined.reason)
                    if fold is not None:
                        fold.resolve(member)
                    return
                parsed = TrainReply.from_content(reply.content)
                if parsed.member != member:
                    raise ProtocolError(f"reply names member {parsed.member!r}, node is {member!r}")
                if sorted(parsed.shards) != sorted(plan.shards_of(member)):
                    raise ProtocolError(f"reply covers shards {parsed.shards}, assigned {plan.shards_of(member)}")
                receipt = self._check_receipt(member, round_number, parsed) if parsed.receipt else None
                weight = 1.0 if equal or not parsed.num_examples else float(parsed.num_examples)
                if server is not None:
                    if parsed.deltas or parsed.advert is None:
                        raise ProtocolError("under secure aggregation a train reply carries a key advert, no deltas")
                    server.add_advert(member, parsed.advert, self.public_keys.get(member, ""), weight)
                else:
                    fold.accept(member, parsed, weight)  # checked whole, then folded (or queued in order)
            except (ProtocolError, AggregationError, LedgerError, SecAggError, ValueError) as err:
                result.failed[member] = f"invalid train reply: {err}"
                log.warning("%s: %s", member, result.failed[member])
                if fold is not None:
                    fold.resolve(member)
                return
            if receipt is not None:
                result.receipts[member] = receipt
            parsed.deltas = {}  # the sums (or the in-order queue) hold what is needed
            result.train[member] = parsed
            if fold is not None:
                fold.resolve(member)

        missing = exchange(self.grid, requests(), self.timeout, on_reply)
        for node in missing:
            member = node_to_name.get(node, str(node))
            result.failed[member] = "no train reply in time"
            if fold is not None:
                fold.resolve(member)

        if server is not None:
            sums = secure_aggregate(self.grid, exchange, self.timeout, server, by_name, result.failed)
            done: set[str] = set()
            for outcome in sums:
                shard = outcome.shard
                done.add(shard)
                if self._enough(shard, outcome.contributors, plan, result):
                    how = "secagg" if outcome.secure else "single"
                    mean = mean_update(outcome, self._trainable_shapes(shard))
                    del outcome  # the float64 sum: one shard's worth at a time
                    if self._apply(shard, mean, result):
                        result.aggregation[shard] = how
                    del mean
                else:
                    del outcome
            for shard, cohort in plan.cohorts.items():
                if shard not in done:
                    why = server.skipped.get(shard, "not recovered by secure aggregation")
                    result.failed[shard] = why + _sat_out(cohort, result)
        else:
            fold.finish_all()
        result.updated_shards.sort()

    def _finish_plain(self, shard: str, acc: ShardMean, plan: RoundPlan, result: RoundResult) -> None:
        """A plaintext shard whose cohort is resolved: mean, validate, optimise, write, free."""
        if not self._enough(shard, acc.contributors, plan, result):
            acc.discard()
            return
        try:
            mean = acc.mean()
        except AggregationError as err:
            result.rejected[shard] = str(err)
            result.failed[shard] = f"aggregate rejected: {err}"
            log.warning("round %d: %s keeps its previous version: %s", result.round, shard, err)
            return
        if self._apply(shard, mean, result):
            result.aggregation[shard] = "plaintext"

    def _apply(self, shard: str, mean: dict[str, torch.Tensor], result: RoundResult) -> bool:
        """Validate the shard's aggregate, then let the server optimiser make its next version.

        The shard's weights and optimiser state are read from ``HEAD`` for this one step and
        the results written to the store right away (not committed: ``HEAD`` moves after the
        whole round), so nothing of the shard stays in memory afterwards. A refused aggregate
        leaves the shard (and its optimiser state) as it was.
        """
        reason = check_aggregate(shard, mean, self.cfg.train.max_update_norm)
        if reason is not None:
            result.rejected[shard] = reason
            result.failed[shard] = f"aggregate rejected: {reason}"
            log.warning("round %d: %s keeps its previous version: %s", result.round, shard, reason)
            return False
        params = self.state.shard_params(shard)
        self.optimizer.load_state_dict(shard, self.state.optimizer_state(shard))
        try:
            new = self.optimizer.apply(params, mean, shard_id=shard)
            self.pending[shard] = self.state.put(shard, {**params, **new})
            del params, new
            state = self.optimizer.state_dict(shard)
            if state:
                self.pending_state[shard] = self.state.put(shard, state)
        finally:
            self.optimizer.load_state_dict(shard, {})  # the store holds it from now on
        result.updated_shards.append(shard)
        return True

    def _enough(self, shard: str, contributors: list[str], plan: RoundPlan, result: RoundResult) -> bool:
        """Embodiment adapters are aggregated over their owners, whoever answered; every other
        shard needs min_cohort actual contributors, not just planned ones."""
        if not contributors:
            result.failed[shard] = f"no valid contribution from cohort {plan.cohorts[shard]}"
            return False
        min_cohort = self.cfg.train.min_cohort
        if not shard.startswith("adapter/emb/") and len(contributors) < min_cohort:
            result.failed[shard] = (
                f"only {len(contributors)} of cohort {plan.cohorts[shard]} contributed (< min_cohort {min_cohort})"
            )
            return False
        return True

    def _check_receipt(self, member: str, round_number: int, reply: TrainReply) -> dict:
        """The receipt must be this member's signed ledger entry for exactly this update."""
        expected = {"member": member, "round": round_number, "run": self.run_id, "shards": sorted(reply.shards)}
        entry = self._signed_entry(member, reply.receipt, {**expected, "release": RELEASE_TRAIN}, "receipt")
        if entry["mechanism"]["steps"] != reply.steps:
            raise ProtocolError(f"receipt records {entry['mechanism']['steps']} steps, reply ran {reply.steps}")
        return entry

    def _check_evaluation_receipt(self, member: str, round_number: int, reply: EvaluateReply) -> dict:
        """A private evaluation's receipt: this member's signed ledger entry of this round's release."""
        expected = {"member": member, "round": round_number, "run": self.run_id, "release": RELEASE_EVALUATION}
        return self._signed_entry(member, reply.receipt, expected, "evaluation receipt")

    def _signed_entry(self, member: str, text: str, expected: dict, what: str) -> dict:
        """``text`` parsed, signed with the key ``member`` announced in query, and saying ``expected``."""
        entry = receipt_from_json(text)
        key = self.public_keys.get(member, "")
        if not key or entry.get("public_key") != key:
            raise ProtocolError(f"{what} is not signed with the key the member registered in query")
        verify_entry(entry, load_public_key(key))
        for field_name, value in expected.items():
            found = release_of(entry) if field_name == "release" else entry.get(field_name)
            if found != value:
                raise ProtocolError(f"{what} {field_name} {found!r} != {value!r}")
        self.saw_receipt(member, entry)
        return entry

    def saw_receipt(self, member: str, entry: dict) -> None:
        """Keep ``entry`` as the member's ledger head if it is its newest receipt so far.

        Newest by the chain where the two link (one names the other as its previous entry),
        else by the entry's time, then epsilon. Not by epsilon alone: a member that changes its
        delta, or PRV's error, can record a smaller epsilon later, and a head stuck on an older
        entry would miss the rollback of everything after it. A re-sent receipt is older."""
        at = dt.datetime.fromisoformat(str(entry["time"]))
        seen = _Head(at, float(entry["epsilon"]), entry_hash(entry), str(entry["prev_hash"]), entry)
        head = self.ledger_heads.get(member)
        follows = head is None or seen.prev_hash == head.hash
        later = head is not None and (seen.time, seen.epsilon) > (head.time, head.epsilon)
        if follows or (later and seen.hash not in (head.hash, head.prev_hash)):
            self.ledger_heads[member] = seen

    def restore_ledger_heads(self, records: Iterable[dict], keys: Mapping[str, str] | None = None) -> None:
        """The heads from the receipts round records kept: this run's after a restart, and
        (with ``keys``, member -> its pinned ledger key) earlier runs' whose receipts that key
        signed: a ledger rolled back between runs is caught too."""
        for record in records:
            received = [*(record.get("receipts") or {}).items(), *(record.get("ledger_heads") or {}).items()]
            for member, evaluation in (record.get("evaluation") or {}).items():
                if isinstance(evaluation, dict) and evaluation.get("receipt"):
                    received.append((member, receipt_from_json(evaluation["receipt"])))
            for member, entry in received:
                if keys is None or (member in keys and entry.get("public_key") == keys[member]):
                    self.saw_receipt(member, entry)

    def ledger_head(self, member: str) -> str:
        return self.ledger_heads[member].hash if member in self.ledger_heads else ""

    def head_receipts(self) -> dict[str, dict]:
        """Each member's newest receipt the coordinator holds, as the round record keeps it: an
        auditor of this run alone then sees a ledger rolled back behind a receipt of an earlier
        run (the member may only have declined in this one, leaving no receipt of its own here)."""
        return {member: head.entry for member, head in sorted(self.ledger_heads.items())}

    # ------------------------------------------------------------------ evaluate
    def evaluate(self, round_number: int, members: Iterable[int]) -> dict[str, EvaluateReply]:
        """Each member's held-out error; ``self.eval_withheld`` says why the others released none."""
        out: dict[str, EvaluateReply] = {}
        self.eval_withheld = {}
        node_to_name = {node: m.name for node, m in self.members.items()}

        def on_reply(reply: Message, node: int) -> None:
            member = node_to_name.get(node, f"node {node}")
            if reply.has_error():
                log.warning("%s: evaluate error %s: %s", member, reply.error.code, reply.error.reason)
                return
            try:
                parsed = EvaluateReply.from_content(reply.content)
                if parsed.withheld:
                    log.info("%s released no held-out error: %s", member, parsed.withheld)
                    self.eval_withheld[member] = parsed.withheld
                    return
                if parsed.receipt:
                    self._check_evaluation_receipt(member, round_number, parsed)
                out[member] = parsed
            except (ProtocolError, LedgerError) as err:
                log.warning("%s: evaluation not used: %s", member, err)

        def requests() -> Iterator[Message]:
            for node in members:
                member = node_to_name[node]
                request = EvaluateRequest(
                    round_number, None, self.sync.ref_for(member), run=self.run_id, ledger_head=self.ledger_head(member)
                )
                yield Message(request.to_content(), node, EVALUATE)

        exchange(self.grid, requests(), self.timeout, on_reply)
        return out

    def new_result(self, round_number: int, plan: RoundPlan) -> RoundResult:
        """The round's result as its query left it: who sat out, and who was not there at all."""
        return RoundResult(round=round_number, plan=plan, declined=dict(self.sits_out), absent=dict(self.absent))

    def run_round(self, round_number: int) -> RoundResult:
        start = time.monotonic()
        self.query(round_number)
        plan = self.plan(round_number)
        result = self.new_result(round_number, plan)
        if plan.members:
            self.train_and_aggregate(round_number, plan, result)
        result.evaluation = self.evaluate(round_number, list(self.members))
        result.seconds = time.monotonic() - start
        return result


def _sat_out(cohort: list[str], result: RoundResult) -> str:
    """Which of a cohort's members sent no update, and why: a secure-aggregation reason such as
    "2 of 3 members shared keys" names no one, and the operator has to find out who."""
    absent = [m for m in cohort if m not in result.train]
    if not absent:
        return ""
    said = (result.declined.get(m) or result.failed.get(m) for m in absent)
    return " (" + "; ".join(f"{m}: {why or 'no update'}"[:200] for m, why in zip(absent, said, strict=True)) + ")"


class _PlainFold:
    """Secure aggregation off: fold train replies into per-shard sums and finish each shard
    as soon as its whole cohort is resolved (see the module docstring).

    ``ordered``: float sums depend on the order contributions are added in, which depends on
    arrival. For bit-reproducible runs (resume drills, ``train.ordered_aggregation``) each
    shard folds its contributions in sorted member order: a contribution that arrives before
    its predecessors in that order waits, copied into a buffer of the same sum pool (so it
    is held to the same RAM budget and spilled like a sum), until they are resolved.
    """

    def __init__(self, runner: RoundRunner, plan: RoundPlan, result: RoundResult, pool: SumPool, ordered: bool):
        self.runner, self.plan, self.result, self.ordered, self.pool = runner, plan, result, ordered, pool
        self.accumulators = {
            shard: ShardMean(shard, cohort, runner._trainable_shapes(shard), pool)
            for shard, cohort in plan.cohorts.items()
        }
        self.order = {shard: sorted(cohort) for shard, cohort in plan.cohorts.items()}
        self.next = dict.fromkeys(plan.cohorts, 0)  # ordered: index of the next member to fold
        self.queued: dict[str, dict[str, tuple[SumBuffer, float]]] = {s: {} for s in plan.cohorts}
        self.resolved: set[str] = set()

    def accept(self, member: str, parsed: TrainReply, weight: float) -> None:
        """Check every shard of the reply (all or none), then fold or queue each shard's part."""
        grouped: dict[str, dict[str, torch.Tensor]] = {}
        for name, tensor in parsed.deltas.items():
            grouped.setdefault(shard_of(name), {})[name] = tensor
        if set(grouped) - set(parsed.shards):
            raise ProtocolError(f"reply has deltas for unassigned shards {sorted(set(grouped) - set(parsed.shards))}")
        for shard in parsed.shards:
            self.accumulators[shard].check(member, grouped.get(shard, {}), weight)
        for shard in parsed.shards:
            if self.ordered:
                acc = self.accumulators[shard]
                buf = self.pool.new(acc.numel, np.float32, f"{shard} from {member}")
                acc.copy_into(buf, grouped[shard])
                self.queued[shard][member] = (buf, weight)
            else:
                self.accumulators[shard].add(member, grouped[shard], weight)
        grouped.clear()

    def resolve(self, member: str) -> None:
        """``member`` has answered (or never will): fold what its answer unblocks, finish
        every shard whose cohort is now complete."""
        if member in self.resolved:
            return
        self.resolved.add(member)
        for shard in [s for s in self.accumulators if member in self.plan.cohorts[s]]:
            self._advance(shard)

    def _advance(self, shard: str) -> None:
        acc, order = self.accumulators[shard], self.order[shard]
        if self.ordered:
            while self.next[shard] < len(order) and order[self.next[shard]] in self.resolved:
                member = order[self.next[shard]]
                queued = self.queued[shard].pop(member, None)
                if queued is not None:
                    buf, weight = queued
                    flat = buf.load()
                    buf.release()
                    acc.add(member, acc.views(flat), weight)
                    del flat
                self.next[shard] += 1
        if all(m in self.resolved for m in order):
            del self.accumulators[shard]
            self.queued.pop(shard, None)
            self.runner._finish_plain(shard, acc, self.plan, self.result)

    def finish_all(self) -> None:
        """End of the train exchange: every member is resolved by now; finish what is left."""
        for member in self.plan.members:
            self.resolve(member)
        for shard in list(self.accumulators):
            acc = self.accumulators.pop(shard)
            self.runner._finish_plain(shard, acc, self.plan, self.result)
