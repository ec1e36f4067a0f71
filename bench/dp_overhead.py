"""Cost of DP-SGD against non-private training of the same shards, measured in one run.

On the ``small`` model, batch 32, 2 threads, for two trainable sets:

- ``2 experts``: experts 0 and 1 of every layer + ``adapter/shared`` (LoRA B) + one
  embodiment adapter (franka);
- ``all experts``: every expert of every layer + the same adapters.

Each variant (``np`` = non-private SGD, or a DP-SGD mode of ``privacy.dp_sgd``) lives in
its own spawned worker process. After every worker has warmed up, the driver gives them
turns, one after the other and ``--repeats`` times (rotating the order); in a turn a
worker runs ``--burst`` steps and times all but the first (which re-warms the caches the
other workers evicted). Reported: the median step time per variant, and the ratio =
median over turns of (median DP step of the turn / median non-private step of the turn
next to it). Why interleaved: the machine is shared and noisy (OpenMP threads stall for
seconds when neighbours wake up; one variant's step time in separate runs was measured
30x apart), so only ratios of steps taken close together mean much. Idle workers block
on their pipe and cost no CPU.

Peak memory is each worker's ``ru_maxrss``. Every worker, the non-private one too,
imports opacus (about 115 MB of resident memory by itself), so the difference to ``np``
is what the DP training step costs, not the library import.

A DP step is the full private step (forward, per-sample clipping, noise, optimizer step)
on a fixed batch of 32 episodes; the non-private step is forward, ``loss.mean()``
backward and the optimizer step. Targets (issue 3): <= 1.3x with 2 experts, <= 2x with
all experts.

Usage: ``python bench/dp_overhead.py [--repeats 10] [--burst 3] [--modes bk,hooks] [--sets '2 experts']``;
writes ``bench/results/dp_overhead.json``.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import resource
import statistics
import time
from pathlib import Path

import opacus  # noqa: F401  # in every worker, np included: see "peak memory" in the docstring
import torch

from privacy.dp_sgd import DEFAULT_MODE, DPSGD, MODES, DPConfig
from shared_model.config import load_config
from shared_model.policy import Policy
from shared_model.shards import SHARED_ADAPTER, embodiment_shard, expert_shard, set_trainable

BATCH = 32
THREADS = 2
WARMUP = 3
EMBODIMENT = "franka"
TRAINABLE_SETS = ("2 experts", "all experts")


def _shards(which: str, n_layers: int, n_experts: int) -> list[str]:
    experts = (0, 1) if which == "2 experts" else range(n_experts)
    return [expert_shard(layer, e) for layer in range(n_layers) for e in experts] + [
        SHARED_ADAPTER,
        embodiment_shard(EMBODIMENT),
    ]


def _worker(variant: str, which: str, conn) -> None:
    """A fresh process for one variant: build, warm up, then time one step per request.

    Idle between requests (blocked on the pipe), so it does not compete with the worker
    being timed; its ``ru_maxrss`` is the peak memory of this variant alone.
    """
    torch.set_num_threads(THREADS)
    cfg = load_config(model="small")
    m = cfg.model
    policy = Policy(m, cfg.embodiments)
    names = set_trainable(policy, _shards(which, m.n_layers, m.n_experts))
    params = [p for p in policy.parameters() if p.requires_grad]
    gen = torch.Generator().manual_seed(0)
    emb = cfg.embodiments[EMBODIMENT]
    obs = torch.randn(BATCH, m.history, emb.obs_dim, generator=gen)
    target = torch.randn(BATCH, m.chunk, emb.action_dim, generator=gen)
    optimizer = torch.optim.SGD(params, lr=1e-3)

    def per_sample_loss(pred: torch.Tensor, aux: torch.Tensor) -> torch.Tensor:
        return ((pred - target) ** 2).mean(dim=(1, 2)) + m.aux_loss_coef * aux

    if variant == "np":

        def step() -> None:
            optimizer.zero_grad(set_to_none=True)
            pred, aux = policy(EMBODIMENT, obs)
            per_sample_loss(pred, aux).mean().backward()
            optimizer.step()
    else:
        config = DPConfig(noise_multiplier=1.0, max_grad_norm=1.0, sample_rate=0.05, mode=variant)
        dp = DPSGD(policy, optimizer, config, normaliser=float(BATCH))

        def step() -> None:
            dp.zero_grad()
            pred, aux = dp(EMBODIMENT, obs)
            dp.backward(per_sample_loss(pred, aux))
            dp.step()

    for _ in range(WARMUP):
        step()
    conn.send({"trainable_params": sum(p.numel() for p in params), "trainable_tensors": len(names)})
    while (burst := conn.recv()) != "stop":
        times = []
        for _ in range(burst):
            start = time.perf_counter()
            step()
            times.append(time.perf_counter() - start)
        conn.send(times[1:] if burst > 1 else times)  # the first re-warms caches other workers evicted
    conn.send(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)  # Linux: KiB -> MiB


def measure_set(which: str, variants: list[str], repeats: int, burst: int) -> dict:
    """Interleaved timing of every variant on one trainable set; see the module docstring."""
    ctx = mp.get_context("spawn")
    workers = {}
    info: dict = {}
    for variant in variants:  # started one after the other so warm-ups do not overlap
        parent, child = ctx.Pipe()
        proc = ctx.Process(target=_worker, args=(variant, which, child), daemon=True)
        proc.start()
        info = parent.recv()
        workers[variant] = (proc, parent)
    turns: dict[str, list[list[float]]] = {v: [] for v in variants}
    for r in range(repeats):
        order = variants[r % len(variants) :] + variants[: r % len(variants)]
        for variant in order:
            conn = workers[variant][1]
            conn.send(burst)
            turns[variant].append(conn.recv())
    table: dict = {"trainable_params": info["trainable_params"]}
    for variant, (proc, conn) in workers.items():
        conn.send("stop")
        peak = conn.recv()
        proc.join()
        ratios = [
            statistics.median(t) / statistics.median(base) for t, base in zip(turns[variant], turns["np"], strict=True)
        ]
        steps = [x for turn in turns[variant] for x in turn]
        table[variant] = {
            "ms": statistics.median(steps) * 1e3,
            "ratio": statistics.median(ratios),
            "ratios": ratios,
            "peak_rss_mb": peak,
            "step_ms": [x * 1e3 for x in steps],
        }
    return table


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=10, help="turns per variant, interleaved")
    parser.add_argument("--burst", type=int, default=3, help="steps per turn (the first is not timed)")
    parser.add_argument("--modes", default=",".join(MODES), help=f"comma-separated DP modes from {MODES}")
    parser.add_argument("--sets", default=",".join(TRAINABLE_SETS), help=f"comma-separated, from {TRAINABLE_SETS}")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "dp_overhead.json"))
    args = parser.parse_args(argv)
    modes = [x for x in args.modes.split(",") if x]
    sets = [x for x in args.sets.split(",") if x]
    if sorted(set(modes) - set(MODES)) or sorted(set(sets) - set(TRAINABLE_SETS)):
        parser.error(f"modes must come from {MODES}, sets from {TRAINABLE_SETS}")
    variants = ["np", *modes]

    results: dict = {
        "model": "small",
        "batch": BATCH,
        "threads": THREADS,
        "embodiment": EMBODIMENT,
        "repeats": args.repeats,
        "burst": args.burst,
        "default_mode": DEFAULT_MODE,
        "sets": {},
    }
    for which in sets:
        print(f"timing {which} ({', '.join(variants)}) ...", flush=True)
        results["sets"][which] = measure_set(which, variants, args.repeats, args.burst)

    target = {"2 experts": 1.3, "all experts": 2.0}
    print(
        f"\nsmall model, batch {BATCH}, {THREADS} threads, {args.repeats} interleaved turns of {args.burst} steps;"
        " ratio = median over turns of DP / non-private turn next to it; peak = ru_maxrss (opacus imported in all)"
    )
    print(f"{'trainable':12s} {'variant':10s} {'ms/step':>9s} {'ratio':>7s} {'peak MB':>8s}")
    for which, table in results["sets"].items():
        for variant in variants:
            row = table[variant]
            mark = ""
            if variant != "np":
                mark = "  meets target" if row["ratio"] <= target[which] else f"  > {target[which]}x target"
            print(f"{which:12s} {variant:10s} {row['ms']:9.1f} {row['ratio']:7.2f} {row['peak_rss_mb']:8.0f}{mark}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2))
    print(f"wrote {out}")
    return results


if __name__ == "__main__":
    main()
