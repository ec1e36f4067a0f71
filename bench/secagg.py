"""Cost of one round's aggregation with secure aggregation (SecAgg+) against plaintext, and
against Flower's ``SecAggPlusWorkflow``, measured in the same run.

Workload: N members (``--members``, default 4 8 16) each send an update of one shard
(``expert/L0/E0``, one tensor ``blocks.0.moe.experts.0.w_up.weight``) of P float32 values
(``--params``, default 1e6 1e7) drawn from N(0, 0.01), with different example counts; the
shard's cohort is all N members, one aggregation group built by ``build_setup`` with the
shipped defaults (``SecAggConfig``: 16 bits, clip range 1, complete graph up to 8 members,
then degree 2 ceil(log2 N), majority threshold).

**kyodo secure** runs the real code in-process: N ``MemberSecAgg`` nodes (own state
directory and Ed25519 identity key each) and one ``SecAggServer``, every message through its
wire form (``to_content`` by the sender, ``from_content`` by the receiver, as the transport
carries it; the transport itself, i.e. Flower's chunking, hashing and network, is the same
for both paths and not included). Stages: the train reply with the key advert, share keys,
masked input, unmask, then ``finish`` and ``mean_update`` (the shard's mean as tensors).
A member's ``begin`` (flatten the update, write it to its state directory, make the round's
keys) runs when training ends and is reported separately, outside the ratios.

**plaintext** is what the coordinator does with secure aggregation off: each member's
``TrainReply`` with its deltas (``to_content`` on the member, ``from_content`` on the
coordinator), folded into ``ShardMean`` as ``coordinator.rounds`` ``_fold_plain`` does
(check, add), then ``mean()``.

Every party's work is timed per stage. Two ratios secure / plaintext:

- **critical path** (as deployed: members run in parallel in their own data centres): per
  stage, the coordinator's time plus the slowest member's time, summed over stages. This
  is an upper bound: the coordinator folds replies as they arrive, overlapping the members;
- **total CPU** (every party's work one after the other on this machine).

Each repeat runs one secure and one plaintext round (order alternating); reported are
medians of the per-repeat times and the median of the per-repeat ratios. The secure mean
is asserted equal to the plaintext mean within the quantization error (N grid steps).

**Peak memory** comes from an extra, untimed round of each path before the timed ones
(it also warms up): before each party's call the kernel's high-water mark is reset
(``/proc/self/clear_refs``) and after it ``VmHWM`` is read; glibc is told to ``mmap`` every
buffer above 128 KiB so freed buffers leave the resident set. Coordinator peak: the largest
resident size during any coordinator call above the resident size at the start of the
round (its running state plus the message in hand). Member peak: the largest increase
during one member call (its transient memory, the outgoing message included).

**Flower**: the same N and P through ``SecAggPlusWorkflow`` (legacy ``DefaultWorkflow``,
``FedAvg``, a ``NumPyClient`` behind ``secaggplus_mod``), under ``run_simulation`` (Ray, one
CPU per client) in a child process, 1 round, the same graph degree, threshold, clip range
and 16-bit grid. Only the fit workflow's ``__call__`` is timed (Ray start-up, parameter
initialisation and evaluation are not). Its wall time on this machine is compared with the
secure path's total CPU (everything sequential on one core, a conservative comparison for
kyodo) and critical path. It is slow, so it runs only at P <= ``--flower-max-params``
(default 1e6), under ``--flower-timeout`` seconds per run (a run cut off reports "> T s").

Usage: ``python bench/secagg.py [--members 4 8 16] [--params 1e6 1e7] [--repeats 2]
[--flower/--no-flower]``; writes ``bench/results/secagg.json``. The full grid takes about
N minutes on 2 cores (see the README's performance section).
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import os
import platform
import resource
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from aggregation.secagg.graph import default_degree, default_threshold
from aggregation.secagg.server import SecAggServer, build_setup
from aggregation.secagg.vectors import shard_length
from aggregation.weighted_mean import ShardMean
from coordinator.secure_round import mean_update
from member_node.secagg_client import MemberSecAgg
from privacy.keys import load_or_create_signing_key, public_key_hex
from shared_model.config import SecAggConfig
from shared_model.protocol import (
    MaskedInputReply,
    MaskedInputRequest,
    ShareKeysReply,
    ShareKeysRequest,
    TrainReply,
    UnmaskReply,
    UnmaskRequest,
)
from shared_model.shards import shard_of

SHARD = "expert/L0/E0"
TENSOR = "blocks.0.moe.experts.0.w_up.weight"
RUN = "bench"
COORD = "coordinator"
SECURE_STAGES = ("train reply", "share keys", "masked input", "unmask", "finish")
PLAIN_STAGES = ("train reply", "finish")
RESULTS = Path(__file__).parent / "results" / "secagg.json"
_M_MMAP_THRESHOLD = -3


# ------------------------------------------------------------------------------ measuring
def _status_mb(field_name: str) -> float:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(field_name + ":"):
                return int(line.split()[1]) / 1024
    raise RuntimeError(f"{field_name} not in /proc/self/status")


def _reset_peak() -> None:
    with open("/proc/self/clear_refs", "w") as fh:
        fh.write("5")  # resets VmHWM to the current resident size (Linux >= 4.0)


def _mmap_big_buffers() -> None:
    """Every allocation above 128 KiB gets its own mapping, returned to the kernel on free."""
    try:
        ctypes.CDLL("libc.so.6").mallopt(_M_MMAP_THRESHOLD, 128 * 1024)
    except OSError:
        pass


@dataclass
class Clock:
    """Seconds (and, in the memory pass, peak resident MB) per (party, stage)."""

    memory: bool = False
    seconds: dict[tuple[str, str], float] = field(default_factory=lambda: defaultdict(float))
    peak_mb: dict[str, float] = field(default_factory=lambda: defaultdict(float))
    round_base_mb: float = 0.0

    def start_round(self) -> None:
        gc.collect()
        if self.memory:
            self.round_base_mb = _status_mb("VmRSS")

    @contextmanager
    def __call__(self, party: str, stage: str):
        if self.memory:
            _reset_peak()
            before = _status_mb("VmRSS")
        start = time.perf_counter()
        yield
        self.seconds[party, stage] += time.perf_counter() - start
        if self.memory:
            base = self.round_base_mb if party == COORD else before
            key = COORD if party == COORD else "member"
            self.peak_mb[key] = max(self.peak_mb[key], _status_mb("VmHWM") - base)

    def summary(self, stages: tuple[str, ...], members: list[str]) -> dict:
        per_stage = {}
        for stage in stages:
            member_times = [self.seconds.get((m, stage), 0.0) for m in members]
            per_stage[stage] = {
                "coordinator_s": self.seconds.get((COORD, stage), 0.0),
                "slowest_member_s": max(member_times),
                "members_total_s": sum(member_times),
            }
        return {
            "stages": per_stage,
            "critical_s": sum(s["coordinator_s"] + s["slowest_member_s"] for s in per_stage.values()),
            "cpu_s": sum(s["coordinator_s"] + s["members_total_s"] for s in per_stage.values()),
            "coordinator_s": sum(s["coordinator_s"] for s in per_stage.values()),
        }


# ------------------------------------------------------------------------------ workload
@dataclass
class Workload:
    n: int
    p: int
    root: Path
    members: list[str] = field(init=False)
    deltas: dict[str, dict[str, torch.Tensor]] = field(init=False)
    weights: dict[str, int] = field(init=False)
    shapes: dict[str, tuple[int, ...]] = field(init=False)
    nodes: dict[str, MemberSecAgg] = field(init=False)
    identity: dict[str, str] = field(init=False)

    def __post_init__(self) -> None:
        if shard_of(TENSOR) != SHARD:
            raise SystemExit(f"{TENSOR} belongs to {shard_of(TENSOR)}, not {SHARD}")
        cols = 1000 if self.p % 1000 == 0 else 1
        self.shapes = {TENSOR: (self.p // cols, cols)}
        self.members = [f"m{i:02d}" for i in range(self.n)]
        data_rng = np.random.default_rng(self.n * 1_000_003 + self.p)  # benchmark data, nothing secret
        self.deltas = {
            m: {TENSOR: torch.from_numpy(data_rng.normal(0.0, 0.01, self.p).astype(np.float32).reshape(self.shapes[TENSOR]))}
            for m in self.members
        }
        self.weights = {m: 48 + 16 * (i % 4) for i, m in enumerate(self.members)}
        self.nodes, self.identity = {}, {}
        for m in self.members:
            key = load_or_create_signing_key(self.root / m / "identity.pem")
            self.nodes[m] = MemberSecAgg(self.root / m, m, key)
            self.identity[m] = public_key_hex(key)

    def plaintext_mean(self) -> np.ndarray:
        total = sum(self.weights[m] * self.deltas[m][TENSOR].numpy().astype(np.float64) for m in self.members)
        return total.reshape(-1) / sum(self.weights.values())


def _reply(member: str, deltas: dict[str, torch.Tensor], weight: int, advert=None) -> TrainReply:
    return TrainReply(member, [SHARD], deltas, num_examples=weight, loss=0.1, steps=10, receipt="", advert=advert)


def secure_round(w: Workload, round_number: int, clock: Clock) -> tuple[np.ndarray, dict[str, float]]:
    """One round of kyodo's SecAgg+; returns the mean update (flat) and the members' begin times."""
    sa = SecAggConfig()
    setup = build_setup(
        {SHARD: w.members},
        bits=sa.bits,
        clip_range=sa.clip_range,
        degree=sa.degree,
        threshold=sa.threshold,
        graph_seed=os.urandom(16),
    )
    begin_s: dict[str, float] = {}
    clock.start_round()
    with clock(COORD, "train reply"):
        server = SecAggServer(RUN, round_number, setup, {SHARD: shard_length(w.shapes)})
    for m in w.members:
        start = time.perf_counter()
        advert = w.nodes[m].begin(RUN, round_number, setup, w.deltas[m])
        begin_s[m] = time.perf_counter() - start
        with clock(m, "train reply"):
            content = _reply(m, {}, w.weights[m], advert).to_content()
        with clock(COORD, "train reply"):
            parsed = TrainReply.from_content(content)
            assert not parsed.deltas and parsed.advert is not None
            server.add_advert(m, parsed.advert, w.identity[m], parsed.num_examples)
        del content, parsed

    stages = (
        ("share keys", server.share_keys_requests, ShareKeysRequest, MemberSecAgg.share_keys, ShareKeysReply, server.add_shares),
        ("masked input", server.masked_input_requests, MaskedInputRequest, MemberSecAgg.masked_input, MaskedInputReply, server.add_masked),
        ("unmask", server.unmask_requests, UnmaskRequest, MemberSecAgg.unmask, UnmaskReply, server.add_unmask),
    )  # fmt: skip
    for stage, make_requests, request_cls, handle, reply_cls, accept in stages:
        with clock(COORD, stage):
            outbox = {m: r.to_content() for m, r in make_requests().items()}
        assert sorted(outbox) == w.members, (stage, sorted(outbox))
        for m in w.members:
            with clock(m, stage):
                content = handle(w.nodes[m], request_cls.from_content(outbox.pop(m))).to_content()
            with clock(COORD, stage):
                reply = reply_cls.from_content(content)
                assert reply.member == m
                accept(reply)
            del content, reply
    with clock(COORD, "finish"):
        sums = server.finish()
        mean = mean_update(sums[SHARD], w.shapes)
    assert sorted(sums[SHARD].contributors) == w.members and sums[SHARD].secure, server.skipped
    return mean[TENSOR].numpy().reshape(-1), begin_s


def plaintext_round(w: Workload, clock: Clock) -> np.ndarray:
    """What the coordinator does with secure aggregation off (``Rounds._fold_plain``)."""
    clock.start_round()
    with clock(COORD, "train reply"):
        acc = ShardMean(SHARD, w.members, w.shapes)
    for m in w.members:
        with clock(m, "train reply"):
            content = _reply(m, w.deltas[m], w.weights[m]).to_content()
        with clock(COORD, "train reply"):
            parsed = TrainReply.from_content(content)
            grouped: dict[str, dict[str, torch.Tensor]] = {}
            for name, tensor in parsed.deltas.items():
                grouped.setdefault(shard_of(name), {})[name] = tensor
            assert set(grouped) == set(parsed.shards)
            acc.check(m, grouped[SHARD], float(parsed.num_examples))
            acc.add(m, grouped[SHARD], float(parsed.num_examples))
            parsed.deltas = {}
        del content, parsed, grouped
    with clock(COORD, "finish"):
        mean = acc.mean()
    return mean[TENSOR].numpy().reshape(-1)


def bench_ours(n: int, p: int, repeats: int, root: Path) -> dict:
    w = Workload(n, p, root)
    expected = w.plaintext_mean()
    sa = SecAggConfig()
    step = 2 * sa.clip_range / ((1 << sa.bits) - 1)
    # Each member's stochastic rounding is off by less than one grid step, and the cohort's
    # summed weight (relative to the largest) is at least 1: the mean is within n steps.
    tolerance = n * step + 1e-6

    def check(mean: np.ndarray, what: str) -> None:
        err = float(np.max(np.abs(mean.astype(np.float64) - expected)))
        assert err <= tolerance, f"{what} mean differs from the exact mean by {err:.3g} > {tolerance:.3g}"

    # Memory pass (untimed, also the warm-up): big buffers mmapped so frees show in RSS.
    _mmap_big_buffers()
    mem_secure, mem_plain = Clock(memory=True), Clock(memory=True)
    mean_s, _ = secure_round(w, 0, mem_secure)
    check(mean_s, "secure")
    check(plaintext_round(w, mem_plain), "plaintext")
    del mean_s
    gc.collect()

    runs = []
    for rep in range(repeats):
        clocks = {}
        begin_s: dict[str, float] = {}
        order = ("secure", "plaintext") if rep % 2 == 0 else ("plaintext", "secure")
        for mode in order:
            clocks[mode] = Clock()
            if mode == "secure":
                mean, begin_s = secure_round(w, rep + 1, clocks[mode])
            else:
                mean = plaintext_round(w, clocks[mode])
            check(mean, mode)
            del mean
            gc.collect()
        sec, pla = clocks["secure"].summary(SECURE_STAGES, w.members), clocks["plaintext"].summary(PLAIN_STAGES, w.members)
        runs.append(
            {
                "secure": sec,
                "plaintext": pla,
                "ratio_critical": sec["critical_s"] / pla["critical_s"],
                "ratio_cpu": sec["cpu_s"] / pla["cpu_s"],
                "member_begin_max_s": max(begin_s.values()),
            }
        )
    shutil.rmtree(root, ignore_errors=True)

    def med(path: tuple[str, ...]) -> float:
        values = []
        for run in runs:
            v = run
            for k in path:
                v = v[k]
            values.append(v)
        return statistics.median(values)

    return {
        "n": n,
        "p": p,
        "repeats": repeats,
        "secure_critical_s": med(("secure", "critical_s")),
        "secure_cpu_s": med(("secure", "cpu_s")),
        "secure_coordinator_s": med(("secure", "coordinator_s")),
        "plain_critical_s": med(("plaintext", "critical_s")),
        "plain_cpu_s": med(("plaintext", "cpu_s")),
        "plain_coordinator_s": med(("plaintext", "coordinator_s")),
        "ratio_critical": med(("ratio_critical",)),
        "ratio_cpu": med(("ratio_cpu",)),
        "member_begin_max_s": med(("member_begin_max_s",)),
        "secure_stages": {
            stage: {k: med(("secure", "stages", stage, k)) for k in ("coordinator_s", "slowest_member_s", "members_total_s")}
            for stage in SECURE_STAGES
        },
        "peak_mb": {
            "secure_coordinator": mem_secure.peak_mb[COORD],
            "secure_member": mem_secure.peak_mb["member"],
            "plain_coordinator": mem_plain.peak_mb[COORD],
            "plain_member": mem_plain.peak_mb["member"],
        },
        "runs": runs,
    }


# ------------------------------------------------------------------------------ Flower
def flower_worker(n: int, p: int, rounds: int, out: Path) -> None:
    """Child process: one round of Flower's SecAggPlusWorkflow under run_simulation."""
    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    from flwr.client import ClientApp, NumPyClient
    from flwr.client.mod import secaggplus_mod
    from flwr.common import Context, ndarrays_to_parameters
    from flwr.server import LegacyContext, ServerApp, ServerConfig
    from flwr.server.strategy import FedAvg
    from flwr.server.workflow import DefaultWorkflow, SecAggPlusWorkflow
    from flwr.simulation import run_simulation

    sa = SecAggConfig()
    fit_s: list[float] = []
    degree = min(sa.degree or default_degree(n), n - 1)
    threshold = sa.threshold or default_threshold(degree)

    class TimedSecAggPlus(SecAggPlusWorkflow):
        def __call__(self, grid, context) -> None:
            start = time.perf_counter()
            super().__call__(grid, context)
            fit_s.append(time.perf_counter() - start)
            out.write_text(json.dumps({"fit_s": fit_s}))

    class Client(NumPyClient):
        def __init__(self, index: int) -> None:
            self.index = index
            self.update = np.random.default_rng(index).normal(0.0, 0.01, p).astype(np.float32)

        def get_parameters(self, config):
            return [np.zeros(p, np.float32)]

        def fit(self, parameters, config):
            return [self.update], 48 + 16 * (self.index % 4), {}

    def client_fn(context: Context):
        return Client(int(context.node_config.get("partition-id", 0))).to_client()

    client_app = ClientApp(client_fn=client_fn, mods=[secaggplus_mod])
    server_app = ServerApp()

    @server_app.main()
    def main(grid, context) -> None:
        strategy = FedAvg(
            fraction_fit=1.0,
            fraction_evaluate=0.0,
            min_fit_clients=n,
            min_available_clients=n,
            initial_parameters=ndarrays_to_parameters([np.zeros(p, np.float32)]),
        )
        legacy = LegacyContext(context=context, config=ServerConfig(num_rounds=rounds), strategy=strategy)
        workflow = DefaultWorkflow(
            fit_workflow=TimedSecAggPlus(
                num_shares=degree + 1 if degree < n - 1 else n,  # Flower counts the member itself
                reconstruction_threshold=threshold,
                clipping_range=sa.clip_range,
                quantization_range=1 << sa.bits,
                modulus_range=1 << 32,
            )
        )
        workflow(grid, legacy)

    run_simulation(
        server_app=server_app,
        client_app=client_app,
        num_supernodes=n,
        backend_config={"client_resources": {"num_cpus": 1, "num_gpus": 0.0}, "init_args": {"num_cpus": os.cpu_count()}},
    )


