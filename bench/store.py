"""Shard store commit and export of a model several times larger than the process may hold.

A synthetic model of ``--shards`` expert shards of ``--shard-mb`` MB (float32, three tensors
each like an expert FFN) is generated one shard at a time, committed to a ``ShardStore``, then
a second round changes ``--changed`` shards, the full round is read back (verified) shard by
shard, exported in the Hugging Face layout, and round 0's replaced objects are collected.

Memory limit: every phase runs in its own child process under ``RLIMIT_DATA`` (``--limit-mb``).
``RLIMIT_AS`` is unusable with torch: OpenBLAS reserves large virtual areas at import and
fails even under a limit of hundreds of MB. ``RLIMIT_DATA`` (Linux >= 4.7) caps private
writable mappings, i.e. heap and anonymous ``mmap``, which is where tensors and byte buffers
live, while shared libraries and the page cache stay outside it, so it bounds exactly "the
model in memory". A control child first tries to allocate the whole model and must be refused
(the limit really binds). Each child reports its own peak RSS (``ru_maxrss``; it includes
torch's mapped libraries: the control child reports that floor before it allocates; the
generator also holds one shard-sized random block it derives every shard from); the parent
also records ``RUSAGE_CHILDREN`` (the largest child).

Baseline, measured in the same run: the same number of files with the same bytes written with
plain ``open().write()`` and ``fsync``. Ratios are phase time / baseline time; export reads
and writes every byte, so it is also given against stream_read + baseline. Before reads,
the objects' pages are dropped from the page cache (``posix_fadvise DONTNEED``, our files
only), so reads come from the disk.

Usage: ``python bench/store.py [--shards 32] [--shard-mb 64] [--limit-mb 448] [--changed 4]
[--export-file-mb 1024] [--dir DIR] [--keep]``; writes ``bench/results/store.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

D_MODEL = 2048


def _shapes(shard_bytes: int) -> tuple[int, int]:
    """(hidden, d_model) of an expert whose three float32 matrices total about ``shard_bytes``."""
    return max(1, round(shard_bytes / (3 * D_MODEL * 4))), D_MODEL


_BASE: dict[tuple[int, int], Any] = {}


def _shard(index: int, shard_bytes: int, version: int = 0) -> tuple[str, dict[str, Any]]:
    """Synthetic shard ``index`` (expert/L{l}/E{e}, 8 experts a layer), distinct for every
    (index, version): one random block per process, offset by a per-shard constant (one add
    instead of a fresh random draw, which would take longer than writing the shard)."""
    import torch

    from shared_model.shards import expert_shard

    layer, expert = divmod(index, 8)
    hidden, d = _shapes(shard_bytes)
    if (hidden, d) not in _BASE:
        gen = torch.Generator().manual_seed(0)
        _BASE[(hidden, d)] = [torch.rand(hidden, d, generator=gen) for _ in range(3)]
    gate, up, down = (t + (index * 1000 + version) for t in _BASE[(hidden, d)])
    prefix = f"blocks.{layer}.moe.experts.{expert}"
    tensors = {
        f"{prefix}.w_gate.weight": gate,
        f"{prefix}.w_up.weight": up,
        f"{prefix}.w_down.weight": down.reshape(d, hidden),
    }
    return expert_shard(layer, expert), tensors


def _drop_cache(paths: Iterator[Path]) -> None:
    """Evict our (fsynced, hence clean) files from the page cache so reads hit the disk."""
    for path in paths:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


# ------------------------------------------------------------------ phases (child processes)


def _phase(name: str, args: argparse.Namespace) -> dict[str, Any]:
    import torch

    from shared_model.export import export_hf
    from shared_model.store import ShardStore

    torch.set_num_threads(1)
    work = Path(args.dir)
    shard_bytes = args.shard_mb << 20
    out: dict[str, Any] = {}
    if name == "control":
        out["idle_maxrss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        total = args.shards * shard_bytes
        try:
            torch.empty(total, dtype=torch.uint8)
            out["refused"] = False
        except (RuntimeError, MemoryError) as exc:
            out["refused"] = True
            out["error"] = str(exc).splitlines()[-1][:160]
        out["seconds"] = 0.0
    elif name == "baseline":
        base = work / "baseline"
        base.mkdir(exist_ok=True)
        elapsed = written = 0
        for i in range(args.shards):
            _, tensors = _shard(i, shard_bytes)
            start = time.perf_counter()
            with open(base / f"{i}.bin", "wb") as fh:
                for t in tensors.values():
                    fh.write(t.numpy().data)
                fh.flush()
                os.fsync(fh.fileno())
            elapsed += time.perf_counter() - start
            written += sum(t.nbytes for t in tensors.values())
            del tensors
        shutil.rmtree(base)
        out.update(seconds=elapsed, bytes=written)
    elif name == "commit":
        store = ShardStore(work / "store")
        elapsed = generate = 0.0
        changed = {}
        for i in range(args.shards):
            start = time.perf_counter()
            shard_id, tensors = _shard(i, shard_bytes)
            generate += time.perf_counter() - start
            start = time.perf_counter()
            changed[shard_id] = store.put_shard(shard_id, tensors)
            elapsed += time.perf_counter() - start
            del tensors
        start = time.perf_counter()
        store.commit(None, changed, model_config="bench-" + "0" * 58)
        commit_s = time.perf_counter() - start
        written = sum(store.object_size(o) for o in changed.values())
        out.update(seconds=elapsed + commit_s, put_seconds=elapsed, manifest_seconds=commit_s)
        out.update(bytes=written, generate_seconds=generate, objects=len(changed))
    elif name == "commit_incremental":
        store = ShardStore(work / "store")
        parent = store.head_manifest()
        before = set(store.objects())
        elapsed = 0.0
        changed = {}
        for i in range(args.changed):
            shard_id, tensors = _shard(i * (args.shards // max(1, args.changed)), shard_bytes, version=1)
            start = time.perf_counter()
            changed[shard_id] = store.put_shard(shard_id, tensors)
            elapsed += time.perf_counter() - start
            del tensors
        start = time.perf_counter()
        store.commit(parent, changed, extra={"bench": "incremental"})
        out["seconds"] = elapsed + time.perf_counter() - start
        new = set(store.objects()) - before
        out.update(bytes=sum(store.object_size(o) for o in new), objects=len(new))
    elif name == "stream_read":
        store = ShardStore(work / "store")
        head = store.head()
        _drop_cache(store.object_path(o) for o in store.manifest(head.round).shards.values())
        start = time.perf_counter()
        read = 0
        for _, tensors in store.iter_shards(head.round):
            read += sum(t.nbytes for t in tensors.values())
            del tensors
        out.update(seconds=time.perf_counter() - start, bytes=read)
    elif name == "export":
        store = ShardStore(work / "store")
        head = store.head()
        _drop_cache(store.object_path(o) for o in store.manifest(head.round).shards.values())
        start = time.perf_counter()
        result = export_hf(store, head.round, work / "hf", max_shard_bytes=args.export_file_mb << 20)
        out.update(seconds=time.perf_counter() - start, bytes=result.total_size, files=len(result.files))
        shutil.rmtree(work / "hf")
        # gc in the same process (it allocates next to nothing): drops round 0's 4 old objects.
        start = time.perf_counter()
        report = store.gc(keep_last=1)
        out["gc"] = {"seconds": time.perf_counter() - start, "objects": report.removed_objects}
        out["gc"]["bytes"] = report.removed_bytes
    else:
        raise SystemExit(f"unknown phase {name!r}")
    out["maxrss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return out


# -------------------------------------------------------------------------------- driver


def _run_child(name: str, args: argparse.Namespace, limit_bytes: int) -> dict[str, Any]:
    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_DATA, (limit_bytes, limit_bytes))

    cmd = [sys.executable, __file__, "--phase", name, "--dir", str(args.dir)]
    cmd += ["--shards", str(args.shards), "--shard-mb", str(args.shard_mb), "--changed", str(args.changed)]
    cmd += ["--export-file-mb", str(args.export_file_mb)]
    proc = subprocess.run(cmd, preexec_fn=limit, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"phase {name} failed (rc {proc.returncode}):\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shards", type=int, default=32)
    parser.add_argument("--shard-mb", type=int, default=64)
    parser.add_argument("--limit-mb", type=int, default=448, help="RLIMIT_DATA of every phase's process")
    parser.add_argument("--changed", type=int, default=4, help="shards changed in the second round")
    parser.add_argument("--export-file-mb", type=int, default=1024, help="max tensor bytes per exported file")
    parser.add_argument("--dir", type=Path, default=None, help="work directory (default: a temp dir, removed)")
    parser.add_argument("--keep", action="store_true", help="keep the work directory")
    parser.add_argument("--phase", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "store.json")
    args = parser.parse_args()

    if args.phase:
        print(json.dumps(_phase(args.phase, args)))
        return

    made_dir = args.dir is None
    args.dir = Path(tempfile.mkdtemp(prefix="kyodo-bench-store-")) if made_dir else args.dir
    args.dir.mkdir(parents=True, exist_ok=True)
    limit = args.limit_mb << 20
    hidden, d = _shapes(args.shard_mb << 20)
    model_bytes = args.shards * 3 * hidden * d * 4
    print(
        f"model: {args.shards} shards x {3 * hidden * d * 4 / 2**20:.1f} MiB = {model_bytes / 2**30:.2f} GiB; "
        f"RLIMIT_DATA {args.limit_mb} MiB (the model is {model_bytes / limit:.1f}x the limit); work dir {args.dir}"
    )
    phases: dict[str, dict[str, Any]] = {}
    try:
        for name in ("control", "baseline", "commit", "commit_incremental", "stream_read", "export"):
            wall = time.perf_counter()
            phases[name] = _run_child(name, args, limit)
            phases[name]["process_wall_seconds"] = time.perf_counter() - wall
            row = phases[name]
            rate = f"{row['bytes'] / row['seconds'] / 2**20:8.0f} MiB/s" if row.get("bytes") and row["seconds"] else ""
            print(
                f"  {name:20s}{row['seconds']:8.2f} s {row.get('bytes', 0) / 2**20:10.0f} MiB {rate:>14s}"
                f"   peak RSS {row['maxrss_mb']:6.0f} MiB"
            )
    finally:
        if made_dir and not args.keep:
            shutil.rmtree(args.dir, ignore_errors=True)
    if not phases["control"]["refused"]:
        raise SystemExit("the memory limit did not bind: allocating the whole model succeeded")

    baseline = phases["baseline"]["seconds"]
    import safetensors
    import torch

    report = {
        "shards": args.shards,
        "shard_bytes": 3 * hidden * d * 4,
        "model_bytes": model_bytes,
        "limit": "RLIMIT_DATA",
        "limit_bytes": limit,
        "model_to_limit": model_bytes / limit,
        "changed_shards": args.changed,
        "export_file_bytes": args.export_file_mb << 20,
        "phases": phases,
        "ratios_to_baseline": {
            name: phases[name]["seconds"] / baseline
            for name in ("commit", "commit_incremental", "stream_read", "export")
        },
        "incremental_to_full_commit": phases["commit_incremental"]["seconds"] / phases["commit"]["seconds"],
        # Export reads and writes every byte: compare it with reading (stream_read) plus writing (baseline).
        "export_to_read_plus_write": phases["export"]["seconds"] / (phases["stream_read"]["seconds"] + baseline),
        "rusage_children_maxrss_mb": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024,
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "safetensors": safetensors.__version__,
    }
    print(f"control: allocating the whole model under the limit was refused ({phases['control']['error']})")
    for name, ratio in report["ratios_to_baseline"].items():
        print(f"  {name:20s} x{ratio:5.2f} of the raw write+fsync baseline ({baseline:.2f} s)")
    print(
        f"largest child peak RSS {report['rusage_children_maxrss_mb']:.0f} MiB "
        f"(idle floor {phases['control']['idle_maxrss_mb']:.0f} MiB) for a {model_bytes / 2**30:.2f} GiB model"
    )
    print(f"export / (stream_read + baseline) = {report['export_to_read_plus_write']:.2f}")
    gc = phases["export"]["gc"]
    print(f"gc(keep_last=1): {gc['objects']} objects, {gc['bytes'] / 2**20:.0f} MiB in {gc['seconds']:.2f} s")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
