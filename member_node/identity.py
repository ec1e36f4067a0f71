"""Who this node is and where its data lives: from the node's own config, never the coordinator.

Deployment: ``flower-supernode --node-config 'member="sony" embodiment="so100"
data-dir="/srv/kyodo/sony" state-dir="/srv/kyodo/sony-state" epsilon=8.0 delta=1e-5'``.
The privacy budget is part of the node's config for the same reason: nothing the
coordinator sends can raise it. Simulation: Flower gives each virtual node a ``partition-id``,
which picks the matching member of the federation config, with its data under
``data_root/<member>``.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from member_node.reply_timing import ReplyDelay
from privacy.accountant import ACCOUNTANTS
from privacy.budget import Budget
from privacy.eval_release import EvalPrivacy
from shared_model.config import KyodoConfig, PrivacyConfig
from shared_model.device import resolve_device
from shared_model.durable import replace_json


class NodeConfigError(ValueError):
    """The node's own configuration is missing or inconsistent; the text says what to fix."""


@dataclass(frozen=True)
class MemberIdentity:
    name: str
    embodiment: str
    data_dir: Path
    state_dir: Path  # ledger and signing key: the member's, kept across runs
    epsilon: float = 8.0
    delta: float = 1e-5
    dp: bool = True
    noise_multiplier: float = 0.0  # 0: planned from the budget over the run's rounds
    # The fewest training rounds, over every run, the member spreads its budget across; the
    # coordinator's planned rounds count only when they are more (0: follow the coordinator).
    budget_rounds: int = 0
    eval_noise_multiplier: float = 5.0  # held-out error release under DP; 0: none
    eval_loss_bound: float = 0.05
    device: str = "cpu"  # where the node trains and evaluates (shared_model.device)
    workers: int = 1  # data-parallel DP-SGD processes (member_node.parallel); cuda: one per device
    # Replies leave no earlier than this many seconds after their request arrived
    # (member_node.reply_timing: hides how long the work took); 0: as soon as ready.
    train_reply_after: float = 0.0
    eval_reply_after: float = 0.0
    # Train only where the update leaves masked: a round without secure aggregation, or one
    # that puts this member alone in a cohort for a shard other than its own embodiment
    # adapter, is declined (the coordinator decides both; the member need not trust it to).
    require_secagg: bool = False
    # The consortium's published file (members' ledger keys, as auditors use it): the identity
    # keys a round lists for the other members must be the ones it publishes ('' : not pinned).
    consortium_file: str = ""
    # Refuse to run without ``consortium_file`` (``kyodo-member init`` sets it).
    require_pinned_keys: bool = False
    # The member's own DP-SGD accounting settings, which the run's ``privacy.*`` otherwise
    # supply ('' / 0: the run's). None of the run's can raise the budget, but the accountant
    # decides what the member's epsilon means and the two limits decide which rounds it
    # trains; a member that pins them keeps them whatever a run asks.
    accountant: str = ""
    max_noise_multiplier: float = 0.0
    min_steps: int = 0

    def privacy_settings(self, run: PrivacyConfig) -> PrivacyConfig:
        """The run's privacy settings with the member's own in their place where it set them."""
        return replace(
            run,
            accountant=self.accountant or run.accountant,
            max_noise_multiplier=self.max_noise_multiplier or run.max_noise_multiplier,
            min_steps=self.min_steps or run.min_steps,
        )

    def privacy_overrides(self, run: PrivacyConfig) -> dict[str, tuple[Any, Any]]:
        """Each setting where the member's own differs from the run's: name -> (member's, run's)."""
        own = self.privacy_settings(run)
        return {
            name: (getattr(own, name), getattr(run, name))
            for name in ("accountant", "max_noise_multiplier", "min_steps")
            if getattr(own, name) != getattr(run, name)
        }

    def eval_privacy(self) -> EvalPrivacy:
        return EvalPrivacy(self.eval_noise_multiplier, self.eval_loss_bound)

    def reply_delays(self) -> tuple[ReplyDelay, ReplyDelay]:
        """How long train and evaluation replies are held (ValueError names a bad setting)."""
        return ReplyDelay(self.train_reply_after, "train"), ReplyDelay(self.eval_reply_after, "eval")

    def torch_device(self) -> torch.device:
        return resolve_device(self.device)


def _float(node_config: Mapping[str, Any], key: str, default: float) -> float:
    try:
        return float(node_config.get(key, default))
    except (TypeError, ValueError):
        raise NodeConfigError(f"node config {key!r} must be a number, got {node_config[key]!r}") from None


