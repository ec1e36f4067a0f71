"""Coordinator memory of one real round as the shard count grows (issue 5, item 4).

Runs the real ``coordinator.rounds.RoundRunner`` (query, plan, train replies through their
wire form, per-shard fold, finish, server optimiser, shard objects written to a real store)
against ``tests/round_fakes.FakeGrid``, whose members answer at once with random deltas
(reverse member order, one reply per pull; their replicas already hold the current model,
so requests carry no objects). Plaintext aggregation (the fake members do not
run SecAgg+; its masked sums use the same pool, see ``aggregation.secagg.server``).

Model: the tiny preset widened so every expert shard is ``--d-model`` x ``--hidden`` x 2
float32 (4 MiB by default), with ``n_layers x n_experts`` expert shards for each point of
``--shards``; one member per expert of a layer, each training 2 experts per layer
(``min_cohort`` 2), so a round touches every expert shard while each reply keeps the same
size (8 experts plus adapters) as the model grows.

Compared, each in a fresh process (peaks do not mix; the store is built beforehand, so the
whole-model initialisation is not in the peak):

* ``budget``: the runner's sum pool limited to 2 largest shards (what the design promises);
* ``no budget``: the same code with an unlimited pool, i.e. early finishing alone, which is
  the baseline: sums of every open shard in RAM at once.

Printed: peak RSS growth over the RSS before the round, the pool's peak resident bytes, the
model size and the bytes of the round's sums, and the ratio budget/no-budget. Written to
``bench/results/round_memory.json``. Usage: ``python bench/round_memory.py [--shards 16 32 64]``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # tests.round_fakes

N_LAYERS = 4
EXPERTS_PER_MEMBER = 2  # per layer: a member's reply stays the same size as the model grows
_LAUNCH = "import subprocess, sys; sys.exit(subprocess.call(sys.argv[1:]))"  # see bench/aggregate.py


def _overrides(shards: int, d_model: int, hidden: int) -> list[str]:
    return [
        f"model.n_layers={N_LAYERS}",
        f"model.n_experts={shards // N_LAYERS}",
        f"model.d_model={d_model}",
        f"model.expert_hidden={hidden}",
        "secagg.enabled=false",
        "train.min_cohort=2",
        f"train.experts_per_member={EXPERTS_PER_MEMBER}",
    ]


def _rss_mb() -> float:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def child(out_dir: Path, shards: int, d_model: int, hidden: int, budget_shards: float | None) -> dict:
    import torch

    from coordinator.federation import initial_model
    from coordinator.rounds import RoundResult, RoundRunner
    from coordinator.run_state import RunState
    from shared_model.config import load_config
    from tests.round_fakes import FakeGrid

    torch.set_num_threads(1)
    cfg = load_config(model="tiny", overrides=_overrides(shards, d_model, hidden))
    state = RunState(cfg, out_dir)
    if state.head is None:  # setup run: build and store the initial model, nothing measured
        state.commit_initial(initial_model(cfg), {"run": "bench"})
        return {"setup": True}
    # One member per expert of a layer: every expert gets a cohort of 2, each reply is
    # EXPERTS_PER_MEMBER x N_LAYERS experts whatever the model size.
    embodiments = sorted(cfg.embodiments)
    n_members = shards // N_LAYERS
    members = {f"m{i:03d}": embodiments[i % len(embodiments)] for i in range(n_members)}
    # Members already hold the current model (as from their second round on): a first
    # download carries the whole model in one request, which is not what this measures.
    grid = FakeGrid(members, state.layout, held=state.head.object_ids())
    probe = RoundRunner(cfg, grid, state, run_id="bench", timeout=600, sum_budget_bytes=0)
    sizes = {s: 4 * sum(math.prod(v) for v in probe._trainable_shapes(s).values()) for s in state.layout.shards}
    largest = max(sizes.values())
    # No budget: an unlimited pool (None would mean the runner's default budget).
    budget = sys.maxsize if budget_shards is None else int(budget_shards * largest)
    runner = RoundRunner(cfg, grid, state, run_id="bench", timeout=600, sum_budget_bytes=budget)
    runner.query(1)
    plan = runner.plan(1)
    result = RoundResult(round=1, plan=plan)
    base = _rss_mb()
    start = time.perf_counter()
    runner.train_and_aggregate(1, plan, result)
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    model_bytes = sum(spec.numel * 4 for specs in state.layout.shards.values() for spec in specs)
    return {
        "shards": shards,
        "budget": "no budget" if budget_shards is None else f"{budget_shards:g} largest shards",
        "budget_bytes": None if budget_shards is None else budget,
        "largest_shard_mb": largest / 2**20,
        "model_mb": model_bytes / 2**20,
        "round_sums_mb": sum(sizes[s] for s in plan.cohorts) / 2**20,
        "updated_shards": len(result.updated_shards),
        "planned_shards": len(plan.cohorts),
        "base_rss_mb": base,
        "peak_rss_mb": peak,
        "growth_mb": peak - base,
        "pool_peak_mb": runner.last_pool.peak_resident_bytes / 2**20,
        "spilled_mb": runner.last_pool.spilled_bytes / 2**20,
        "s": seconds,
    }


def _run(args: argparse.Namespace, out_dir: Path, shards: int, budget: float | None) -> dict:
    cmd = [sys.executable, "-c", _LAUNCH, sys.executable, __file__, "--child", str(out_dir), "--shards", str(shards)]
    cmd += ["--d-model", str(args.d_model), "--hidden", str(args.hidden)]
    if budget is not None:
        cmd += ["--budget-shards", str(budget)]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, cwd=ROOT).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shards", type=int, nargs="*", default=[16, 32, 64], help="expert shards (x4 layers)")
    parser.add_argument("--d-model", type=int, default=256)
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--budget-shards", type=float, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--child", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "round_memory.json")
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.shards[0], args.d_model, args.hidden, args.budget_shards)))
        return

    t0 = time.perf_counter()
    rows = []
    for shards in args.shards:
        for budget in (2.0, None):
            with tempfile.TemporaryDirectory(dir=ROOT / "bench" / "results") as tmp:
                _run(args, Path(tmp), shards, None)  # setup: the initial model in the store
                rows.append(_run(args, Path(tmp), shards, budget))
    print(f"{'shards':>6s} {'budget':>18s}{'model MB':>10s}{'sums MB':>9s}{'largest MB':>11s}"
          f"{'pool peak MB':>13s}{'RSS growth MB':>14s}{'spilled MB':>11s}{'s':>6s}")  # fmt: skip
    for r in rows:
        print(
            f"{r['shards']:6d} {r['budget']:>18s}{r['model_mb']:10.0f}{r['round_sums_mb']:9.0f}"
            f"{r['largest_shard_mb']:11.1f}{r['pool_peak_mb']:13.1f}{r['growth_mb']:14.0f}{r['spilled_mb']:11.0f}"
            f"{r['s']:6.1f}"
        )
    ratios = {}
    for shards in args.shards:
        b, n = (next(r for r in rows if r["shards"] == shards and (r["budget_bytes"] is None) == nb) for nb in (0, 1))
        ratios[str(shards)] = {
            "rss growth budget / no budget": b["growth_mb"] / n["growth_mb"],
            "rss growth budget / largest shard": b["growth_mb"] / b["largest_shard_mb"],
            "rss growth budget / model": b["growth_mb"] / b["model_mb"],
        }
        print(f"  {shards} shards: " + ", ".join(f"{k} {v:.2f}" for k, v in ratios[str(shards)].items()))
    report = {"rows": rows, "ratios": ratios, "load_avg_1m": os.getloadavg()[0], "wall_s": time.perf_counter() - t0}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out} ({report['wall_s']:.0f} s)")


if __name__ == "__main__":
    main()
