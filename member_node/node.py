"""The member node's logic: answer query, train and evaluate from the member's own data.

Kept free of Flower types (the ClientApp adapts messages), so it is tested directly.
"""

from __future__ import annotations

import hashlib

import numpy as np
import torch

from member_node.identity import MemberIdentity
from member_node.lerobot import read_dataset
from member_node.trainer import evaluate, train_shards
from member_node.windows import EpisodeWindows, split_episodes
from shared_model.config import KyodoConfig
from shared_model.policy import Policy
from shared_model.protocol import (
    EvaluateReply,
    EvaluateRequest,
    ProtocolError,
    QueryReply,
    QueryRequest,
    TrainReply,
    TrainRequest,
    coarse_count,
)
from shared_model.shards import BACKBONE, embodiment_shard, shard_kind


class MemberNode:
    def __init__(self, cfg: KyodoConfig, identity: MemberIdentity):
        self.cfg = cfg
        self.identity = identity
        emb_cfg = cfg.embodiments[identity.embodiment]
        self.dataset = read_dataset(identity.data_dir, emb_cfg, identity.embodiment)
        indices = list(range(len(self.dataset.episodes)))
        train_ids, held_ids = split_episodes(indices, cfg.train.held_out_fraction, seed=cfg.train.seed)
        m = cfg.model
        self.train_windows = EpisodeWindows(
            [self.dataset.episodes[i] for i in train_ids], emb_cfg, history=m.history, chunk=m.chunk
        )
        self.held_windows = EpisodeWindows(
            [self.dataset.episodes[i] for i in held_ids], emb_cfg, history=m.history, chunk=m.chunk
        )
        self.policy = Policy(cfg.model, cfg.embodiments)

    # ------------------------------------------------------------------ query
    def query(self, request: QueryRequest) -> QueryReply:
        return QueryReply(
            member=self.identity.name,
            embodiments=[self.identity.embodiment],
            episodes=coarse_count(len(self.dataset.episodes)),
        )

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

    def train(self, request: TrainRequest) -> TrainReply:
        self.check_assignment(request.shards)
        self._load_model(request.model)
        result = train_shards(
            self.policy,
            self.identity.embodiment,
            self.train_windows,
            request.shards,
            request.hparams,
            aux_coef=self.cfg.model.aux_loss_coef,
            rng=self._rng(request.hparams.seed, request.round),
        )
        return TrainReply(
            member=self.identity.name,
            shards=list(request.shards),
            deltas=result.deltas,
            num_examples=result.num_examples,
            loss=result.loss,
            steps=result.steps,
        )

    # ------------------------------------------------------------------ evaluate
    def evaluate(self, request: EvaluateRequest) -> EvaluateReply:
        self._load_model(request.model)
        result = evaluate(self.policy, self.identity.embodiment, self.held_windows)
        return EvaluateReply(
            member=self.identity.name,
            num_examples=result.num_examples,
            action_mse=result.action_mse,
            action_mae=result.action_mae,
        )
