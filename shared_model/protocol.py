"""The message protocol between coordinator and member nodes, defined once.

The coordinator and the member node never import each other; both import this module. Each
message kind has a typed request and reply with ``to_content`` (build a Flower RecordDict)
and ``from_content`` (parse *and validate* one). Anything that does not validate raises
:class:`ProtocolError`, which the node turns into an error reply instead of crashing, before
touching its data or ledger.

Flower routes ``"<category>.<action>"`` message types to ``@app.<category>(action)``; the
category must be one of ``query``, ``train``, ``evaluate``.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord, RecordDict
from flwr.common.constant import SType

from shared_model.config import SECAGG_MAX_COHORT

QUERY = "query"
TRAIN = "train"
EVALUATE = "evaluate"
SEATING = f"{QUERY}.seating"

# Record names inside each message's RecordDict.
REC_REQUEST = "kyodo.request"
REC_REPLY = "kyodo.reply"
REC_METRICS = "kyodo.metrics"
REC_MODEL = "kyodo.model"
REC_MANIFEST = "kyodo.manifest"  # shard id -> object id of the model the request is about
REC_OBJECTS = "kyodo.objects"  # the shard objects (safetensors bytes) the node lacks
REC_DELTA = "kyodo.delta"
REC_DECLINED = "kyodo.declined"

# Error codes carried by Flower error replies (``Message(Error(code, reason), reply_to=...)``).
ERR_INVALID_REQUEST = 4001
ERR_NODE_CONFIG = 4002
ERR_DATA = 4003
ERR_INTERNAL = 5000

_SHARD_RE = re.compile(r"^(backbone|adapter/shared|adapter/emb/[A-Za-z0-9_\-]+|expert/L\d+/E\d+)\Z")
# Patterns end in \Z, not $: "$" also matches before a final newline, so "run\n" passed as a
# name. Names become path components on nodes (a run's secure-aggregation state is secagg/<run>/):
# "." and ".." are refused, as a review's run id ".." put private keys outside secagg/.
_NAME_RE = re.compile(r"^(?!\.+\Z)[A-Za-z0-9_\-\.]{1,64}\Z")

# Upper bounds that no sane request exceeds; a request outside them is refused, not obeyed.
MAX_LOCAL_STEPS = 100_000
MAX_BATCH_SIZE = 65_536
MAX_OBJECTS = 10_000_000
MAX_REASON = 500  # characters of a node's free-text reason kept (it ends up in logs)
MAX_MEMBERS = 10_000  # names in a consortium roster or a pinned consortium file
_OBJECT_ID_RE = re.compile(r"^[0-9a-f]{64}\Z")


class ProtocolError(ValueError):
    """A message does not follow the protocol; the text says which field and why."""


def _require(record: Mapping, key: str, kinds: type | tuple[type, ...], where: str):
    if key not in record:
        raise ProtocolError(f"{where}: missing field {key!r}")
    value = record[key]
    if isinstance(value, bool) and bool not in (kinds if isinstance(kinds, tuple) else (kinds,)):
        raise ProtocolError(f"{where}: field {key!r} has type bool, expected {kinds}")
    if not isinstance(value, kinds):
        raise ProtocolError(f"{where}: field {key!r} has type {type(value).__name__}, expected {kinds}")
    return value


def _round_number(record: Mapping, where: str) -> int:
    rnd = _require(record, "round", int, where)
    if rnd < 0:
        raise ProtocolError(f"{where}: round must be >= 0")
    return rnd


def _run_id(record: Mapping, where: str) -> str:
    run = _require(record, "run", str, where)
    if not _NAME_RE.match(run):
        raise ProtocolError(f"{where}: run id {run!r} is not valid")
    return run


def _config(content: RecordDict, name: str, where: str) -> ConfigRecord:
    if name not in content.config_records:
        raise ProtocolError(f"{where}: missing config record {name!r}")
    return content.config_records[name]


def _metrics(content: RecordDict, name: str, where: str) -> MetricRecord:
    if name not in content.metric_records:
        raise ProtocolError(f"{where}: missing metric record {name!r}")
    return content.metric_records[name]


def validate_shard_ids(shards: list[str], where: str) -> list[str]:
    if len(set(shards)) != len(shards):
        raise ProtocolError(f"{where}: shard list has duplicates")
    for shard in shards:
        if not isinstance(shard, str) or not _SHARD_RE.match(shard):
            raise ProtocolError(f"{where}: {shard!r} is not a valid shard id")
    return list(shards)


def _finite_positive(value: float, key: str, where: str, allow_zero: bool = False) -> float:
    if not math.isfinite(value) or value < 0 or (value == 0 and not allow_zero):
        raise ProtocolError(
            f"{where}: field {key!r} must be a finite {'non-negative' if allow_zero else 'positive'} number"
        )
    return float(value)


def tensors_to_record(tensors: Mapping[str, torch.Tensor]) -> ArrayRecord:
    """Pack named tensors; contiguous CPU copies so Flower can serialise them."""
    return ArrayRecord({k: v.detach().to("cpu").contiguous() for k, v in tensors.items()})


def record_to_tensors(record: ArrayRecord, where: str) -> dict[str, torch.Tensor]:
    """Unpack and check every tensor is finite: a NaN never enters a model or an aggregate."""
    out: dict[str, torch.Tensor] = {}
    for name, array in record.items():
        arr = array.numpy()
        if arr.dtype.kind == "f" and not np.isfinite(arr).all():
            raise ProtocolError(f"{where}: tensor {name!r} has non-finite values")
        out[name] = torch.from_numpy(np.ascontiguousarray(arr))
    return out


def _arrays(content: RecordDict, name: str, where: str) -> dict[str, torch.Tensor]:
    if name not in content.array_records:
        raise ProtocolError(f"{where}: missing array record {name!r}")
    return record_to_tensors(content.array_records[name], where)


# ------------------------------------------------------------------------------ model transfer
@dataclass
class ModelRef:
    """A model by reference: its round manifest (shard id -> content-addressed object id) and
    the objects the node does not hold yet. The node checks every object's sha256 on receipt;
    what it already holds is never sent again (incremental sync)."""

    manifest: dict[str, str]
    objects: dict[str, bytes] = field(default_factory=dict, repr=False)

    def nbytes(self) -> int:
        return sum(len(b) for b in self.objects.values())


def _model_to_content(model: dict[str, torch.Tensor] | None, ref: ModelRef | None) -> dict:
    if ref is not None:
        objects = ArrayRecord({oid: Array(np.frombuffer(data, dtype=np.uint8)) for oid, data in ref.objects.items()})
        return {REC_MANIFEST: ConfigRecord({"shards": json.dumps(ref.manifest, sort_keys=True)}), REC_OBJECTS: objects}
    if model is None:
        raise ProtocolError("a request needs a model or a model reference")
    return {REC_MODEL: tensors_to_record(model)}


def _model_from_content(content: RecordDict, where: str) -> tuple[dict[str, torch.Tensor] | None, ModelRef | None]:
    if REC_MANIFEST not in content.config_records:
        return _arrays(content, REC_MODEL, where), None
    try:
        manifest = json.loads(_require(content.config_records[REC_MANIFEST], "shards", str, where))
    except json.JSONDecodeError as err:
        raise ProtocolError(f"{where}: manifest is not JSON: {err}") from None
    if not isinstance(manifest, dict) or not manifest:
        raise ProtocolError(f"{where}: manifest must map shard ids to object ids")
    validate_shard_ids(list(manifest), where)
    for shard, oid in manifest.items():
        if not isinstance(oid, str) or not _OBJECT_ID_RE.match(oid):
            raise ProtocolError(f"{where}: object id of {shard} is not a sha256 hex digest")
    objects: dict[str, bytes] = {}
    if REC_OBJECTS in content.array_records:
        for oid, array in content.array_records[REC_OBJECTS].items():
            if not _OBJECT_ID_RE.match(oid):
                raise ProtocolError(f"{where}: object name {oid!r} is not a sha256 hex digest")
            arr = array.numpy()
            if arr.dtype != np.uint8 or arr.ndim != 1:
                raise ProtocolError(f"{where}: object {oid[:12]} must be a 1-D uint8 array")
            objects[oid] = arr.tobytes()
    stray = set(objects) - set(manifest.values())
    if stray:
        raise ProtocolError(f"{where}: objects {sorted(stray)[:3]} are not in the manifest")
    return None, ModelRef(manifest, objects)


# ------------------------------------------------------------------------------ query
@dataclass
class QueryRequest:
    """Who is there, and (with ``hparams``) whether each node could train this round.

    The round's run, hyper-parameters and planned rounds let a DP node run the very decision
    it would make on a train request (noise plan, budget check) and answer ``can_train``
    exactly: a node that would decline is then left out of the cohorts instead of breaking
    one it was counted in (secure aggregation needs min_cohort members who actually train).
    """

    round: int
    run: str = ""
    hparams: TrainHyperParams | None = None
    planned_rounds: int = 1
    ledger_head: str = ""  # as in TrainRequest: the newest of the member's receipts the coordinator holds
    # The consortium's members as the coordinator registered them (deployment; [] in a
    # simulation): a node pinned to an older consortium file tells its own member which it lacks.
    roster: list[str] = field(default_factory=list)

    def to_content(self) -> RecordDict:
        request: dict = {"round": self.round}
        if self.roster:
            request["roster"] = list(self.roster)
        if self.hparams is not None:
            request.update(
                run=self.run,
                planned_rounds=self.planned_rounds,
                ledger_head=self.ledger_head,
                **self.hparams.to_record(),
            )
        return RecordDict({REC_REQUEST: ConfigRecord(request)})

    @classmethod
    def from_content(cls, content: RecordDict) -> QueryRequest:
        where = "query request"
        rec = _config(content, REC_REQUEST, where)
        rnd = _round_number(rec, where)
        roster = _member_names(rec.get("roster", []), "roster", where)
        if "run" not in rec:
            return cls(round=rnd, roster=roster)
        run, planned = _run_and_planned_rounds(rec, where)
        return cls(
            round=rnd,
            run=run,
            hparams=TrainHyperParams.from_record(rec, where),
            planned_rounds=planned,
            ledger_head=_ledger_head(rec, where),
            roster=roster,
        )


def _member_names(values: object, name: str, where: str) -> list[str]:
    if not isinstance(values, list) or len(values) > MAX_MEMBERS:
        raise ProtocolError(f"{where}: {name} must be a list of at most {MAX_MEMBERS} member names")
    if not all(isinstance(v, str) and _NAME_RE.match(v) for v in values):
        raise ProtocolError(f"{where}: {name} holds an invalid member name")
    return list(values)


def _object_list(values: list, where: str) -> list[str]:
    if len(values) > MAX_OBJECTS:
        raise ProtocolError(f"{where}: {len(values)} objects exceed {MAX_OBJECTS}")
    for oid in values:
        if not isinstance(oid, str) or not _OBJECT_ID_RE.match(oid):
            raise ProtocolError(f"{where}: {oid!r} is not an object id (sha256 hex)")
    return list(values)


def coarse_count(n: int) -> int:
    """Round a dataset size down to one significant figure (e.g. 1234 -> 1000).

    The planner needs scale, not the exact count; the exact count is the member's business.
    """
    if n < 10:
        return n
    magnitude = 10 ** int(math.floor(math.log10(n)))
    return (n // magnitude) * magnitude


@dataclass
class QueryReply:
    member: str
    embodiments: list[str]
    episodes: int  # coarse (one significant figure); 0 under DP: the size is private
    public_key: str = ""  # hex Ed25519 key that signs the member's privacy receipts
    epsilon_spent: float = 0.0
    epsilon_budget: float = 0.0
    can_train: bool = True  # False when the remaining budget cannot pay for a useful round
    objects: list[str] = field(default_factory=list)  # shard objects held in the node's replica
    reason: str = ""  # why can_train is False, in the member's words (shown in the coordinator's log)
    # The members whose identity keys the node pinned (its copy of the consortium's public
    # file; [] if none): secure aggregation with anyone else would be refused at share keys,
    # after the training, so the coordinator seats only members that pinned each other.
    pinned: list[str] = field(default_factory=list)

    def to_content(self) -> RecordDict:
        return RecordDict(
            {
                REC_REPLY: ConfigRecord(
                    {
                        "member": self.member,
                        "embodiments": list(self.embodiments),
                        "episodes": self.episodes,
                        "public_key": self.public_key,
                        "epsilon_spent": float(self.epsilon_spent),
                        "epsilon_budget": float(self.epsilon_budget),
                        "can_train": bool(self.can_train),
                        "objects": list(self.objects),
                        "reason": self.reason[:MAX_REASON],
                        "pinned": list(self.pinned),
                    }
                )
            }
        )

    @classmethod
    def from_content(cls, content: RecordDict) -> QueryReply:
        where = "query reply"
        rec = _config(content, REC_REPLY, where)
        member = _require(rec, "member", str, where)
        if not _NAME_RE.match(member):
            raise ProtocolError(f"{where}: member name {member!r} is not valid")
        embodiments = list(_require(rec, "embodiments", list, where))
        if not embodiments or not all(isinstance(e, str) and _NAME_RE.match(e) for e in embodiments):
            raise ProtocolError(f"{where}: embodiments must be a non-empty list of names")
        episodes = _require(rec, "episodes", int, where)
        public_key = _require(rec, "public_key", str, where)
        if public_key and not re.fullmatch(r"[0-9a-f]{64}", public_key):
            raise ProtocolError(f"{where}: public_key must be 64 lowercase hex characters")
        spent = float(_require(rec, "epsilon_spent", (int, float), where))
        budget = float(_require(rec, "epsilon_budget", (int, float), where))
        return cls(
            member=member,
            embodiments=embodiments,
            episodes=episodes,
            public_key=public_key,
            epsilon_spent=spent,
            epsilon_budget=budget,
            can_train=_require(rec, "can_train", bool, where),
            objects=_object_list(_require(rec, "objects", list, where), where),
            reason=str(rec.get("reason", ""))[:MAX_REASON],
            pinned=_member_names(rec.get("pinned", []), "pinned", where),
        )


@dataclass
class SeatingNotice:
    """Tells a node that could train why the coordinator left it out of a round.

    A member admitted before the others re-pinned the consortium's file answers every query
    with ``can_train`` and its file is the newest, so nothing on its own node says why it is
    never asked to train: only the operator's round record did. The notice carries names, not
    the coordinator's text, so the node words its own log line and a coordinator cannot put
    arbitrary text in the member's log."""

    round: int
    run: str
    # Members whose pinned consortium file does not list this one: until they re-pin it and
    # restart, secure aggregation with them would be refused, so this member sits out.
    not_pinned_by: list[str]

    def to_content(self) -> RecordDict:
        request = {"round": self.round, "run": self.run, "not_pinned_by": list(self.not_pinned_by)}
        return RecordDict({REC_REQUEST: ConfigRecord(request)})

    @classmethod
    def from_content(cls, content: RecordDict) -> SeatingNotice:
        where = "seating notice"
        rec = _config(content, REC_REQUEST, where)
        rnd, run = _round_number(rec, where), _run_id(rec, where)
        names = _member_names(_require(rec, "not_pinned_by", list, where), "not_pinned_by", where)
        if not names:
            raise ProtocolError(f"{where}: not_pinned_by names no member")
        return cls(round=rnd, run=run, not_pinned_by=names)


