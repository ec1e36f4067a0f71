"""Data-parallel DP-SGD inside one member: several worker processes, one ``torch.distributed`` group.

A member's data center trains its assigned shards on several devices (GPUs with NCCL) or
several CPU sockets (gloo). The episodes are split into disjoint parts, one per worker;
every worker Poisson-samples its part at the round's rate q, so together they draw one
Poisson sample of all the member's episodes: the mechanism, its accounting and the ledger
entry are those of the single-process round. The clipped sums are added up across workers
and the noise is drawn once, each worker drawing its own slice's part of one draw from rank
0's key (``privacy.dp_sgd._with_distributed_secure_noise``); each worker then takes the
identical optimizer step, so the replicas never diverge (checked
at the end of the round: a diverged round raises instead of returning an update).

The node process itself stays the one the coordinator talks to: it hands the workers the
policy's state and the episode parts, and gets rank 0's deltas back. Workers are spawned
per round (start method ``spawn``: no CUDA or thread state inherited from the node), which
costs their start-up (a few seconds to import torch and Opacus) once per round.
"""

from __future__ import annotations

import os
import socket
import sys
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from member_node.lerobot import Episode
from member_node.trainer import TrainResult, train_shards
from member_node.windows import EpisodeWindows
from privacy.dp_sgd import DPConfig
from shared_model.config import EmbodimentConfig, ModelConfig
from shared_model.policy import Policy
from shared_model.protocol import TrainHyperParams


@dataclass(frozen=True)
class ParallelJob:
    """What every worker needs; pickled once per worker by ``spawn``."""

    model: ModelConfig
    embodiments: Mapping[str, EmbodimentConfig]
    state: dict[str, torch.Tensor]
    embodiment: str
    parts: list[list[Episode]]
    shards: list[str]
    hp: TrainHyperParams
    dp: DPConfig
    aux_coef: float
    seed: int
    device_type: str  # "cpu" (gloo) or "cuda" (nccl, worker r on cuda:r)
    threads: int
    noise_seed: int | None = None  # tests only
    physical_batch: int | None = None


def split_episodes_for_workers(episodes: Sequence[Episode], workers: int) -> list[list[Episode]]:
    """Disjoint parts, episode i to worker i mod ``workers`` (sizes differ by at most one)."""
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    if len(episodes) < workers:
        raise ValueError(f"{len(episodes)} training episodes cannot be split across {workers} workers")
    return [list(episodes[r::workers]) for r in range(workers)]


