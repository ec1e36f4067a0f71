"""Typed configuration for kyodo, loaded with OmegaConf.

Every YAML file under ``configs/`` is merged onto these dataclasses in *struct* mode, so a
misspelled key anywhere (file, command-line dotlist or Flower run config) fails loudly with
the key's full path instead of being silently ignored. The config lives in ``shared_model``
because it is the lowest layer: the model, the member node and the coordinator all read it.
"""

from __future__ import annotations

import math
import re
import shlex
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"


# Members of one secure-aggregation cohort at most: Shamir share ids are one byte, 1..255
# (aggregation.secagg.shamir.MAX_SHARE_ID), and nodes refuse a larger group (shared_model.protocol).
SECAGG_MAX_COHORT = 255


class ConfigError(ValueError):
    """A configuration value or key is wrong; the message names it."""


@dataclass
class ModelConfig:
    """Sizes of the shared MoE transformer policy."""

    name: str = "tiny"
    n_layers: int = 2
    d_model: int = 64
    n_heads: int = 4
    n_experts: int = 4
    top_k: int = 2
    expert_hidden: int = 64
    lora_rank: int = 4
    lora_alpha: float = 8.0
    lora_seed: int = 1234
    adapter_hidden: int = 64
    history: int = 4
    chunk: int = 8
    aux_loss_coef: float = 0.01
    init_seed: int = 0
    # The DP-SGD learning rate this size was tuned at (``train.lr`` 0 takes it). It belongs
    # with the size: Adam's step on a noisy coordinate is about lr x its signal-to-noise
    # ratio and the noise grows with the trainable parameters. Measured on the default
    # federation at epsilon 8, 4 rounds x 25 steps, relative actions: `tiny` federated
    # held-out MSE 0.0034-0.0253 at 3e-3 against 0.0080-0.0147 at 1e-2, where the noise
    # random-walked the policy past holding still; `small` mean 0.0126 at 3e-3, 0.0163 at 1e-3.
    lr: float = 3e-3
    # Task conditioning: the width of the hashed task-text vector (shared_model.task_text)
    # the shared adapter's ``task_proj`` reads; 0 = the policy does not read the task, and
    # episodes of several tasks train one unconditioned policy. Part of the model's shape,
    # so it is fixed for a consortium like d_model.
    task_buckets: int = 0


@dataclass
class EmbodimentConfig:
    """A robot body: what its data looks like. Public to the consortium, never data."""

    kind: str = "arm"
    state_dim: int = 0
    env_state_dim: int = 0
    image_feature_dim: int = 0
    action_dim: int = 0
    fps: int = 30
    # Public physical ranges (spec sheet), used to normalise inputs and outputs locally so
    # that normalisation never depends on private data. Precomputed image features are
    # expected at about unit scale (as embeddings are) and are not rescaled.
    state_bound: list[float] = field(default_factory=list)
    env_state_bound: list[float] = field(default_factory=list)
    action_bound: list[float] = field(default_factory=list)
    # For each action dimension, the state dimension whose current value it is predicted
    # relative to, or -1 for an absolute prediction (empty: all absolute). A joint target
    # is then learnt as "where to go from here" (relative actions, as UMI and pi0 use), so an
    # untrained policy holds still instead of commanding the middle of every joint's range.
    # With absolute targets every policy in bench/utility.py was still worse than holding
    # still after 100 steps; relative ones cut the federation's held-out error under DP
    # 3-4x (docs/utility.md). Public, like the bounds: it says which joint a command
    # refers to, nothing about anyone's data.
    action_relative_to: list[int] = field(default_factory=list)

    @property
    def obs_dim(self) -> int:
        """Width of one observation step fed to the embodiment's input encoder."""
        return self.state_dim + self.env_state_dim


