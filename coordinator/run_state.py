"""The run's durable state: the shard store under ``<out_dir>/store``, and resuming from it.

A round is committed by writing the objects of the shards it changed (and the server
optimiser's state for them), then a manifest, then moving ``HEAD`` (``shared_model.store``).
Whatever happens before ``HEAD`` moves is as if the round never ran: a restarted
coordinator resumes at ``HEAD.round + 1`` with the model and optimiser state of ``HEAD``.

The coordinator never holds the model: the round runner reads a shard's weights and
optimiser state from ``HEAD`` when it finishes that shard (:meth:`RunState.shard_params`,
:meth:`RunState.optimizer_state`), writes the new objects at once (:meth:`RunState.put`),
and :meth:`RunState.commit_objects` then only writes the manifest and moves ``HEAD``.

Failpoints (``KYODO_FAILPOINT=<round>:<where>``) kill the process at a named point of a
round's commit, for resume drills and tests: ``after-train`` (aggregated, shard objects
written as each shard finished, ``HEAD`` not moved), ``after-objects`` (every object
written, manifest not yet), ``after-commit`` (``HEAD`` moved, round record not yet written).
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from shared_model.config import KyodoConfig
from shared_model.shards import ShardLayout
from shared_model.store import ADDED_MODEL_SETTINGS, Manifest, ShardStore, model_config_hash

log = logging.getLogger("kyodo.coordinator")

FAILPOINTS = ("after-train", "after-objects", "after-commit")
OPTIMIZER_STATE_PREFIX = "optimizer"


def failpoint(round_number: int, where: str) -> None:
    """Die here (as ``kill -9`` would: no cleanup, no flush) if the environment asks for it."""
    if where not in FAILPOINTS:
        raise ValueError(f"unknown failpoint {where!r}; known: {FAILPOINTS}")
    if os.environ.get("KYODO_FAILPOINT") == f"{round_number}:{where}":
        log.error("failpoint %d:%s: the coordinator dies here", round_number, where)
        os._exit(137)


def resume_refusal(cfg: KyodoConfig, run_dir: Path, committed: str, where: Path | None = None) -> str | None:
    """Why the run in ``run_dir``, whose rounds are of the model hashed ``committed``, cannot
    go on with ``cfg``'s model (None when it can), naming ``where`` (default ``run_dir``)."""
    if committed == model_config_hash(cfg.model, cfg.embodiments):
        return None
    return (
        f"{where or run_dir} holds rounds of {model_mismatch(cfg, run_dir, committed)}: a resume goes on with "
        "the model the run started with"
    )


def model_mismatch(cfg: KyodoConfig, run_dir: Path, committed: str) -> str:
    """ "another model config (<hashes>)", and which settings differ from those the run in
    ``run_dir`` committed ``committed`` (its manifests' model hash) with, where its
    config.yaml still describes that model: a bare hash left the operator guessing."""
    from coordinator.run_status import run_settings  # local: rich and yaml, for this message only

    want = model_config_hash(cfg.model, cfg.embodiments)
    text = f"another model config ({committed[:12]} != {want[:12]})"
    settings = run_settings(run_dir)
    model, embodiments = settings.get("model"), settings.get("embodiments")
    if not isinstance(model, dict) or not isinstance(embodiments, dict):
        return text
    if model_config_hash(model, embodiments) != committed:
        return text  # config.yaml was rewritten since: it cannot say what the rounds are
    model = {**ADDED_MODEL_SETTINGS, **model}  # a run from before a setting existed had it off
    changed = [
        f"model.{key} {model.get(key)!r} -> {value!r}"
        for key, value in dataclasses.asdict(cfg.model).items()
        if model.get(key) != value
    ]
    new_embodiments = {name: dataclasses.asdict(e) for name, e in cfg.embodiments.items()}
    changed += [
        f"embodiments.{name}" for name in sorted(set(embodiments) | set(new_embodiments))
        if embodiments.get(name) != new_embodiments.get(name)
    ]  # fmt: skip
    return text + (f": {', '.join(changed)} since the run's rounds" if changed else "")


@dataclass
class Resumed:
    round: int  # the last committed round; the run continues at round + 1
    extra: dict[str, Any]  # HEAD manifest's extra (run id, optimiser state objects)


