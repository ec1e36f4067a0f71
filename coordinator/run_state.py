"""The run's durable state: the shard store under ``<out_dir>/store``, and resuming from it.

A round is committed by writing the objects of the shards it changed (and the server
optimiser's state for them), then a manifest, then moving ``HEAD`` (``shared_model.store``).
Whatever happens before ``HEAD`` moves is as if the round never ran: a restarted
coordinator resumes at ``HEAD.round + 1`` with the model and optimiser state of ``HEAD``.

Failpoints (``KYODO_FAILPOINT=<round>:<where>``) kill the process at a named point of a
round's commit, for resume drills and tests: ``after-train`` (aggregated in memory,
nothing written), ``after-objects`` (objects written, ``HEAD`` not moved), ``after-commit``
(``HEAD`` moved, round record not yet written).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from shared_model.config import KyodoConfig
from shared_model.shards import ShardLayout
from shared_model.store import Manifest, ShardStore, model_config_hash

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


@dataclass
class Resumed:
    round: int  # the last committed round; the run continues at round + 1
    model: dict[str, torch.Tensor]
    optimizer_state: dict[str, dict[str, torch.Tensor]]  # shard -> state tensors
    extra: dict[str, Any]


class RunState:
    """The coordinator's view of its store: commit rounds, resume from HEAD."""

    def __init__(self, cfg: KyodoConfig, out_dir: Path | str):
        self.cfg = cfg
        self.store = ShardStore(Path(out_dir) / "store")
        self.config_hash = model_config_hash(cfg.model, cfg.embodiments)
        self.layout = ShardLayout.from_config(cfg.model, cfg.embodiments)
        self.head: Manifest | None = self.store.head_manifest()

    def resume(self) -> Resumed | None:
        """The state at HEAD, or None for a fresh run. Refuses a store of another model."""
        if self.head is None:
            return None
        if self.head.model_config != self.config_hash:
            raise ValueError(
                f"{self.store.root} holds rounds of another model config "
                f"({self.head.model_config[:12]} != {self.config_hash[:12]}): use a fresh out_dir"
            )
        model = self.store.load_model(self.head.round)
        state = {
            shard: self.store.get_shard(oid) for shard, oid in self.head.extra.get(OPTIMIZER_STATE_PREFIX, {}).items()
        }
        # Views into the verified read buffer: copy so the optimiser may update them in place.
        model = {k: v.clone() for k, v in model.items()}
        state = {s: {k: v.clone() for k, v in t.items()} for s, t in state.items()}
        return Resumed(self.head.round, model, state, dict(self.head.extra))

    def shard_tensors(self, model: Mapping[str, torch.Tensor], shard: str) -> dict[str, torch.Tensor]:
        return {spec.name: model[spec.name] for spec in self.layout.shards[shard]}

    def commit_initial(self, model: Mapping[str, torch.Tensor], extra: Mapping[str, Any]) -> Manifest:
        changed = {shard: self.store.put_shard(shard, self.shard_tensors(model, shard)) for shard in self.layout.shards}
        self.head = self.store.commit(None, changed, round_number=0, model_config=self.config_hash, extra=dict(extra))
        return self.head

    def commit_round(
        self,
        round_number: int,
        model: Mapping[str, torch.Tensor],
        changed_shards: Iterable[str],
        optimizer_state: Mapping[str, Mapping[str, torch.Tensor]],
        extra: Mapping[str, Any],
    ) -> Manifest:
        """Write only the changed shards (and their optimiser state), then move HEAD."""
        if self.head is None:
            raise ValueError("commit_initial first")
        changed = {s: self.store.put_shard(s, self.shard_tensors(model, s)) for s in sorted(set(changed_shards))}
        opt = dict(self.head.extra.get(OPTIMIZER_STATE_PREFIX, {}))
        for shard, tensors in optimizer_state.items():
            if tensors:
                opt[shard] = self.store.put_shard(shard, dict(tensors))
        failpoint(round_number, "after-objects")
        self.head = self.store.commit(
            self.head, changed, round_number=round_number, extra={**extra, OPTIMIZER_STATE_PREFIX: opt}
        )
        return self.head