@dataclass
class SeatingNoted:
    """The node's answer to a :class:`SeatingNotice`: it logged it (nothing else is sent)."""

    member: str

    def to_content(self) -> RecordDict:
        return RecordDict({REC_REPLY: ConfigRecord({"member": self.member})})

    @classmethod
    def from_content(cls, content: RecordDict) -> SeatingNoted:
        where = "seating notice reply"
        member = _require(_config(content, REC_REPLY, where), "member", str, where)
        if not _NAME_RE.match(member):
            raise ProtocolError(f"{where}: member name {member!r} is not valid")
        return cls(member)


# ------------------------------------------------------------------------------ train
@dataclass
class TrainHyperParams:
    lr: float
    local_steps: int
    batch_size: int
    weight_decay: float = 0.0
    seed: int = 0
    max_grad_norm: float = 1.0  # DP-SGD clipping norm C, shared by the cohort
    sample_rate: float = 0.0  # DP-SGD's public Poisson rate q; DP nodes decline 0 (none named)

    def to_record(self) -> dict:
        return {
            "lr": float(self.lr),
            "local_steps": int(self.local_steps),
            "batch_size": int(self.batch_size),
            "weight_decay": float(self.weight_decay),
            "seed": int(self.seed),
            "max_grad_norm": float(self.max_grad_norm),
            "sample_rate": float(self.sample_rate),
        }

    @classmethod
    def from_record(cls, rec: Mapping, where: str) -> TrainHyperParams:
        lr = _finite_positive(_require(rec, "lr", float, where), "lr", where)
        steps = _require(rec, "local_steps", int, where)
        batch = _require(rec, "batch_size", int, where)
        if not 1 <= steps <= MAX_LOCAL_STEPS:
            raise ProtocolError(f"{where}: local_steps {steps} outside 1..{MAX_LOCAL_STEPS}")
        if not 1 <= batch <= MAX_BATCH_SIZE:
            raise ProtocolError(f"{where}: batch_size {batch} outside 1..{MAX_BATCH_SIZE}")
        wd = _finite_positive(_require(rec, "weight_decay", float, where), "weight_decay", where, allow_zero=True)
        seed = _require(rec, "seed", int, where)
        clip = _finite_positive(_require(rec, "max_grad_norm", float, where), "max_grad_norm", where)
        rate = rec.get("sample_rate", 0.0)  # absent from older coordinators' requests
        if isinstance(rate, bool) or not isinstance(rate, int | float) or not 0 <= rate <= 1:
            raise ProtocolError(f"{where}: sample_rate must be a number in [0, 1], got {rate!r}")
        return cls(
            lr=lr, local_steps=steps, batch_size=batch, weight_decay=wd, seed=seed, max_grad_norm=clip,
            sample_rate=float(rate),
        )  # fmt: skip