@dataclass
class MemberConfig:
    """A consortium member as the local simulation knows it (deployment: node config)."""

    name: str = ""
    embodiment: str = ""
    episodes: int = 60
    episode_seconds: float = 4.0
    seed: int = 0
    tasks: int = 1  # 2: synthetic episodes of the goal task and a home task (``data synth --tasks``)
    # The member's own privacy settings. In deployment they come from the node's own config
    # (``--node-config``), never from the coordinator; here they stand in for it.
    epsilon: float = 8.0
    delta: float = 1e-5
    dp: bool = True
    noise_multiplier: float = 0.0  # 0: plan it from the budget over the run's rounds
    # Spread the budget over at least this many training rounds, counted over every run the
    # node trains (0: over the rounds the coordinator plans). Node config ``budget-rounds``.
    budget_rounds: int = 0
    # Releasing the held-out error under DP (privacy.eval_release): the Gaussian mechanism's
    # noise multiplier (0: release none) and the per-episode error bound, in normalised
    # action units (untrained policies err 0.004-0.04 per episode). At 5 a release costs the
    # DP-SGD plan about 2% more noise (4 rounds at epsilon 8); with 400 held-out episodes
    # the released mean strays from the clipped one by ~9e-4 (one standard deviation).
    eval_noise_multiplier: float = 5.0
    eval_loss_bound: float = 0.05
    # The torch device the node trains and evaluates on (cpu, cuda, cuda:N), checked by
    # the node when it starts (shared_model.device). Deployment: ``device`` in the node config.
    device: str = "cpu"
    workers: int = 1  # data-parallel DP-SGD processes of the node (``workers`` in the node config)
    # Seconds after a train / evaluate request reached the node before its reply may leave
    # (member_node.reply_timing; node config train-reply-after / eval-reply-after); 0: off.
    train_reply_after: float = 0.0
    eval_reply_after: float = 0.0
    # Decline any round whose update would leave unmasked (node config require-secagg;
    # ``kyodo-member init`` sets it for a deployed member).
    require_secagg: bool = False
    # The member's own accountant, noise cap and fewest steps ('' / 0: the run's privacy.*;
    # node config accountant / max-noise-multiplier / min-steps).
    accountant: str = ""
    max_noise_multiplier: float = 0.0
    min_steps: int = 0
    # Who may answer as this member (deployment: from the consortium file and the SuperLink's
    # registrations). A node that names this member but is another Flower node, or signs with
    # another key, is left out of the run. Empty / 0: not pinned (simulation).
    ledger_public_key: str = ""  # hex Ed25519 key that signs the member's privacy receipts
    node_id: int = 0  # Flower node id its SuperNode key was registered as


@dataclass
class FederationConfig:
    name: str = "default"
    members: list[MemberConfig] = field(default_factory=list)


@dataclass
class TrainConfig:
    """Round and optimisation settings the coordinator sends with every round."""

    # Tuned for DP-SGD (bench/utility.py, docs/utility.md). Under DP the batch is the
    # expected Poisson batch, and noise per step scales with 1/batch: 128 episodes of a
    # member's 1600 (q = 0.08) over 100 steps needs sigma ~1 at epsilon 8. Adam's step on a
    # noisy coordinate shrinks to about lr x its signal-to-noise ratio, so DP needs a larger
    # lr than non-private training, but too large a one lets the noise random-walk every
    # weight; the best one depends on the model size, so it lives in model.lr.
    rounds: int = 4
    local_steps: int = 25
    # Members without DP draw this many episodes per step. DP members sample at
    # privacy.sample_rate and divide each noised step by this public number (never by q x
    # their private episode count, which would scale the update outside the mechanism).
    batch_size: int = 128
    # The most episodes a DP step puts through one forward/backward: its Poisson sample (q x
    # the member's episodes, unbounded in N) goes in chunks of this size, adding up to the
    # same clipped sum, so a member's memory does not grow with its data (measured ~1.5 MB
    # per episode on `small`).
    physical_batch: int = 256
    lr: float = 0.0  # 0: the model size's own DP-tuned lr (model.lr)
    weight_decay: float = 0.0
    min_cohort: int = 3
    experts_per_member: int = 2
    # Server optimiser per shard (aggregation.server_opt): fedavg, fedavgm or fedadam.
    server_optimizer: str = "fedavg"
    server_lr: float = 1.0
    server_momentum: float = 0.9  # fedavgm
    server_beta1: float = 0.9  # fedadam
    server_beta2: float = 0.99  # fedadam
    server_tau: float = 1e-3  # fedadam
    # An aggregated shard update whose L2 norm exceeds this (or that is not finite) is
    # rejected: the shard keeps its previous version and the round record says why. 0 = no bound.
    max_update_norm: float = 0.0
    # Seconds the coordinator waits for a stage's replies (query, train, each secure-
    # aggregation stage, evaluate); a node that has not answered by then is left out of the
    # round. Must exceed what members pad their replies to (train-reply-after).
    reply_timeout: float = 600.0
    # Share of a member's episodes held out for evaluation, each episode decided by its own
    # content (member_node.windows.split_episodes), so the share is binomial around it.
    held_out_fraction: float = 0.2
    # Held-out windows evaluated per episode, evenly spaced (0 = every window). 4 of an
    # episode's ~120 over ~400 held-out episodes keep evaluation affordable at thousands of
    # episodes per member (every window of 400 episodes on `small`: ~2 min per member).
    eval_windows_per_episode: int = 4
    seed: int = 0
    threads: int = 1
    # Fold plaintext replies in member-name order (holds every reply until the last): makes a
    # run bit-reproducible, e.g. to check that a resumed run equals an uninterrupted one.
    ordered_aggregation: bool = False


