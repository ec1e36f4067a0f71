"""The round-0 model from public data: pretrained, non-privately, on public simulated
episodes of every embodiment the consortium knows.

Why: the backbone (embeddings, attention, norms, routers) is frozen during federated rounds
(ARCHITECTURE), which presumes it was trained before. From a random initialisation the
members' DP-SGD has to learn ~31k parameters of ``tiny`` from ~1600 episodes each, which it
cannot do at epsilon 8 (docs/utility.md: n x epsilon / sqrt(d) ~ 72, Tramer &
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

In a consortium the operator pretrains once, outside any run (``kyodo-coordinator
pretrain``), publishes the file's sha256 with the run configuration, and every run imports
it (``public.checkpoint`` + ``public.checkpoint_sha256``): the ServerApp does not spend
minutes pretraining at every start (about 12 on ``small``), and the signed round-0 record
names exactly which weights round 1 started from (:func:`initial_source`), so an auditor or
a member can check it against the published file.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import safetensors.torch
import torch

from member_node.synthetic import generate_episodes
from member_node.trainer import UniformSampler, train_plain
from member_node.windows import EpisodeWindows
from shared_model.config import EmbodimentConfig, KyodoConfig
from shared_model.durable import fsync_dir
from shared_model.policy import Policy
from shared_model.protocol import TrainHyperParams
from shared_model.shards import ShardLayout, set_trainable


def public_embodiments(cfg: KyodoConfig) -> dict[str, EmbodimentConfig]:
    """The public simulator's embodiments: the consortium's, at ``public.fps_scale`` x the control rate."""
    scale = cfg.public.fps_scale
    return {name: dataclasses.replace(emb, fps=max(1, round(emb.fps * scale))) for name, emb in cfg.embodiments.items()}


def _pretrainable(policy: Policy) -> list[torch.nn.Parameter]:
    """Every parameter but LoRA A, which stays at its shared seed (ARCHITECTURE: only B is
    trained, so that the mean of the members' B is the mean of their updates)."""
    return [p for name, p in policy.named_parameters() if ".lora_A." not in name]


def public_checkpoint(cfg: KyodoConfig, on_block: Callable[[int, str], None] | None = None) -> dict[str, torch.Tensor]:
    """The pretrained round-0 state dict (``public.rounds`` > 0), trained on public episodes only.

    ``on_block(round, embodiment)`` is called after each embodiment's steps of each round (a
    progress bar: ``small`` takes minutes)."""
    pub = cfg.public
    if pub.rounds < 1:
        raise ValueError(f"public.rounds must be >= 1 to pretrain, got {pub.rounds}")
    model = cfg.model
    policy = Policy(model, cfg.embodiments)
    windows = {}
    for i, (name, emb) in enumerate(sorted(public_embodiments(cfg).items())):
        episodes = generate_episodes(name, emb, pub.episodes, pub.episode_seconds, pub.seed + i)
        windows[name] = EpisodeWindows(episodes, cfg.embodiments[name], model.history, model.chunk, model.task_buckets)
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
        for rnd in range(1, pub.rounds + 1):
            for name, data in windows.items():
                train_plain(policy, name, data, hp, model.aux_loss_coef, rng, sampler, optimizer, [])
                if on_block is not None:
                    on_block(rnd, name)
    finally:
        set_trainable(policy, [])
    return {k: v.detach().clone() for k, v in policy.state_dict().items()}


FORMAT = "kyodo-public-checkpoint/1"  # safetensors metadata "format" of a file this module writes


class CheckpointError(ValueError):
    """The configured public checkpoint cannot be round 0: missing, not the published bytes,
    or not this model's tensors. Raised before anything is committed."""


def checkpoint_metadata(cfg: KyodoConfig) -> dict[str, str]:
    """What a checkpoint file says about how it was made (safetensors metadata: str -> str)."""
    return {"format": FORMAT, "model": cfg.model.name, "public": json.dumps(_made_with(cfg), sort_keys=True)}


def _made_with(cfg: KyodoConfig) -> dict[str, Any]:
    """The settings pretraining depends on."""
    pub = cfg.public
    return {
        "rounds": pub.rounds,
        "episodes": pub.episodes,
        "episode_seconds": pub.episode_seconds,
        "fps_scale": pub.fps_scale,
        "seed": pub.seed,
        "lr": cfg.train.lr or cfg.model.lr,
        "local_steps": cfg.train.local_steps,
        "batch_size": cfg.train.batch_size,
    }


def write_checkpoint(state: dict[str, torch.Tensor], path: Path | str, metadata: dict[str, str]) -> str:
    """Write ``state`` as safetensors at ``path`` (complete or absent: temp name, fsync, rename)
    and return the sha256 of the file's bytes, which the operator publishes."""
    path = Path(path)
    data = safetensors.torch.save({k: v.contiguous() for k, v in state.items()}, metadata=metadata)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        with open(tmp, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)
    return hashlib.sha256(data).hexdigest()


def load_checkpoint(cfg: KyodoConfig) -> dict[str, torch.Tensor]:
    """The state dict in ``public.checkpoint``, after checking it is the published file and
    exactly this model's tensors.

    The bytes are read once, hashed, and parsed from that same buffer, so a file swapped
    between the check and the load cannot slip in, and nothing unverified is parsed. This
    holds the file and the model in RAM together, once per run (``initial_model`` holds the
    whole model anyway).
    """
    path = Path(cfg.public.checkpoint)
    try:
        data = path.read_bytes()
    except OSError as err:
        raise _unreadable(path, err) from err
    _require_published(cfg, hashlib.sha256(data).hexdigest())
    try:
        state = safetensors.torch.load(data)
    except Exception as err:  # safetensors raises its own SafetensorError for malformed headers
        raise CheckpointError(f"public.checkpoint {path} is not a safetensors file: {err}") from err
    _check_fits(cfg, state, path)
    return state


def check_published(cfg: KyodoConfig) -> None:
    """Fail early (``kyodo-coordinator init`` and ``run``) if ``public.checkpoint`` is not the
    published file: a streaming hash, so it costs no RAM at any model size. The run itself
    still checks everything again, on the bytes it loads (:func:`load_checkpoint`)."""
    if not cfg.public.checkpoint:
        return
    path = Path(cfg.public.checkpoint)
    digest = hashlib.sha256()
    try:
        with open(path, "rb") as fh:
            while chunk := fh.read(1 << 24):
                digest.update(chunk)
    except OSError as err:
        raise _unreadable(path, err) from err
    _require_published(cfg, digest.hexdigest())
    # Its tensors' names, shapes and dtypes from the header alone: a checkpoint of another
    # model shape (another model.task_buckets, say) was refused only inside the submitted run
    try:
        with safetensors.safe_open(path, framework="pt") as reader:
            specs = {name: _slice_spec(reader.get_slice(name)) for name in reader.keys()}  # noqa: SIM118
    except Exception as err:  # safetensors raises its own SafetensorError for malformed headers
        raise CheckpointError(f"public.checkpoint {path} is not a safetensors file: {err}") from err
    _raise_misfit(cfg, path, _misfit(cfg, specs))


_SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}