def _run_and_planned_rounds(rec: Mapping, where: str) -> tuple[str, int]:
    run = _run_id(rec, where)
    planned = _require(rec, "planned_rounds", int, where)
    if not 1 <= planned <= 1_000_000:
        raise ProtocolError(f"{where}: planned_rounds {planned} outside 1..1000000")
    return run, planned


def _ledger_head(rec: Mapping, where: str) -> str:
    """The optional ``ledger_head``: '' or the 64-hex hash of a ledger entry (older requests lack it)."""
    head = rec.get("ledger_head", "")
    if not isinstance(head, str) or not (head == "" or re.fullmatch(r"[0-9a-f]{64}", head)):
        raise ProtocolError(f"{where}: ledger_head must be '' or 64 lowercase hex characters")
    return head


@dataclass
class TrainRequest:
    round: int
    shards: list[str]
    hparams: TrainHyperParams
    model: dict[str, torch.Tensor] | None = field(repr=False)  # the model itself (tests, benches) ...
    run: str = "run"
    planned_rounds: int = 1  # lets a node spread its budget over the run; it never raises it
    model_ref: ModelRef | None = field(default=None, repr=False)  # ... or by reference (what rounds send)
    secagg: SecAggSetup | None = None  # None: reply with plaintext deltas (debugging only)
    # Hash of the newest entry of this member's ledger that the coordinator holds a receipt
    # of ('' for none): a node whose ledger lacks it was rolled back and declines.
    ledger_head: str = ""

    def to_content(self) -> RecordDict:
        request = {
            "round": self.round,
            "shards": list(self.shards),
            "run": self.run,
            "planned_rounds": self.planned_rounds,
            "ledger_head": self.ledger_head,
            "secagg": self.secagg.to_json() if self.secagg else "",
            **self.hparams.to_record(),
        }
        return RecordDict({REC_REQUEST: ConfigRecord(request), **_model_to_content(self.model, self.model_ref)})

    @classmethod
    def from_content(cls, content: RecordDict) -> TrainRequest:
        where = "train request"
        rec = _config(content, REC_REQUEST, where)
        rnd = _round_number(rec, where)
        if rnd < 1:
            raise ProtocolError(f"{where}: a training round is numbered from 1, got {rnd}")
        shards = validate_shard_ids(list(_require(rec, "shards", list, where)), where)
        if not shards:
            raise ProtocolError(f"{where}: no shards assigned")
        hparams = TrainHyperParams.from_record(rec, where)
        run, planned = _run_and_planned_rounds(rec, where)
        secagg_text = _require(rec, "secagg", str, where)
        secagg = SecAggSetup.from_json(secagg_text, where) if secagg_text else None
        if secagg is not None:
            covered = {s for g in secagg.groups for s in g.shards}
            if not set(shards) <= covered:
                raise ProtocolError(f"{where}: shards {sorted(set(shards) - covered)} are in no secagg group")
        model, ref = _model_from_content(content, where)
        return cls(
            round=rnd,
            shards=shards,
            hparams=hparams,
            model=model,
            run=run,
            planned_rounds=planned,
            secagg=secagg,
            model_ref=ref,
            ledger_head=_ledger_head(rec, where),
        )