@dataclass
class PrivacyConfig:
    """Coordinator-side DP-SGD settings: the clipping norm is a training hyper-parameter
    shared by a cohort. Budgets and noise are the members' own (MemberConfig / node config)."""

    # With absolute actions the median per-episode gradient norm at initialisation was 0.24
    # (tiny) / 0.37 (small), so 0.1 clipped most episodes. With relative actions it is 0.005
    # (honda), 0.006 (sony), 0.017 (fanuc), 0.17 (softbank) on tiny, yet C from 0.003 to 0.1
    # gives the same held-out error: under Adam the update does not scale with C, and
    # sigma*C scales with the clipped signal.
    max_grad_norm: float = 0.1
    accountant: str = "rdp"
    min_steps: int = 5  # a round shortened below this is declined instead
    # A node whose remaining budget would need a planned noise multiplier above this declines
    # the round: such an update is mostly noise (sigma 0.9 spends epsilon 8 over the default
    # run), and in a cohort it only dilutes the others' mean. It can only make nodes decline,
    # never spend more.
    max_noise_multiplier: float = 10.0
    # Poisson sampling rate q of DP-SGD, the same public number for every DP member: the
    # expected batch is q x the member's own training episodes. A rate derived from the
    # member's size (train.batch_size / episodes) would put that size in every signed
    # receipt (q = batch / N), which the coordinator keeps. 0.08 is 128 / 1600, the default
    # federation's training episodes. DP nodes refuse a request without one (0).
    sample_rate: float = 0.08


@dataclass
class SecAggConfig:
    """Secure aggregation (SecAgg+): the coordinator learns each shard's cohort sum only.

    Updates are clipped to ``[-clip_range, clip_range]`` per entry and quantized to ``bits``
    bits with stochastic rounding; the modulus (2^32 or 2^64) is chosen per cohort so its sum
    can never wrap. ``degree`` 0 / ``threshold`` 0 mean the defaults of
    ``aggregation.secagg.graph`` (complete graph up to 8 members, majority threshold).
    """

    enabled: bool = True  # off only for debugging; every round record says which was used
    bits: int = 16  # 2R/65535 = 3e-5 steps at R=1: far below DP noise, and the float32 fast path
    # A round's delta entry beyond this is clipped (counted in the node's log). AdamW moves
    # an entry by at most about lr per step, so lr x local_steps bounds it; 1.0 covers
    # the shipped configs with room to spare.
    clip_range: float = 1.0
    degree: int = 0
    threshold: int = 0


