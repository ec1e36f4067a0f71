"""The round-0 model from public data: pretrained, non-privately, on public simulated
episodes of every embodiment the consortium knows.

Why: the backbone (embeddings, attention, norms, routers) is frozen during federated rounds
(ARCHITECTURE), which presumes it was trained before. From a random initialisation the
members' DP-SGD has to learn ~31k parameters of ``tiny`` from ~1600 episodes each, which it
cannot do at epsilon 8 (README, "Utility under privacy": n x epsilon / sqrt(d) ~ 72, Tramer &
Boneh 2021). Starting from a checkpoint trained on public data is how the field gets DP
fine-tuning close to non-private (De et al. 2022; Li et al. 2022), and how robot foundation
models start anyway (pretraining on public datasets, then adapting to one's own robot).

Nothing private goes in: the episodes come from the public simulator
(``member_node.synthetic``) under public seeds, with the control rate of every embodiment
scaled by ``public.fps_scale``. That scaling stands in for the gap between public data and
a member's own robots; with ``fps_scale`` 1 the public episodes would follow exactly the
dynamics that generate the members' synthetic data, and fine-tuning would have little
left to learn.

Every embodiment trains in turn for ``train.local_steps`` steps per round (batch
``train.batch_size``), for ``public.rounds`` rounds, one AdamW over every parameter but
LoRA A (the backbone included: it is frozen only during federated rounds), at the
model's lr. Deterministic for a given config (seeded data, sampling and initialisation).
"""

from __future__ import annotations

import dataclasses

import numpy as np
import torch

from member_node.synthetic import generate_episodes
from member_node.trainer import UniformSampler, train_plain
from member_node.windows import EpisodeWindows
from shared_model.config import EmbodimentConfig, KyodoConfig
from shared_model.policy import Policy
from shared_model.protocol import TrainHyperParams
from shared_model.shards import set_trainable


def public_embodiments(cfg: KyodoConfig) -> dict[str, EmbodimentConfig]:
    """The public simulator's embodiments: the consortium's, at ``public.fps_scale`` x the control rate."""
    scale = cfg.public.fps_scale
    return {name: dataclasses.replace(emb, fps=max(1, round(emb.fps * scale))) for name, emb in cfg.embodiments.items()}


def _pretrainable(policy: Policy) -> list[torch.nn.Parameter]:
    """Every parameter but LoRA A, which stays at its shared seed (ARCHITECTURE: only B is
    trained, so that the mean of the members' B is the mean of their updates)."""
    return [p for name, p in policy.named_parameters() if ".lora_A." not in name]


def public_checkpoint(cfg: KyodoConfig) -> dict[str, torch.Tensor]:
    """The pretrained round-0 state dict (``public.rounds`` > 0), trained on public episodes only."""
    pub = cfg.public
    if pub.rounds < 1:
        raise ValueError(f"public.rounds must be >= 1 to pretrain, got {pub.rounds}")
    model = cfg.model
    policy = Policy(model, cfg.embodiments)
    windows = {}
    for i, (name, emb) in enumerate(sorted(public_embodiments(cfg).items())):
        episodes = generate_episodes(name, emb, pub.episodes, pub.episode_seconds, pub.seed + i)
        windows[name] = EpisodeWindows(episodes, cfg.embodiments[name], model.history, model.chunk)
    params = _pretrainable(policy)
    set_trainable(policy, [])
    for p in params:
        p.requires_grad_(True)
    optimizer = torch.optim.AdamW(params, lr=cfg.train.lr or model.lr, weight_decay=cfg.train.weight_decay)
    hp = TrainHyperParams(optimizer.defaults["lr"], cfg.train.local_steps, cfg.train.batch_size)
    sampler = UniformSampler(cfg.train.batch_size)
    rng = np.random.default_rng(pub.seed)
    policy.train()
    try:
        for _ in range(pub.rounds):
            for name, data in windows.items():
                train_plain(policy, name, data, hp, model.aux_loss_coef, rng, sampler, optimizer, [])
    finally:
        set_trainable(policy, [])
    return {k: v.detach().clone() for k, v in policy.state_dict().items()}
