"""Local training of the assigned shards, and held-out evaluation, on the member's own data.

Built around the episode as the unit: each step draws a set of episodes and takes one
window from each, and the loss is a sum of per-episode terms. That is exactly the shape
DP-SGD needs (per-sample gradients = per-episode gradients), so the privacy layer plugs in
by replacing :class:`EpisodeSampler` (Poisson sampling) and wrapping the optimiser
(``train_shards(..., dp=DPConfig(...))``, see ``privacy.dp_sgd``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np
import torch

from member_node.windows import EpisodeWindows, WindowBatch
from privacy.dp_sgd import DPSGD, DPConfig, PoissonEpisodeSampler
from shared_model.policy import Policy
from shared_model.protocol import TrainHyperParams
from shared_model.shards import set_trainable


def per_sample_loss(
    pred: torch.Tensor, target: torch.Tensor, pad: torch.Tensor, aux: torch.Tensor, aux_coef: float
) -> torch.Tensor:
    """Masked action-chunk MSE plus the router load-balancing term, one value per sample [B].

    Padded chunk steps (past the episode end) do not count. Returning [B] rather than a
    scalar keeps every term attributable to one episode (needed for DP clipping).
    """
    mask = (~pad).to(pred.dtype).unsqueeze(-1)  # [B, K, 1]
    sq = (pred - target) ** 2 * mask
    denom = (mask.sum(dim=(1, 2)) * pred.shape[-1]).clamp_min(1.0)
    return sq.sum(dim=(1, 2)) / denom + aux_coef * aux


class EpisodeSampler(Protocol):
    """Chooses which training episodes (positions) take part in one step."""

    def __call__(self, n_episodes: int, rng: np.random.Generator) -> np.ndarray: ...


@dataclass
class UniformSampler:
    """Non-private sampling: a fixed-size batch of distinct episodes (with replacement only
    when the member has fewer episodes than the batch)."""

    batch_size: int

    def __call__(self, n_episodes: int, rng: np.random.Generator) -> np.ndarray:
        replace = n_episodes < self.batch_size
        return rng.choice(n_episodes, size=self.batch_size, replace=replace)


@dataclass
class TrainResult:
    deltas: dict[str, torch.Tensor]
    num_examples: int  # training episodes available this round (FedAvg's n_k)
    # Mean per-sample loss over the round's last quarter of steps (DP: of the non-empty
    # steps; NaN if all were empty). Computed from the data *without* noise: under DP it
    # is not covered by the guarantee and must not leave the node as is.
    loss: float
    steps: int  # steps actually run; under DP every one counts for the accountant, empty or not
    dp_mode: str | None = None  # DPSGD.mode used (record it in the ledger); None = non-private
    empty_steps: int = 0  # DP steps whose Poisson batch was empty (they added noise only)
    workers_peak_rss_mb: float | None = None  # data-parallel rounds: the largest worker's peak RSS


OptimizerFactory = Callable[[Iterable[torch.nn.Parameter], TrainHyperParams], torch.optim.Optimizer]


def adamw(params: Iterable[torch.nn.Parameter], hp: TrainHyperParams) -> torch.optim.Optimizer:
    return torch.optim.AdamW(list(params), lr=hp.lr, weight_decay=hp.weight_decay)


def policy_device(policy: Policy) -> torch.device:
    """Where the policy's parameters live: every batch goes there, every delta comes back."""
    return next(policy.parameters()).device


def _forward(policy: Policy, embodiment: str, batch: WindowBatch) -> tuple[torch.Tensor, torch.Tensor]:
    return policy(embodiment, batch.obs, batch.image, batch.task)


