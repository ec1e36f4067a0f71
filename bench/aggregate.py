"""Streaming per-shard weighted mean (``ShardMean``) against a numpy roofline and Flower's FedAvg.

Throughput: N updates of one shard, each ``--p`` float32 values (default 10M, 40 MB), are
folded into one example-weighted mean; the figure is GB/s of *input* folded (N * P * 4 bytes
over the time). Measured, in turns (round-robin, ``--repeats`` times, medians reported; the
machine is shared and noisy):

* ``roofline f64``: ``np.zeros(P, float64)`` then ``np.add(acc, x, out=acc)`` per update, i.e.
  the data movement of folding float32 input into a float64 sum, *unweighted* (a weight costs
  one more multiply per element). This is the roofline the target refers to.
* ``roofline f32``: the same into a float32 accumulator (plain float32 add; fewer bytes, so faster).
* ``kyodo ShardMean.add xN``: a fresh ``ShardMean`` and ``add`` per update (every check and
  the weighted float32 in-place fold; finiteness is checked once, in ``mean``), on
  already-decoded tensors. This
  is the row compared with the roofline: both fold N updates and stop.
* ``kyodo add xN + mean``: the same plus ``mean()`` (float32 result): the complete aggregate,
  compared with Flower's function, which returns the complete aggregate too.
* ``kyodo decode+add xN + mean``: the same starting from each reply's Flower ``ArrayRecord``,
  decoded with the coordinator's own ``shared_model.protocol.record_to_tensors`` (``np.load``
  copy plus its own finiteness pass): like for like with Flower's function, which decodes inside.
* ``kyodo decode only``: ``record_to_tensors`` alone, to show what the decode costs.
* ``flower aggregate_arrayrecords``: the function Flower 1.42's message-API
  ``flwr.serverapp.strategy.FedAvg.aggregate_train`` calls
  (``flwr/serverapp/strategy/strategy_utils.py``), on a list of N reply ``RecordDict``s. It needs
  every reply in memory at once, accumulates in float32 (``value.numpy() * weight``, a temporary
  per update) and serialises the result into an ``ArrayRecord``.

Accuracy (untimed): max error of each mean against a float64 reference, relative to its
largest value, for N = ``--n`` and N = 32.

Memory (measured first): each (method, N) for N in ``--mem-n`` runs in a fresh subprocess so
peaks do not mix.
For kyodo, replies arrive one at a time: build the reply record (as it comes off the wire),
decode, fold, free. For Flower, the N reply records are built first (what the strategy holds
when it aggregates), then aggregated. Reported: ``ru_maxrss`` peak and its growth over the RSS
just before the first reply (torch, flwr and numpy already imported).

Usage: ``python bench/aggregate.py [--p 10000000] [--n 8] [--repeats 5] [--mem-n 4 8 16 32]``;
writes ``bench/results/aggregate.json``.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from flwr.app import Array, ArrayRecord, MetricRecord, RecordDict  # noqa: E402
from flwr.serverapp.strategy.strategy_utils import aggregate_arrayrecords  # noqa: E402

from aggregation.weighted_mean import ShardMean  # noqa: E402
from shared_model.protocol import record_to_tensors, tensors_to_record  # noqa: E402

NAME = "blocks.0.moe.experts.0.w_up.weight"
SHARD = "expert/L0/E0"
WEIGHT_KEY = "num-examples"
FOLD = "kyodo ShardMean.add xN"
FULL = "kyodo add xN + mean"
DECODE_FULL = "kyodo decode+add xN + mean"
DECODE = "kyodo decode only"
FLOWER = "flower aggregate_arrayrecords"
METHODS = ("roofline f64", "roofline f32", FOLD, FULL, DECODE_FULL, DECODE, FLOWER)


def _update(rng: np.random.Generator, p: int) -> np.ndarray:
    return (rng.standard_normal(p, dtype=np.float32) * 0.01).astype(np.float32, copy=False)


def _weights(n: int) -> list[int]:
    """Uneven example counts, as cohorts have."""
    return [100 + 37 * i * i for i in range(n)]


def _flower_reply(x: np.ndarray, weight: int) -> RecordDict:
    return RecordDict({"arrays": ArrayRecord({NAME: Array(x)}), "metrics": MetricRecord({WEIGHT_KEY: weight})})


def _kyodo_reply(x: np.ndarray, weight: int) -> RecordDict:
    """The same payload the way a kyodo member sends it (``tensors_to_record``)."""
    return RecordDict(
        {"delta": tensors_to_record({NAME: torch.from_numpy(x)}), "metrics": MetricRecord({WEIGHT_KEY: weight})}
    )


def _kyodo_fold(members: list[str], p: int, tensors: list[torch.Tensor], weights: list[int]) -> ShardMean:
    acc = ShardMean(SHARD, members, {NAME: (p,)})
    for member, tensor, weight in zip(members, tensors, weights, strict=True):
        acc.add(member, {NAME: tensor}, float(weight))
    return acc


def _decode_only(replies: list[RecordDict]) -> None:
    for reply in replies:
        record_to_tensors(reply.array_records["delta"], "bench reply")


def _kyodo_decode_fold(members: list[str], p: int, replies: list[RecordDict]) -> torch.Tensor:
    acc = ShardMean(SHARD, members, {NAME: (p,)})
    for member, reply in zip(members, replies, strict=True):
        deltas = record_to_tensors(reply.array_records["delta"], "bench reply")
        acc.add(member, deltas, float(reply.metric_records["metrics"][WEIGHT_KEY]))
    return acc.mean()[NAME]


def _roofline(xs: list[np.ndarray], dtype: type[np.floating]) -> np.ndarray:
    acc = np.zeros(xs[0].size, dtype=dtype)
    for x in xs:
        np.add(acc, x, out=acc)
    return acc


# ------------------------------------------------------------------ accuracy
ACCURACY_N = 32  # the float32 accuracy claim in aggregation/weighted_mean.py is for this N


def _accuracy(rng: np.random.Generator, p: int, n: int, xs: list[np.ndarray] | None) -> dict[str, float]:
    """Max error of each mean against a float64 reference, relative to the reference's largest value."""
    xs = xs if xs is not None else [_update(rng, p) for _ in range(n)]
    weights = _weights(n)
    members = [f"member-{i}" for i in range(n)]
    total = float(sum(weights))
    ref = np.zeros(p)
    for x, w in zip(xs, weights, strict=True):
        ref += x.astype(np.float64) * (w / total)
    scale = float(np.abs(ref).max())
    ours = _kyodo_fold(members, p, [torch.from_numpy(x) for x in xs], weights).mean()[NAME].numpy()
    replies = [_flower_reply(x, w) for x, w in zip(xs, weights, strict=True)]
    flower = aggregate_arrayrecords(replies, WEIGHT_KEY)[NAME].numpy()
    return {
        f"kyodo ShardMean N={n}": float(np.abs(ours - ref).max()) / scale,
        f"{FLOWER} N={n}": float(np.abs(flower - ref).max()) / scale,
    }