def _int(node_config: Mapping[str, Any], key: str, default: int) -> int:
    value = node_config.get(key, default)
    if isinstance(value, bool) or not (isinstance(value, int) or (isinstance(value, str) and value.isdigit())):
        raise NodeConfigError(f"node config {key!r} must be a whole number, got {value!r}")
    return int(value)


def own_privacy_problem(accountant: str, max_noise_multiplier: float, min_steps: int, name: str) -> str:
    """What is wrong with the accounting settings a member pinned ('' when nothing is), each
    setting named by ``name`` formatted with its node-config key (``"--{}"`` for ``init``)."""
    if accountant not in ("", *ACCOUNTANTS):
        return f"{name.format('accountant')} {accountant!r} is not one of {', '.join(ACCOUNTANTS)} ('': the run's)"
    if not (math.isfinite(max_noise_multiplier) and max_noise_multiplier >= 0):
        return f"{name.format('max-noise-multiplier')} must be a positive number (0: the run's), got {max_noise_multiplier}"
    if min_steps < 0:
        return f"{name.format('min-steps')} must be >= 0 (0: the run's), got {min_steps}"
    return ""


def workers_problem(workers: int, device: str) -> str:
    """Why ``workers`` data-parallel processes cannot train on ``device`` here ('' if they can)."""
    if workers < 1:
        return f"must be >= 1, got {workers}"
    if workers == 1:
        return ""
    kind = torch.device(device.strip().lower()).type
    if kind == "cuda" and device.strip().lower() != "cuda":
        return f"with {workers} workers name the device 'cuda' (worker r uses cuda:r), not {device!r}"
    if kind == "cuda" and torch.cuda.device_count() < workers:
        return f"{workers} workers need {workers} CUDA devices, this machine has {torch.cuda.device_count()}"
    return ""


def _bool(node_config: Mapping[str, Any], key: str, default: bool) -> bool:
    value = node_config.get(key, default)
    if isinstance(value, bool):
        return value
    if str(value).lower() in ("true", "1", "yes"):
        return True
    if str(value).lower() in ("false", "0", "no"):
        return False
    raise NodeConfigError(f"node config {key!r} must be true or false, got {value!r}")


BUDGET_FILE = "budget.json"  # in the state directory: the budget `kyodo-member budget` set last


def write_budget_file(state_dir: Path, epsilon: float, delta: float) -> None:
    """Record a budget the member just set where its running node reads it at every message."""
    state_dir.mkdir(parents=True, exist_ok=True)
    replace_json(state_dir / BUDGET_FILE, {"epsilon": float(epsilon), "delta": float(delta)})


def _with_lowered_budget(identity: MemberIdentity) -> MemberIdentity:
    """The lower of the epsilon the node was started with and the one ``kyodo-member budget``
    set since. A member that lowers its budget means it at once: a walkthrough's node, not
    restarted, went on spending at the old 8 and passed the 2.7 its member had published, and
    every audit of that member failed after. A raise waits for a restart (the node config), so
    nothing but the member's own start can ever widen what a node may spend."""
    path = Path(identity.state_dir) / BUDGET_FILE
    if not path.is_file():
        return identity
    try:
        epsilon = float(json.loads(path.read_text(encoding="utf-8"))["epsilon"])
    except (OSError, ValueError, KeyError, TypeError) as err:
        # Refusing is the safe side: a budget the member lowered must not be read as none.
        raise NodeConfigError(
            f"member {identity.name!r}: {path} is unreadable ({err}): run kyodo-member budget again"
        ) from None
    if not math.isfinite(epsilon) or epsilon >= identity.epsilon:
        return identity
    return replace(identity, epsilon=epsilon)


