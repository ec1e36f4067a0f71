"""Cost of the SecAgg+ primitives on one large shard vector, relative to a plain ``np.add``.

Times, on ``--n`` entries (default 10M, about a small model's expert shard): ``quantize``
(float32 in, uint32/uint64 grid values out), ``expand_mask`` (ChaCha20 keystream),
``add_into`` (one modular mask addition) and ``dequantize_sum``, against ``np.add`` of two
float32 arrays of the same length. The machine is shared and noisy, so the operations are
measured in turns (round-robin, ``--repeats`` times) and each reports its median and the
ratio of medians to the baseline measured in the same run.

Memory: a second, untimed pass runs each operation under ``tracemalloc`` (numpy reports its
buffers to it) and records the peak of new allocations during the call, i.e. the temporaries
plus the result; the process's ``ru_maxrss`` is reported as well.

Usage: ``python bench/secagg_primitives.py [--n 10000000] [--repeats 7] [--bits 16] [--cohort 100]``;
writes ``bench/results/secagg_primitives.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import time
import tracemalloc
from collections.abc import Callable
from pathlib import Path

import numpy as np

from aggregation.secagg.masks import expand_mask
from aggregation.secagg.quantize import (
    QuantizationPlan,
    add_into,
    dequantize_sum,
    plan_quantization,
    quantize,
    secure_rng,
)


def _ops(n: int, bits: int, cohort: int) -> tuple[dict[str, Callable[[], object]], QuantizationPlan]:
    """The timed calls, closing over inputs built once (only the call itself is measured)."""
    plan = plan_quantization(cohort, bits, 1.0)
    data_rng = np.random.default_rng(0)  # benchmark data only, nothing secret
    x = (data_rng.standard_normal(n, dtype=np.float32) * 0.2).astype(np.float32)
    y = data_rng.standard_normal(n, dtype=np.float32)
    rng = secure_rng()
    seed = os.urandom(32)
    q, _ = quantize(x, plan, rng)
    acc = q.copy()
    mask = expand_mask(seed, "bench", n, plan.dtype)
    total = (q // plan.dtype(2)).astype(plan.dtype)  # a valid sum of one member
    return {
        "np.add float32 (baseline)": lambda: np.add(x, y),
        "quantize": lambda: quantize(x, plan, rng),
        "expand_mask": lambda: expand_mask(seed, "bench", n, plan.dtype),
        "add_into (mask)": lambda: add_into(acc, mask),
        "dequantize_sum": lambda: dequantize_sum(total, 1, plan),
    }, plan


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=10_000_000)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--bits", type=int, default=16)
    parser.add_argument("--cohort", type=int, default=100)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "secagg_primitives.json")
    args = parser.parse_args()

    ops, plan = _ops(args.n, args.bits, args.cohort)
    names = list(ops)
    for fn in ops.values():  # warm up: first-touch page faults, cipher and ufunc setup
        fn()

    times: dict[str, list[float]] = {name: [] for name in names}
    for rep in range(args.repeats):
        order = names[rep % len(names) :] + names[: rep % len(names)]
        for name in order:
            start = time.perf_counter()
            result = ops[name]()
            times[name].append(time.perf_counter() - start)
            del result

    peaks: dict[str, int] = {}
    tracemalloc.start()
    for name in names:
        tracemalloc.reset_peak()
        base, _ = tracemalloc.get_traced_memory()
        result = ops[name]()
        peaks[name] = tracemalloc.get_traced_memory()[1] - base
        del result
    tracemalloc.stop()

    baseline = statistics.median(times[names[0]])
    report = {
        "n": args.n,
        "plan": plan.to_dict(),
        "dtype": np.dtype(plan.dtype).name,
        "repeats": args.repeats,
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "numpy": np.__version__,
        "ops": {
            name: {
                "median_s": statistics.median(times[name]),
                "min_s": min(times[name]),
                "ratio_to_np_add": statistics.median(times[name]) / baseline,
                "peak_new_alloc_mb": peaks[name] / 2**20,
            }
            for name in names
        },
        "ru_maxrss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }
    print(f"n={args.n:,} plan={plan.to_dict()} dtype={report['dtype']} repeats={args.repeats}")
    print(f"{'operation':28s}{'median ms':>11s}{'min ms':>9s}{'x np.add':>10s}{'peak MB':>10s}")
    for name, row in report["ops"].items():
        print(
            f"{name:28s}{row['median_s'] * 1e3:11.1f}{row['min_s'] * 1e3:9.1f}"
            f"{row['ratio_to_np_add']:10.2f}{row['peak_new_alloc_mb']:10.1f}"
        )
    print(f"process ru_maxrss: {report['ru_maxrss_mb']:.0f} MB")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
