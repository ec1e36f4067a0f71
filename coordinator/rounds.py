"""One federated round on a Flower Grid: query, plan, train, aggregate, save, evaluate.

Replies are pulled as they arrive and folded into per-shard running sums at once
(:class:`aggregation.weighted_mean.ShardMean`), so a reply's tensors can be freed before the
next one is read. A node that fails, replies with an error, or returns something that does
not validate is left out of the round with a log line; the round goes on with the rest.
"""

from __future__ import annotations

import gc
import logging
import secrets
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import torch
from flwr.app import Message
from flwr.serverapp import Grid

from aggregation.secagg.errors import SecAggError
from aggregation.secagg.server import SecAggServer, build_setup
from aggregation.secagg.vectors import shard_length
from aggregation.server_opt import ServerOptimizer, make_server_optimizer
from aggregation.validate import check_aggregate
from aggregation.weighted_mean import AggregationError, ShardMean
from coordinator.planner import MemberInfo, RoundPlan, plan_round
from coordinator.secure_round import mean_update, secure_aggregate
from coordinator.sync import ModelSync
from privacy.keys import load_public_key
from privacy.ledger import LedgerError, receipt_from_json, verify_entry
from shared_model.config import KyodoConfig
from shared_model.protocol import (
    EVALUATE,
    QUERY,
    TRAIN,
    EvaluateReply,
    EvaluateRequest,
    ProtocolError,
    QueryReply,
    QueryRequest,
    TrainDeclined,
    TrainHyperParams,
    TrainReply,
    TrainRequest,
)
from shared_model.shards import ShardLayout, shard_of

log = logging.getLogger("kyodo.coordinator")

POLL_INTERVAL_S = 0.2


@dataclass
class RoundResult:
    round: int
    plan: RoundPlan
    train: dict[str, TrainReply] = field(default_factory=dict)  # member -> reply (deltas dropped)
    receipts: dict[str, dict] = field(default_factory=dict)  # member -> verified signed ledger entry
    declined: dict[str, str] = field(default_factory=dict)  # member -> the node's reason
    evaluation: dict[str, EvaluateReply] = field(default_factory=dict)
    updated_shards: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)  # member or shard -> why
    rejected: dict[str, str] = field(default_factory=dict)  # shard -> why its aggregate was refused
    # shard -> how it was aggregated: "secagg" (the coordinator saw only the cohort sum),
    # "single" (a cohort of one under secagg: its sum is its update), "plaintext" (secagg off)
    aggregation: dict[str, str] = field(default_factory=dict)
    seconds: float = 0.0


