"""The member node's logic: answer query, train and evaluate from the member's own data.

Kept free of Flower types (the ClientApp adapts messages), so it is tested directly.

Privacy (ARCHITECTURE.md, "Privacy"): the member's budget comes from its own config; before
each round the node computes the epsilon the round would reach and trains fewer steps or
declines. The ledger entry of a round is appended *before* training starts (write-ahead):
a crash after that point still counts the round as spent, so a restarted node can never
forget a spend; the ledger is also the accountant's only state (its history of
mechanisms), so a restart can never double count one either. Under DP the held-out error
the node reports is a release too (``member_node.private_eval``): noised, within the
budget, and in the same ledger; the plan for the noise multiplier reserves room for it.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import functools
import hashlib
import json
import logging
import os
from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from member_node.data_units import without_episodes_beyond_bounds
from member_node.identity import MemberIdentity, NodeConfigError
from member_node.lerobot import DatasetError, Episode, LeRobotDataset, distinct_tasks, left_out_text, read_dataset
from member_node.missed_rounds import note_queried, rounds_text
from member_node.parallel import train_shards_parallel
from member_node.private_eval import EvaluationReleaser, release_key
from member_node.release_plan import ReleasePlanner
from member_node.secagg_client import MemberSecAgg
from member_node.sent_updates import MASKED, PLAIN, note_sent, sent_updates, start_noting
from member_node.trainer import evaluate, train_shards
from member_node.windows import EpisodeWindows, split_episodes
from privacy.accountant import UnreachableTarget
from privacy.accountant import epsilon as composed_epsilon
from privacy.budget import Budget, RoundAllowance, allow_round
from privacy.dp_sgd import DEFAULT_MODE, DPConfig
from privacy.keys import (
    FINGERPRINT_KEY_FILE,
    keyed_fingerprint,
    load_or_create_fingerprint_key,
    load_or_create_signing_key,
    public_key_hex,
)
from privacy.ledger import Ledger, receipt_to_json
from privacy.secure_noise import NOISE_SOURCE
from shared_model.config import KyodoConfig
from shared_model.durable import replace_json
from shared_model.policy import Policy, build_meta, count_parameters
from shared_model.protocol import (
    ConsistencyReply,
    ConsistencyRequest,
    EvaluateReply,
    EvaluateRequest,
    MaskedInputReply,
    MaskedInputRequest,
    ModelRef,
    ProtocolError,
    QueryReply,
    QueryRequest,
    SeatingNoted,
    SeatingNotice,
    ShareKeysReply,
    ShareKeysRequest,
    TrainDeclined,
    TrainHyperParams,
    TrainReply,
    TrainRequest,
    UnmaskReply,
    UnmaskRequest,
    coarse_count,
)
from shared_model.shards import BACKBONE, ShardLayout, embodiment_shard, load_shard, shard_kind
from shared_model.store import CorruptObjectError, ShardStore, StoreError
from shared_model.task_text import task_words
from shared_model.text import shortened

# Written when a request names a receipt this node's ledger lacks (``MemberNode.rolled_back``).
ROLLBACK_FILE = "rollback.json"
log = logging.getLogger("kyodo.member")
# How a member picks up members admitted after it pinned the consortium's file.
REPIN = "run `kyodo-member trust` with the operator's current audit-consortium.yaml and restart the node"


def _model_base(model_ref: ModelRef | None) -> str:
    """The sha256 of the round manifest a request's model is, '' for a model sent whole."""
    if model_ref is None:
        return ""
    return hashlib.sha256(json.dumps(model_ref.manifest, sort_keys=True).encode()).hexdigest()


def _pinned_keys(identity: MemberIdentity) -> dict[str, str] | None:
    """Member -> Ed25519 key from the consortium file the member trusts (None: none set)."""
    if not identity.consortium_file:
        return None
    from privacy.audit.consortium import ConsortiumError, load_consortium

    try:
        consortium = load_consortium(identity.consortium_file)
    except (ConsortiumError, OSError) as err:
        raise NodeConfigError(f"node config 'consortium-file': {err}") from None
    # A member that left is no longer accepted in a cohort: the file keeps it for audits only.
    return {name: member.public_key for name, member in consortium.members.items() if not member.departed}


# The share of this machine's memory the run's model may take as float32 weights (training
# adds gradients, per-sample gradients and optimiser state on top).
MODEL_MEMORY_SHARE = 0.25