def bench_flower(n: int, p: int, timeout: float) -> dict:
    with tempfile.TemporaryDirectory(prefix="kyodo-bench-flower-") as tmp:
        out = Path(tmp) / "fit.json"
        env = {**os.environ, "FLWR_TELEMETRY_ENABLED": "0", "RAY_DEDUP_LOGS": "0"}
        cmd = [sys.executable, __file__, "--flower-worker", str(n), str(p), str(out)]
        start = time.perf_counter()
        proc = subprocess.Popen(cmd, env=env, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        try:
            _, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)  # the worker's own session: itself and its Ray processes
            proc.communicate()
            return {"n": n, "p": p, "fit_s": None, "timed_out_after_s": timeout}
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
        wall = time.perf_counter() - start
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # Ray helpers left behind in the worker's session
        except ProcessLookupError:
            pass
        if not out.exists():
            tail = err.decode(errors="replace")[-2000:]
            raise RuntimeError(f"Flower run N={n} P={p} failed (rc {proc.returncode}):\n{tail}")
        return {"n": n, "p": p, "fit_s": json.loads(out.read_text())["fit_s"], "process_wall_s": wall}


# ------------------------------------------------------------------------------ main
def _fmt_p(p: int) -> str:
    return f"{p / 1e6:g}M" if p >= 1_000_000 else f"{p:,}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--members", type=int, nargs="+", default=[4, 8, 16])
    parser.add_argument("--params", type=float, nargs="+", default=[1e6, 1e7])
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--flower", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--flower-max-params", type=float, default=1e6)
    parser.add_argument("--flower-max-members", type=int, default=16)
    parser.add_argument("--flower-timeout", type=float, default=300.0)
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--flower-worker", nargs=4, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.flower_worker:
        flower_worker(*(int(x) for x in args.flower_worker[:3]), Path(args.flower_worker[3]))
        return

    torch.set_num_threads(1)
    bench_start = time.perf_counter()
    rows = []
    for p in (int(x) for x in args.params):
        for n in args.members:
            with tempfile.TemporaryDirectory(prefix="kyodo-bench-secagg-") as tmp:
                row = bench_ours(n, p, args.repeats, Path(tmp))
            rows.append(row)
            print(
                f"N={n:2d} P={_fmt_p(p):>4s}: secure/plain critical {row['ratio_critical']:.2f}x "
                f"({row['secure_critical_s']:.2f} s / {row['plain_critical_s']:.2f} s), "
                f"cpu {row['ratio_cpu']:.2f}x ({row['secure_cpu_s']:.2f} s / {row['plain_cpu_s']:.2f} s)",
                flush=True,
            )
    flower = []
    if args.flower:
        for p in (int(x) for x in args.params):
            for n in args.members:
                if p > args.flower_max_params or n > args.flower_max_members:
                    continue
                res = bench_flower(n, p, args.flower_timeout)
                ours = next(r for r in rows if r["n"] == n and r["p"] == p)
                if res["fit_s"] is not None:
                    res["speedup_vs_cpu"] = res["fit_s"] / ours["secure_cpu_s"]
                    res["speedup_vs_critical"] = res["fit_s"] / ours["secure_critical_s"]
                flower.append(res)
                shown = f"{res['fit_s']:.1f} s" if res["fit_s"] is not None else f"> {args.flower_timeout:.0f} s"
                print(f"Flower SecAggPlusWorkflow N={n:2d} P={_fmt_p(p):>4s}: fit {shown}", flush=True)

    report = {
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "numpy": np.__version__,
        "secagg": vars(SecAggConfig()),
        "rows": rows,
        "flower": flower,
        "flower_timeout_s": args.flower_timeout,
        "ru_maxrss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "bench_wall_s": time.perf_counter() - bench_start,
    }
    _print_table(report)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out} ({report['bench_wall_s']:.0f} s)")