def exchange(
    grid: Grid,
    messages: list[Message],
    timeout: float,
    on_reply: Callable[[Message], None],
) -> set[int]:
    """Push messages, hand each reply to ``on_reply`` as soon as it arrives.

    Returns the node ids that did not answer in time.
    """
    ids = [mid for mid in grid.push_messages(messages) if mid]
    waiting = {mid: msg.metadata.dst_node_id for mid, msg in zip(ids, messages, strict=True)}
    deadline = time.monotonic() + timeout
    while waiting and time.monotonic() < deadline:
        for reply in grid.pull_messages(list(waiting)):
            waiting.pop(reply.metadata.reply_to_message_id, None)
            on_reply(reply)
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
    """Holds the global model (one tensor dict) and runs rounds against a Grid."""

    def __init__(
        self,
        cfg: KyodoConfig,
        grid: Grid,
        model: dict[str, torch.Tensor],
        run_id: str = "run",
        timeout: float = 600.0,
        sync: ModelSync | None = None,
    ):
        self.cfg = cfg
        # With a store: the model travels by reference, each node gets only what it lacks.
        self.sync = sync
        self.run_id = run_id
        self.grid = grid
        self.model = model
        self.timeout = timeout
        self.layout = ShardLayout.from_config(cfg.model, cfg.embodiments)
        self.optimizer = server_optimizer(cfg)
        self.members: dict[int, MemberInfo] = {}
        self.public_keys: dict[str, str] = {}  # member -> hex Ed25519 key from query
        self.epsilon: dict[str, tuple[float, float]] = {}  # member -> (spent, budget) as reported

    # ------------------------------------------------------------------ query
    def query(self, round_number: int) -> dict[int, MemberInfo]:
        node_ids = list(self.grid.get_node_ids())
        members: dict[int, MemberInfo] = {}

        def on_reply(reply: Message) -> None:
            node = reply.metadata.src_node_id
            if reply.has_error():
                log.warning("node %s declined query: %s", node, reply.error.reason)
                return
            try:
                info = QueryReply.from_content(reply.content)
            except ProtocolError as err:
                log.warning("node %s: %s", node, err)
                return
            members[node] = MemberInfo(
                node, info.member, tuple(info.embodiments), info.episodes, can_train=info.can_train
            )
            self.public_keys[info.member] = info.public_key
            if self.sync is not None:
                self.sync.reported(info.member, info.objects)
            self.epsilon[info.member] = (info.epsilon_spent, info.epsilon_budget)

        msgs = [Message(QueryRequest(round_number).to_content(), n, QUERY) for n in node_ids]
        missing = exchange(self.grid, msgs, self.timeout, on_reply)
        for node in missing:
            log.warning("node %s did not answer query in time", node)
        names = [m.name for m in members.values()]
        duplicated = {n for n in names if names.count(n) > 1}
        if duplicated:
            log.error("nodes claim the same member name %s: they are left out", sorted(duplicated))
            members = {k: v for k, v in members.items() if v.name not in duplicated}
        self.members = members
        return members

    def plan(self, round_number: int) -> RoundPlan:
        available = [m for m in self.members.values() if m.can_train]
        for m in self.members.values():
            if not m.can_train:
                log.info("round %d: %s has no privacy budget left and is not asked", round_number, m.name)
        return plan_round(
            round_number,
            available,
            n_layers=self.cfg.model.n_layers,
            n_experts=self.cfg.model.n_experts,
            embodiments=sorted(self.cfg.embodiments),
            min_cohort=self.cfg.train.min_cohort,
            experts_per_member=self.cfg.train.experts_per_member,
        )

    # ------------------------------------------------------------------ train + aggregate
    def _trainable_shapes(self, shard: str) -> dict[str, tuple[int, ...]]:
        return {
            spec.name: tuple(spec.shape)
            for spec in self.layout.shards[shard]
            if not (shard == "adapter/shared" and ".lora_A." in spec.name)
        }

    def train_and_aggregate(self, round_number: int, plan: RoundPlan, result: RoundResult) -> None:
        t = self.cfg.train
        hp = TrainHyperParams(
            lr=t.lr,
            local_steps=t.local_steps,
            batch_size=t.batch_size,
            weight_decay=t.weight_decay,
            seed=t.seed,
            max_grad_norm=self.cfg.privacy.max_grad_norm,
        )
        by_name = {m.name: node for node, m in self.members.items()}
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
            server = SecAggServer(self.run_id, round_number, setup, lengths)
        accumulators = {
            shard: ShardMean(shard, cohort, self._trainable_shapes(shard)) for shard, cohort in plan.cohorts.items()
        }
        msgs = []
        for member in plan.members:
            request = TrainRequest(
                round_number,
                plan.shards_of(member),
                hp,
                None if self.sync else self.model,
                run=self.run_id,
                planned_rounds=t.rounds,
                secagg=setup,
                model_ref=self.sync.ref_for(member) if self.sync else None,
            )
            msgs.append(Message(request.to_content(), by_name[member], TRAIN))
        node_to_name = {node: m.name for node, m in self.members.items()}
        # Float sums depend on the order replies are added in, which depends on arrival. For
        # bit-reproducible runs (resume drills) replies can be folded in member order instead,
        # at the cost of holding every reply until the last one arrives.
        ordered = t.ordered_aggregation and server is None
        buffered: list[tuple[str, TrainReply, float]] = []

        def on_reply(reply: Message) -> None:
            member = node_to_name.get(reply.metadata.src_node_id, "?")
            if reply.has_error():
                result.failed[member] = f"train error {reply.error.code}: {reply.error.reason}"
                log.warning("%s: %s", member, result.failed[member])
                return
            try:
                if TrainDeclined.is_declined(reply.content):
                    declined = TrainDeclined.from_content(reply.content)
                    result.declined[member] = declined.reason
                    log.info("%s sits round %d out: %s", member, round_number, declined.reason)
                    return
                parsed = TrainReply.from_content(reply.content)
                if parsed.member != member:
                    raise ProtocolError(f"reply names member {parsed.member!r}, node is {member!r}")
                if sorted(parsed.shards) != sorted(plan.shards_of(member)):
                    raise ProtocolError(f"reply covers shards {parsed.shards}, assigned {plan.shards_of(member)}")
                receipt = self._check_receipt(member, round_number, parsed) if parsed.receipt else None
                weight = float(parsed.num_examples)
                if server is not None:
                    if parsed.deltas or parsed.advert is None:
                        raise ProtocolError("under secure aggregation a train reply carries a key advert, no deltas")
                    server.add_advert(member, parsed.advert, self.public_keys.get(member, ""), weight)
                elif ordered:
                    buffered.append((member, parsed, weight))  # folded below, in member order
                else:
                    self._fold_plain(member, parsed, accumulators, weight)
            except (ProtocolError, AggregationError, LedgerError, SecAggError, ValueError) as err:
                result.failed[member] = f"invalid train reply: {err}"
                log.warning("%s: %s", member, result.failed[member])
                return
            if receipt is not None:
                result.receipts[member] = receipt
            if not ordered:
                parsed.deltas = {}  # fold-and-free: the sums hold what is needed
            result.train[member] = parsed

        missing = exchange(self.grid, msgs, self.timeout, on_reply)
        for node in missing:
            result.failed[node_to_name.get(node, str(node))] = "no train reply in time"
        for member, parsed, weight in sorted(buffered, key=lambda item: item[0]):
            try:
                self._fold_plain(member, parsed, accumulators, weight)
            except (ProtocolError, AggregationError, ValueError) as err:
                result.failed[member] = f"invalid train reply: {err}"
                result.train.pop(member, None)
                result.receipts.pop(member, None)
            parsed.deltas = {}

        if server is not None:
            sums = secure_aggregate(self.grid, exchange, self.timeout, server, by_name, result.failed)
            for shard in plan.cohorts:
                if shard not in sums:
                    result.failed[shard] = server.skipped.get(shard, "not recovered by secure aggregation")
                    continue
                outcome = sums[shard]
                if self._enough(shard, outcome.contributors, plan, result):
                    mean = mean_update(outcome, self._trainable_shapes(shard))
                    if self._apply(shard, mean, result):
                        result.aggregation[shard] = "secagg" if outcome.secure else "single"
            return

        for shard, acc in accumulators.items():
            if self._enough(shard, acc.contributors, plan, result) and self._apply(shard, acc.mean(), result):
                result.aggregation[shard] = "plaintext"

    def _apply(self, shard: str, mean: dict[str, torch.Tensor], result: RoundResult) -> bool:
        """Validate the shard's aggregate, then let the server optimiser make its next version.
        A refused aggregate leaves the shard (and its optimiser state) as it was."""
        reason = check_aggregate(shard, mean, self.cfg.train.max_update_norm)
        if reason is not None:
            result.rejected[shard] = reason
            result.failed[shard] = f"aggregate rejected: {reason}"
            log.warning("round %d: %s keeps its previous version: %s", result.round, shard, reason)
            return False
        self.model.update(self.optimizer.apply(self.model, mean, shard_id=shard))
        result.updated_shards.append(shard)
        return True

    def _fold_plain(self, member: str, parsed: TrainReply, accumulators: dict[str, ShardMean], weight: float) -> None:
        """Secure aggregation off (debugging): fold the member's plaintext deltas, all or none."""
        grouped: dict[str, dict[str, torch.Tensor]] = {}
        for name, tensor in parsed.deltas.items():
            grouped.setdefault(shard_of(name), {})[name] = tensor
        if set(grouped) - set(parsed.shards):
            raise ProtocolError(f"reply has deltas for unassigned shards {sorted(set(grouped) - set(parsed.shards))}")
        for shard in parsed.shards:
            accumulators[shard].check(member, grouped.get(shard, {}), weight)
        for shard in parsed.shards:
            accumulators[shard].add(member, grouped[shard], weight)

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
        entry = receipt_from_json(reply.receipt)
        key = self.public_keys.get(member, "")
        if not key or entry.get("public_key") != key:
            raise ProtocolError("receipt is not signed with the key the member registered in query")
        verify_entry(entry, load_public_key(key))
        expected = {"member": member, "round": round_number, "run": self.run_id, "shards": sorted(reply.shards)}
        for field_name, value in expected.items():
            if entry.get(field_name) != value:
                raise ProtocolError(f"receipt {field_name} {entry.get(field_name)!r} != {value!r}")
        if entry["mechanism"]["steps"] != reply.steps:
            raise ProtocolError(f"receipt records {entry['mechanism']['steps']} steps, reply ran {reply.steps}")
        return entry

    # ------------------------------------------------------------------ evaluate
    def evaluate(self, round_number: int, members: Iterable[int]) -> dict[str, EvaluateReply]:
        out: dict[str, EvaluateReply] = {}
        node_to_name = {node: m.name for node, m in self.members.items()}

        def on_reply(reply: Message) -> None:
            member = node_to_name.get(reply.metadata.src_node_id, "?")
            if reply.has_error():
                log.warning("%s: evaluate error %s: %s", member, reply.error.code, reply.error.reason)
                return
            try:
                out[member] = EvaluateReply.from_content(reply.content)
            except ProtocolError as err:
                log.warning("%s: %s", member, err)

        msgs = []
        for node in members:
            if self.sync is not None:
                request = EvaluateRequest(round_number, None, self.sync.ref_for(node_to_name[node]))
            else:
                request = EvaluateRequest(round_number, self.model)
            msgs.append(Message(request.to_content(), node, EVALUATE))
        exchange(self.grid, msgs, self.timeout, on_reply)
        return out

    def run_round(self, round_number: int) -> RoundResult:
        start = time.monotonic()
        self.query(round_number)
        plan = self.plan(round_number)
        result = RoundResult(round=round_number, plan=plan)
        if plan.members:
            self.train_and_aggregate(round_number, plan, result)
        result.evaluation = self.evaluate(round_number, list(self.members))
        result.seconds = time.monotonic() - start
        return result