@dataclass
class TrainReply:
    member: str
    shards: list[str]
    deltas: dict[str, torch.Tensor] = field(repr=False)
    num_examples: int
    loss: float
    steps: int
    receipt: str = ""  # the signed privacy-ledger entry of this round (JSON); "" without DP
    # Under secure aggregation: the node's key advertisement, and no deltas (they follow masked).
    advert: KeyAdvert | None = None

    def to_content(self) -> RecordDict:
        advert = json.dumps(self.advert.to_json()) if self.advert else ""
        return RecordDict(
            {
                REC_REPLY: ConfigRecord(
                    {"member": self.member, "shards": list(self.shards), "receipt": self.receipt, "advert": advert}
                ),
                REC_DELTA: tensors_to_record(self.deltas),
                REC_METRICS: MetricRecord(
                    {"num-examples": int(self.num_examples), "loss": float(self.loss), "steps": int(self.steps)}
                ),
            }
        )

    @classmethod
    def from_content(cls, content: RecordDict) -> TrainReply:
        where = "train reply"
        rec = _config(content, REC_REPLY, where)
        metrics = _metrics(content, REC_METRICS, where)
        num_examples = _require(metrics, "num-examples", int, where)
        if num_examples < 0:
            raise ProtocolError(f"{where}: num-examples must be >= 0 (0: withheld under DP)")
        loss = float(_require(metrics, "loss", (int, float), where))
        advert_text = _require(rec, "advert", str, where)
        advert = None
        if advert_text:
            try:
                advert = KeyAdvert.from_json(json.loads(advert_text), where)
            except json.JSONDecodeError as err:
                raise ProtocolError(f"{where}: advert is not JSON: {err}") from None
        return cls(
            member=_require(rec, "member", str, where),
            shards=validate_shard_ids(list(_require(rec, "shards", list, where)), where),
            deltas=_arrays(content, REC_DELTA, where),
            num_examples=num_examples,
            loss=loss,
            steps=_require(metrics, "steps", int, where),
            receipt=_require(rec, "receipt", str, where),
            advert=advert,
        )


@dataclass
class TrainDeclined:
    """The node sits this round out (its budget cannot pay for it); not an error."""

    member: str
    reason: str
    epsilon_spent: float

    def to_content(self) -> RecordDict:
        return RecordDict(
            {
                REC_DECLINED: ConfigRecord(
                    {"member": self.member, "reason": self.reason, "epsilon_spent": float(self.epsilon_spent)}
                )
            }
        )

    @staticmethod
    def is_declined(content: RecordDict) -> bool:
        return REC_DECLINED in content.config_records

    @classmethod
    def from_content(cls, content: RecordDict) -> TrainDeclined:
        where = "train declined"
        rec = _config(content, REC_DECLINED, where)
        return cls(
            member=_require(rec, "member", str, where),
            reason=_require(rec, "reason", str, where),
            epsilon_spent=float(_require(rec, "epsilon_spent", (int, float), where)),
        )


# ------------------------------------------------------------------------------ evaluate
@dataclass
class EvaluateRequest:
    round: int
    model: dict[str, torch.Tensor] | None = field(repr=False)
    model_ref: ModelRef | None = field(default=None, repr=False)
    # The run the evaluated model belongs to: a node under DP records its release of the
    # held-out error in its ledger under (run, round), and answers a re-sent request from it.
    run: str = ""
    ledger_head: str = ""  # as in TrainRequest

    def to_content(self) -> RecordDict:
        return RecordDict(
            {
                REC_REQUEST: ConfigRecord({"round": self.round, "run": self.run, "ledger_head": self.ledger_head}),
                **_model_to_content(self.model, self.model_ref),
            }
        )

    @classmethod
    def from_content(cls, content: RecordDict) -> EvaluateRequest:
        where = "evaluate request"
        rec = _config(content, REC_REQUEST, where)
        rnd = _round_number(rec, where)
        run = _run_id(rec, where) if rec.get("run") else ""  # a review's run id was 2 MB and two log lines
        model, ref = _model_from_content(content, where)
        return cls(round=rnd, model=model, model_ref=ref, run=run, ledger_head=_ledger_head(rec, where))


