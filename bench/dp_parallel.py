"""One member's DP-SGD round on W data-parallel worker processes against one process, same run.

``member_node.parallel`` splits a member's episodes over W workers (gloo on CPU here, NCCL
with one GPU each in a data center), adds their clipped sums up and draws the noise once.
This measures what that costs and buys on this machine's cores: a whole round (worker start
included: they are spawned per round) of ``--steps`` DP steps on the ``small`` model, every
expert trainable, the franka adapter, expected batch ``--batch`` of 1600 episodes, against
the same round in the node's own process with all of its threads. Rounds alternate between
the two (``--repeats`` each) because the machine is shared and noisy; reported: medians, the
ratio of medians, and the worker start-up alone (a 1-step round minus a 1-step round in
process). Peak memory: the driver's ``ru_maxrss`` and the largest worker's own VmHWM.

Usage: ``python bench/dp_parallel.py [--workers 2] [--steps 25] [--repeats 3]``; writes
``bench/results/dp_parallel.json``.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import time
from pathlib import Path

import numpy as np
import torch

from member_node.parallel import train_shards_parallel
from member_node.synthetic import generate_episodes
from member_node.trainer import train_shards
from member_node.windows import EpisodeWindows
from privacy.dp_sgd import DPConfig
from shared_model.config import load_config
from shared_model.policy import Policy
from shared_model.protocol import TrainHyperParams
from shared_model.shards import SHARED_ADAPTER, embodiment_shard, expert_shard

EMBODIMENT = "franka"
EPISODES = 1600


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "dp_parallel.json"))
    args = parser.parse_args()

    cfg = load_config(model="small")
    m = cfg.model
    shards = [expert_shard(layer, e) for layer in range(m.n_layers) for e in range(m.n_experts)]
    shards += [SHARED_ADAPTER, embodiment_shard(EMBODIMENT)]
    episodes = generate_episodes(EMBODIMENT, cfg.embodiments[EMBODIMENT], EPISODES, 4.0, seed=1)
    windows = EpisodeWindows(episodes, cfg.embodiments[EMBODIMENT], m.history, m.chunk, m.task_buckets)
    policy = Policy(m, cfg.embodiments)
    state = {k: v.clone() for k, v in policy.state_dict().items()}
    dp = DPConfig(noise_multiplier=1.0, max_grad_norm=0.1, sample_rate=args.batch / EPISODES)

    def in_process(steps: int) -> float:
        policy.load_state_dict(state)
        hp = TrainHyperParams(lr=1e-3, local_steps=steps, batch_size=args.batch)
        t = time.perf_counter()
        train_shards(
            policy, EMBODIMENT, windows, shards, hp, aux_coef=m.aux_loss_coef, rng=np.random.default_rng(0), dp=dp
        )
        return time.perf_counter() - t

    worker_peaks: list[float] = []

    def workers(steps: int) -> float:
        policy.load_state_dict(state)
        hp = TrainHyperParams(lr=1e-3, local_steps=steps, batch_size=args.batch)
        t = time.perf_counter()
        result = train_shards_parallel(
            policy, EMBODIMENT, episodes, shards, hp, dp=dp, workers=args.workers, aux_coef=m.aux_loss_coef
        )
        worker_peaks.append(result.workers_peak_rss_mb or float("nan"))
        return time.perf_counter() - t

    in_process(1)  # warm-up: first-call allocations and imports
    times: dict[str, list[float]] = {"process": [], "workers": [], "process 1 step": [], "workers 1 step": []}
    for _ in range(args.repeats):
        times["process"].append(in_process(args.steps))
        times["workers"].append(workers(args.steps))
        times["process 1 step"].append(in_process(1))
        times["workers 1 step"].append(workers(1))
    med = {k: statistics.median(v) for k, v in times.items()}
    startup = med["workers 1 step"] - med["process 1 step"]
    per_step = {
        "process": med["process"] / args.steps,
        "workers": (med["workers"] - startup) / args.steps,
    }
    result = {
        "model": "small",
        "trainable": "all experts + adapters",
        "episodes": EPISODES,
        "expected_batch": args.batch,
        "steps": args.steps,
        "workers": args.workers,
        "threads_in_process": torch.get_num_threads(),
        "round_s": med,
        "round_ratio_workers_over_process": med["workers"] / med["process"],
        "worker_startup_s": startup,
        "step_s": per_step,
        "step_ratio_workers_over_process": per_step["workers"] / per_step["process"],
        "peak_rss_mb_driver": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "peak_rss_mb_largest_worker": max(worker_peaks),
        "samples_s": times,
    }
    print(
        f"round of {args.steps} DP steps (small, all experts, batch {args.batch}): in process "
        f"{med['process']:.2f} s ({torch.get_num_threads()} threads), {args.workers} workers {med['workers']:.2f} s "
        f"-> {result['round_ratio_workers_over_process']:.2f}x; worker start-up {startup:.2f} s; per step "
        f"{per_step['process'] * 1e3:.0f} ms vs {per_step['workers'] * 1e3:.0f} ms "
        f"-> {result['step_ratio_workers_over_process']:.2f}x; peak RSS driver {result['peak_rss_mb_driver']:.0f} MB, "
        f"worker {result['peak_rss_mb_largest_worker']:.0f} MB"
    )
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