# ------------------------------------------------------------------ throughput
def throughput(p: int, n: int, repeats: int) -> dict:
    rng = np.random.default_rng(0)
    xs = [_update(rng, p) for _ in range(n)]
    weights = _weights(n)
    members = [f"member-{i}" for i in range(n)]
    tensors = [torch.from_numpy(x) for x in xs]
    flower_replies = [_flower_reply(x, w) for x, w in zip(xs, weights, strict=True)]
    kyodo_replies = [_kyodo_reply(x, w) for x, w in zip(xs, weights, strict=True)]

    ops: dict[str, Callable[[], object]] = {
        "roofline f64": lambda: _roofline(xs, np.float64),
        "roofline f32": lambda: _roofline(xs, np.float32),
        FOLD: lambda: _kyodo_fold(members, p, tensors, weights),
        FULL: lambda: _kyodo_fold(members, p, tensors, weights).mean(),
        DECODE_FULL: lambda: _kyodo_decode_fold(members, p, kyodo_replies),
        DECODE: lambda: _decode_only(kyodo_replies),
        FLOWER: lambda: aggregate_arrayrecords(flower_replies, WEIGHT_KEY),
    }
    times: dict[str, list[float]] = {k: [] for k in ops}
    for _ in range(repeats):
        for key, op in ops.items():
            start = time.perf_counter()
            op()
            times[key].append(time.perf_counter() - start)

    accuracy = {}
    for n_acc in sorted({n, ACCURACY_N}):  # untimed: float64 reference of the weighted mean
        accuracy.update(_accuracy(rng, p, n_acc, xs if n_acc == n else None))

    input_bytes = n * p * 4
    result = {}
    for key, ts in times.items():
        med = statistics.median(ts)
        result[key] = {"median_s": med, "min_s": min(ts), "gb_per_s": input_bytes / med / 1e9, "times_s": ts}
    return {"results": result, "max_rel_error_vs_float64": accuracy}