def _slice_spec(tensor_slice: Any) -> tuple[torch.dtype | str, tuple[int, ...]]:
    dtype = tensor_slice.get_dtype()
    return _SAFETENSORS_DTYPES.get(dtype, dtype), tuple(tensor_slice.get_shape())


def _unreadable(path: Path, err: OSError) -> CheckpointError:
    return CheckpointError(f"public.checkpoint {path}: cannot read it ({err.strerror or err})")


def _require_published(cfg: KyodoConfig, digest: str) -> None:
    if digest != cfg.public.checkpoint_sha256:
        raise CheckpointError(
            f"public.checkpoint {cfg.public.checkpoint} has sha256 {digest}, not the published "
            f"public.checkpoint_sha256 {cfg.public.checkpoint_sha256}: refusing to start from it"
        )


def _check_fits(cfg: KyodoConfig, state: dict[str, torch.Tensor], path: Path) -> None:
    """Every tensor of the policy, with its shape and dtype, and nothing else; all finite."""
    problems = _misfit(cfg, {name: (t.dtype, tuple(t.shape)) for name, t in state.items()})
    if not problems:
        problems = [
            f"{n}: not finite" for n, t in sorted(state.items()) if t.is_floating_point() and not t.isfinite().all()
        ]
    _raise_misfit(cfg, path, problems)


def _misfit(cfg: KyodoConfig, specs: dict[str, tuple[torch.dtype | str, tuple[int, ...]]]) -> list[str]:
    """What keeps tensors of these (dtype, shape) from being exactly the policy's."""
    layout = ShardLayout.from_config(cfg.model, cfg.embodiments)  # meta device: nothing allocated
    expected = {spec.name: spec for specs in layout.shards.values() for spec in specs}
    problems = [f"missing {name}" for name in sorted(set(expected) - set(specs))]
    problems += [f"unexpected {name}" for name in sorted(set(specs) - set(expected))]
    for name in sorted(set(expected) & set(specs)):
        want, (dtype, shape) = expected[name], specs[name]
        if tuple(want.shape) != shape or want.dtype != dtype:
            problems.append(f"{name}: {dtype} {shape}, model has {want.dtype} {tuple(want.shape)}")
    return problems


def _raise_misfit(cfg: KyodoConfig, path: Path, problems: list[str]) -> None:
    if not problems:
        return
    shown = "; ".join(problems[:5]) + (f"; and {len(problems) - 5} more" if len(problems) > 5 else "")
    hint = ""
    if any("task_proj" in p for p in problems):
        hint = f" (the checkpoint was made with another model.task_buckets than this run's {cfg.model.task_buckets})"
    raise CheckpointError(f"public.checkpoint {path} does not fit model {cfg.model.name!r}: {shown}{hint}")


def initial_source(cfg: KyodoConfig) -> dict[str, Any]:
    """Where round 0 came from, for the coordinator's signed round-0 record."""
    pub = cfg.public
    if pub.checkpoint:
        # "sha256:" prefix: a bare 64-hex string in a manifest reads as a store object id.
        return {"source": "public-checkpoint", "sha256": f"sha256:{pub.checkpoint_sha256}"}
    if pub.rounds > 0:
        return {"source": "public-pretraining", **_made_with(cfg)}
    return {"source": "init", "init_seed": cfg.model.init_seed}