@dataclass
class EvaluateReply:
    """A member's held-out error on the model it was sent.

    Without DP the values are exact. Under DP they are a private release
    (``privacy.eval_release``): ``action_mse`` and ``num_examples`` (held-out episodes) are
    noised, ``action_mae`` is NaN (not released) and ``receipt`` is the signed ledger entry
    that accounts for the release. ``withheld`` says why a node released nothing (its budget
    cannot pay for it, or the member releases no evaluation); the metrics are then NaN / 0.
    """

    member: str
    num_examples: int
    action_mse: float  # in normalised action units (comparable across embodiments)
    action_mae: float  # in the embodiment's physical units; NaN when not released
    receipt: str = ""
    withheld: str = ""

    @property
    def released(self) -> bool:
        return not self.withheld

    def to_content(self) -> RecordDict:
        return RecordDict(
            {
                REC_REPLY: ConfigRecord({"member": self.member, "receipt": self.receipt, "withheld": self.withheld}),
                REC_METRICS: MetricRecord(
                    {
                        "num-examples": int(self.num_examples),
                        "action-mse": float(self.action_mse),
                        "action-mae": float(self.action_mae),
                    }
                ),
            }
        )

    @classmethod
    def from_content(cls, content: RecordDict) -> EvaluateReply:
        where = "evaluate reply"
        metrics = _metrics(content, REC_METRICS, where)
        rec = _config(content, REC_REPLY, where)
        mse = float(_require(metrics, "action-mse", (int, float), where))
        mae = float(_require(metrics, "action-mae", (int, float), where))
        receipt = _require(rec, "receipt", str, where) if "receipt" in rec else ""
        withheld = _require(rec, "withheld", str, where) if "withheld" in rec else ""
        if math.isinf(mse) or math.isinf(mae) or (math.isnan(mse) and not withheld):
            raise ProtocolError(f"{where}: metrics must be finite (action-mae may be NaN: not released)")
        return cls(
            member=_require(rec, "member", str, where),
            num_examples=_require(metrics, "num-examples", int, where),
            action_mse=mse,
            action_mae=mae,
            receipt=receipt,
            withheld=withheld,
        )


# ------------------------------------------------------------------------------ secure aggregation
# SecAgg+ (Bell et al. 2020) runs inside the train stage: the train reply carries the node's
# key advertisement instead of its deltas, then three more exchanges follow. Flower routes
# "train.<action>" to ``@app.train("<action>")``.
SECAGG_SHARE_KEYS = "train.share_keys"
SECAGG_MASKED_INPUT = "train.masked_input"
SECAGG_CONSISTENCY = "train.consistency"
SECAGG_UNMASK = "train.unmask"
REC_SECAGG = "kyodo.secagg"
REC_MASKED = "kyodo.masked"

MAX_SECAGG_JSON = 16 * 1024 * 1024  # a setup or share bundle larger than this is refused
_HEX_RE = re.compile(r"^(?:[0-9a-f]{2})*\Z")
_GROUP_RE = re.compile(r"^g\d{1,6}\Z")
# A member is in one group per distinct cohort of the shards it trains; ten thousand is far past
# any plan (a member trains a few experts and adapters) and bounds what a reply can make a node parse.
MAX_ADVERT_GROUPS = 10_000


def _name(value: object, what: str, where: str) -> str:
    if not isinstance(value, str) or not _NAME_RE.match(value):
        raise ProtocolError(f"{where}: {what} {value!r} is not a valid name")
    return value


def _hex(value: object, what: str, where: str, size: int | None = None) -> bytes:
    if not isinstance(value, str) or not _HEX_RE.match(value):
        raise ProtocolError(f"{where}: {what} must be lowercase hex")
    raw = bytes.fromhex(value)
    if size is not None and len(raw) != size:
        raise ProtocolError(f"{where}: {what} must be {size} bytes, got {len(raw)}")
    return raw


def _json_body(content: RecordDict, where: str) -> dict:
    rec = _config(content, REC_SECAGG, where)
    body = _require(rec, "body", str, where)
    if len(body) > MAX_SECAGG_JSON:
        raise ProtocolError(f"{where}: body of {len(body)} characters exceeds {MAX_SECAGG_JSON}")
    try:
        parsed = json.loads(body)
    except json.JSONDecodeError as err:
        raise ProtocolError(f"{where}: body is not JSON: {err}") from None
    if not isinstance(parsed, dict):
        raise ProtocolError(f"{where}: body must be a JSON object")
    return parsed


def _body_content(body: dict) -> RecordDict:
    return RecordDict({REC_SECAGG: ConfigRecord({"body": json.dumps(body, sort_keys=True)})})


def _round_run(body: Mapping, where: str) -> tuple[int, str]:
    rnd = body.get("round")
    if not isinstance(rnd, int) or isinstance(rnd, bool) or rnd < 0:
        raise ProtocolError(f"{where}: round must be an integer >= 0")
    return rnd, _name(body.get("run"), "run id", where)


def _names(value: object, what: str, where: str) -> list[str]:
    if not isinstance(value, list):
        raise ProtocolError(f"{where}: {what} must be a list of names")
    names = [_name(v, what, where) for v in value]
    if len(set(names)) != len(names):
        raise ProtocolError(f"{where}: {what} has duplicates")
    return names