def train_shards_parallel(
    policy: Policy,
    embodiment: str,
    episodes: Sequence[Episode],
    shards: list[str],
    hp: TrainHyperParams,
    *,
    dp: DPConfig,
    workers: int,
    aux_coef: float,
    seed: int = 0,
    device_type: str = "cpu",
    noise_seed: int | None = None,
    physical_batch: int | None = None,
) -> TrainResult:
    """One DP round over ``workers`` processes; ``policy`` is left as it was (the deltas say
    what changed, as the node applies nothing itself). ``deltas``, ``steps`` and
    ``num_examples`` are the round's; ``loss`` and ``empty_steps`` are rank 0's own (its
    part's), which is all the node reads of them (neither leaves it under DP)."""
    if device_type == "cuda" and torch.cuda.device_count() < workers:
        raise ValueError(f"{workers} workers need {workers} CUDA devices, this machine has {torch.cuda.device_count()}")
    if device_type not in ("cpu", "cuda"):
        raise ValueError(f"data-parallel training runs on cpu or cuda, not {device_type!r}")
    job = ParallelJob(
        model=policy.config,
        embodiments=dict(policy.embodiments),
        state={k: v.detach().to("cpu").clone() for k, v in policy.state_dict().items()},
        embodiment=embodiment,
        parts=split_episodes_for_workers(episodes, workers),
        shards=list(shards),
        hp=hp,
        dp=dp,
        aux_coef=aux_coef,
        seed=seed,
        device_type=device_type,
        threads=max(1, torch.get_num_threads() // workers) if device_type == "cpu" else 1,
        noise_seed=noise_seed,
        physical_batch=physical_batch,
    )
    with tempfile.TemporaryDirectory(prefix="kyodo-workers-") as tmp:
        out = Path(tmp) / "result.pt"
        store = Path(tmp) / "rendezvous"
        try:
            mp.start_processes(
                _worker, args=(workers, str(store), job, str(out)), nprocs=workers, join=True, start_method="spawn"
            )
        except mp.ProcessRaisedException as err:
            # The worker's own exception is the last line of the traceback torch relays.
            raise RuntimeError(f"a training worker failed: {str(err).strip().splitlines()[-1]}") from err
        except mp.ProcessExitedException as err:
            raise RuntimeError(f"a training worker died: {err}") from None
        # Written by rank 0 of this round's own workers into a private temporary directory.
        saved = torch.load(out, weights_only=True)
    return TrainResult(**saved)


def _loopback_interface() -> str:
    names = [name for _, name in socket.if_nameindex()]
    return next((n for n in ("lo", "lo0") if n in names), "lo")


def _worker(rank: int, world: int, store: str, job: ParallelJob, out: str) -> None:
    # The un-noised clipped sums travel between the workers: nothing of that may be reachable
    # from the member's network. The rendezvous is a file in the round's private temporary
    # directory (a TCP store listens on every interface, unauthenticated), and gloo's and
    # NCCL's own sockets are bound to the loopback interface (by default they take the
    # address the host name resolves to). The workers of one node share one host.
    os.environ["GLOO_SOCKET_IFNAME"] = os.environ["NCCL_SOCKET_IFNAME"] = _loopback_interface()
    torch.set_num_threads(job.threads)
    if job.device_type == "cuda":
        torch.cuda.set_device(rank)
        device, backend = torch.device("cuda", rank), "nccl"
    else:
        device, backend = torch.device("cpu"), "gloo"
    dist.init_process_group(backend, init_method=f"file://{store}", rank=rank, world_size=world)
    try:
        policy = Policy(job.model, job.embodiments, device=device)
        policy.load_state_dict(job.state)
        emb = job.embodiments[job.embodiment]
        windows = EpisodeWindows(job.parts[rank], emb, job.model.history, job.model.chunk, job.model.task_buckets)
        result = train_shards(
            policy,
            job.embodiment,
            windows,
            job.shards,
            job.hp,
            aux_coef=job.aux_coef,
            rng=np.random.default_rng([job.seed, rank]),
            dp=job.dp,
            dp_noise_seed=job.noise_seed,
            distributed=True,
            physical_batch=job.physical_batch,
        )
        _check_in_step(result, device)
        peaks = [torch.zeros(1, dtype=torch.float64, device=device) for _ in range(world)]
        dist.all_gather(peaks, torch.tensor([peak_rss_mb()], dtype=torch.float64, device=device))
        result.workers_peak_rss_mb = max(float(p) for p in peaks)
        if rank == 0:
            # A file, not a queue: a pipe would block a large update until the parent reads,
            # while the parent waits for the workers to exit.
            torch.save(asdict(result), out)
        # Nobody tears the group down while a peer may still use it: without this barrier a
        # worker leaving early aborted at exit ("terminate called without an active
        # exception") in 1 of 6 rounds here.
        dist.barrier()
    finally:
        dist.destroy_process_group()
    # Leave without interpreter finalisation: gloo's C++ worker threads can still hold tensors
    # then, and tearing those down aborted a worker at exit ("terminate called without an
    # active exception", SIGABRT) in 1 of 6 rounds with no barrier and still in a CI run with
    # one. Everything this worker had to do (rank 0: the result file) is done and closed.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def peak_rss_mb() -> float:
    """This worker's own peak resident memory (VmHWM). Not ``ru_maxrss``: Linux carries that
    across exec, so a spawned worker would report the parent's size at fork time."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _check_in_step(result: TrainResult, device: torch.device) -> None:
    """Every worker must end with the same update: they all took the same noised steps."""
    total = sum(float(d.double().sum()) + float(d.double().abs().sum()) for d in result.deltas.values())
    mine = torch.tensor([total], dtype=torch.float64, device=device)
    everyone = [torch.zeros_like(mine) for _ in range(dist.get_world_size())]
    dist.all_gather(everyone, mine)
    if any(not torch.equal(other, mine) for other in everyone):
        raise RuntimeError(f"data-parallel workers diverged: update checksums {[float(t) for t in everyone]}")
