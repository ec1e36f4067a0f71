"""Empirical privacy audit of one member's training with canaries, in one training run.

The accounting check proves that the recorded epsilon follows from the recorded mechanism;
it cannot see a mechanism that does not do what it records (noise not added, clipping
skipped, the wrong sample rate). This audit looks at what training actually does, in the
manner of Steinke, Nasr and Jagielski 2023 (``privacy.audit.bound``):

1. Make ``m`` canary episodes that nothing else in the data predicts: each holds one random
   observation (inside the robot's public ranges) for ``chunk`` frames and one random action
   target *outside* the robot's physical action range (each dimension +-2x its bound, random
   sign; from the held state, for dimensions the model predicts relative to the state).
   Only memorising a canary lowers its loss, and learning one does not help another.
2. Include each canary in the member's training episodes independently with probability 1/2.
3. Train exactly as a member node does: ``member_node.trainer.train_shards`` on the member's
   training episodes plus the included canaries, with ``privacy.dp_sgd.DPConfig`` (Poisson
   sampling of episodes at q = batch / episodes, per-episode clipping, Gaussian noise, the
   node's noise multiplier planned by the node's own planner for the member's epsilon), or
   without DP as a node with ``dp=false`` trains.
4. Score each canary by how much training lowered its loss (initial model minus trained
   model: the initial model is public, so the difference removes each canary's own
   difficulty), guess the top k "in" and the bottom k "out" (r = 2k guesses, fixed in
   advance), count correct guesses, and turn the count into a lower bound on epsilon at 95%
   confidence.

A bound above the claimed epsilon means the training is demonstrably not as private as
claimed. A bound at or below it is consistent with the claim (it is not a proof: audits
are lower bounds). The non-private run shows the audit has power on this setup.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from member_node.lerobot import Episode, read_dataset
from member_node.synthetic import generate_episodes
from member_node.trainer import per_sample_loss, train_shards
from member_node.windows import EpisodeWindows, split_episodes
from privacy.accountant import Mechanism, noise_for_target
from privacy.accountant import epsilon as node_epsilon
from privacy.audit.accounting import Mech, rdp_epsilon, totals_of
from privacy.audit.bound import epsilon_lower_bound
from privacy.dp_sgd import DEFAULT_MODE, DPConfig, PoissonEpisodeSampler
from shared_model.config import KyodoConfig, load_config
from shared_model.policy import Policy
from shared_model.protocol import TrainHyperParams
from shared_model.shards import SHARED_ADAPTER, embodiment_shard, expert_shard

CANARY_ACTION_SCALE = 2.0  # canary targets sit at +-2x the robot's action bound: out of distribution


@dataclass
class CanarySetup:
    """One canary audit: whose training, how much of it, how many canaries and guesses."""

    embodiment: str = "so100"
    model: str = "tiny"
    data_dir: str | None = None  # the member's LeRobot dataset; None: synthetic episodes
    episodes: int = 60  # synthetic episodes (before the held-out split), as the demo's members
    canaries: int = 100
    guesses: int = 40  # r = 2k: the k best-scoring guessed "in", the k worst "out"
    # 400: with actions relative to the state, 200 non-private steps memorised too few canaries
    # for the audit to show power (37-38 of 40 guesses; 400 steps: 39-40)
    steps: int = 400
    batch_size: int = 32
    lr: float = 1e-3
    dp: bool = True
    epsilon: float = 8.0  # the member's budget for this training; sigma is planned to reach it
    delta: float = 1e-5
    noise_multiplier: float = 0.0  # > 0: use it instead of planning
    max_grad_norm: float | None = None  # None: the consortium's privacy.max_grad_norm
    shards: list[str] = field(default_factory=list)  # empty: own adapter, shared adapter, all experts
    confidence: float = 0.95
    seed: int = 0  # canaries, inclusion coins (and non-private training's window choice)
    deterministic: bool = False  # also seed DP noise, Poisson sampling and windows (tests); real audits: secret


@dataclass
class CanaryResult:
    """What the audit measured, and the bound next to the claim."""

    setup: dict[str, Any]
    included: int
    training_episodes: int  # the member's own, without canaries
    sample_rate: float
    noise_multiplier: float | None  # None: non-private
    steps: int
    claimed_epsilon: float | None  # the node's accountant (what the member's ledger would record)
    claimed_epsilon_dp_accounting: float | None  # the auditor's independent RDP value
    guesses: int
    correct: int
    epsilon_lower_bound: float
    seconds: float

    @property
    def consistent(self) -> bool:
        """False when the empirical bound exceeds the claim: the training leaks more than claimed."""
        return self.claimed_epsilon is None or self.epsilon_lower_bound <= self.claimed_epsilon

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        out["consistent"] = self.consistent
        return out


def make_canaries(cfg: KyodoConfig, embodiment: str, m: int, rng: np.random.Generator) -> list[Episode]:
    """``m`` constant episodes, each a random observation mapped to a random out-of-range action."""
    emb = cfg.embodiments[embodiment]
    length = cfg.model.chunk
    state_bound = np.asarray(emb.state_bound, dtype=np.float32)
    env_bound = np.asarray(emb.env_state_bound, dtype=np.float32)
    action_bound = np.asarray(emb.action_bound, dtype=np.float32)
    out = []
    for i in range(m):
        state = rng.uniform(-1.0, 1.0, emb.state_dim).astype(np.float32) * state_bound
        env = rng.uniform(-1.0, 1.0, emb.env_state_dim).astype(np.float32) * env_bound if emb.env_state_dim else None
        image = rng.standard_normal(emb.image_feature_dim).astype(np.float32) if emb.image_feature_dim else None
        action = rng.choice([-1.0, 1.0], emb.action_dim).astype(np.float32) * CANARY_ACTION_SCALE * action_bound
        # The target must be random in what the model predicts: for a dimension predicted
        # relative to the state, a random +-2x offset from the canary's held state.
        relative = np.asarray(emb.action_relative_to, dtype=np.int64)
        if relative.size:
            action = action + np.where(relative >= 0, state[np.maximum(relative, 0)], 0.0).astype(np.float32)

        def frames(row: np.ndarray | None) -> np.ndarray | None:
            return None if row is None else np.tile(row, (length, 1))

        out.append(
            Episode(
                index=1_000_000 + i,
                state=frames(state),
                env_state=frames(env),
                image_features=frames(image),
                action=frames(action),
            )
        )
    return out


@torch.no_grad()
def canary_losses(policy: Policy, embodiment: str, windows: EpisodeWindows) -> np.ndarray:
    """Mean action loss over each canary's windows (padding excluded), one value per canary."""
    policy.eval()
    per_window = []
    for batch in windows.all_windows(256):
        pred, aux = policy(embodiment, batch.obs, batch.image, batch.task)
        per_window.append(per_sample_loss(pred, batch.action, batch.action_pad, aux, 0.0).numpy())
    losses = np.concatenate(per_window)
    episode = np.repeat(np.arange(len(windows)), windows.lengths)
    return np.bincount(episode, weights=losses) / windows.lengths