class RunState:
    """The coordinator's view of its store: commit rounds, resume from HEAD."""

    def __init__(self, cfg: KyodoConfig, out_dir: Path | str):
        self.cfg = cfg
        self.store = ShardStore(Path(out_dir) / "store")
        # Where aggregation spills running sums that exceed its RAM budget (aggregation.sums):
        # next to the store, on the same disk, never a tmpfs.
        self.scratch_dir = Path(out_dir) / "scratch"
        self.scratch_dir.mkdir(parents=True, exist_ok=True)
        self.config_hash = model_config_hash(cfg.model, cfg.embodiments)
        self.layout = ShardLayout.from_config(cfg.model, cfg.embodiments)
        self.head: Manifest | None = self.store.head_manifest()

    def resume(self) -> Resumed | None:
        """The state at HEAD, or None for a fresh run. Refuses a store of another model."""
        if self.head is None:
            return None
        refusal = resume_refusal(self.cfg, self.store.root.parent, self.head.model_config, where=self.store.root)
        if refusal:
            raise ValueError(f"{refusal} (or start a new run in a fresh out_dir)")
        return Resumed(self.head.round, dict(self.head.extra))

    # ------------------------------------------------------------------ one shard at a time
    def _head(self) -> Manifest:
        if self.head is None:
            raise ValueError("commit_initial first")
        return self.head

    def shard_params(self, shard: str) -> dict[str, torch.Tensor]:
        """The shard's tensors at ``HEAD`` (hash-verified; one buffer of the shard's size)."""
        return self.store.get_shard(self._head().shards[shard], shard_id=shard)

    def optimizer_state(self, shard: str) -> dict[str, torch.Tensor]:
        """The server optimiser's state of ``shard`` at ``HEAD`` (empty if it never had any)."""
        oid = self._head().extra.get(OPTIMIZER_STATE_PREFIX, {}).get(shard)
        return {} if oid is None else self.store.get_shard(oid, shard_id=shard)

    def put(self, shard: str, tensors: Mapping[str, torch.Tensor]) -> str:
        """Write one object now (a shard's next version or its optimiser state); ``HEAD`` does
        not move, so until :meth:`commit_objects` it is as if it was never written."""
        return self.store.put_shard(shard, dict(tensors))

    def shard_tensors(self, model: Mapping[str, torch.Tensor], shard: str) -> dict[str, torch.Tensor]:
        return {spec.name: model[spec.name] for spec in self.layout.shards[shard]}

    def commit_initial(self, model: Mapping[str, torch.Tensor], extra: Mapping[str, Any]) -> Manifest:
        changed = {shard: self.store.put_shard(shard, self.shard_tensors(model, shard)) for shard in self.layout.shards}
        return self.commit_initial_objects(changed, extra)

    def commit_initial_objects(self, objects: Mapping[str, str], extra: Mapping[str, Any]) -> Manifest:
        """Round 0 from objects already in the store (shard -> object id; every shard)."""
        self.head = self.store.commit(
            None, dict(objects), round_number=0, model_config=self.config_hash, extra=dict(extra)
        )
        return self.head

    def commit_round(
        self,
        round_number: int,
        model: Mapping[str, torch.Tensor],
        changed_shards: Iterable[str],
        optimizer_state: Mapping[str, Mapping[str, torch.Tensor]],
        extra: Mapping[str, Any],
    ) -> Manifest:
        """Write only the changed shards (and their optimiser state) from a whole model, then
        move HEAD (small models, tools and tests; the round runner uses :meth:`commit_objects`)."""
        self._head()
        changed = {s: self.put(s, self.shard_tensors(model, s)) for s in sorted(set(changed_shards))}
        states = {shard: self.put(shard, tensors) for shard, tensors in optimizer_state.items() if tensors}
        return self.commit_objects(round_number, changed, states, extra)

    def commit_objects(
        self,
        round_number: int,
        changed: Mapping[str, str],
        optimizer_objects: Mapping[str, str],
        extra: Mapping[str, Any],
    ) -> Manifest:
        """Commit a round whose objects are already written (shard -> object id, for the
        weights and the optimiser state): the manifest, then HEAD, last."""
        head = self._head()
        opt = dict(head.extra.get(OPTIMIZER_STATE_PREFIX, {}))
        opt.update(optimizer_objects)
        failpoint(round_number, "after-objects")
        self.head = self.store.commit(
            head, dict(sorted(changed.items())), round_number=round_number, extra={**extra, OPTIMIZER_STATE_PREFIX: opt}
        )
        return self.head