def _print_table(report: dict) -> None:
    print()
    print(
        "| N | P | secure / plaintext, critical path | secure / plaintext, total CPU | secure: critical, CPU "
        "(coordinator) | plaintext: critical, CPU (coordinator) | member begin | peak MB coordinator secure / plain "
        "| peak MB member secure / plain |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for r in report["rows"]:
        pk = r["peak_mb"]
        print(
            f"| {r['n']} | {_fmt_p(r['p'])} | **{r['ratio_critical']:.2f}x** | {r['ratio_cpu']:.2f}x "
            f"| {r['secure_critical_s']:.2f} s, {r['secure_cpu_s']:.2f} s ({r['secure_coordinator_s']:.2f} s) "
            f"| {r['plain_critical_s']:.2f} s, {r['plain_cpu_s']:.2f} s ({r['plain_coordinator_s']:.2f} s) "
            f"| {r['member_begin_max_s']:.2f} s "
            f"| {pk['secure_coordinator']:.0f} / {pk['plain_coordinator']:.0f} "
            f"| {pk['secure_member']:.0f} / {pk['plain_member']:.0f} |"
        )
    if report["flower"]:
        print()
        print("| N | P | Flower SecAggPlusWorkflow fit | kyodo secure, total CPU | speed-up | vs critical path |")
        print("|---|---|---|---|---|---|")
        for f in report["flower"]:
            ours = next(r for r in report["rows"] if r["n"] == f["n"] and r["p"] == f["p"])
            if f["fit_s"] is None:
                print(
                    f"| {f['n']} | {_fmt_p(f['p'])} | > {f['timed_out_after_s']:.0f} s | {ours['secure_cpu_s']:.2f} s "
                    f"| > {f['timed_out_after_s'] / ours['secure_cpu_s']:.0f}x | |"
                )
            else:
                print(
                    f"| {f['n']} | {_fmt_p(f['p'])} | {f['fit_s']:.1f} s | {ours['secure_cpu_s']:.2f} s "
                    f"| **{f['speedup_vs_cpu']:.0f}x** | {f['speedup_vs_critical']:.0f}x |"
                )


if __name__ == "__main__":
    main()