def count_correct(scores: np.ndarray, included: np.ndarray, guesses: int) -> int:
    """Guess the ``guesses // 2`` highest scores "in" and as many lowest "out"; count the right ones."""
    k = guesses // 2
    order = np.argsort(-scores, kind="stable")
    return int(included[order[:k]].sum() + (~included[order[len(order) - k :]]).sum())


def _member_episodes(cfg: KyodoConfig, setup: CanarySetup) -> list[Episode]:
    """The member's training episodes: its dataset minus the held-out split, as the node uses."""
    emb = cfg.embodiments[setup.embodiment]
    if setup.data_dir:
        episodes = read_dataset(Path(setup.data_dir), emb, setup.embodiment).episodes
    else:
        episodes = generate_episodes(setup.embodiment, emb, setup.episodes, 4.0, setup.seed + 22)
    train_ids, _ = split_episodes(episodes, cfg.train.held_out_fraction, seed=cfg.train.seed)
    return [episodes[i] for i in train_ids]


def default_shards(cfg: KyodoConfig, embodiment: str) -> list[str]:
    """Everything a member may train: its embodiment adapter, the shared adapter, every expert."""
    m = cfg.model
    experts = [expert_shard(layer, e) for layer in range(m.n_layers) for e in range(m.n_experts)]
    return [embodiment_shard(embodiment), SHARED_ADAPTER, *experts]