@dataclass
class SecAggGroup:
    """Shards that share one cohort, masked and unmasked together.

    ``neighbours`` is the SecAgg+ graph (symmetric, no self loops); a member's secrets are
    Shamir-shared among its neighbours with ``threshold`` needed to recover them. Share ids
    are a member's 1-based position in ``members``. ``quantization`` is
    ``aggregation.secagg.quantize.QuantizationPlan.to_dict()`` for this cohort's size.
    """

    group_id: str
    shards: list[str]
    members: list[str]
    neighbours: dict[str, list[str]]
    threshold: int
    quantization: dict

    def share_id(self, member: str) -> int:
        return self.members.index(member) + 1

    def to_json(self) -> dict:
        return {
            "group_id": self.group_id,
            "shards": list(self.shards),
            "members": list(self.members),
            "neighbours": {m: list(n) for m, n in self.neighbours.items()},
            "threshold": self.threshold,
            "quantization": dict(self.quantization),
        }

    @classmethod
    def from_json(cls, raw: object, where: str) -> SecAggGroup:
        if not isinstance(raw, dict):
            raise ProtocolError(f"{where}: a group must be an object")
        gid = raw.get("group_id")
        if not isinstance(gid, str) or not _GROUP_RE.match(gid):
            raise ProtocolError(f"{where}: group id {gid!r} is not valid (g<number>)")
        where = f"{where} group {gid}"
        shards = validate_shard_ids(list(raw.get("shards") or []), where)
        if not shards:
            raise ProtocolError(f"{where}: no shards")
        members = _names(raw.get("members"), "members", where)
        if not 1 <= len(members) <= SECAGG_MAX_COHORT:
            raise ProtocolError(f"{where}: a group has 1..{SECAGG_MAX_COHORT} members, got {len(members)}")
        neighbours_raw = raw.get("neighbours")
        if not isinstance(neighbours_raw, dict) or set(neighbours_raw) != set(members):
            raise ProtocolError(f"{where}: neighbours must list every member exactly")
        neighbours = {m: _names(n, "neighbours", where) for m, n in neighbours_raw.items()}
        for m, ns in neighbours.items():
            if m in ns or not set(ns) <= set(members):
                raise ProtocolError(f"{where}: neighbours of {m} must be other members of the group")
            for n in ns:
                if m not in neighbours[n]:
                    raise ProtocolError(f"{where}: the graph is not symmetric ({m} -> {n})")
        threshold = raw.get("threshold")
        degree = min(len(n) for n in neighbours.values())
        widest = max(neighbours.values(), key=len)
        if not isinstance(threshold, int) or isinstance(threshold, bool) or threshold < 0:
            raise ProtocolError(f"{where}: threshold must be an integer >= 0")
        if len(members) > 1 and not 1 <= threshold <= degree:
            raise ProtocolError(f"{where}: threshold {threshold} must be in 1..{degree} (the smallest degree)")
        if len(members) > 1 and 2 * threshold <= len(widest):
            # A member answers unmask once, with one of a peer's two secrets; at a threshold of
            # half its neighbours or less, a coordinator that tells half of them the peer
            # dropped and the rest it stayed collects both, and with them the peer's update.
            raise ProtocolError(
                f"{where}: threshold {threshold} is not more than half of a member's {len(widest)} neighbours, "
                "so a coordinator could collect both of a member's secrets"
            )
        quantization = raw.get("quantization")
        if not isinstance(quantization, dict):
            raise ProtocolError(f"{where}: quantization must be an object")
        return cls(gid, shards, members, neighbours, threshold, quantization)


@dataclass
class SecAggSetup:
    """The round's aggregation groups (every shard of the round in exactly one)."""

    groups: list[SecAggGroup]

    def groups_of(self, member: str) -> list[SecAggGroup]:
        return [g for g in self.groups if member in g.members]

    def to_json(self) -> str:
        return json.dumps({"groups": [g.to_json() for g in self.groups]}, sort_keys=True)

    def digest(self) -> bytes:
        """SHA-256 of the canonical JSON: what members sign in their key adverts, so that
        neighbours sent different setups (groups, graphs, thresholds) find out."""
        return hashlib.sha256(self.to_json().encode()).digest()

    @classmethod
    def from_json(cls, text: str, where: str) -> SecAggSetup:
        if len(text) > MAX_SECAGG_JSON:
            raise ProtocolError(f"{where}: secagg setup too large")
        try:
            raw = json.loads(text)
        except json.JSONDecodeError as err:
            raise ProtocolError(f"{where}: secagg setup is not JSON: {err}") from None
        if not isinstance(raw, dict) or not isinstance(raw.get("groups"), list) or not raw["groups"]:
            raise ProtocolError(f"{where}: secagg setup needs a non-empty list of groups")
        groups = [SecAggGroup.from_json(g, where) for g in raw["groups"]]
        ids = [g.group_id for g in groups]
        if len(set(ids)) != len(ids):
            raise ProtocolError(f"{where}: duplicate group ids")
        shards = [s for g in groups for s in g.shards]
        if len(set(shards)) != len(shards):
            raise ProtocolError(f"{where}: a shard is in two groups")
        return cls(groups)