def resolve_identity(node_config: Mapping[str, Any], cfg: KyodoConfig) -> MemberIdentity:
    if "member" in node_config:
        for key in ("embodiment", "data-dir"):
            if key not in node_config:
                raise NodeConfigError(f"node config sets 'member' but not {key!r}")
        data_dir = Path(str(node_config["data-dir"])).expanduser()
        identity = MemberIdentity(
            name=str(node_config["member"]),
            embodiment=str(node_config["embodiment"]),
            data_dir=data_dir,
            state_dir=Path(str(node_config.get("state-dir", data_dir.parent / f"{data_dir.name}-state"))).expanduser(),
            epsilon=_float(node_config, "epsilon", 8.0),
            delta=_float(node_config, "delta", 1e-5),
            dp=_bool(node_config, "dp", True),
            noise_multiplier=_float(node_config, "noise-multiplier", 0.0),
            budget_rounds=_int(node_config, "budget-rounds", 0),
            eval_noise_multiplier=_float(node_config, "eval-noise-multiplier", 5.0),
            eval_loss_bound=_float(node_config, "eval-loss-bound", 0.05),
            device=str(node_config.get("device", "cpu")),
            workers=_int(node_config, "workers", 1),
            train_reply_after=_float(node_config, "train-reply-after", 0.0),
            eval_reply_after=_float(node_config, "eval-reply-after", 0.0),
            require_secagg=_bool(node_config, "require-secagg", False),
            consortium_file=str(node_config.get("consortium-file", "")),
            require_pinned_keys=_bool(node_config, "require-pinned-keys", False),
            accountant=str(node_config.get("accountant", "")),
            max_noise_multiplier=_float(node_config, "max-noise-multiplier", 0.0),
            min_steps=_int(node_config, "min-steps", 0),
        )
    elif "partition-id" in node_config:
        pid = int(node_config["partition-id"])
        members = cfg.federation.members
        if not 0 <= pid < len(members):
            raise NodeConfigError(
                f"simulation node {pid} has no member: federation {cfg.federation.name!r} has {len(members)}"
            )
        m = members[pid]
        state_root = Path(cfg.state_root) if cfg.state_root else Path(cfg.out_dir) / "nodes"
        identity = MemberIdentity(
            name=m.name,
            embodiment=m.embodiment,
            data_dir=Path(cfg.data_root) / m.name,
            state_dir=state_root / m.name,
            epsilon=m.epsilon,
            delta=m.delta,
            dp=m.dp,
            noise_multiplier=m.noise_multiplier,
            budget_rounds=m.budget_rounds,
            eval_noise_multiplier=m.eval_noise_multiplier,
            eval_loss_bound=m.eval_loss_bound,
            device=m.device,
            workers=m.workers,
            train_reply_after=m.train_reply_after,
            eval_reply_after=m.eval_reply_after,
            require_secagg=m.require_secagg,
            accountant=m.accountant,
            max_noise_multiplier=m.max_noise_multiplier,
            min_steps=m.min_steps,
        )
    else:
        raise NodeConfigError("node config names no member: set member, embodiment and data-dir")
    identity = _with_lowered_budget(identity)
    try:
        Budget(identity.epsilon, identity.delta)
    except ValueError as err:
        raise NodeConfigError(f"member {identity.name!r}: privacy budget: {err}") from None
    if identity.noise_multiplier < 0:
        raise NodeConfigError(f"member {identity.name!r}: noise multiplier must be >= 0")
    if identity.budget_rounds < 0:
        raise NodeConfigError(f"member {identity.name!r}: node config 'budget-rounds' must be >= 0")
    if identity.budget_rounds and identity.noise_multiplier:
        raise NodeConfigError(
            f"member {identity.name!r}: node config sets both 'noise-multiplier' (a fixed sigma) and 'budget-rounds' "
            "(a sigma planned over that many rounds): set one"
        )
    try:
        identity.eval_privacy()
    except ValueError as err:
        raise NodeConfigError(f"member {identity.name!r}: eval-noise-multiplier / eval-loss-bound: {err}") from None
    try:
        identity.reply_delays()
    except ValueError as err:
        raise NodeConfigError(f"member {identity.name!r}: node config {err}") from None
    try:
        identity.torch_device()
    except ValueError as err:
        raise NodeConfigError(f"member {identity.name!r}: node config 'device': {err}") from None
    own = own_privacy_problem(identity.accountant, identity.max_noise_multiplier, identity.min_steps, "'{}'")
    if own:
        raise NodeConfigError(f"member {identity.name!r}: node config {own}")
    problem = workers_problem(identity.workers, identity.device)
    if problem:
        raise NodeConfigError(f"member {identity.name!r}: node config 'workers': {problem}")
    if identity.require_pinned_keys and not identity.consortium_file:
        # `kyodo-member start` says this first; this catches a SuperNode started by hand.
        raise NodeConfigError(
            f"member {identity.name!r}: node config 'require-pinned-keys' is set but no 'consortium-file' pins the "
            "other members' identity keys (kyodo-member trust)"
        )
    if identity.embodiment not in cfg.embodiments:
        raise NodeConfigError(
            f"member {identity.name!r} declares embodiment {identity.embodiment!r}, "
            f"which the consortium config does not know ({sorted(cfg.embodiments)})"
        )
    return identity