# ------------------------------------------------------------------ memory (child process)
def _rss_now_mb() -> float:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _vm_hwm_mb() -> float:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def _peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def memory_child(method: str, p: int, n: int) -> dict:
    rng = np.random.default_rng(1)
    weights = _weights(n)
    members = [f"member-{i}" for i in range(n)]
    base = _rss_now_mb()
    start = time.perf_counter()
    if method == "kyodo":
        acc = ShardMean(SHARD, members, {NAME: (p,)})
        for member, weight in zip(members, weights, strict=True):
            reply = _kyodo_reply(_update(rng, p), weight)  # arrives
            deltas = record_to_tensors(reply.array_records["delta"], "bench reply")
            acc.add(member, deltas, float(weight))
            del reply, deltas  # fold-and-free
            # Flower's ``RecordDict.array_records`` returns a view that sits in a reference cycle
            # and holds the reply's ArrayRecord, so the reply's bytes are only released by the
            # cyclic GC; without this the peak grows ~1 update per reply until gen-0 GC happens
            # to run. (The coordinator decodes the same way; see the report.)
            gc.collect(1)  # young generations suffice (the cycle is new) and take ~2 ms, not ~400
        mean = acc.mean()
    elif method == "flower":
        replies = [_flower_reply(_update(rng, p), w) for w in weights]  # all held, as the strategy does
        mean = aggregate_arrayrecords(replies, WEIGHT_KEY)
        del replies
    else:
        raise ValueError(f"unknown method {method!r}")
    elapsed = time.perf_counter() - start
    del mean
    peak = _peak_mb()
    return {
        "method": method,
        "n": n,
        "base_rss_mb": base,
        "peak_rss_mb": peak,
        "growth_mb": peak - base,
        "vm_hwm_mb": _vm_hwm_mb(),  # the kernel's own high-water mark of this process, as a cross-check
        "s": elapsed,
    }


# Linux carries a process's RSS high-water mark over ``fork`` + ``exec`` (the child's
# ``ru_maxrss`` starts at the parent's RSS), so a child spawned straight from this process would
# report at least this process's size. A bare interpreter in between (~10 MB) starts it clean.
_LAUNCH = "import subprocess, sys; sys.exit(subprocess.call(sys.argv[1:]))"


def _flat(rows: list[dict], tolerance_mb: float = 64.0) -> bool:
    growth = [r["growth_mb"] for r in rows]
    return max(growth) - min(growth) <= tolerance_mb


def memory(p: int, ns: list[int]) -> list[dict]:
    rows = []
    for method in ("kyodo", "flower"):
        for n in ns:
            cmd = [
                sys.executable,
                "-c",
                _LAUNCH,
                sys.executable,
                __file__,
                "--child",
                method,
                "--p",
                str(p),
                "--n",
                str(n),
            ]
            out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
            rows.append(json.loads(out.strip().splitlines()[-1]))
    return rows