def _advert_weight(value: object, where: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < 1 << 63:
        raise ProtocolError(f"{where}: advert weight must be an integer >= 0")
    return value


@dataclass
class KeyAdvert:
    """A node's X25519 public keys for this round, signed with its Ed25519 identity key: one
    cipher key, and one mask key per aggregation group of more than one member that it is in
    (``aggregation.secagg.keys`` says why each group has its own)."""

    cipher_pk: bytes
    mask_pks: dict[str, bytes]  # group id -> mask public key
    setup_sha256: bytes  # the round's SecAggSetup as this node received it (SecAggSetup.digest)
    weight: int  # the example count the node reported for the round (0: withheld)
    signature: bytes

    def to_json(self) -> dict:
        return {
            "cipher_pk": self.cipher_pk.hex(),
            "mask_pks": {g: pk.hex() for g, pk in self.mask_pks.items()},
            "setup_sha256": self.setup_sha256.hex(),
            "weight": int(self.weight),
            "signature": self.signature.hex(),
        }

    @classmethod
    def from_json(cls, raw: object, where: str) -> KeyAdvert:
        if not isinstance(raw, dict):
            raise ProtocolError(f"{where}: key advert must be an object")
        masks = raw.get("mask_pks")
        if not isinstance(masks, dict) or len(masks) > MAX_ADVERT_GROUPS:
            raise ProtocolError(f"{where}: mask_pks must be an object of at most {MAX_ADVERT_GROUPS} groups")
        for gid in masks:
            if not isinstance(gid, str) or not _GROUP_RE.match(gid):
                raise ProtocolError(f"{where}: mask key for group id {gid!r}, which is not valid (g<number>)")
        return cls(
            _hex(raw.get("cipher_pk"), "cipher_pk", where, 32),
            {gid: _hex(pk, f"mask key of group {gid}", where, 32) for gid, pk in masks.items()},
            _hex(raw.get("setup_sha256"), "setup_sha256", where, 32),
            _advert_weight(raw.get("weight"), where),
            _hex(raw.get("signature"), "signature", where, 64),
        )


@dataclass
class ShareKeysRequest:
    """Stage 2: the adverts of the other members of the node's groups (its neighbours' keys it
    shares with; everyone's signed example count) and their identity keys (which signed the
    adverts, and later sign the survivor sets)."""

    round: int
    run: str
    adverts: dict[str, KeyAdvert]
    identity_keys: dict[str, str]  # member -> hex Ed25519 key announced in query

    def to_content(self) -> RecordDict:
        return _body_content(
            {
                "round": self.round,
                "run": self.run,
                "adverts": {m: a.to_json() for m, a in self.adverts.items()},
                "identity_keys": dict(self.identity_keys),
            }
        )

    @classmethod
    def from_content(cls, content: RecordDict) -> ShareKeysRequest:
        where = "share-keys request"
        body = _json_body(content, where)
        rnd, run = _round_run(body, where)
        adverts_raw, keys_raw = body.get("adverts"), body.get("identity_keys")
        if not isinstance(adverts_raw, dict) or not isinstance(keys_raw, dict):
            raise ProtocolError(f"{where}: adverts and identity_keys must be objects")
        adverts = {_name(m, "member", where): KeyAdvert.from_json(a, where) for m, a in adverts_raw.items()}
        keys = {_name(m, "member", where): _hex(k, "identity key", where, 32).hex() for m, k in keys_raw.items()}
        if not set(adverts) <= set(keys):
            raise ProtocolError(f"{where}: every advert needs its member's identity key")
        return cls(rnd, run, adverts, keys)


@dataclass
class ShareKeysReply:
    """Encrypted share bundles, one per neighbour; the coordinator can only relay them."""

    member: str
    sealed: dict[str, bytes]  # recipient -> AEAD ciphertext

    def to_content(self) -> RecordDict:
        return _body_content({"member": self.member, "sealed": {m: c.hex() for m, c in self.sealed.items()}})

    @classmethod
    def from_content(cls, content: RecordDict) -> ShareKeysReply:
        where = "share-keys reply"
        body = _json_body(content, where)
        sealed = body.get("sealed")
        if not isinstance(sealed, dict):
            raise ProtocolError(f"{where}: sealed must be an object")
        return cls(
            _name(body.get("member"), "member", where),
            {_name(m, "recipient", where): _hex(c, "ciphertext", where) for m, c in sealed.items()},
        )


@dataclass
class MaskedInputRequest:
    """Stage 3: the bundles addressed to this node, who is still in, and its weight per group."""

    round: int
    run: str
    sealed: dict[str, bytes]  # sender -> ciphertext addressed to this node
    # group id -> members that completed share-keys for it (masks are built with them only)
    active: dict[str, list[str]]
    weights: dict[str, float]  # group id -> this node's update scale (its weight / the group's largest)

    def to_content(self) -> RecordDict:
        return _body_content(
            {
                "round": self.round,
                "run": self.run,
                "sealed": {m: c.hex() for m, c in self.sealed.items()},
                "active": {g: list(m) for g, m in self.active.items()},
                "weights": dict(self.weights),
            }
        )

    @classmethod
    def from_content(cls, content: RecordDict) -> MaskedInputRequest:
        where = "masked-input request"
        body = _json_body(content, where)
        rnd, run = _round_run(body, where)
        sealed = body.get("sealed")
        weights = body.get("weights")
        active = body.get("active")
        if not isinstance(sealed, dict) or not isinstance(weights, dict) or not isinstance(active, dict):
            raise ProtocolError(f"{where}: sealed, active and weights must be objects")
        parsed_weights = {}
        for gid, w in weights.items():
            if not isinstance(w, (int, float)) or isinstance(w, bool) or not 0.0 < float(w) <= 1.0:
                raise ProtocolError(f"{where}: weight of {gid!r} must be in (0, 1]")
            parsed_weights[str(gid)] = float(w)
        return cls(
            rnd,
            run,
            {_name(m, "sender", where): _hex(c, "ciphertext", where) for m, c in sealed.items()},
            {str(g): _names(m, "active", where) for g, m in active.items()},
            parsed_weights,
        )


# A masked vector is as large as the shard, so its wire form (the ``.npy`` bytes that
# ``flwr.app.Array`` carries) is written with one copy and read with none. Flower's own
# ``Array(ndarray)`` / ``Array.numpy()`` go through ``np.save`` / ``np.load`` on a BytesIO: three
# copies out and one in. Measured at 10M uint32 entries (median of 7): 85 ms -> 34 ms to build, 15 ms -> 0.1 ms to read
# (bench/secagg.py). The bytes are exactly ``np.save``'s, so ``Array.numpy()`` still reads them.
_NPY_RING_DTYPES = (np.dtype("<u4"), np.dtype("<u8"))


def _npy_array(vector: np.ndarray) -> Array:
    vector = np.ascontiguousarray(vector)
    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(header, np.lib.format.header_data_from_array_1_0(vector))
    data = b"".join((header.getvalue(), memoryview(vector).cast("B")))
    return Array(dtype=str(vector.dtype), shape=tuple(vector.shape), stype=SType.NUMPY, data=data)


def _npy_ring_vector(array: Array, where: str) -> np.ndarray:
    """A read-only view of a 1-D little-endian uint32/uint64 ``.npy`` payload; anything else is refused."""
    if not isinstance(array, Array) or array.stype != SType.NUMPY or not isinstance(array.data, bytes):
        raise ProtocolError(f"{where} must be a numpy array")
    fp = io.BytesIO(array.data)
    try:
        version = np.lib.format.read_magic(fp)
        read_header = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}
        if version not in read_header:
            raise ValueError(f"unsupported .npy version {version}")
        shape, fortran_order, dtype = read_header[version](fp)
    except ValueError as err:
        raise ProtocolError(f"{where} is not a valid .npy array: {err}") from None
    if dtype not in _NPY_RING_DTYPES or len(shape) != 1:
        raise ProtocolError(f"{where} must be a 1-D uint32/uint64 vector, got {dtype} {shape}")
    offset = fp.tell()
    if len(array.data) - offset != shape[0] * dtype.itemsize:
        raise ProtocolError(f"{where}: {len(array.data) - offset} data bytes for {shape[0]} {dtype} entries")
    return np.frombuffer(array.data, dtype=dtype, count=shape[0], offset=offset)