def run_canary_audit(setup: CanarySetup) -> CanaryResult:
    """Train once with canaries (DP or not, as ``setup.dp``) and bound epsilon from the guesses."""
    if not 2 <= setup.guesses <= setup.canaries or setup.guesses % 2:
        raise ValueError(f"guesses must be even and in 2..canaries ({setup.canaries}), got {setup.guesses}")
    start = time.monotonic()
    cfg = load_config(model=setup.model)
    if setup.embodiment not in cfg.embodiments:
        raise ValueError(f"unknown embodiment {setup.embodiment!r}; known: {sorted(cfg.embodiments)}")
    rng = np.random.default_rng(setup.seed)
    own = _member_episodes(cfg, setup)
    canaries = make_canaries(cfg, setup.embodiment, setup.canaries, rng)
    included = rng.random(setup.canaries) < 0.5
    history, chunk, buckets = cfg.model.history, cfg.model.chunk, cfg.model.task_buckets
    emb = cfg.embodiments[setup.embodiment]
    train = EpisodeWindows(
        own + [c for c, inc in zip(canaries, included, strict=True) if inc], emb, history, chunk, buckets
    )
    probe = EpisodeWindows(canaries, emb, history, chunk, buckets)
    policy = Policy(cfg.model, cfg.embodiments)
    before = canary_losses(policy, setup.embodiment, probe)

    clip = setup.max_grad_norm if setup.max_grad_norm is not None else cfg.privacy.max_grad_norm
    hp = TrainHyperParams(setup.lr, setup.steps, setup.batch_size, cfg.train.weight_decay, setup.seed, clip)
    sample_rate = min(1.0, setup.batch_size / len(train))
    sigma = claimed = claimed_independent = None
    dp = sampler = None
    if setup.dp:
        sigma = setup.noise_multiplier or noise_for_target(
            setup.epsilon, setup.delta, sample_rate, setup.steps, 1, accountant="rdp"
        )
        dp = DPConfig(noise_multiplier=sigma, max_grad_norm=clip, sample_rate=sample_rate, mode=DEFAULT_MODE)
        claimed = node_epsilon([Mechanism(sigma, sample_rate, setup.steps)], setup.delta, "rdp")
        claimed_independent = rdp_epsilon(totals_of([Mech(sigma, sample_rate, setup.steps)]), setup.delta)
        if setup.deterministic:
            sampler = PoissonEpisodeSampler(sample_rate, seed=setup.seed + 1)
    train_shards(
        policy,
        setup.embodiment,
        train,
        setup.shards or default_shards(cfg, setup.embodiment),
        hp,
        aux_coef=cfg.model.aux_loss_coef,
        rng=np.random.default_rng(setup.seed + 2),
        dp=dp,
        sampler=sampler,
        dp_noise_seed=setup.seed + 3 if setup.deterministic and dp is not None else None,
    )
    after = canary_losses(policy, setup.embodiment, probe)
    correct = count_correct(before - after, included, setup.guesses)
    bound = epsilon_lower_bound(setup.canaries, setup.guesses, correct, setup.delta, setup.confidence)
    return CanaryResult(
        setup=asdict(setup),
        included=int(included.sum()),
        training_episodes=len(own),
        sample_rate=sample_rate,
        noise_multiplier=sigma,
        steps=setup.steps,
        claimed_epsilon=claimed,
        claimed_epsilon_dp_accounting=claimed_independent
        if claimed_independent is None or math.isfinite(claimed_independent)
        else None,
        guesses=setup.guesses,
        correct=correct,
        epsilon_lower_bound=bound,
        seconds=time.monotonic() - start,
    )
