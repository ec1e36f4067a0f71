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

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, MetricRecord, RecordDict

QUERY = "query"
TRAIN = "train"
EVALUATE = "evaluate"

# Record names inside each message's RecordDict.
REC_REQUEST = "kyodo.request"
REC_REPLY = "kyodo.reply"
REC_METRICS = "kyodo.metrics"
REC_MODEL = "kyodo.model"
REC_DELTA = "kyodo.delta"
REC_DECLINED = "kyodo.declined"

# Error codes carried by Flower error replies (``Message(Error(code, reason), reply_to=...)``).
ERR_INVALID_REQUEST = 4001
ERR_NODE_CONFIG = 4002
ERR_DATA = 4003
ERR_INTERNAL = 5000

_SHARD_RE = re.compile(r"^(backbone|adapter/shared|adapter/emb/[A-Za-z0-9_\-]+|expert/L\d+/E\d+)$")
_NAME_RE = re.compile(r"^[A-Za-z0-9_\-\.]{1,64}$")

# Upper bounds that no sane request exceeds; a request outside them is refused, not obeyed.
MAX_LOCAL_STEPS = 100_000
MAX_BATCH_SIZE = 65_536


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


# ------------------------------------------------------------------------------ query
@dataclass
class QueryRequest:
    round: int

    def to_content(self) -> RecordDict:
        return RecordDict({REC_REQUEST: ConfigRecord({"round": self.round})})

    @classmethod
    def from_content(cls, content: RecordDict) -> QueryRequest:
        where = "query request"
        rnd = _require(_config(content, REC_REQUEST, where), "round", int, where)
        if rnd < 0:
            raise ProtocolError(f"{where}: round must be >= 0")
        return cls(round=rnd)


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
    episodes: int  # coarse (one significant figure)
    public_key: str = ""  # hex Ed25519 key that signs the member's privacy receipts
    epsilon_spent: float = 0.0
    epsilon_budget: float = 0.0
    can_train: bool = True  # False when the remaining budget cannot pay for a useful round

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
        )


# ------------------------------------------------------------------------------ train
@dataclass
class TrainHyperParams:
    lr: float
    local_steps: int
    batch_size: int
    weight_decay: float = 0.0
    seed: int = 0
    max_grad_norm: float = 1.0  # DP-SGD clipping norm C, shared by the cohort

    def to_record(self) -> dict:
        return {
            "lr": float(self.lr),
            "local_steps": int(self.local_steps),
            "batch_size": int(self.batch_size),
            "weight_decay": float(self.weight_decay),
            "seed": int(self.seed),
            "max_grad_norm": float(self.max_grad_norm),
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
        return cls(lr=lr, local_steps=steps, batch_size=batch, weight_decay=wd, seed=seed, max_grad_norm=clip)


@dataclass
class TrainRequest:
    round: int
    shards: list[str]
    hparams: TrainHyperParams
    model: dict[str, torch.Tensor] = field(repr=False)
    run: str = "run"
    planned_rounds: int = 1  # lets a node spread its budget over the run; it never raises it

    def to_content(self) -> RecordDict:
        request = {
            "round": self.round,
            "shards": list(self.shards),
            "run": self.run,
            "planned_rounds": self.planned_rounds,
            **self.hparams.to_record(),
        }
        return RecordDict({REC_REQUEST: ConfigRecord(request), REC_MODEL: tensors_to_record(self.model)})

    @classmethod
    def from_content(cls, content: RecordDict) -> TrainRequest:
        where = "train request"
        rec = _config(content, REC_REQUEST, where)
        rnd = _require(rec, "round", int, where)
        shards = validate_shard_ids(list(_require(rec, "shards", list, where)), where)
        if not shards:
            raise ProtocolError(f"{where}: no shards assigned")
        hparams = TrainHyperParams.from_record(rec, where)
        run = _require(rec, "run", str, where)
        if not _NAME_RE.match(run):
            raise ProtocolError(f"{where}: run id {run!r} is not valid")
        planned = _require(rec, "planned_rounds", int, where)
        if not 1 <= planned <= 1_000_000:
            raise ProtocolError(f"{where}: planned_rounds {planned} outside 1..1000000")
        return cls(
            round=rnd,
            shards=shards,
            hparams=hparams,
            model=_arrays(content, REC_MODEL, where),
            run=run,
            planned_rounds=planned,
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

    def to_content(self) -> RecordDict:
        return RecordDict(
            {
                REC_REPLY: ConfigRecord({"member": self.member, "shards": list(self.shards), "receipt": self.receipt}),
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
        if num_examples <= 0:
            raise ProtocolError(f"{where}: num-examples must be positive")
        loss = float(_require(metrics, "loss", (int, float), where))
        return cls(
            member=_require(rec, "member", str, where),
            shards=validate_shard_ids(list(_require(rec, "shards", list, where)), where),
            deltas=_arrays(content, REC_DELTA, where),
            num_examples=num_examples,
            loss=loss,
            steps=_require(metrics, "steps", int, where),
            receipt=_require(rec, "receipt", str, where),
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
    model: dict[str, torch.Tensor] = field(repr=False)

    def to_content(self) -> RecordDict:
        return RecordDict({REC_REQUEST: ConfigRecord({"round": self.round}), REC_MODEL: tensors_to_record(self.model)})

    @classmethod
    def from_content(cls, content: RecordDict) -> EvaluateRequest:
        where = "evaluate request"
        rnd = _require(_config(content, REC_REQUEST, where), "round", int, where)
        return cls(round=rnd, model=_arrays(content, REC_MODEL, where))


@dataclass
class EvaluateReply:
    member: str
    num_examples: int
    action_mse: float  # in normalised action units (comparable across embodiments)
    action_mae: float  # in the embodiment's physical units

    def to_content(self) -> RecordDict:
        return RecordDict(
            {
                REC_REPLY: ConfigRecord({"member": self.member}),
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
        mse = float(_require(metrics, "action-mse", (int, float), where))
        mae = float(_require(metrics, "action-mae", (int, float), where))
        if not (math.isfinite(mse) and math.isfinite(mae)):
            raise ProtocolError(f"{where}: metrics must be finite")
        return cls(
            member=_require(_config(content, REC_REPLY, where), "member", str, where),
            num_examples=_require(metrics, "num-examples", int, where),
            action_mse=mse,
            action_mae=mae,
        )
