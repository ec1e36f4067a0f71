"""What reading the task text buys on episodes of two tasks, against not reading it, same run.

Each default-federation member's robot gets synthetic episodes of two subtasks (``data synth
--tasks 2``): the goal task and a home task, switching every 0.5-1.5 s, the goal always
drawn and observed, so right after a switch the motion history shows the old subtask and
only the task text the new one. Each member
trains alone, on its own robot, the shards a node trains (every expert, the shared adapter,
its embodiment adapter), from the same initial policy, once with ``model.task_buckets 0``
(the baseline: one unconditioned policy for both tasks) and once with ``--buckets``; then
non-private and under DP-SGD at ``--epsilon`` (sigma from the accountant's planning helper,
``privacy.accountant.noise_for_target``, for the steps as one round). Both arms draw the same
batches from the same seed; under DP each run's noise is fresh and secret, so DP ratios carry
that noise too. 2000 episodes per member, as in the default federation, so DP's expected
batch (``privacy.sample_rate`` x 1600 training episodes) is the public batch size its noised
sum is divided by. Reported per member: held-out action MSE (normalised units) over 4
windows per episode, the ratio conditioned / unconditioned (below 1: reading the task
helps), and the MSE of the windows whose history reaches back across a switch.
Timings are printed, never asserted; peak RSS is the process's ``ru_maxrss``.

Usage: ``python bench/task_conditioning.py [--episodes 2000] [--steps 400] [--buckets 256]``;
writes ``bench/results/task_conditioning.json``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import resource
import time
from pathlib import Path

import numpy as np
import torch

from member_node.synthetic import generate_episodes
from member_node.trainer import evaluate, train_shards
from member_node.windows import EpisodeWindows, split_episodes
from privacy.accountant import noise_for_target
from privacy.dp_sgd import DPConfig
from shared_model.config import load_config
from shared_model.policy import Policy
from shared_model.protocol import TrainHyperParams
from shared_model.shards import SHARED_ADAPTER, embodiment_shard, expert_shard


def _train_and_evaluate(cfg, model_cfg, emb_name, train_eps, held_eps, hp, dp, seed) -> dict[str, float]:
    torch.manual_seed(seed)
    policy = Policy(model_cfg, cfg.embodiments)
    m = model_cfg
    shards = [expert_shard(layer, e) for layer in range(m.n_layers) for e in range(m.n_experts)]
    shards += [SHARED_ADAPTER, embodiment_shard(emb_name)]
    emb = cfg.embodiments[emb_name]
    windows = EpisodeWindows(train_eps, emb, m.history, m.chunk, m.task_buckets)
    train_shards(
        policy,
        emb_name,
        windows,
        shards,
        hp,
        aux_coef=m.aux_loss_coef,
        rng=np.random.default_rng(seed),
        dp=dp,
    )
    held = EpisodeWindows(held_eps, emb, m.history, m.chunk, m.task_buckets)
    ids, offsets = _switch_windows(held_eps, m.history)
    return {
        "all": evaluate(policy, emb_name, held, per_episode=4).action_mse,
        "after_switch": _mse_at(policy, emb_name, held, ids, offsets),
    }


def _switch_windows(episodes, history: int) -> tuple[np.ndarray, np.ndarray]:
    """(episode, frame) of every window whose history still reaches back across a change of
    subtask: there the motion shows the old subtask and only the text the new one."""
    ids, offsets = [], []
    for i, ep in enumerate(episodes):
        which = ep.frame_tasks()
        for t in np.flatnonzero(np.diff(which)) + 1:
            frames = np.arange(t, min(t + history, ep.length))
            ids += [i] * len(frames)
            offsets += frames.tolist()
    return np.asarray(ids, dtype=np.int64), np.asarray(offsets, dtype=np.int64)


@torch.no_grad()
def _mse_at(policy: Policy, emb_name: str, held: EpisodeWindows, ids: np.ndarray, offsets: np.ndarray) -> float:
    if not len(ids):
        return float("nan")
    policy.eval()
    batch = held.at(ids, offsets)
    pred, _ = policy(emb_name, batch.obs, batch.image, batch.task)
    mask = (~batch.action_pad).to(pred.dtype).unsqueeze(-1).expand_as(pred)
    return float((((pred - batch.action) ** 2) * mask).sum() / mask.sum())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="tiny")
    parser.add_argument(
        "--episodes", type=int, default=2000, help="per member, before the held-out split (the federation's)"
    )
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--buckets", type=int, default=256)
    parser.add_argument("--epsilon", type=float, default=8.0)
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "task_conditioning.json"))
    args = parser.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    cfg = load_config(model=args.model)
    baseline = dataclasses.replace(cfg.model, task_buckets=0)
    conditioned = dataclasses.replace(cfg.model, task_buckets=args.buckets)
    t = cfg.train
    hp = TrainHyperParams(
        lr=cfg.model.lr,
        local_steps=args.steps,
        batch_size=t.batch_size,
        max_grad_norm=cfg.privacy.max_grad_norm,
        sample_rate=cfg.privacy.sample_rate,
    )
    sigma = noise_for_target(args.epsilon, 1e-5, cfg.privacy.sample_rate, args.steps, 1)
    dp = DPConfig(sigma, cfg.privacy.max_grad_norm, cfg.privacy.sample_rate)
    results = []
    started = time.perf_counter()
    print(f"{args.model}, {args.episodes} episodes of 2 tasks per member, {args.steps} steps, sigma {sigma:.3f}")
    print("member        setting   unconditioned  conditioned  ratio   after a switch (unconditioned -> conditioned)")
    for member in cfg.federation.members:
        eps = generate_episodes(
            member.embodiment, cfg.embodiments[member.embodiment], args.episodes, 4.0, member.seed, tasks=2
        )
        train_ids, held_ids = split_episodes(eps, 0.2, seed=member.seed)
        train_eps, held_eps = [eps[i] for i in train_ids], [eps[i] for i in held_ids]
        for setting, mechanism in (("non-DP", None), (f"eps {args.epsilon:g}", dp)):
            base = _train_and_evaluate(
                cfg, baseline, member.embodiment, train_eps, held_eps, hp, mechanism, member.seed
            )
            cond = _train_and_evaluate(
                cfg, conditioned, member.embodiment, train_eps, held_eps, hp, mechanism, member.seed
            )
            ratio = cond["all"] / base["all"]
            switch = f"{base['after_switch']:.4f} -> {cond['after_switch']:.4f}"
            print(f"{member.name:<13} {setting:<9} {base['all']:>13.4f}  {cond['all']:>11.4f}  {ratio:5.2f}   {switch}")
            results.append(
                {
                    "member": member.name,
                    "embodiment": member.embodiment,
                    "setting": setting,
                    "unconditioned": base,
                    "conditioned": cond,
                    "ratio": ratio,
                }
            )
    elapsed = time.perf_counter() - started
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"{elapsed:.0f} s, peak RSS {peak_mb:.0f} MB")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    summary = {"args": vars(args), "sigma": sigma, "seconds": elapsed, "peak_rss_mb": peak_mb, "results": results}
    Path(args.out).write_text(json.dumps(summary, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