@dataclass
class PublicConfig:
    """The round-0 model from public data (``coordinator.public_checkpoint``); 0 rounds: a
    random initialisation. Public simulated episodes only, never a member's."""

    rounds: int = 0  # rounds of pretraining, each train.local_steps steps per embodiment
    episodes: int = 2000  # public episodes per embodiment
    episode_seconds: float = 4.0
    # The public simulator's control rate relative to the members' robots: the stand-in for
    # the gap between public data and a member's own robot (1 = the members' own dynamics).
    fps_scale: float = 1.5
    seed: int = 1000  # public seeds: seed + i for the i-th embodiment (sorted by name)
    # A checkpoint made once by `kyodo-coordinator pretrain` (or any safetensors file of
    # exactly this model's tensors), imported as round 0 instead of pretraining in the run;
    # refused unless its bytes hash to checkpoint_sha256, the value the operator published.
    checkpoint: str = ""
    checkpoint_sha256: str = ""


@dataclass
class KyodoConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    embodiments: dict[str, EmbodimentConfig] = field(default_factory=dict)
    federation: FederationConfig = field(default_factory=FederationConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    privacy: PrivacyConfig = field(default_factory=PrivacyConfig)
    secagg: SecAggConfig = field(default_factory=SecAggConfig)
    public: PublicConfig = field(default_factory=PublicConfig)
    out_dir: str = "runs/demo"
    # An earlier run's directory: this run's round 0 is that run's last committed model (its
    # store's HEAD; ``coordinator.continuation``), so a consortium goes on training one model
    # over many runs. Empty: round 0 comes from ``public`` (or the initialisation).
    continue_from: str = ""
    data_root: str = "data/demo"
    # Where simulated members keep their ledger and keys; empty: ``<out_dir>/nodes``.
    state_root: str = ""
    # The coordinator's Ed25519 key that signs every committed round (created on first use);
    # empty: ``<out_dir>/coordinator_ed25519.pem``. A deployment keeps one per operator.
    coordinator_key: str = ""


def _available(kind: str) -> list[str]:
    return sorted(p.stem for p in (CONFIG_DIR / kind).glob("*.yaml"))


def _load_yaml(kind: str, name: str) -> DictConfig:
    path = CONFIG_DIR / kind / f"{name}.yaml"
    if not path.is_file():
        raise ConfigError(f"unknown {kind} config {name!r}; available: {', '.join(_available(kind))}")
    return OmegaConf.load(path)


def _describe(err: Exception) -> str:
    """OmegaConf's first message line, without its multi-line object dump."""
    msg = getattr(err, "msg", None) or str(err)
    return msg.splitlines()[0]


def _merge(base: DictConfig, other: Any, source: str) -> DictConfig:
    try:
        return OmegaConf.merge(base, other)
    except (OmegaConfBaseException, TypeError) as err:
        key = getattr(err, "full_key", None) or "?"
        raise ConfigError(f"{source}: bad key or value {key!r}: {_describe(err)}") from None


def _apply_override(cfg: DictConfig, item: str) -> None:
    key, _, raw = item.partition("=")
    key = key.strip()
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as err:
        raise ConfigError(f"override {item!r}: cannot parse value: {err}") from None
    try:
        current = OmegaConf.select(cfg, key, default=_MISSING)
        if current is _MISSING:
            raise ConfigKeyError(f"Key '{key}' does not exist")
        if isinstance(current, str) and isinstance(value, int | float | bool):
            # A string setting keeps its text: YAML reads a hash of digits ("000...01") as the
            # int 1, "0123" as the octal 83, "1.5e+3" as a float.
            value = raw.strip()
        OmegaConf.update(cfg, key, value, merge=True)
    except (OmegaConfBaseException, TypeError, ValueError) as err:
        raise ConfigError(f"override {item!r}: unknown key or bad value for {key!r}: {_describe(err)}") from None


_MISSING = object()


def load_config(
    model: str = "tiny",
    federation: str = "default",
    overrides: Sequence[str] | Mapping[str, Any] = (),
) -> KyodoConfig:
    """Compose schema <- ``configs/embodiments.yaml`` <- model <- federation <- overrides.

    ``overrides`` is a dotlist (``["train.rounds=5"]``) or a flat mapping of dotted keys
    (Flower's run config). The preset names themselves may also be overridden this way
    with the keys ``model`` / ``federation`` holding a preset name.
    """
    items = _as_dotlist(overrides)
    presets = {"model": model, "federation": federation}
    rest: list[str] = []
    for item in items:
        key, _, value = item.partition("=")
        if key in presets:
            presets[key] = value
        else:
            rest.append(item)
    cfg = OmegaConf.structured(KyodoConfig)
    OmegaConf.set_struct(cfg, True)
    # Embodiments are a name -> spec mapping: new names are allowed, but each spec is still
    # a typed EmbodimentConfig, so a misspelled field inside one is still an error.
    OmegaConf.set_struct(cfg.embodiments, False)
    cfg = _merge(cfg, {"embodiments": OmegaConf.load(CONFIG_DIR / "embodiments.yaml")}, "configs/embodiments.yaml")
    cfg = _merge(cfg, {"model": _load_yaml("model", presets["model"])}, f"configs/model/{presets['model']}.yaml")
    cfg = _merge(
        cfg,
        {"federation": _load_yaml("federation", presets["federation"])},
        f"configs/federation/{presets['federation']}.yaml",
    )
    for item in rest:
        _apply_override(cfg, item)
    obj = OmegaConf.to_object(cfg)
    assert isinstance(obj, KyodoConfig)
    validate(obj)
    if obj.train.lr == 0:
        obj.train.lr = obj.model.lr
    return obj


def _as_dotlist(overrides: Sequence[str] | Mapping[str, Any]) -> list[str]:
    if isinstance(overrides, Mapping):
        out = []
        for key, value in overrides.items():
            if isinstance(value, bool):
                value = str(value).lower()
            out.append(f"{key}={value}")
        return out
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form key=value")
    return list(overrides)


def validate(cfg: KyodoConfig) -> None:
    """Cross-field checks that a schema cannot express."""
    m = cfg.model
    if m.d_model % m.n_heads:
        raise ConfigError(f"model.d_model ({m.d_model}) must be divisible by model.n_heads ({m.n_heads})")
    if not 1 <= m.top_k <= m.n_experts:
        raise ConfigError(f"model.top_k ({m.top_k}) must be in 1..model.n_experts ({m.n_experts})")
    if m.task_buckets < 0:
        raise ConfigError(f"model.task_buckets ({m.task_buckets}) must be >= 0 (0: the policy does not read the task)")
    for name, emb in cfg.embodiments.items():
        for field_name, dim in (("state", emb.state_dim), ("env_state", emb.env_state_dim), ("action", emb.action_dim)):
            bound = getattr(emb, f"{field_name}_bound")
            if len(bound) != dim:
                raise ConfigError(
                    f"embodiments.{name}.{field_name}_bound has {len(bound)} values but {field_name}_dim is {dim}"
                )
            if any(not b > 0 for b in bound):
                raise ConfigError(f"embodiments.{name}.{field_name}_bound must be positive (it divides the data)")
        if emb.state_dim <= 0 or emb.action_dim <= 0:
            raise ConfigError(f"embodiments.{name}: state_dim and action_dim must be positive")
        if emb.fps <= 0 or emb.image_feature_dim < 0 or emb.env_state_dim < 0:
            raise ConfigError(f"embodiments.{name}: fps must be positive and feature sizes non-negative")
        rel = emb.action_relative_to
        if rel and (len(rel) != emb.action_dim or any(not -1 <= i < emb.state_dim for i in rel)):
            raise ConfigError(
                f"embodiments.{name}.action_relative_to needs one state index (0..{emb.state_dim - 1}) or -1 per "
                f"action dimension ({emb.action_dim}), got {list(rel)}"
            )
    if not (math.isfinite(cfg.train.reply_timeout) and cfg.train.reply_timeout > 0):
        raise ConfigError(f"train.reply_timeout must be a positive number of seconds, got {cfg.train.reply_timeout}")
    seen = set()
    if cfg.secagg.enabled and len(cfg.federation.members) > SECAGG_MAX_COHORT:
        # The planner puts every member able to train into adapter/shared's cohort: a larger one
        # is a group every node refuses, round after round (nothing spent, nothing trained).
        raise ConfigError(
            f"federation has {len(cfg.federation.members)} members, but a secure-aggregation cohort has at most "
            f"{SECAGG_MAX_COHORT} (one-byte Shamir share ids) and adapter/shared's cohort is every member"
        )
    for i, member in enumerate(cfg.federation.members):
        if not member.name:
            raise ConfigError(f"federation.members[{i}].name is empty")
        if member.name in seen:
            raise ConfigError(f"federation.members[{i}].name {member.name!r} is used twice")
        seen.add(member.name)
        if member.embodiment not in cfg.embodiments:
            raise ConfigError(
                f"federation.members[{i}].embodiment {member.embodiment!r} is not one of {sorted(cfg.embodiments)}"
            )
        if not (member.epsilon > 0 and 0 < member.delta < 1 and member.noise_multiplier >= 0):
            raise ConfigError(f"federation.members[{i}]: need epsilon > 0, 0 < delta < 1, noise_multiplier >= 0")
        if member.budget_rounds < 0 or (member.budget_rounds and member.noise_multiplier):
            raise ConfigError(
                f"federation.members[{i}]: budget_rounds must be >= 0 and not set with a fixed noise_multiplier, "
                f"got {member.budget_rounds}"
            )
        if not (member.eval_noise_multiplier >= 0 and member.eval_loss_bound > 0):
            raise ConfigError(f"federation.members[{i}]: need eval_noise_multiplier >= 0 and eval_loss_bound > 0")
        for what in ("train_reply_after", "eval_reply_after"):
            seconds = getattr(member, what)
            if not (math.isfinite(seconds) and 0 <= seconds < cfg.train.reply_timeout):
                raise ConfigError(
                    f"federation.members[{i}]: need 0 <= {what} < train.reply_timeout ({cfg.train.reply_timeout:g} s), "
                    f"got {seconds}"
                )
        if member.accountant not in ("", "rdp", "prv") or not member.max_noise_multiplier >= 0 or member.min_steps < 0:
            raise ConfigError(
                f"federation.members[{i}]: need accountant '', rdp or prv, max_noise_multiplier >= 0 and "
                f"min_steps >= 0 ('' / 0: the run's privacy.*)"
            )
        if member.ledger_public_key and not re.fullmatch(r"[0-9a-f]{64}", member.ledger_public_key):
            raise ConfigError(f"federation.members[{i}].ledger_public_key must be 64 lowercase hex characters")
        if member.node_id < 0:
            raise ConfigError(f"federation.members[{i}].node_id must be >= 0 (0 = not pinned)")
    if cfg.privacy.accountant not in ("rdp", "prv"):
        raise ConfigError(f"privacy.accountant {cfg.privacy.accountant!r} is not one of rdp, prv")
    if not cfg.privacy.max_grad_norm > 0:
        raise ConfigError("privacy.max_grad_norm must be positive")
    if not cfg.privacy.max_noise_multiplier > 0:
        raise ConfigError("privacy.max_noise_multiplier must be positive")
    if not 0 < cfg.privacy.sample_rate <= 1:
        raise ConfigError(
            f"privacy.sample_rate must be in (0, 1] (the public DP sampling rate), got {cfg.privacy.sample_rate}"
        )
    if cfg.train.physical_batch < 1:
        raise ConfigError(f"train.physical_batch must be >= 1, got {cfg.train.physical_batch}")
    if cfg.train.server_optimizer not in ("fedavg", "fedavgm", "fedadam"):
        raise ConfigError(
            f"train.server_optimizer {cfg.train.server_optimizer!r} is not one of fedavg, fedavgm, fedadam"
        )
    if not (math.isfinite(m.lr) and m.lr > 0):
        raise ConfigError(f"model.lr ({m.lr}) must be a positive finite number")
    if not (math.isfinite(cfg.train.lr) and cfg.train.lr >= 0):
        raise ConfigError(f"train.lr ({cfg.train.lr}) must be >= 0 (0 = the model's own lr, model.lr)")
    if cfg.train.max_update_norm < 0:
        raise ConfigError("train.max_update_norm must be >= 0 (0 = no bound)")
    if cfg.train.min_cohort < 1:
        raise ConfigError("train.min_cohort must be >= 1")
    if not 0.0 < cfg.train.held_out_fraction < 1.0:
        raise ConfigError("train.held_out_fraction must be in (0, 1)")
    if cfg.train.eval_windows_per_episode < 0:
        raise ConfigError("train.eval_windows_per_episode must be >= 0 (0 = every window)")
    pub = cfg.public
    if pub.rounds < 0 or pub.episodes < 1 or not pub.episode_seconds > 0:
        raise ConfigError("public.rounds must be >= 0 (0 = no pretraining), public.episodes >= 1, episode_seconds > 0")
    if not (math.isfinite(pub.fps_scale) and pub.fps_scale > 0):
        raise ConfigError(f"public.fps_scale ({pub.fps_scale}) must be a positive finite number")
    if pub.checkpoint and not re.fullmatch(r"[0-9a-f]{64}", pub.checkpoint_sha256):
        raise ConfigError(
            "public.checkpoint needs public.checkpoint_sha256: the published sha256 of the file "
            f"(64 lowercase hex digits), got {pub.checkpoint_sha256!r}"
        )
    if pub.checkpoint_sha256 and not pub.checkpoint:
        raise ConfigError("public.checkpoint_sha256 is set but public.checkpoint (the file) is not")
    if pub.checkpoint and pub.rounds > 0:
        raise ConfigError("public.checkpoint and public.rounds > 0 both make round 0: set one of them")
    if cfg.continue_from and (pub.checkpoint or pub.rounds > 0):
        other = "public.checkpoint" if pub.checkpoint else "public.rounds > 0"
        raise ConfigError(f"continue_from and {other} both make round 0: set one of them")
    sa = cfg.secagg
    if not 1 <= sa.bits <= 62:
        raise ConfigError(f"secagg.bits ({sa.bits}) must be in 1..62")
    if not (math.isfinite(sa.clip_range) and sa.clip_range > 0):
        raise ConfigError("secagg.clip_range must be a positive finite number")
    if sa.degree < 0 or sa.threshold < 0:
        raise ConfigError("secagg.degree and secagg.threshold must be >= 0 (0 = default)")
    # Below a complete graph the degree is rounded up to even (a Harary graph needs it).
    if sa.threshold and sa.degree and 2 * sa.threshold <= sa.degree + sa.degree % 2:
        raise ConfigError(
            f"secagg.threshold {sa.threshold} must be more than half of secagg.degree {sa.degree} "
            f"({sa.degree + sa.degree % 2} in cohorts larger than it, rounded up to even): at half or less a "
            "coordinator could collect both of a member's secrets"
        )


def to_yaml(cfg: KyodoConfig) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


def config_from_run_config(run_config: Mapping[str, Any]) -> KyodoConfig:
    """Build the config from Flower's run config (``model``, ``federation``, ``overrides``).

    ``overrides`` is a whitespace-separated dotlist, e.g. ``"train.rounds=2 train.lr=0.01"``,
    so every value in ``configs/`` can be changed with ``flwr run --run-config``.
    """
    known = {"model", "federation", "overrides"}
    unknown = sorted(set(run_config) - known)
    if unknown:
        raise ConfigError(f"unknown run-config keys {unknown}; expected {sorted(known)}")
    overrides = shlex.split(str(run_config.get("overrides", "") or ""))
    return load_config(
        model=str(run_config.get("model", "tiny")),
        federation=str(run_config.get("federation", "default")),
        overrides=overrides,
    )