@dataclass
class MaskedInputReply:
    """One masked, quantized vector per shard (the shard's trainable tensors, flattened in
    sorted name order); unsigned integers modulo the group's modulus."""

    member: str
    masked: dict[str, np.ndarray] = field(repr=False)

    def to_content(self) -> RecordDict:
        return RecordDict(
            {
                REC_SECAGG: ConfigRecord({"member": self.member}),
                REC_MASKED: ArrayRecord({s: _npy_array(v) for s, v in self.masked.items()}),
            }
        )

    @classmethod
    def from_content(cls, content: RecordDict) -> MaskedInputReply:
        where = "masked-input reply"
        member = _name(_require(_config(content, REC_SECAGG, where), "member", str, where), "member", where)
        if REC_MASKED not in content.array_records:
            raise ProtocolError(f"{where}: missing array record {REC_MASKED!r}")
        masked = {}
        for shard, array in content.array_records[REC_MASKED].items():
            validate_shard_ids([shard], where)
            masked[shard] = _npy_ring_vector(array, f"{where}: {shard}")
        return cls(member, masked)


def _survivors_dropped(body: Mapping, where: str) -> tuple[list[str], list[str]]:
    survivors = _names(body.get("survivors"), "survivors", where)
    dropped = _names(body.get("dropped"), "dropped", where)
    if set(survivors) & set(dropped):
        raise ProtocolError(f"{where}: {sorted(set(survivors) & set(dropped))} both survived and dropped")
    return survivors, dropped


def _signatures(raw: object, what: str, where: str) -> dict[str, bytes]:
    if not isinstance(raw, dict):
        raise ProtocolError(f"{where}: {what} must be an object")
    out = {}
    for key, sig in raw.items():
        if not isinstance(key, str):
            raise ProtocolError(f"{where}: {what} keys must be strings")
        out[key] = _hex(sig, f"signature in {what}", where, 64)
    return out


@dataclass
class ConsistencyRequest:
    """Stage 4: who made it, for each survivor to sign once, per group, before anyone reveals
    a share (Bonawitz et al. 2017, section 4): a coordinator that showed holders different
    survivor sets can then get enough signatures on at most one of them."""

    round: int
    run: str
    survivors: list[str]
    dropped: list[str]

    def to_content(self) -> RecordDict:
        return _body_content(
            {"round": self.round, "run": self.run, "survivors": list(self.survivors), "dropped": list(self.dropped)}
        )

    @classmethod
    def from_content(cls, content: RecordDict) -> ConsistencyRequest:
        where = "consistency request"
        body = _json_body(content, where)
        return cls(*_round_run(body, where), *_survivors_dropped(body, where))


@dataclass
class ConsistencyReply:
    """The node's signature, per group, on the survivor set it was shown (and the group's setup
    and active members): see ``aggregation.secagg.keys.survivors_payload``."""

    member: str
    signatures: dict[str, bytes]  # group -> Ed25519 signature

    def to_content(self) -> RecordDict:
        body = {"member": self.member, "signatures": {g: sig.hex() for g, sig in self.signatures.items()}}
        return _body_content(body)

    @classmethod
    def from_content(cls, content: RecordDict) -> ConsistencyReply:
        where = "consistency reply"
        body = _json_body(content, where)
        signatures = _signatures(body.get("signatures"), "signatures", where)
        for gid in signatures:
            if not _GROUP_RE.match(gid):
                raise ProtocolError(f"{where}: bad group {gid!r}")
        return cls(_name(body.get("member"), "member", where), signatures)


@dataclass
class UnmaskRequest:
    """Stage 5: who made it (their self-mask seeds are recovered) and who dropped after sharing
    (their mask keys are recovered), with the survivors' signatures on that set per group.
    Disjoint: no member's two secrets are ever both asked for."""

    round: int
    run: str
    survivors: list[str]
    dropped: list[str]
    signatures: dict[str, dict[str, bytes]] = field(default_factory=dict)  # group -> member -> signature

    def to_content(self) -> RecordDict:
        return _body_content(
            {
                "round": self.round,
                "run": self.run,
                "survivors": list(self.survivors),
                "dropped": list(self.dropped),
                "signatures": {g: {m: s.hex() for m, s in sigs.items()} for g, sigs in self.signatures.items()},
            }
        )

    @classmethod
    def from_content(cls, content: RecordDict) -> UnmaskRequest:
        where = "unmask request"
        body = _json_body(content, where)
        raw = body.get("signatures")
        if not isinstance(raw, dict):
            raise ProtocolError(f"{where}: signatures must be an object")
        signatures = {}
        for gid, sigs in raw.items():
            if not isinstance(gid, str) or not _GROUP_RE.match(gid):
                raise ProtocolError(f"{where}: bad group {gid!r}")
            signatures[gid] = {_name(m, "member", where): s for m, s in _signatures(sigs, gid, where).items()}
        return cls(*_round_run(body, where), *_survivors_dropped(body, where), signatures)


@dataclass
class UnmaskReply:
    """Shares this node holds: ``self_seed[owner]`` for survivors, ``mask_key[owner]`` for the dropped."""

    member: str
    shares: dict[str, dict[str, dict[str, bytes]]]  # group -> "self_seed" | "mask_key" -> owner -> share

    def to_content(self) -> RecordDict:
        body = {
            "member": self.member,
            "shares": {
                g: {kind: {o: s.hex() for o, s in owners.items()} for kind, owners in kinds.items()}
                for g, kinds in self.shares.items()
            },
        }
        return _body_content(body)

    @classmethod
    def from_content(cls, content: RecordDict) -> UnmaskReply:
        where = "unmask reply"
        body = _json_body(content, where)
        raw = body.get("shares")
        if not isinstance(raw, dict):
            raise ProtocolError(f"{where}: shares must be an object")
        shares: dict[str, dict[str, dict[str, bytes]]] = {}
        for gid, kinds in raw.items():
            if not isinstance(gid, str) or not _GROUP_RE.match(gid) or not isinstance(kinds, dict):
                raise ProtocolError(f"{where}: bad group {gid!r}")
            if not set(kinds) <= {"self_seed", "mask_key"}:
                raise ProtocolError(f"{where}: share kinds must be self_seed / mask_key")
            shares[gid] = {}
            for kind, owners in kinds.items():
                if not isinstance(owners, dict):
                    raise ProtocolError(f"{where}: {gid}.{kind} must be an object")
                shares[gid][kind] = {_name(o, "owner", where): _hex(s, "share", where) for o, s in owners.items()}
        return cls(_name(body.get("member"), "member", where), shares)