# ------------------------------------------------------------------ main
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--p", type=int, default=10_000_000, help="float32 values per update")
    parser.add_argument("--n", type=int, default=8, help="updates folded per throughput measurement")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--mem-n", type=int, nargs="*", default=[4, 8, 16, 32])
    parser.add_argument("--child", choices=["kyodo", "flower"], help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "aggregate.json")
    args = parser.parse_args()
    if args.child:
        print(json.dumps(memory_child(args.child, args.p, args.n)))
        return

    t0 = time.perf_counter()
    # Memory first, while this process is still small (see ``memory``).
    mem = memory(args.p, args.mem_n) if args.mem_n else []
    tp = throughput(args.p, args.n, args.repeats)
    res = tp["results"]
    gbps = {k: v["gb_per_s"] for k, v in res.items()}
    ratios = {
        "fold / roofline f64": gbps[FOLD] / gbps["roofline f64"],
        "fold / roofline f32": gbps[FOLD] / gbps["roofline f32"],
        "fold+mean / flower": gbps[FULL] / gbps[FLOWER],
        "decode+fold+mean / flower": gbps[DECODE_FULL] / gbps[FLOWER],
    }

    mb = args.p * 4 / 2**20
    print(
        f"P={args.p:,} float32 ({mb:.0f} MiB/update), N={args.n}, repeats={args.repeats}, "
        f"cpus={os.cpu_count()}, torch threads={torch.get_num_threads()}, load={os.getloadavg()[0]:.2f}"
    )
    print(f"{'method':32s}{'median ms':>11s}{'min ms':>9s}{'GB/s in':>9s}{'x roof64':>10s}{'x flower':>10s}")
    for key in METHODS:
        r = res[key]
        print(
            f"{key:32s}{r['median_s'] * 1e3:11.1f}{r['min_s'] * 1e3:9.1f}{r['gb_per_s']:9.2f}"
            f"{r['gb_per_s'] / gbps['roofline f64']:10.2f}{r['gb_per_s'] / gbps[FLOWER]:10.2f}"
        )
    for key, value in ratios.items():
        print(f"  {key:30s} {value:6.2f}")
    for key, value in tp["max_rel_error_vs_float64"].items():
        print(f"  max rel error vs float64, {key}: {value:.2e}")
    if mem:
        print(f"{'memory':10s}{'N':>4s}{'base RSS MB':>13s}{'peak RSS MB':>13s}{'growth MB':>11s}{'s':>7s}")
        for row in mem:
            print(
                f"{row['method']:10s}{row['n']:4d}{row['base_rss_mb']:13.0f}{row['peak_rss_mb']:13.0f}"
                f"{row['growth_mb']:11.0f}{row['s']:7.2f}"
            )

    report = {
        "p": args.p,
        "n": args.n,
        "repeats": args.repeats,
        "input_bytes_per_run": args.n * args.p * 4,
        "roofline": "np.add(acc, x, out=acc): float32 input into a float64 (and, separately, float32) "
        "accumulator, unweighted, single-threaded numpy",
        "throughput": res,
        "ratios": ratios,
        "targets_met": {
            "fold >= 0.5 x roofline f64": ratios["fold / roofline f64"] >= 0.5,
            "fold+mean >= 2 x flower": ratios["fold+mean / flower"] >= 2.0,
            "kyodo peak flat in N": _flat([r for r in mem if r["method"] == "kyodo"]) if mem else None,
        },
        "max_rel_error_vs_float64": tp["max_rel_error_vs_float64"],
        "memory": mem,
        "machine": {
            "platform": platform.platform(),
            "cpus": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "numpy": np.__version__,
            "torch": torch.__version__,
            "load_avg_1m": os.getloadavg()[0],
        },
        "wall_s": time.perf_counter() - t0,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out} ({report['wall_s']:.0f} s)")


if __name__ == "__main__":
    main()
