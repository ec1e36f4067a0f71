"""One data-parallel DP step's noise: every worker noising its own slice, against rank 0 alone.

``privacy.dp_sgd._with_distributed_secure_noise`` reduce-scatters the workers' clipped sums,
each worker noises its slice with numbers of one draw from the key they share, and the
slices are all-gathered. The baseline is the scheme it replaced, measured in the same run
and the same gloo group: all-reduce, rank 0 draws every normal, broadcast. Both noise the
same flattened float32 sums of P parameters; the bench checks they give the same numbers
(same key) before timing. W worker processes of one thread each, as ``member_node.parallel``
runs them on CPU; the cipher runs on each worker's host core either way.

P: ``small`` with 2 experts trainable (868k), all experts (3.4M), and larger flat sizes for
where a member's shards are heading (the ``trillion`` plan gives a member 5.5e9 parameters
per round). Reported per P: median seconds per noise step for each scheme (alternating,
``--repeats`` each), the ratio, the largest worker's peak RSS, and where the time goes
(the noise of P and of P/W numbers on one worker; gloo's all-reduce, broadcast,
reduce-scatter and all-gather of P floats).

Usage: ``python bench/dp_noise.py [--workers 2] [--repeats 5] [--sizes 868000,3400000,20000000]``;
writes ``bench/results/dp_noise.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from member_node.parallel import peak_rss_mb
from privacy.dp_sgd import _with_distributed_secure_noise
from privacy.secure_noise import SecureRandom

STD = 0.1
TENSORS = 40  # a step's sums come as many tensors (``small`` with 2 experts: 40)


def _optimizer(sizes: list[int], seed: int) -> torch.optim.Optimizer:
    """The production distributed DP optimizer over parameters whose clipped sums we set."""
    from opacus.optimizers import DPOptimizerFastGradientClipping

    params = [torch.nn.Parameter(torch.zeros(n)) for n in sizes]
    opt = _with_distributed_secure_noise(DPOptimizerFastGradientClipping)(
        torch.optim.SGD(params, lr=0.0), noise_multiplier=1.0, max_grad_norm=STD, expected_batch_size=1.0
    )
    opt.noise_source = SecureRandom(seed=seed)  # every worker the same key, as after the broadcast
    return opt


def _set_sums(opt: torch.optim.Optimizer, sums: list[torch.Tensor]) -> None:
    """A fresh step's clipped sums (a new tensor carries no "already noised" mark)."""
    for p, s in zip(opt.params, sums, strict=True):
        p.summed_grad, p.grad = s.clone(), None


def _rank0_alone(sums: list[torch.Tensor], source: SecureRandom) -> list[torch.Tensor]:
    """The previous scheme: all-reduce, rank 0 draws all the noise, broadcast, one gradient
    per parameter (as the production step makes them)."""
    flat = torch.cat([s.reshape(-1) for s in sums])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    if dist.get_rank() == 0:
        source.add_noise_([flat], STD)
    dist.broadcast(flat, src=0)
    return [g.view_as(s).clone() for g, s in zip(flat.split([s.numel() for s in sums]), sums, strict=True)]


def _measure(total: int, world: int, repeats: int) -> dict:
    """Both schemes on P = ``total`` parameters in ``TENSORS`` tensors, and their parts."""
    sizes = [total // TENSORS + (i < total % TENSORS) for i in range(TENSORS)]
    g = torch.Generator().manual_seed(dist.get_rank())
    sums = [torch.randn(n, generator=g) for n in sizes]
    sharded, baseline = _optimizer(sizes, seed=1), SecureRandom(seed=1)
    # Same key, same numbers: the sharded step adds exactly the baseline's noise.
    _set_sums(sharded, sums)
    sharded.add_noise()
    want = _rank0_alone(sums, baseline)
    same = all(torch.equal(p.grad, w) for p, w in zip(sharded.params, want, strict=True))
    times: dict[str, list[float]] = {}

    def timed(name: str, step: Callable[[], object]) -> None:
        dist.barrier()
        t = time.perf_counter()
        step()
        dist.barrier()
        times.setdefault(name, []).append(time.perf_counter() - t)

    flat, part = torch.zeros(total), torch.zeros(-(-total // world))
    for _ in range(repeats):
        timed("rank 0 alone", lambda: _rank0_alone(sums, baseline))
        _set_sums(sharded, sums)
        timed("sharded", sharded.add_noise)
        # Where the time goes: the noise on one worker, and gloo's collectives.
        timed("component: noise of all P", lambda: baseline.add_noise_([flat], STD))
        timed("component: noise of P/W", lambda: baseline.add_noise_([part], STD))
        timed("component: all-reduce", lambda: dist.all_reduce(flat))
        timed("component: broadcast", lambda: dist.broadcast(flat, src=0))
        timed("component: reduce-scatter", lambda: dist.reduce_scatter_single(part, flat))
        timed("component: all-gather", lambda: dist.all_gather_single(flat, part))
    return {"parameters": total, "same_noise": same, "samples_s": times}


def _worker(rank: int, world: int, store: str, sizes_total: list[int], repeats: int, out: str) -> None:
    os.environ["GLOO_SOCKET_IFNAME"] = "lo"
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    rows = [_measure(total, world, repeats) for total in sizes_total]
    peak = torch.tensor([peak_rss_mb()], dtype=torch.float64)
    peaks = [torch.zeros(1, dtype=torch.float64) for _ in range(world)]
    dist.all_gather(peaks, peak)
    if rank == 0:
        Path(out).write_text(json.dumps({"rows": rows, "peak_rss_mb_largest_worker": max(float(p) for p in peaks)}))
    dist.barrier()
    dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--sizes", default="868000,3400000,20000000")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "dp_noise.json"))
    args = parser.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    with tempfile.TemporaryDirectory() as tmp:
        out = str(Path(tmp) / "result.json")
        mp.spawn(_worker, args=(args.workers, str(Path(tmp) / "store"), sizes, args.repeats, out), nprocs=args.workers)
        measured = json.loads(Path(out).read_text())
    result = {"workers": args.workers, "threads_per_worker": 1, "std": STD, "tensors": TENSORS, **measured}
    for row in result["rows"]:
        med = {k: statistics.median(v) for k, v in row["samples_s"].items()}
        row["median_s"] = med
        row["ratio_sharded_over_rank0"] = med["sharded"] / med["rank 0 alone"]
        if not row["same_noise"]:
            raise SystemExit(f"P={row['parameters']}: the sharded step did not add the baseline's noise")
        print(
            f"P={row['parameters']:>11,}: rank 0 alone {med['rank 0 alone'] * 1e3:8.1f} ms, sharded over "
            f"{args.workers} workers {med['sharded'] * 1e3:8.1f} ms -> {row['ratio_sharded_over_rank0']:.2f}x "
            "(same noise: yes)"
        )
        parts = ", ".join(f"{k.split(': ')[1]} {v * 1e3:.1f}" for k, v in med.items() if k.startswith("component"))
        print(f"    components, ms (one worker; collectives over {args.workers}): {parts}")
    print(f"peak RSS of the largest worker: {result['peak_rss_mb_largest_worker']:.0f} MB")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
