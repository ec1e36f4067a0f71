"""Cost of the DP-compatible MoE dispatch, against the alternatives, measured in one run.

Three ways to run the same experts on the same routed tokens (forward + backward):
- ``flat``: the usual MoE dispatch (gather each expert's tokens over batch x time into one
  ``[n_tokens, D]`` batch). Fastest, but it breaks DP-SGD's per-sample gradients, so
  kyodo cannot use it: it is the baseline that shows what DP compatibility costs.
- ``dense``: every expert on every token, gate 0 where not routed (DP-compatible, simple).
- ``sparse``: kyodo's batch-preserving dispatch (``shared_model.moe.MoELayer``).

Prints each as a ratio to ``flat``, plus peak RSS of a process running only that variant,
and writes ``bench/results/moe_dispatch.json``. Usage: ``python bench/moe_dispatch.py [--out FILE]``.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import resource
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from shared_model.moe import MoELayer

CASES = [  # (B, S, D, E, k, hidden): small's layer; then a wider expert pool
    (32, 20, 128, 8, 2, 256),
    (32, 20, 128, 32, 4, 256),
]
REPEATS = 15


def _flat(layer: MoELayer, x: torch.Tensor) -> torch.Tensor:
    b, s, d = x.shape
    gates, top_i, _ = layer.router(x)
    tokens = x.reshape(b * s, d)
    flat_i, flat_g = top_i.reshape(b * s, -1), gates.reshape(b * s, -1)
    y = torch.zeros_like(tokens)
    for e, expert in enumerate(layer.experts):
        rows, slot = (flat_i == e).nonzero(as_tuple=True)
        if rows.numel():
            y = y.index_add(0, rows, expert(tokens[rows]) * flat_g[rows, slot].unsqueeze(-1))
    return y.reshape(b, s, d)


def _dense(layer: MoELayer, x: torch.Tensor) -> torch.Tensor:
    gates, top_i, _ = layer.router(x)
    combine = torch.zeros(*x.shape[:2], layer.n_experts, dtype=x.dtype).scatter(-1, top_i, gates)
    y = torch.zeros_like(x)
    for e, expert in enumerate(layer.experts):
        y = y + expert(x) * combine[..., e : e + 1]
    return y


def _sparse(layer: MoELayer, x: torch.Tensor) -> torch.Tensor:
    return layer(x)[0]


VARIANTS = {"flat": _flat, "dense": _dense, "sparse": _sparse}


def _time_variant(name: str, case: tuple, queue) -> None:
    torch.set_num_threads(1)
    torch.manual_seed(0)
    b, s, d, e, k, h = case
    layer = MoELayer(d, e, k, h)
    x = torch.randn(b, s, d)
    fn = VARIANTS[name]
    times = []
    for i in range(REPEATS + 3):
        start = time.perf_counter()
        out = fn(layer, x)
        F.mse_loss(out, torch.zeros_like(out)).backward()
        layer.zero_grad(set_to_none=True)
        if i >= 3:
            times.append(time.perf_counter() - start)
    queue.put((statistics.median(times), resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024))


def run_case(case: tuple) -> dict:
    ctx = mp.get_context("spawn")
    result = {}
    for name in VARIANTS:
        queue = ctx.Queue()
        proc = ctx.Process(target=_time_variant, args=(name, case, queue))
        proc.start()
        seconds, peak_mb = queue.get()
        proc.join()
        result[name] = {"ms": seconds * 1e3, "peak_rss_mb": peak_mb}
    for name in VARIANTS:
        result[name]["ratio_to_flat"] = result[name]["ms"] / result["flat"]["ms"]
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "moe_dispatch.json")
    args = parser.parse_args()
    rows = []
    for case in CASES:
        b, s, d, e, k, h = case
        res = run_case(case)
        rows.append({"B": b, "S": s, "D": d, "E": e, "k": k, "hidden": h, **res})
        print(f"B={b} S={s} D={d} E={e} top-{k} hidden={h} (forward+backward, 1 thread)")
        for name, r in res.items():
            print(f"  {name:7s} {r['ms']:8.2f} ms  {r['ratio_to_flat']:5.2f}x flat  peak RSS {r['peak_rss_mb']:.0f} MB")
    out = args.out
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(rows, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
