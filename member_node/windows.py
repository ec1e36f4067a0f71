"""Training windows for an action-chunking policy (as ACT / LeRobot's ``delta_timestamps``).

Every frame t of every episode is one window: the observation history obs[t-H+1 .. t]
(frames before the start repeat frame 0) and the action chunk action[t .. t+K-1] (steps
past the end repeat the last action and are flagged in ``action_pad`` so the loss can
ignore them).

Normalisation divides by the embodiment's *public* bounds from the spec sheet, never by
statistics of the data: a data-dependent scale would itself leak private information and
would also differ between members, breaking the shared model's input convention.

An embodiment may declare action dimensions relative to the current state
(``action_relative_to``): the target is then the chunk minus the state it starts from, so
the model learns where to go from here and an untrained model holds still. The held-out
error is unchanged by this (the offset cancels), and the data on disk stays absolute.

Sampling is per episode because the privacy unit of DP-SGD is the episode: the trainer
Poisson-samples episodes and each sampled episode contributes exactly one window.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from member_node.lerobot import Episode, frame_task_ids
from shared_model.config import EmbodimentConfig
from shared_model.task_text import task_table


@dataclass
class WindowBatch:
    """A batch of windows; ``action_pad`` is True where the chunk ran past the episode end."""

    obs: torch.Tensor  # [B, H, obs_dim] float32, normalised
    image: torch.Tensor | None  # [B, H, image_feature_dim] float32
    # [B, K, action_dim] float32: the model's target, normalised, and for the embodiment's
    # relative dimensions (``action_relative_to``) minus the current state they refer to
    action: torch.Tensor
    action_pad: torch.Tensor  # [B, K] bool
    # [B, task_buckets] float32: the hashed text of the task at each window's current frame
    # (shared_model.task_text); None when the policy does not read the task
    task: torch.Tensor | None = None

    def __len__(self) -> int:
        return int(self.obs.shape[0])

    def to(self, device: torch.device | str) -> WindowBatch:
        return WindowBatch(
            obs=self.obs.to(device),
            image=None if self.image is None else self.image.to(device),
            action=self.action.to(device),
            action_pad=self.action_pad.to(device),
            task=None if self.task is None else self.task.to(device),
        )


def split_episodes(episodes: Sequence[Episode], held_out_fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """Positions of the (train, held-out) episodes, by episode so no episode leaks across.

    Each episode's side is decided by its own content alone: it is held out when a hash of
    ``seed`` and its arrays, read as a number in [0, 1), is below ``held_out_fraction``.
    Why not a seeded permutation of the episode count: the privacy unit is the episode, and
    under a permutation adding or removing one episode reshuffles which *other* episodes
    are trained on, so two neighbouring datasets could give training sets that differ in
    hundreds of episodes, outside what DP-SGD's accounting covers. Here a neighbour changes
    exactly one side by exactly that episode. The held-out share is then binomial around
    the fraction (400 +- 18 of 2000 at 0.2), and either side may be empty for a tiny
    dataset: moving an episode across to fill it would make the split depend on the others
    again (a DP node then trains on noise only, or releases the noised error of nothing).
    Order does not matter; identical episodes go to the same side.
    """
    if not 0.0 <= held_out_fraction <= 1.0:
        raise ValueError(f"held_out_fraction must be in [0, 1], got {held_out_fraction}")
    held = np.array([_content_draw(e, seed) < held_out_fraction for e in episodes], dtype=bool)
    return np.flatnonzero(~held).tolist(), np.flatnonzero(held).tolist()


def _content_draw(episode: Episode, seed: int) -> float:
    """A number in [0, 1) fixed by ``seed`` and the episode's arrays (not its index, which
    shifts when another episode is removed)."""
    digest = hashlib.sha256(b"kyodo/held-out/v1\n" + int(seed).to_bytes(8, "little", signed=True))
    for array in (episode.state, episode.env_state, episode.image_features, episode.action):
        if array is None:
            digest.update(b"-")
            continue
        a = np.ascontiguousarray(array)
        digest.update(f"{a.dtype.str}{a.shape}".encode())
        digest.update(a.tobytes())
    return int.from_bytes(digest.digest()[:8], "little") / 2.0**64


def _task_arrays(episodes: Sequence[Episode], buckets: int) -> tuple[np.ndarray, np.ndarray | None]:
    """Each frame's row in a table of hashed task texts ([N] int64, [texts, buckets]), or
    (empty, None) when the policy does not read the task. One row per distinct text, so a
    million frames of ten tasks cost ten rows, not a million."""
    if buckets <= 0:
        return np.zeros(0, dtype=np.int64), None
    texts, per_episode = frame_task_ids(episodes)
    of_frame = np.concatenate(per_episode) if per_episode else np.zeros(0, dtype=np.int64)
    return of_frame, task_table(texts, buckets)


def _relative_reference(
    embodiment: EmbodimentConfig, obs_scale: np.ndarray, action_scale: np.ndarray
) -> tuple[np.ndarray | None, np.ndarray]:
    """Which observation column each action dimension is relative to, and the factor that
    turns that column (normalised by its state bound) into the action's normalised units
    (0 for an absolute dimension). ``None`` when every dimension is absolute."""
    rel = np.asarray(embodiment.action_relative_to, dtype=np.int64)
    if rel.size == 0 or not np.any(rel >= 0):
        return None, np.zeros(embodiment.action_dim, dtype=np.float32)
    if rel.size != embodiment.action_dim or np.any(rel >= embodiment.state_dim) or np.any(rel < -1):
        raise ValueError(f"action_relative_to {rel.tolist()} does not fit action_dim {embodiment.action_dim}")
    idx = np.where(rel >= 0, rel, 0)
    gain = np.where(rel >= 0, obs_scale[idx] / action_scale, 0.0).astype(np.float32)
    return idx, gain


def obs_scale(embodiment: EmbodimentConfig) -> np.ndarray:
    """Public per-dimension scale of one observation step (state, then env state)."""
    return _scale([*embodiment.state_bound, *embodiment.env_state_bound], "state_bound/env_state_bound")


def action_scale(embodiment: EmbodimentConfig) -> np.ndarray:
    """Public per-dimension scale of one action."""
    return _scale(list(embodiment.action_bound), "action_bound")


def _scale(bound: list[float], what: str) -> np.ndarray:
    scale = np.asarray(bound, dtype=np.float32)
    if scale.size == 0 or not np.all(np.isfinite(scale)) or np.any(scale <= 0):
        raise ValueError(f"{what} must be positive and finite, got {bound}")
    return scale


class EpisodeWindows:
    """All windows of a set of episodes, as flat arrays plus precomputed index tables.

    Frames are stored once ([N, dim]); each window is a row of an index table ([W, H] for
    the history, [W, K] for the chunk), so sampling is a single fancy-indexing gather and
    memory does not grow with H and K.
    """

    def __init__(
        self,
        episodes: Sequence[Episode],
        embodiment: EmbodimentConfig,
        history: int,
        chunk: int,
        task_buckets: int = 0,
    ) -> None:
        """``task_buckets`` is the model's (``model.task_buckets``): above 0, every window
        carries its task's hashed text."""
        if history < 1 or chunk < 1:
            raise ValueError(f"history and chunk must be >= 1, got {history} and {chunk}")
        self.history = history
        self.chunk = chunk
        self.obs_dim = embodiment.obs_dim
        self.action_dim = embodiment.action_dim
        self.image_dim = embodiment.image_feature_dim
        self._obs_scale = obs_scale(embodiment)
        self._action_scale = action_scale(embodiment)
        self._ref_idx, self._ref_gain = _relative_reference(embodiment, self._obs_scale, self._action_scale)
        self.lengths = np.array([ep.length for ep in episodes], dtype=np.int64)
        if np.any(self.lengths < 1):
            raise ValueError("every episode needs at least one frame")
        self.starts = (np.cumsum(self.lengths) - self.lengths).astype(np.int64)
        self._obs = self._stack(episodes, "obs", self.obs_dim) / self._obs_scale
        self._action = self._stack(episodes, "action", self.action_dim) / self._action_scale
        self._image = self._stack(episodes, "image_features", self.image_dim) if self.image_dim else None
        self._obs_idx, self._act_idx, self._pad = self._index_tables()
        self._task_of_frame, self._task_table = _task_arrays(episodes, task_buckets)

    @staticmethod
    def _stack(episodes: Sequence[Episode], attr: str, dim: int) -> np.ndarray:
        parts = [getattr(ep, attr) for ep in episodes]
        for i, part in enumerate(parts):
            if part is None or part.ndim != 2 or part.shape[1] != dim:
                shape = None if part is None else part.shape
                raise ValueError(f"episode {i}: {attr} has shape {shape}, expected [T, {dim}]")
        if not parts:
            return np.zeros((0, dim), dtype=np.float32)
        return np.concatenate(parts).astype(np.float32)

    def _index_tables(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Flat frame indices of each window's history and chunk, and the chunk pad mask."""
        episode_of = np.repeat(np.arange(len(self.lengths)), self.lengths)
        start = self.starts[episode_of][:, None]
        last = (self.lengths[episode_of] - 1)[:, None]
        t = np.arange(int(self.lengths.sum()), dtype=np.int64)[:, None] - start
        past = t + np.arange(1 - self.history, 1)[None, :]
        future = t + np.arange(self.chunk)[None, :]
        obs_idx = start + np.maximum(past, 0)
        act_idx = start + np.minimum(future, last)
        return obs_idx, act_idx, future > last

    def __len__(self) -> int:
        return len(self.lengths)

    def num_windows(self) -> int:
        return int(self.lengths.sum())

    def sample(self, episode_ids: Sequence[int], rng: np.random.Generator) -> WindowBatch:
        """One uniformly random window from each listed episode (positions in the list), drawn
        from ``rng``: non-private training. DP-SGD draws its windows from its own secret
        stream and takes them with :meth:`at` (one window per sampled episode is what makes
        the episode the privacy unit).
        """
        ids = self._check_ids(episode_ids)
        offsets = rng.integers(0, self.lengths[ids]) if len(ids) else np.zeros(0, dtype=np.int64)
        return self._gather(self.starts[ids] + offsets)

    def at(self, episode_ids: Sequence[int], offsets: np.ndarray) -> WindowBatch:
        """For listed episode i, the window at its frame ``offsets[i]`` (DP-SGD draws the
        offsets from its own secret stream: ``PoissonEpisodeSampler.window_offsets``)."""
        ids = self._check_ids(episode_ids)
        offsets = np.asarray(offsets, dtype=np.int64).reshape(-1)
        if offsets.shape != ids.shape or (len(ids) and (offsets.min() < 0 or np.any(offsets >= self.lengths[ids]))):
            raise IndexError("one offset per listed episode, each inside that episode")
        return self._gather(self.starts[ids] + offsets)

    def _check_ids(self, episode_ids: Sequence[int]) -> np.ndarray:
        ids = np.asarray(episode_ids, dtype=np.int64).reshape(-1)
        if len(ids) and (ids.min() < 0 or ids.max() >= len(self)):
            raise IndexError(f"episode ids must be in 0..{len(self) - 1}, got {ids.min()}..{ids.max()}")
        return ids

    def all_windows(self, batch_size: int = 256, per_episode: int = 0) -> Iterator[WindowBatch]:
        """Windows for evaluation, in order: every window, or ``per_episode`` evenly spaced
        ones from each episode, one from the middle of each of ``per_episode`` equal
        stretches (all of a shorter episode's).

        Evenly spaced and deterministic, so every evaluation of a model sees the same
        windows. Subsampling is what keeps evaluation affordable once a member holds
        thousands of episodes: neighbouring windows of one episode overlap in all but one
        frame, so a few evenly spaced ones carry most of the episode's information about
        the error, and the held-out episodes, not the windows, are the independent samples.
        """
        if batch_size < 1:
            raise ValueError("batch_size must be >= 1")
        if per_episode < 0:
            raise ValueError(f"per_episode must be >= 0 (0 = every window), got {per_episode}")
        chosen = self._evaluation_windows(per_episode)
        for lo in range(0, len(chosen), batch_size):
            yield self._gather(chosen[lo : lo + batch_size])

    def evaluation_episodes(self, per_episode: int = 0) -> np.ndarray:
        """The episode (position) of each window :meth:`all_windows` yields, in the same order."""
        episode_of = np.repeat(np.arange(len(self.lengths)), self.lengths)
        return episode_of[self._evaluation_windows(per_episode)]

    def _evaluation_windows(self, per_episode: int) -> np.ndarray:
        if per_episode == 0 or np.all(self.lengths <= per_episode):
            return np.arange(self.num_windows(), dtype=np.int64)
        parts = []
        for start, length in zip(self.starts, self.lengths, strict=True):
            if length <= per_episode:
                parts.append(np.arange(start, start + length))
            else:
                # the middle of each of per_episode equal stretches: every part of the episode
                # (start, approach, end) weighs as much as in the full evaluation
                parts.append(start + (np.arange(per_episode) * length + length // 2) // per_episode)
        return np.concatenate(parts)

    def _gather(self, windows: np.ndarray) -> WindowBatch:
        obs_idx = self._obs_idx[windows]
        now_idx = obs_idx[:, -1]  # the frame the chunk starts from
        action = self._action[self._act_idx[windows]]
        if self._ref_idx is not None:
            now = self._obs[now_idx]  # [B, obs_dim]
            action = action - (now[:, self._ref_idx] * self._ref_gain)[:, None, :]
        return WindowBatch(
            obs=torch.from_numpy(self._obs[obs_idx]),
            image=None if self._image is None else torch.from_numpy(self._image[obs_idx]),
            action=torch.from_numpy(np.ascontiguousarray(action, dtype=np.float32)),
            action_pad=torch.from_numpy(self._pad[windows]),
            task=None if self._task_table is None else torch.from_numpy(self._task_table[self._task_of_frame[now_idx]]),
        )

    def normalize_obs(self, obs: torch.Tensor) -> torch.Tensor:
        """Raw observations (state, env state) to the model's normalised scale."""
        return obs / torch.as_tensor(self._obs_scale, dtype=obs.dtype, device=obs.device)

    def denormalize_action(self, a: torch.Tensor, obs: torch.Tensor | None = None) -> torch.Tensor:
        """Model output ``[B, K, action_dim]`` back to physical action units. An embodiment
        with relative dimensions needs the window's normalised observations ``obs``
        ``[B, H, obs_dim]``: its prediction is an offset from the current state."""
        phys = a * torch.as_tensor(self._action_scale, dtype=a.dtype, device=a.device)
        if self._ref_idx is None:
            return phys
        if obs is None:
            raise ValueError("this embodiment predicts actions relative to the current state: pass the window's obs")
        gain = torch.as_tensor(self._ref_gain * self._action_scale, dtype=a.dtype, device=a.device)
        return phys + (obs[:, -1, torch.as_tensor(self._ref_idx, device=obs.device)] * gain)[:, None, :]