def train_shards(
    policy: Policy,
    embodiment: str,
    windows: EpisodeWindows,
    shards: list[str],
    hp: TrainHyperParams,
    *,
    aux_coef: float,
    rng: np.random.Generator,
    sampler: EpisodeSampler | None = None,
    make_optimizer: OptimizerFactory = adamw,
    dp: DPConfig | None = None,
    dp_noise_seed: int | None = None,
    distributed: bool = False,
    physical_batch: int | None = None,
) -> TrainResult:
    """Train only ``shards`` (everything else frozen) for ``hp.local_steps`` steps; return their deltas.

    With ``dp``: DP-SGD (``privacy.dp_sgd``). Episodes are Poisson-sampled at
    ``dp.sample_rate`` (the expected batch is ``dp.sample_rate * len(windows)``), each
    step's update is clipped per episode, noised and divided by the public ``hp.batch_size``
    (never by a number derived from the member's episode count), and an empty batch still
    makes a (noise-only) step. ``sampler`` may only be a :class:`PoissonEpisodeSampler` at
    the same rate (tests seed one); ``dp_noise_seed`` is for tests only -- by default the
    noise is seeded from ``secrets``. The policy is returned unwrapped: no hooks, no Opacus attributes, all
    parameters frozen, the same state-dict keys, ready for the next round.

    ``distributed``: this process is one data-parallel worker of the member
    (``member_node.parallel``), ``windows`` its part of the episodes; DP only.
    ``num_examples`` counts every worker's episodes; the step's noise is drawn once.
    """
    if len(windows) == 0 and dp is None:
        raise ValueError("no training episodes")
    # Under DP an empty training set is not an error: every step samples nothing and adds
    # only noise. Failing instead would tell the coordinator N = 0 apart from N = 1.
    n_episodes = len(windows)
    if distributed:
        if dp is None:
            raise ValueError("data-parallel training is for DP-SGD (non-private training runs in one process)")
        n_episodes = _all_workers_sum(n_episodes)
    names = set(set_trainable(policy, shards))
    if not names:
        raise ValueError(f"shards {shards} have no trainable parameters")
    params = {n: p for n, p in policy.named_parameters() if n in names}
    before = {n: p.detach().clone() for n, p in params.items()}
    optimizer = make_optimizer(params.values(), hp)
    policy.train()
    losses: list[float] = []
    try:
        if dp is None:
            train_plain(
                policy,
                embodiment,
                windows,
                hp,
                aux_coef,
                rng,
                sampler or UniformSampler(hp.batch_size),
                optimizer,
                losses,
            )
            steps, empty, mode = hp.local_steps, 0, None
        else:
            if sampler is None:
                sampler = PoissonEpisodeSampler(dp.sample_rate)
            elif not isinstance(sampler, PoissonEpisodeSampler) or sampler.sample_rate != dp.sample_rate:
                raise ValueError("DP-SGD needs Poisson sampling at dp.sample_rate (a PoissonEpisodeSampler)")
            steps, empty, mode = _train_private(
                policy,
                embodiment,
                windows,
                hp,
                aux_coef,
                rng,
                sampler,
                optimizer,
                losses,
                dp,
                dp_noise_seed,
                distributed,
                physical_batch,
            )
    finally:
        set_trainable(policy, [])
    tail = losses[-max(1, len(losses) // 4) :]
    # Deltas leave through secure aggregation and the protocol's encoders, which work on host
    # memory: bring them back from an accelerator here, once per round.
    deltas = {n: (p.detach() - before[n]).to("cpu").contiguous() for n, p in params.items()}
    return TrainResult(
        deltas=deltas,
        num_examples=n_episodes,
        loss=float(np.mean(tail)) if tail else float("nan"),
        steps=steps,
        dp_mode=mode,
        empty_steps=empty,
    )


def train_plain(
    policy: Policy,
    embodiment: str,
    windows: EpisodeWindows,
    hp: TrainHyperParams,
    aux_coef: float,
    rng: np.random.Generator,
    sampler: EpisodeSampler,
    optimizer: torch.optim.Optimizer,
    losses: list[float],
) -> None:
    """``hp.local_steps`` non-private steps of ``optimizer`` over whatever requires grad
    (the caller sets that and keeps the optimizer, e.g. across embodiments); appends each
    step's mean loss to ``losses``."""
    device = policy_device(policy)
    for _ in range(hp.local_steps):
        ids = sampler(len(windows), rng)
        batch = windows.sample(ids, rng).to(device)
        pred, aux = _forward(policy, embodiment, batch)
        loss = per_sample_loss(pred, batch.action, batch.action_pad, aux, aux_coef)
        optimizer.zero_grad(set_to_none=True)
        loss.mean().backward()
        optimizer.step()
        losses.append(float(loss.detach().mean()))


def _train_private(
    policy: Policy,
    embodiment: str,
    windows: EpisodeWindows,
    hp: TrainHyperParams,
    aux_coef: float,
    rng: np.random.Generator,
    sampler: PoissonEpisodeSampler,
    optimizer: torch.optim.Optimizer,
    losses: list[float],
    dp: DPConfig,
    noise_seed: int | None,
    distributed: bool,
    physical_batch: int | None,
) -> tuple[int, int, str]:
    """DP-SGD steps; returns (steps run, empty steps, mode). The engine is always closed.

    ``physical_batch``: the most episodes in one forward/backward (``bk`` mode); a larger
    Poisson sample goes through in chunks that add up to the same clipped sum, so memory
    does not grow with the member's data.
    """
    with DPSGD(policy, optimizer, dp, hp.batch_size, noise_seed=noise_seed, distributed=distributed) as engine:
        device = policy_device(policy)
        chunk = physical_batch if physical_batch and engine.mode == "bk" else None
        for _ in range(hp.local_steps):
            ids = sampler(len(windows), rng)
            offsets = sampler.window_offsets(windows.lengths[ids])
            engine.zero_grad()
            step_losses = []
            pieces = 1 if chunk is None or len(ids) <= chunk else -(-len(ids) // chunk)
            for part, part_offsets in zip(np.array_split(ids, pieces), np.array_split(offsets, pieces), strict=True):
                batch = windows.at(part, part_offsets).to(device)
                pred, aux = engine(embodiment, batch.obs, batch.image, batch.task)
                loss = per_sample_loss(pred, batch.action, batch.action_pad, aux, aux_coef)
                engine.backward(loss)
                step_losses.append(loss.detach())
            engine.step()
            if len(ids):
                losses.append(float(torch.cat(step_losses).mean()))
        return engine.steps, engine.empty_steps, engine.mode


def _all_workers_sum(value: int) -> int:
    import torch.distributed as dist

    total = torch.tensor([value], dtype=torch.int64, device="cuda" if dist.get_backend() == "nccl" else "cpu")
    dist.all_reduce(total)
    return int(total.item())


@dataclass
class EvalResult:
    num_examples: int
    action_mse: float  # normalised units, comparable across embodiments
    action_mae: float  # physical units of the embodiment
    # Per held-out episode (positions in the windows), the mean squared error over its
    # evaluation windows: what a private release clips per episode (privacy.eval_release).
    episode_mse: np.ndarray = field(default_factory=lambda: np.zeros(0), repr=False)


@torch.no_grad()
def evaluate(
    policy: Policy, embodiment: str, windows: EpisodeWindows, batch_size: int = 256, per_episode: int = 0
) -> EvalResult:
    """Held-out action error over the held-out episodes' windows (padding excluded): every
    window, or ``per_episode`` evenly spaced ones per episode (:meth:`EpisodeWindows.all_windows`)."""
    policy.eval()
    device = policy_device(policy)
    sq, abs_err, counts = [], [], []
    for batch in windows.all_windows(batch_size, per_episode):
        batch = batch.to(device)
        pred, _ = _forward(policy, embodiment, batch)
        mask = (~batch.action_pad).to(pred.dtype).unsqueeze(-1).expand_as(pred)
        sq.append((((pred - batch.action) ** 2) * mask).sum(dim=(1, 2)))
        phys = windows.denormalize_action(pred, batch.obs) - windows.denormalize_action(batch.action, batch.obs)
        abs_err.append((phys.abs() * mask).sum(dim=(1, 2)))
        counts.append(mask.sum(dim=(1, 2)))
    count = float(torch.cat(counts).sum()) if counts else 0.0
    if count == 0:
        # No held-out episode (a DP node still releases its noised error: of nothing).
        return EvalResult(num_examples=0, action_mse=float("nan"), action_mae=float("nan"), episode_mse=np.zeros(0))
    sq_w, abs_w, count_w = (torch.cat(x).double().cpu().numpy() for x in (sq, abs_err, counts))
    episode = windows.evaluation_episodes(per_episode)
    ep_sq = np.bincount(episode, weights=sq_w, minlength=len(windows))
    ep_count = np.bincount(episode, weights=count_w, minlength=len(windows))
    return EvalResult(
        num_examples=len(sq_w),
        action_mse=float(sq_w.sum()) / count,
        action_mae=float(abs_w.sum()) / count,
        episode_mse=ep_sq[ep_count > 0] / ep_count[ep_count > 0],
    )