def check_model_fits(cfg: KyodoConfig, memory_bytes: int | None = None) -> None:
    """Refuse a run's model this machine cannot hold, before allocating it. The model comes
    with the coordinator's run config: a review's query naming the trillion-parameter preset
    made a node allocate until the kernel stopped it."""
    if memory_bytes is None:
        memory_bytes = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    weights = 4 * count_parameters(build_meta(cfg.model, cfg.embodiments))
    if weights > MODEL_MEMORY_SHARE * memory_bytes:
        raise NodeConfigError(
            f"the run's model {cfg.model.name!r} needs {weights / 2**30:.1f} GiB of float32 weights, more than "
            f"{MODEL_MEMORY_SHARE:.0%} of this machine's {memory_bytes / 2**30:.1f} GiB: this node does not build it"
        )


class MemberNode:
    def __init__(self, cfg: KyodoConfig, identity: MemberIdentity):
        # Where the member pinned its own accountant and limits, they replace the run's: the
        # node never reads the run's ``privacy.accountant``, ``max_noise_multiplier`` or
        # ``min_steps`` past this line (``privacy_overrides`` keeps what it asked, for the log).
        self.cfg = replace(cfg, privacy=identity.privacy_settings(cfg.privacy))
        self.privacy_overrides = identity.privacy_overrides(cfg.privacy)
        self.identity = identity
        self.device = identity.torch_device()
        check_model_fits(cfg)
        self.policy = Policy(cfg.model, cfg.embodiments, device=self.device)
        self.layout = ShardLayout.from_model(self.policy)
        self.budget = Budget(identity.epsilon, identity.delta)
        state = Path(identity.state_dir)
        state.mkdir(parents=True, exist_ok=True)
        self.signing_key = load_or_create_signing_key(state / "member_ed25519.pem")
        self._fingerprint_key = load_or_create_fingerprint_key(state / FINGERPRINT_KEY_FILE)
        self.ledger = Ledger(state / "ledger.jsonl", self.signing_key)
        start_noting(state)
        self._rollback_path = state / ROLLBACK_FILE
        self.secagg = MemberSecAgg(
            state, identity.name, self.signing_key, equal_weight=identity.dp, pinned_keys=_pinned_keys(identity)
        )
        self.eval_releaser = EvaluationReleaser(
            state,
            self.ledger,
            self.budget,
            identity.eval_privacy(),
            member=identity.name,
            accountant=self.cfg.privacy.accountant,
            dataset_fingerprint=self.dataset_fingerprint,
        )
        self.plans = ReleasePlanner(
            self.ledger, self.budget, identity, self.cfg.privacy, self.eval_releaser.privacy, state
        )
        # The node's replica of the shared model: content-addressed objects, fetched only
        # when missing. ``_loaded`` says which object each shard of the policy holds now.
        self.replica = ShardStore(state / "replica")
        self._loaded: dict[str, str] = {}
        (state / "member.json").write_text(
            json.dumps(
                {
                    "member": identity.name,
                    "embodiment": identity.embodiment,
                    "epsilon": identity.epsilon,
                    "delta": identity.delta,
                    "accountant": self.cfg.privacy.accountant,
                    "budget_rounds": identity.budget_rounds,
                    "dp": identity.dp,
                    "public_key": public_key_hex(self.signing_key),
                },
                indent=2,
            ),
            encoding="utf-8",
        )

    # ------------------------------------------------------------------ the member's data
    # Read when a request first needs it (train, evaluate, a non-DP query), not when the node
    # is built: in deployment Flower starts a ClientApp process per message, and reading the
    # data for a query or a secure-aggregation stage would make those replies take longer the
    # more episodes the member holds (train and evaluate replies can be padded, those not).

    @functools.cached_property
    def dataset(self) -> LeRobotDataset:
        emb = self.cfg.embodiments[self.identity.embodiment]
        # Episodes in other units than the embodiment's are left out like non-finite ones: each
        # decided by its own values (member_node.data_units).
        dataset = without_episodes_beyond_bounds(
            read_dataset(self.identity.data_dir, emb, self.identity.embodiment), emb
        )
        if dataset.left_out:  # the member's own log; replies never say
            log.warning("member %s: episodes left out: %s", self.identity.name, left_out_text(dataset.left_out))
        if dataset.task_problem:
            if self.cfg.model.task_buckets > 0:  # it would train every task as the empty one
                raise DatasetError(f"the consortium's model reads the task, and {dataset.task_problem}")
            log.warning("member %s: task annotations ignored: %s", self.identity.name, dataset.task_problem)
        self._warn_about_tasks(distinct_tasks(dataset.episodes))
        return dataset

    def _warn_about_tasks(self, tasks: list[str]) -> None:
        """The member's own log, when its data and the consortium's model disagree about tasks."""
        reads = self.cfg.model.task_buckets > 0
        if len(tasks) > 1 and not reads:
            log.warning(
                "member %s: the episodes name %d tasks but the consortium's model does not read the task "
                "(model.task_buckets 0): they train one policy that cannot tell them apart",
                self.identity.name,
                len(tasks),
            )
        elif reads and not any(task_words(t) for t in tasks):
            log.warning(
                "member %s: the consortium's model reads the task, but the episodes name none with a word in it "
                "(see `kyodo-member data inspect`): they train as the empty task",
                self.identity.name,
            )

    @functools.cached_property
    def _split(self) -> tuple[list[Episode], list[Episode]]:
        episodes = self.dataset.episodes
        train_ids, held_ids = split_episodes(episodes, self.cfg.train.held_out_fraction, seed=self.cfg.train.seed)
        train, held = [episodes[i] for i in train_ids], [episodes[i] for i in held_ids]
        if not train or not held:
            log.warning(
                "member %s: %d training and %d held-out episodes: %s",
                self.identity.name,
                len(train),
                len(held),
                "DP rounds will add noise only / release the noised error of no episode"
                if self.identity.dp
                else "this node cannot train or evaluate",
            )
        return train, held

    @property
    def train_episodes(self) -> list[Episode]:
        return self._split[0]

    @functools.cached_property
    def train_windows(self) -> EpisodeWindows:
        return self._windows(self.train_episodes)

    @functools.cached_property
    def held_windows(self) -> EpisodeWindows:
        return self._windows(self._split[1])

    def _windows(self, episodes: list[Episode]) -> EpisodeWindows:
        m = self.cfg.model
        return EpisodeWindows(
            episodes, self.cfg.embodiments[self.identity.embodiment], m.history, m.chunk, m.task_buckets
        )

    @functools.cached_property
    def workers(self) -> int:
        """Data-parallel processes: each needs an episode. Fewer episodes than configured
        workers is not an error the node could reply with (it would tell the coordinator how
        few it holds): it uses fewer, which changes nothing in the mechanism, and logs it."""
        workers = max(1, min(self.identity.workers, len(self.train_episodes)))
        if workers < self.identity.workers:
            log.warning(
                "member %s: %d training episodes, so %d data-parallel workers instead of %d",
                self.identity.name,
                len(self.train_episodes),
                workers,
                self.identity.workers,
            )
        return workers

    def dataset_fingerprint(self) -> str:
        """What a receipt says about the data: the manifest's fingerprint under the member's key
        and a fresh nonce (privacy.keys.keyed_fingerprint), never the plain hash the coordinator
        could test, and never the same value twice, which would say the data had not changed."""
        return keyed_fingerprint(self._fingerprint_key, self.dataset.fingerprint())

    def epsilon_spent(self) -> float:
        return composed_epsilon(self.ledger.history(), self.budget.delta, self.cfg.privacy.accountant)

    # ------------------------------------------------------------------ query
    def query(self, request: QueryRequest) -> QueryReply:
        self._note_missed_rounds(request)
        spent = self.epsilon_spent()
        reason = ""
        if self.identity.dp and self._can_resend(request.run, request.round):
            pass  # trained before the coordinator restarted: sent again, spending nothing
        elif self.identity.dp:
            if spent >= self.budget.epsilon:
                reason = f"privacy budget exhausted: epsilon {spent:.4g} of {self.budget.epsilon:g} spent"
            elif request.hparams is not None:
                # The decision a train request would get, without recording anything.
                decision = self._dp_round(
                    request.run,
                    request.round,
                    request.hparams,
                    request.planned_rounds,
                    ledger_head=request.ledger_head,
                    persist_plan=False,
                )
                reason = decision if isinstance(decision, str) else ""
        pinned = self.secagg.pinned_keys
        self._warn_unpinned_roster(request.roster, pinned)
        return QueryReply(
            member=self.identity.name,
            embodiments=[self.identity.embodiment],
            # Under DP the dataset size is withheld too: even rounded, a count is not a DP
            # release (999 and 1000 episodes round to 900 and 1000).
            episodes=0 if self.identity.dp else coarse_count(len(self.dataset.episodes)),
            public_key=public_key_hex(self.signing_key),
            epsilon_spent=spent,
            epsilon_budget=self.budget.epsilon,
            can_train=not reason,
            objects=sorted(self.replica.objects()),
            reason=reason,
            pinned=sorted(pinned) if pinned is not None else [],
        )

    def _note_missed_rounds(self, request: QueryRequest) -> None:
        missed = note_queried(Path(self.identity.state_dir), request.run, request.round) if request.run else range(0)
        if missed:
            # WARNING: a ClientApp process logs nothing below it.
            log.warning(
                "%s: %s of run %s went on without this member: its node was not connected when %s began (stopped, "
                "restarting or unreachable), or failed to answer (an error earlier in this log says why), so it "
                "trained and spent nothing there; it is back from round %d",
                self.identity.name,
                rounds_text(missed),
                request.run,
                "it" if len(missed) == 1 else "they",
                request.round,
            )

    def _warn_unpinned_roster(self, roster: list[str], pinned: Mapping[str, str] | None) -> None:
        """Tell the member, in its own log, that its pinned file is older than the consortium:
        the coordinator leaves it out of rounds with the members that file lacks, and nothing
        else on this node would say why it is no longer asked to train."""
        unknown = sorted(set(roster) - set(pinned)) if pinned is not None else []
        if unknown:
            # WARNING: a ClientApp process logs nothing below it.
            log.warning(
                "%s: the consortium now lists %s, whom the pinned consortium file %s does not: this member is "
                "left out of rounds with them until it does; %s",
                self.identity.name,
                shortened(unknown),
                self.identity.consortium_file,
                REPIN,
            )

    def seating(self, notice: SeatingNotice) -> SeatingNoted:
        """Log why the coordinator left this member out of a round it could train: members that
        have not pinned it yet. Only names arrive; the words are the node's own."""
        log.warning(
            "%s is left out of training (round %d of run %s): %s pinned a consortium file that does not list this "
            "member; until they run `kyodo-member trust` with the operator's current audit-consortium.yaml and "
            "restart their nodes, the coordinator seats them without it (the operator can tell them)",
            self.identity.name,
            notice.round,
            notice.run,
            shortened(notice.not_pinned_by),
        )
        return SeatingNoted(self.identity.name)

    # ------------------------------------------------------------------ train
    def check_assignment(self, shards: list[str]) -> None:
        """Refuse what this node cannot or must not train (checked before any computation)."""
        m = self.cfg.model
        own = embodiment_shard(self.identity.embodiment)
        for shard in shards:
            kind = shard_kind(shard)
            if shard == BACKBONE:
                raise ProtocolError("train request: the backbone is frozen during federated rounds")
            if kind == "adapter_emb" and shard != own:
                raise ProtocolError(f"train request: {shard} is another embodiment's adapter; this node owns {own}")
            if kind == "expert":
                layer, expert = (int(part[1:]) for part in shard.split("/")[1:])
                if layer >= m.n_layers or expert >= m.n_experts:
                    raise ProtocolError(f"train request: {shard} does not exist in model {m.name!r}")

    def _load_request_model(self, model: dict[str, torch.Tensor] | None, ref: ModelRef | None) -> None:
        if ref is None:
            if model is None:
                raise ProtocolError("request carries no model")
            self._load_model(model)
            self._loaded = {}
        else:
            self._sync(ref)

    def _sync(self, ref: ModelRef) -> None:
        """Store the objects that came (each checked against its sha256), load every shard whose
        object changed, and drop objects no longer in the model (the replica keeps one version)."""
        expected = set(self.layout.shards)
        if set(ref.manifest) != expected:
            raise ProtocolError(
                f"manifest shards do not match model {self.cfg.model.name!r}: "
                f"missing {sorted(expected - set(ref.manifest))[:5]}, extra {sorted(set(ref.manifest) - expected)[:5]}"
            )
        # What this request adds is taken back if it is refused: a review's 8 refused requests
        # left 112 MiB of objects in the replica, listed in every later query reply.
        added = [oid for oid in ref.objects if not self.replica.has(oid)]
        try:
            self._store_and_load(ref)
        except BaseException:
            for oid in added:
                if oid not in self._loaded.values():
                    self.replica.object_path(oid).unlink(missing_ok=True)
            raise
        self.replica.gc(keep_objects=set(ref.manifest.values()))

    def _store_and_load(self, ref: ModelRef) -> None:
        for oid, data in ref.objects.items():
            try:
                self.replica.put_object_bytes(oid, data)
            except StoreError as err:
                raise ProtocolError(f"received object refused: {err}") from None
        for shard, oid in ref.manifest.items():
            if self._loaded.get(shard) == oid:
                continue
            if not self.replica.has(oid):
                raise ProtocolError(f"object {oid[:12]} of {shard} is neither held nor sent")
            try:
                tensors = self.replica.get_shard(oid, shard_id=shard)
                load_shard(self.policy, shard, tensors)
            except StoreError as err:
                # The store's message names the file: the member's log has it, the reply (the
                # coordinator's) does not. A corrupt copy is dropped, so the node's next query
                # no longer lists it and the coordinator sends it again.
                self._loaded.pop(shard, None)
                log.error("%s: the replica's copy of %s: %s", self.identity.name, shard, err)
                dropped = isinstance(err, CorruptObjectError)
                if dropped:
                    self.replica.object_path(oid).unlink(missing_ok=True)
                raise ProtocolError(
                    f"shard {shard}: this node's copy of object {oid[:12]} "
                    + ("was corrupt and is dropped; the next round sends it again" if dropped else "cannot be read")
                    + " (see the node's log)"
                ) from None
            except ValueError as err:
                self._loaded.pop(shard, None)
                raise ProtocolError(f"shard {shard}: {err}") from None
            self._loaded[shard] = oid

    def _load_model(self, tensors: dict[str, torch.Tensor]) -> None:
        expected = self.policy.state_dict()
        missing = sorted(set(expected) - set(tensors))
        extra = sorted(set(tensors) - set(expected))
        if missing or extra:
            raise ProtocolError(
                f"model tensors do not match {self.cfg.model.name!r}: missing {missing[:5]}, extra {extra[:5]}"
            )
        for name, tensor in tensors.items():
            if tuple(tensor.shape) != tuple(expected[name].shape):
                raise ProtocolError(
                    f"model tensor {name}: shape {tuple(tensor.shape)} != {tuple(expected[name].shape)}"
                )
        self.policy.load_state_dict(tensors, strict=True)

    def _rng(self, seed: int, round_number: int) -> np.random.Generator:
        # Each member draws its own batches: mixing in the member name keeps members from
        # sampling identical episode positions while staying reproducible for a fixed seed.
        digest = hashlib.sha256(f"{self.identity.name}/{round_number}/{seed}".encode()).digest()
        return np.random.default_rng(int.from_bytes(digest[:8], "little"))

    def rolled_back(self, ledger_head: str) -> str:
        """Why this node must not spend more ('' when it may): its ledger lacks an entry the
        coordinator holds a receipt of.

        The ledger is the accountant's only state, so a state directory restored from a backup
        would count less than the node has released and let it overspend its budget; the node
        cannot see that alone, the receipts it already sent can.
        """
        if not ledger_head or self.ledger.holds(ledger_head):
            return ""
        log.error("ledger rolled back: it lacks entry %s, whose receipt the coordinator holds", ledger_head)
        self._note_rollback(ledger_head)
        return (
            f"this node's ledger lacks entry {ledger_head[:16]}..., whose signed receipt the coordinator holds "
            "(was the state directory restored from a backup?): its accountant would count less than was "
            "released; restore the ledger that holds that entry"
        )

    def _note_rollback(self, missing_entry: str) -> None:
        """For `kyodo-member status`: the member reads its state directory, not the node's log.
        Keeps when this entry was first found missing, and when last."""
        now = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
        seen = {"missing_entry": missing_entry, "first": now, "last": now}
        with contextlib.suppress(OSError, ValueError, TypeError, KeyError):
            before = json.loads(self._rollback_path.read_text(encoding="utf-8"))
            if before["missing_entry"] == missing_entry:
                seen["first"] = str(before["first"])
        replace_json(self._rollback_path, seen)

    def _dp_round(
        self,
        run: str,
        round_number: int,
        hparams: TrainHyperParams,
        planned_rounds: int,
        *,
        ledger_head: str = "",
        persist_plan: bool = True,
    ) -> tuple[float, float, RoundAllowance] | str:
        """(noise multiplier, sample rate, allowance) of a DP round, or why the node declines it.

        One decision for both messages: ``query`` asks it (nothing recorded) so the coordinator
        leaves out a member that would decline; ``train`` asks it again before training.
        """
        rollback = self.rolled_back(ledger_head)
        if rollback:
            return rollback
        if self.ledger.find(run, round_number) is not None:
            # A re-sent round is never trained twice: that would spend the budget twice.
            if not self._masked_sent(run, round_number):
                return f"round {round_number} of run {run} was already trained"
            lost = (
                f"round {round_number} of run {run} was already trained, and its update already left masked in an "
                "earlier attempt of the round (one stopped at once, or cut off, during secure aggregation is sent "
                "again): it is not masked again in another session, so the epsilon spent on it does not reach the model"
            )
            log.warning("%s: %s", self.identity.name, lost)
            return lost
        if not hparams.sample_rate:
            # A rate derived from this node's size (batch / N) would be in the receipt, and
            # the query's answer would let the coordinator probe N for free: refuse it.
            return (
                "the request names no DP sample rate; this node does not derive one from its episode "
                "count (q = batch / N would reveal it): set privacy.sample_rate"
            )
        sample_rate = hparams.sample_rate
        history = self.ledger.history()
        try:
            sigma = self.plans.noise_multiplier(
                history, sample_rate, run, round_number, hparams.local_steps, planned_rounds, persist=persist_plan
            )
        except UnreachableTarget as err:
            return (
                f"privacy budget exhausted: epsilon {self.epsilon_spent():.6g} of {self.budget.epsilon:g} spent, and no noise "
                f"level lets another round fit ({err})"
            )
        cap = self.cfg.privacy.max_noise_multiplier
        cap_name = (
            "the member's max-noise-multiplier"
            if self.identity.max_noise_multiplier
            else "privacy.max_noise_multiplier"
        )
        if self.identity.noise_multiplier == 0 and sigma > cap:
            rounds = self.plans.rounds_to_plan(planned_rounds, round_number)
            paced = (
                f"; budget-rounds {self.identity.budget_rounds} leaves {rounds} rounds to spread it over: lower it"
                if self.identity.budget_rounds and rounds > planned_rounds - round_number + 1
                else ""
            )
            return (
                f"privacy budget nearly exhausted: epsilon {self.epsilon_spent():.6g} of {self.budget.epsilon:g} spent; the rest "
                f"would need noise multiplier {sigma:.3g} ({cap_name} {cap:g}): an update that "
                f"would be mostly noise{paced}"
            )
        allowance = allow_round(
            self.budget,
            history,
            sigma,
            sample_rate,
            hparams.local_steps,
            accountant=self.cfg.privacy.accountant,
            min_steps=self.cfg.privacy.min_steps,
        )
        if allowance.decision == "declined":
            return allowance.reason
        return sigma, sample_rate, allowance

    def unmasked_update(self, request: TrainRequest) -> str:
        """Why this round would send the member's update where secure aggregation does not hide
        it ('' when it would not, or when the member does not require it: ``require-secagg``).

        Whether a round is masked, and who shares each cohort, are the coordinator's choices.
        A cohort of one sums to the member's update, and in a cohort of two the other member
        can subtract its own: only the member's own embodiment adapter may go in either (no
        one else, or only another owner of that robot, trains it). Who the others are is the
        coordinator's word too unless the member pins them (``kyodo-member trust``)."""
        if not self.identity.require_secagg:
            return ""
        if request.secagg is None:
            return "this member requires secure aggregation (require-secagg) and the round has none"
        own = f"adapter/emb/{self.identity.embodiment}"
        exposed = sorted(
            (len(group.members), shard)
            for group in request.secagg.groups_of(self.identity.name)
            if len(group.members) < 3
            for shard in group.shards
            if shard != own and shard in request.shards
        )
        if exposed:
            size, shard = exposed[0]
            whom = (
                "alone in the cohort" if size == 1 else "in a cohort of two (the other member could subtract its own)"
            )
            return (
                f"the round puts this member {whom} of {', '.join(s for _, s in exposed[:3])}: the sum would show its "
                "update, and this member requires secure aggregation (require-secagg)"
            )
        return ""

    def unpinned_cohort(self, request: TrainRequest) -> str:
        """Why this round seats this node beside members its pinned consortium file does not
        list ('' when it does not, or when nothing is pinned).

        Share keys would refuse such a cohort anyway, but only after training: the budget the
        round spent would buy nothing. Said here, the member sits the round out for free, and
        the reason tells it what to do (a member admitted after it pinned the file)."""
        pinned = self.secagg.pinned_keys
        if pinned is None or request.secagg is None:
            return ""
        seated = {m for group in request.secagg.groups_of(self.identity.name) for m in group.members}
        unknown = sorted(seated - set(pinned))
        if not unknown:
            return ""
        return (
            # No path: this reason goes to the coordinator too (the member's start names the file).
            f"the round seats {', '.join(unknown[:5])} in this member's cohorts, and the consortium file it pinned "
            f"does not list them: if the consortium admitted them, {REPIN}"
        )

    def train(self, request: TrainRequest, arrived: dt.datetime | None = None) -> TrainReply | TrainDeclined:
        """``arrived``: when the request reached the node (the ClientApp's clock, before the
        node was even built), the time its receipt carries: never how long the work took."""
        reply = self._train(request, arrived or dt.datetime.now(dt.UTC))
        if isinstance(reply, TrainDeclined):
            # The reason goes to the coordinator; the member, whose round it was, reads it here
            # (WARNING: a ClientApp process logs nothing below it).
            log.warning("%s sits round %d of run %s out: %s", reply.member, request.round, request.run, reply.reason)
        return reply

    def _train(self, request: TrainRequest, arrived: dt.datetime) -> TrainReply | TrainDeclined:
        self.check_assignment(request.shards)
        refusal = self.unmasked_update(request) or self.unpinned_cohort(request)
        if refusal:
            return TrainDeclined(self.identity.name, refusal, self.epsilon_spent())
        self._load_request_model(request.model, request.model_ref)
        # Training moves these shards away from the committed objects: the next request
        # reloads them, so the node never evaluates or trains from its own unaggregated
        # update (a shard whose aggregate was not committed keeps its old object id).
        for shard in request.shards:
            self._loaded.pop(shard, None)
        common = dict(
            aux_coef=self.cfg.model.aux_loss_coef,
            rng=self._rng(request.hparams.seed, request.round),
        )
        if not self.identity.dp:
            if request.secagg is not None and self._masked_sent(request.run, request.round):
                return TrainDeclined(self.identity.name, self._sent_once(request.run, request.round), 0.0)
            result = train_shards(
                self.policy, self.identity.embodiment, self.train_windows, request.shards, request.hparams, **common
            )
            # FedAvg needs scale, not the member's exact count: the weight (and the signed
            # advert that carries it) is the coarse count the query answers with.
            result.num_examples = coarse_count(result.num_examples)
            return self._reply(request, result, receipt="")
        if request.secagg is not None and self._can_resend(request.run, request.round):
            return self._resend(request)

        decision = self._dp_round(
            request.run, request.round, request.hparams, request.planned_rounds, ledger_head=request.ledger_head
        )
        if isinstance(decision, str):
            return TrainDeclined(self.identity.name, decision, self.epsilon_spent())
        sigma, sample_rate, allowance = decision
        if self.privacy_overrides:
            # WARNING: a ClientApp process (and the executor) logs nothing below it.
            log.warning(
                "member %s trains round %d under its own %s",
                self.identity.name,
                request.round,
                ", ".join(f"{name} {own} (the run asks {run})" for name, (own, run) in self.privacy_overrides.items()),
            )
        dp = DPConfig(
            noise_multiplier=sigma,
            max_grad_norm=request.hparams.max_grad_norm,
            sample_rate=sample_rate,
            mode=DEFAULT_MODE,
        )
        receipt = self.ledger.append(
            at=arrived,
            # The budget this release is planned under, declared before it (once).
            budget=(self.budget.epsilon, self.budget.delta),
            run=request.run,
            round=request.round,
            member=self.identity.name,
            shards=sorted(request.shards),
            privacy_unit="episode",
            mechanism={
                "noise_multiplier": sigma,
                "sample_rate": sample_rate,
                "steps": allowance.steps,
                "clipping_norm": dp.max_grad_norm,
                "opacus_mode": dp.mode,
                "noise_source": NOISE_SOURCE,
            },
            dataset_fingerprint=self.dataset_fingerprint(),
            epsilon=allowance.epsilon_after,
            delta=self.budget.delta,
            accountant=self.cfg.privacy.accountant,
            decision=allowance.decision,
        )
        hparams = replace(request.hparams, local_steps=allowance.steps)
        if self.workers > 1:
            result = train_shards_parallel(
                self.policy,
                self.identity.embodiment,
                self.train_episodes,
                request.shards,
                hparams,
                dp=dp,
                workers=self.workers,
                aux_coef=common["aux_coef"],
                seed=int(common["rng"].integers(2**63)),
                device_type=self.device.type,
                physical_batch=self.cfg.train.physical_batch,
            )
        else:
            result = train_shards(
                self.policy,
                self.identity.embodiment,
                self.train_windows,
                request.shards,
                hparams,
                dp=dp,
                physical_batch=self.cfg.train.physical_batch,
                **common,
            )
        # Under DP only the noised deltas may carry information about the data: the training
        # loss is not noised and the dataset size is not public, so neither is sent (NaN loss,
        # 0 examples: the coordinator then weighs the round's contributions equally).
        result.loss = float("nan")
        result.num_examples = 0
        return self._reply(request, result, receipt=receipt_to_json(receipt))

    def _can_resend(self, run: str, round_number: int) -> bool:
        return self.ledger.find(run, round_number) is not None and self.secagg.can_resend(run, round_number)

    def _resend(self, request: TrainRequest) -> TrainReply | TrainDeclined:
        """A round this node trained, whose update never left masked (the coordinator restarted
        mid-round and sends the round again): the kept update under the new session's keys,
        with the round's receipt, spending nothing. Declining, as before, would throw away the
        budget the round already cost, and the resumed round would train without this member.
        Sent only for the very round it was trained for: the same shards, from the same model."""
        rollback = self.rolled_back(request.ledger_head)
        if rollback:
            return TrainDeclined(self.identity.name, rollback, self.epsilon_spent())
        entry = self.ledger.find(request.run, request.round)
        kept = self.secagg.resendable(request.run, request.round)
        assert entry is not None and kept is not None
        vectors, base = kept
        shards = sorted(request.shards)
        if entry["shards"] != shards or sorted(vectors) != shards or base != _model_base(request.model_ref):
            reason = (
                f"round {request.round} of run {request.run} was already trained, for shards {entry['shards']}"
                f"{'' if base == _model_base(request.model_ref) else ' from another model'}; the round sent again "
                f"asks for {shards}: sitting it out (training again would spend the budget twice)"
            )
            return TrainDeclined(self.identity.name, reason, self.epsilon_spent())
        # WARNING: the member should see it (a ClientApp process logs nothing below that), and
        # it means the coordinator restarted in the middle of a round.
        log.warning(
            "%s: round %d of run %s sent again (the coordinator restarted, or the run was stopped and resumed, "
            "mid-round): its kept update, nothing spent",
            self.identity.name,
            request.round,
            request.run,
        )
        advert = self.secagg.resend(request.run, request.round, request.secagg)
        return TrainReply(
            member=self.identity.name,
            shards=list(request.shards),
            deltas={},
            num_examples=0,
            loss=float("nan"),
            steps=int(entry["mechanism"]["steps"]),
            receipt=receipt_to_json(entry),
            advert=advert,
        )

    def _reply(self, request: TrainRequest, result, receipt: str) -> TrainReply:
        deltas, advert = result.deltas, None
        if request.secagg is not None:
            # The update stays on this node; only its masked form leaves, in a later stage.
            advert = self.secagg.begin(
                request.run,
                request.round,
                request.secagg,
                deltas,
                base=_model_base(request.model_ref),
                weight=result.num_examples,
            )
            deltas = {}
        else:
            note_sent(self.identity.state_dir, request.run, request.round, PLAIN)
        return TrainReply(
            member=self.identity.name,
            shards=list(request.shards),
            deltas=deltas,
            num_examples=result.num_examples,
            loss=result.loss,
            steps=result.steps,
            receipt=receipt,
            advert=advert,
        )

    # ------------------------------------------------------------------ secure aggregation
    def _masked_sent(self, run: str, round_number: int) -> bool:
        return (sent_updates(self.identity.state_dir) or {}).get(release_key(run, round_number)) == MASKED

    @staticmethod
    def _sent_once(run: str, round_number: int) -> str:
        """Why a node without DP masks a round's update once. It retrains a round to the same
        update (no ledger stops it, and its generator is seeded by the round): masked again in
        other cohorts, the sums solve for it. A review recovered one member's exact update from
        four sessions. Without secure aggregation its update left in the clear the first time,
        so sending it again (a coordinator resuming the round) tells nothing new."""
        return (
            f"round {round_number} of run {run}: this node (without DP) already sent its masked update, and masks "
            "a round's update once"
        )

    def share_keys(self, request: ShareKeysRequest) -> ShareKeysReply:
        return self.secagg.share_keys(request)

    def masked_input(self, request: MaskedInputRequest) -> MaskedInputReply:
        if not self.identity.dp and self._masked_sent(request.run, request.round):
            raise ProtocolError(self._sent_once(request.run, request.round))
        reply = self.secagg.masked_input(request)
        note_sent(self.identity.state_dir, request.run, request.round, MASKED)
        return reply

    def consistency(self, request: ConsistencyRequest) -> ConsistencyReply:
        return self.secagg.consistency(request)

    def unmask(self, request: UnmaskRequest) -> UnmaskReply:
        return self.secagg.unmask(request)

    # ------------------------------------------------------------------ evaluate
    def evaluate(self, request: EvaluateRequest, arrived: dt.datetime | None = None) -> EvaluateReply:
        """``arrived``: as for :meth:`train`."""
        arrived = arrived or dt.datetime.now(dt.UTC)
        refusal = (
            (
                self.rolled_back(request.ledger_head)
                or self.plans.evaluation_follows_training(request.run, request.round)
                or self.plans.evaluation_pace(request.run, request.round)
                or self.plans.evaluation_room_unless_released(request.run, request.round)
            )
            if self.identity.dp
            else ""
        )
        if refusal:
            return EvaluateReply(self.identity.name, 0, float("nan"), float("nan"), withheld=refusal)
        self._load_request_model(request.model, request.model_ref)
        result = evaluate(
            self.policy,
            self.identity.embodiment,
            self.held_windows,
            per_episode=self.cfg.train.eval_windows_per_episode,
        )
        if not self.identity.dp:
            if result.num_examples == 0:
                raise ValueError("no held-out episodes to evaluate")
            return EvaluateReply(
                member=self.identity.name,
                num_examples=coarse_count(result.num_examples),  # a weight for the mean, as in training
                action_mse=result.action_mse,
                action_mae=result.action_mae,
            )
        released, receipt, withheld = self.eval_releaser.release(request.run, request.round, result, arrived=arrived)
        if released is None:
            return EvaluateReply(self.identity.name, 0, float("nan"), float("nan"), withheld=withheld)
        return EvaluateReply(
            member=self.identity.name,
            num_examples=released.episodes,
            action_mse=released.action_mse,
            action_mae=float("nan"),  # not released: one noised metric costs less than two
            receipt=receipt,
        )
