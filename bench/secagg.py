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
masked input, consistency (each survivor signs the survivor set), unmask, then ``finish`` and ``mean_update`` (the shard's mean as tensors).
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

Timing runs in fresh processes: each does one warm-up pair of rounds, then pairs of one
secure and one plaintext round (order alternating), ``--repeats`` pairs per (N, P) in all,
half of them before and half after the Flower run of the same (N, P) (the machine's load
drifts over minutes; this keeps the Flower comparison to runs close in time). Reported are
medians of the per-pair times and the median of the per-pair ratios. Every round's mean is asserted equal
to the exact (float64) weighted mean within the quantization error: each member is off by
less than one grid step (2R / (2**bits - 1)) per entry, so the mean by less than
N steps / (sum of the members' weights / the largest weight). Correctness, not timing.

**Peak memory** comes from a second process per (N, P), in which glibc ``mmap``s every buffer
above 128 KiB (set before anything big is allocated, so a freed buffer leaves the resident
set at once): after a warm-up pair, one pair is measured. Before each party's call the
kernel's high-water mark is reset (``/proc/self/clear_refs``), after it ``VmHWM`` is read.
Coordinator: the largest resident size during any of its calls above the resident size at
the start of the round (its running state plus the message in hand). Member: the largest
increase during one member call (its transient memory, the outgoing message included). The
members' inputs, built before the round, are not counted.

**Flower**: the same N and P through ``SecAggPlusWorkflow`` (legacy ``DefaultWorkflow``,
``FedAvg``, a ``NumPyClient`` behind ``secaggplus_mod``), under ``run_simulation`` (Ray, one
CPU per ClientApp, so two run at once on 2 cores) in a child process, for 2 rounds, with the
same graph degree, threshold, clip range and 16-bit grid. Only the fit workflow's
``__call__`` is timed (Ray start-up, parameter initialisation and evaluation are not).
Round 1 also pays for starting Ray's actors and ClientApps (seconds), so round 2 is the one
compared. Its wall time is set against three figures of the secure path: with the members
two at a time as Flower's ClientApps run here (per stage, the coordinator plus the larger of
the slowest member and half the members' total: an estimate assuming perfect balance, the
like-for-like figure), the total CPU (everything one after the other on one core: least
favourable to kyodo) and the critical path (as deployed). A run
longer than ``--flower-timeout`` seconds is cut off and reported as such.

Usage: ``python bench/secagg.py [--members 4 8 16] [--params 1e6 1e7] [--repeats 2]
[--flower/--no-flower] [--flower-timeout 300]``; writes ``bench/results/secagg.json``.
The full grid takes about 10 minutes on 2 cores, two thirds of it in Flower.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import os
import platform
import resource
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from contextlib import contextmanager, suppress
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
    ConsistencyReply,
    ConsistencyRequest,
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
SECURE_STAGES = ("train reply", "share keys", "masked input", "consistency", "unmask", "finish")
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
    with suppress(OSError):
        ctypes.CDLL("libc.so.6").mallopt(_M_MMAP_THRESHOLD, 128 * 1024)


@dataclass
class Clock:
    """Seconds (and, in the memory pass, peak resident MB) per (party, stage)."""

    memory: bool = False
    seconds: dict[tuple[str, str], float] = field(default_factory=lambda: defaultdict(float))
    peak_mb: dict[str, float] = field(default_factory=lambda: defaultdict(float))
    round_base_mb: float = 0.0

    def collect(self) -> None:
        """Memory pass only, between calls: free the message just handled. Once its records are
        read, a flwr ``RecordDict`` sits in a reference cycle, so without a cyclic collection its
        payload outlives it (a process holds up to one payload per reply until the collector runs)."""
        if self.memory:
            gc.collect()

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
            # Members two at a time (as Flower's simulation runs its ClientApps here), perfectly balanced.
            "two_workers_s": sum(
                s["coordinator_s"] + max(s["slowest_member_s"], s["members_total_s"] / 2) for s in per_stage.values()
            ),
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
    degree: int = field(init=False)
    threshold: int = field(init=False)
    exact_mean: np.ndarray = field(init=False, repr=False)
    tolerance: float = field(init=False)
    max_error: float = field(init=False)

    def __post_init__(self) -> None:
        if shard_of(TENSOR) != SHARD:
            raise SystemExit(f"{TENSOR} belongs to {shard_of(TENSOR)}, not {SHARD}")
        cols = 1000 if self.p % 1000 == 0 else 1
        self.shapes = {TENSOR: (self.p // cols, cols)}
        self.members = [f"m{i:02d}" for i in range(self.n)]
        data_rng = np.random.default_rng(self.n * 1_000_003 + self.p)  # benchmark data, nothing secret
        self.deltas = {
            m: {
                TENSOR: torch.from_numpy(
                    data_rng.normal(0.0, 0.01, self.p).astype(np.float32).reshape(self.shapes[TENSOR])
                )
            }
            for m in self.members
        }
        self.weights = {m: 48 + 16 * (i % 4) for i, m in enumerate(self.members)}
        self.nodes, self.identity = {}, {}
        for m in self.members:
            key = load_or_create_signing_key(self.root / m / "identity.pem")
            self.nodes[m] = MemberSecAgg(self.root / m, m, key)
            self.identity[m] = public_key_hex(key)

        sa = SecAggConfig()
        self.degree = min(sa.degree or default_degree(self.n), self.n - 1)
        self.threshold = sa.threshold or default_threshold(self.degree)
        total = sum(self.weights[m] * self.deltas[m][TENSOR].numpy().astype(np.float64) for m in self.members)
        self.exact_mean = total.reshape(-1) / sum(self.weights.values())
        # Each member encodes its update scaled by weight / largest weight, off by less than one
        # grid step (2R / levels) per entry; the decoded sum is divided by the summed scales.
        step = 2 * sa.clip_range / ((1 << sa.bits) - 1)
        scales = sum(self.weights.values()) / max(self.weights.values())
        self.tolerance = self.n * step / scales + 1e-7  # + float32 rounding of the mean
        self.max_error = 0.0

    def check(self, mean: np.ndarray, what: str) -> None:
        """Correctness, not timing: the mean must be the exact mean up to the quantization error."""
        err = float(np.max(np.abs(mean.astype(np.float64) - self.exact_mean)))
        assert err <= self.tolerance, f"{what} mean is {err:.3g} off the exact mean (> {self.tolerance:.3g})"
        self.max_error = max(self.max_error, err)


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
        advert = w.nodes[m].begin(RUN, round_number, setup, w.deltas[m], weight=w.weights[m])
        begin_s[m] = time.perf_counter() - start
        with clock(m, "train reply"):
            content = _reply(m, {}, w.weights[m], advert).to_content()
        with clock(COORD, "train reply"):
            parsed = TrainReply.from_content(content)
            assert not parsed.deltas and parsed.advert is not None
            server.add_advert(m, parsed.advert, w.identity[m], parsed.num_examples)
        del content, parsed
        clock.collect()

    stages = (
        ("share keys", server.share_keys_requests, ShareKeysRequest, MemberSecAgg.share_keys, ShareKeysReply, server.add_shares),
        ("masked input", server.masked_input_requests, MaskedInputRequest, MemberSecAgg.masked_input, MaskedInputReply, server.add_masked),
        ("consistency", server.consistency_requests, ConsistencyRequest, MemberSecAgg.consistency, ConsistencyReply, server.add_consistency),
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
            clock.collect()
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
        clock.collect()
    with clock(COORD, "finish"):
        mean = acc.mean()
    return mean[TENSOR].numpy().reshape(-1)


def _run_pair(w: Workload, round_number: int, order: tuple[str, str], memory: bool = False) -> dict:
    """One secure and one plaintext round (in ``order``), each checked against the exact mean."""
    clocks: dict[str, Clock] = {}
    begin_s: dict[str, float] = {}
    for mode in order:
        clocks[mode] = Clock(memory=memory)
        if mode == "secure":
            mean, begin_s = secure_round(w, round_number, clocks[mode])
        else:
            mean = plaintext_round(w, clocks[mode])
        w.check(mean, mode)
        del mean
        gc.collect()
    return {"clocks": clocks, "begin_s": begin_s}


def bench_ours(n: int, p: int, repeats: int, root: Path) -> dict:
    """Warm-up pair, then ``repeats`` timed pairs (order alternating)."""
    w = Workload(n, p, root)
    _run_pair(w, 0, ("secure", "plaintext"))  # warm-up: first-touch pages, lazy imports, caches
    runs = []
    for rep in range(repeats):
        order = ("secure", "plaintext") if rep % 2 == 0 else ("plaintext", "secure")
        pair = _run_pair(w, rep + 1, order)
        sec = pair["clocks"]["secure"].summary(SECURE_STAGES, w.members)
        pla = pair["clocks"]["plaintext"].summary(PLAIN_STAGES, w.members)
        runs.append(
            {
                "secure": sec,
                "plaintext": pla,
                "ratio_critical": sec["critical_s"] / pla["critical_s"],
                "ratio_cpu": sec["cpu_s"] / pla["cpu_s"],
                "member_begin_max_s": max(pair["begin_s"].values()),
            }
        )
    return {
        "degree": w.degree,
        "threshold": w.threshold,
        "max_abs_error": w.max_error,
        "tolerance": w.tolerance,
        "runs": runs,
    }


def summarise(n: int, p: int, timed: list[dict], memory: dict) -> dict:
    """Medians over every timed pair of every timing process of one (N, P)."""
    runs = [run for part in timed for run in part["runs"]]

    def med(*path: str) -> float:
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
        "pairs": len(runs),
        "degree": timed[0]["degree"],
        "threshold": timed[0]["threshold"],
        "secure_critical_s": med("secure", "critical_s"),
        "secure_cpu_s": med("secure", "cpu_s"),
        "secure_two_workers_s": med("secure", "two_workers_s"),
        "secure_coordinator_s": med("secure", "coordinator_s"),
        "plain_critical_s": med("plaintext", "critical_s"),
        "plain_cpu_s": med("plaintext", "cpu_s"),
        "plain_coordinator_s": med("plaintext", "coordinator_s"),
        "ratio_critical": med("ratio_critical"),
        "ratio_cpu": med("ratio_cpu"),
        "member_begin_max_s": med("member_begin_max_s"),
        "secure_stages": {
            stage: {
                k: med("secure", "stages", stage, k) for k in ("coordinator_s", "slowest_member_s", "members_total_s")
            }
            for stage in SECURE_STAGES
        },
        "max_abs_error": max(part["max_abs_error"] for part in timed),
        "tolerance": timed[0]["tolerance"],
        **memory,
        "runs": runs,
    }


def memory_ours(n: int, p: int, root: Path) -> dict:
    """Peak memory per party, in a process whose every big buffer is its own mapping (so a
    freed buffer leaves the resident set at once): warm-up pair, then the measured pair."""
    _mmap_big_buffers()
    w = Workload(n, p, root)
    _run_pair(w, 0, ("secure", "plaintext"))
    clocks = _run_pair(w, 1, ("secure", "plaintext"), memory=True)["clocks"]
    return {
        "peak_mb": {
            "secure_coordinator": clocks["secure"].peak_mb[COORD],
            "secure_member": clocks["secure"].peak_mb["member"],
            "plain_coordinator": clocks["plaintext"].peak_mb[COORD],
            "plain_member": clocks["plaintext"].peak_mb["member"],
        },
        "inputs_mb": n * p * 4 / 2**20,
        "ru_maxrss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }


def ours_worker(mode: str, n: int, p: int, repeats: int, out: Path) -> None:
    """Child process per (N, P) and mode: a clean heap, and malloc settings that end with it."""
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory(prefix="kyodo-bench-secagg-") as tmp:
        row = bench_ours(n, p, repeats, Path(tmp)) if mode == "time" else memory_ours(n, p, Path(tmp))
    out.write_text(json.dumps(row))


def run_ours(mode: str, n: int, p: int, repeats: int = 0) -> dict:
    with tempfile.TemporaryDirectory(prefix="kyodo-bench-secagg-out-") as tmp:
        out = Path(tmp) / f"{mode}.json"
        cmd = [sys.executable, __file__, "--ours-worker", mode, str(n), str(p), str(repeats), str(out)]
        subprocess.run(cmd, check=True)
        return json.loads(out.read_text())


# ------------------------------------------------------------------------------ Flower
def flower_worker(n: int, p: int, rounds: int, out: Path) -> None:
    """Child process: ``rounds`` rounds of Flower's SecAggPlusWorkflow under run_simulation."""
    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    from flwr.client import ClientApp, NumPyClient
    from flwr.client.mod import secaggplus_mod
    from flwr.common import Context, ndarrays_to_parameters
    from flwr.server import LegacyContext, ServerApp, ServerConfig
    from flwr.server.strategy import FedAvg
    from flwr.server.workflow import DefaultWorkflow, SecAggPlusWorkflow
    from flwr.simulation import run_simulation

    sa = SecAggConfig()
    degree = min(sa.degree or default_degree(n), n - 1)
    threshold = sa.threshold or default_threshold(degree)
    fit_s: list[float] = []

    class TimedSecAggPlus(SecAggPlusWorkflow):
        """Times the fit stage only: all four SecAgg+ stages, the clients' fit included."""

        def __call__(self, grid, context) -> None:
            start = time.perf_counter()
            super().__call__(grid, context)
            fit_s.append(time.perf_counter() - start)
            rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
            out.write_text(json.dumps({"fit_s": fit_s, "server_ru_maxrss_mb": rss}))

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

    server_app = ServerApp()

    @server_app.main()
    def _main(grid, context) -> None:
        strategy = FedAvg(
            fraction_fit=1.0,
            fraction_evaluate=0.0,
            min_fit_clients=n,
            min_available_clients=n,
            initial_parameters=ndarrays_to_parameters([np.zeros(p, np.float32)]),
        )
        legacy = LegacyContext(context=context, config=ServerConfig(num_rounds=rounds), strategy=strategy)
        fit = TimedSecAggPlus(
            num_shares=n if degree >= n - 1 else degree + 1,  # Flower counts the member itself
            reconstruction_threshold=threshold,
            clipping_range=sa.clip_range,
            quantization_range=1 << sa.bits,
            modulus_range=1 << 32,
        )
        DefaultWorkflow(fit_workflow=fit)(grid, legacy)

    run_simulation(
        server_app=server_app,
        client_app=ClientApp(client_fn=client_fn, mods=[secaggplus_mod]),
        num_supernodes=n,
        backend_config={"client_resources": {"num_cpus": 1, "num_gpus": 0.0}},
    )


def run_flower(n: int, p: int, timeout: float) -> dict:
    """Two rounds in a child process (its own session, so a cut-off run takes its Ray
    processes with it): round 1 pays Ray's actor and ClientApp start-up, round 2 is steady."""
    row: dict = {"n": n, "p": p, "cold_s": None, "warm_s": None, "timeout_s": timeout}
    with tempfile.TemporaryDirectory(prefix="kyodo-bench-flower-") as tmp:
        out = Path(tmp) / "fit.json"
        env = {**os.environ, "FLWR_TELEMETRY_ENABLED": "0"}
        cmd = [sys.executable, __file__, "--flower-worker", str(n), str(p), "2", str(out)]
        proc = subprocess.Popen(cmd, env=env, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        try:
            _, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            err = b""
        finally:
            with suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)  # the worker's session: itself and what Ray left running
            proc.wait()
        if out.exists():
            done = json.loads(out.read_text())
            row["cold_s"] = done["fit_s"][0]
            row["warm_s"] = done["fit_s"][1] if len(done["fit_s"]) > 1 else None
            row["server_ru_maxrss_mb"] = done["server_ru_maxrss_mb"]
        elif err:
            raise RuntimeError(
                f"Flower run N={n} P={p} failed (rc {proc.returncode}):\n{err.decode(errors='replace')[-3000:]}"
            )
    return row


# ------------------------------------------------------------------------------ main
def _fmt_p(p: int) -> str:
    return f"{p / 1e6:g}M" if p >= 1_000_000 else f"{p:,}"


def _fmt_s(s: float) -> str:
    return f"{s * 1e3:.0f} ms" if s < 1 else f"{s:.2f} s"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--members", type=int, nargs="+", default=[4, 8, 16])
    parser.add_argument("--params", type=float, nargs="+", default=[1e6, 1e7])
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--flower", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--flower-timeout", type=float, default=300.0, help="seconds per Flower run (2 rounds)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--ours-worker", nargs=5, help=argparse.SUPPRESS)
    parser.add_argument("--flower-worker", nargs=4, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.ours_worker:
        mode, *sizes, out = args.ours_worker
        ours_worker(mode, *(int(x) for x in sizes), Path(out))
        return
    if args.flower_worker:
        flower_worker(*(int(x) for x in args.flower_worker[:3]), Path(args.flower_worker[3]))
        return

    bench_start = time.perf_counter()
    grid = [(n, int(p)) for p in args.params for n in args.members]
    rows, flower = [], []
    for n, p in grid:
        # The machine is shared and its load drifts over minutes, so kyodo's timed pairs are
        # split around the Flower run of the same (N, P): the speed-up compares runs close in time.
        before = (args.repeats + 1) // 2 if args.flower else args.repeats
        timed = [run_ours("time", n, p, before)]
        fl = run_flower(n, p, args.flower_timeout) if args.flower else None
        if args.repeats - before:
            timed.append(run_ours("time", n, p, args.repeats - before))
        row = summarise(n, p, timed, run_ours("memory", n, p))
        rows.append(row)
        print(
            f"kyodo N={n:2d} P={_fmt_p(p):>4s}: secure / plaintext critical path {row['ratio_critical']:.2f}x "
            f"({_fmt_s(row['secure_critical_s'])} / {_fmt_s(row['plain_critical_s'])}), "
            f"total CPU {row['ratio_cpu']:.2f}x ({_fmt_s(row['secure_cpu_s'])} / {_fmt_s(row['plain_cpu_s'])})",
            flush=True,
        )
        if fl is not None:
            if fl["warm_s"] is not None:
                fl["speedup_vs_cpu"] = fl["warm_s"] / row["secure_cpu_s"]
                fl["speedup_vs_two_workers"] = fl["warm_s"] / row["secure_two_workers_s"]
                fl["speedup_vs_critical"] = fl["warm_s"] / row["secure_critical_s"]
            flower.append(fl)
            shown = "cut off" if fl["warm_s"] is None else f"round 2 {_fmt_s(fl['warm_s'])}"
            print(f"Flower N={n:2d} P={_fmt_p(p):>4s}: SecAggPlusWorkflow fit {shown}", flush=True)

    report = {
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "numpy": np.__version__,
        "secagg": vars(SecAggConfig()),
        "rows": rows,
        "flower": flower,
        "bench_wall_s": time.perf_counter() - bench_start,
    }
    _print_tables(report)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out} ({report['bench_wall_s']:.0f} s)")


def _print_tables(report: dict) -> None:
    print()
    print(
        "| N | P | secure / plaintext, critical path | secure / plaintext, total CPU "
        "| secure: critical path, CPU (coordinator) | plaintext: critical path, CPU (coordinator) "
        "| member `begin` | peak MB coordinator, secure / plaintext | peak MB member, secure / plaintext |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for r in report["rows"]:
        pk = r["peak_mb"]
        print(
            f"| {r['n']} | {_fmt_p(r['p'])} | **{r['ratio_critical']:.2f}x** | {r['ratio_cpu']:.2f}x "
            f"| {_fmt_s(r['secure_critical_s'])}, {_fmt_s(r['secure_cpu_s'])} ({_fmt_s(r['secure_coordinator_s'])}) "
            f"| {_fmt_s(r['plain_critical_s'])}, {_fmt_s(r['plain_cpu_s'])} ({_fmt_s(r['plain_coordinator_s'])}) "
            f"| {_fmt_s(r['member_begin_max_s'])} "
            f"| {pk['secure_coordinator']:.0f} / {pk['plain_coordinator']:.0f} "
            f"| {pk['secure_member']:.0f} / {pk['plain_member']:.0f} |"
        )
    if not report["flower"]:
        return
    print()
    print(
        "| N | P | Flower SecAggPlusWorkflow fit, round 2 (round 1) | kyodo secure, total CPU | speed-up "
        "| kyodo secure, members 2 at a time | speed-up | kyodo secure, critical path | speed-up |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for f in report["flower"]:
        ours = next(r for r in report["rows"] if r["n"] == f["n"] and r["p"] == f["p"])
        cpu, two, crit = ours["secure_cpu_s"], ours["secure_two_workers_s"], ours["secure_critical_s"]
        if f["warm_s"] is None:
            cold = f"round 1 {_fmt_s(f['cold_s'])}, " if f["cold_s"] is not None else ""
            flwr_s = f"> {f['timeout_s']:.0f} s for 2 rounds ({cold}cut off)"
            ups = ("n/a",) * 3
        else:
            flwr_s = f"{_fmt_s(f['warm_s'])} ({_fmt_s(f['cold_s'])})"
            ups = tuple(f"{f[k]:.1f}x" for k in ("speedup_vs_cpu", "speedup_vs_two_workers", "speedup_vs_critical"))
        print(
            f"| {f['n']} | {_fmt_p(f['p'])} | {flwr_s} | {_fmt_s(cpu)} | {ups[0]} | {_fmt_s(two)} | **{ups[1]}** "
            f"| {_fmt_s(crit)} | {ups[2]} |"
        )


if __name__ == "__main__":
    main()
