"""``kyodo-coordinator``: the operator's command line.

``demo`` runs the embedded default federation end to end under Flower's simulation engine:
each member prepares its own synthetic LeRobot dataset with its own tool (``kyodo-member
data synth``, run as a separate process, as a member would), then the ServerApp and the
ClientApps run for ``train.rounds`` rounds.
"""

from __future__ import annotations

import os

os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")

import argparse  # noqa: E402
import json  # noqa: E402
import shlex  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

from rich.console import Console  # noqa: E402

from shared_model.config import ConfigError, KyodoConfig, load_config  # noqa: E402

console = Console()


def prepare_member_data(cfg: KyodoConfig, fresh: bool = False) -> None:
    """Have every simulated member write its dataset (skipped when already there)."""
    for member in cfg.federation.members:
        out = Path(cfg.data_root) / member.name
        if (out / "meta" / "info.json").is_file() and not fresh:
            continue
        cmd = [
            sys.executable, "-m", "member_node.cli", "data", "synth",
            "--embodiment", member.embodiment,
            "--episodes", str(member.episodes),
            "--seconds", str(member.episode_seconds),
            "--seed", str(member.seed),
            "--out", str(out),
        ]  # fmt: skip
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
        console.print(f"member [cyan]{member.name}[/] ({member.embodiment}): synthetic episodes in {out}")


def run_config_for(model: str, federation: str, overrides: list[str]) -> dict[str, str]:
    return {"model": model, "federation": federation, "overrides": " ".join(shlex.quote(o) for o in overrides)}


def cmd_demo(args: argparse.Namespace) -> int:
    from coordinator.simulate import run_local_simulation

    overrides = list(args.overrides)
    if args.rounds is not None:
        overrides.append(f"train.rounds={args.rounds}")
    try:
        cfg = load_config(model=args.model, federation=args.federation, overrides=overrides)
    except ConfigError as err:
        console.print(f"[red]config error:[/] {err}")
        return 2
    # The run writes into fresh directories so round files of an older run never mix in.
    if not any(o.startswith("out_dir=") for o in overrides):
        overrides.append(f"out_dir={Path(cfg.out_dir) / time.strftime('%Y%m%d-%H%M%S')}")
        cfg = load_config(model=args.model, federation=args.federation, overrides=overrides)
    prepare_member_data(cfg, fresh=args.fresh_data)
    start = time.monotonic()
    run_local_simulation(
        run_config_for(args.model, args.federation, overrides),
        num_supernodes=len(cfg.federation.members),
        verbose=args.verbose,
    )
    summary_path = Path(cfg.out_dir) / "summary.json"
    if not summary_path.is_file():
        console.print(f"[red]the run wrote no summary ({summary_path}); see the log above[/]")
        return 1
    summary = json.loads(summary_path.read_text())
    first, last = summary["mean_mse"][0], summary["mean_mse"][-1]
    console.print(
        f"[bold green]done[/] in {time.monotonic() - start:.0f}s: mean held-out action MSE "
        f"{first:.4f} -> {last:.4f} ({last / first:.2f}x of the initial error). Run directory: {cfg.out_dir}"
    )
    return 0


def cmd_model_info(args: argparse.Namespace) -> int:
    """Parameter and shard counts of a model size, from the meta device (nothing allocated)."""
    import resource

    from rich.table import Table

    from shared_model.shards import ShardLayout

    try:
        cfg = load_config(model=args.model, overrides=list(args.overrides))
    except ConfigError as err:
        console.print(f"[red]config error:[/] {err}")
        return 2
    start = time.monotonic()
    layout = ShardLayout.from_config(cfg.model, cfg.embodiments)
    seconds = time.monotonic() - start
    table = Table(title=f"model {cfg.model.name!r}: shards by kind")
    for col in ("kind", "shards", "parameters", "bf16 bytes"):
        table.add_column(col, justify="right" if col != "kind" else "left")
    for kind, (count, numel) in layout.count_by_kind().items():
        table.add_row(kind, f"{count:,}", f"{numel:,}", _human(2 * numel))
    total = layout.total_numel()
    table.add_row("[bold]total", f"[bold]{len(layout.shards):,}", f"[bold]{total:,}", f"[bold]{_human(2 * total)}")
    console.print(table)
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    console.print(
        f"{total:.3e} parameters in {len(layout.shards):,} shards; layout built in {seconds:.1f}s, peak RSS {peak_mb:.0f} MB"
    )
    return 0


def cmd_plan(args: argparse.Namespace) -> int:
    """Bytes per shard kind, per member and per round for the planned assignment."""
    import resource

    from rich.table import Table

    from coordinator.capacity import capacity

    try:
        cfg = load_config(model=args.model, overrides=list(args.overrides))
    except ConfigError as err:
        console.print(f"[red]config error:[/] {err}")
        return 2
    if args.members < 1:
        console.print("[red]--members must be >= 1[/]")
        return 2
    start = time.monotonic()
    report = capacity(cfg, args.members, args.round)
    seconds = time.monotonic() - start
    kinds = Table(
        title=f"model {report.model!r}: {report.total_params:.4e} parameters, {_human(report.total_bytes)} in bf16"
    )
    for col in ("shard kind", "shards", "parameters", "bytes (bf16)", "per shard"):
        kinds.add_column(col, justify="left" if col == "shard kind" else "right")
    for kind, k in report.kinds.items():
        per = _human(k.largest) if k.smallest == k.largest else f"{_human(k.smallest)} - {_human(k.largest)}"
        kinds.add_row(kind, f"{k.shards:,}", f"{k.params:,}", _human(k.params * 2), per)
    console.print(kinds)
    plan = report.round_plan
    members = Table(title=f"round {args.round} with {args.members} members (min_cohort {cfg.train.min_cohort}, "
                    f"{cfg.train.experts_per_member} experts per member per layer)")  # fmt: skip
    for col in ("member", "robot", "shards", "trainable params", "upload", "download (incremental)"):
        members.add_column(col, justify="left" if col in ("member", "robot") else "right")
    for m in report.members:
        members.add_row(
            m.member, m.embodiment, f"{m.shards:,}", f"{m.trainable_params:,}",
            _human(m.upload_bytes), _human(m.download_bytes),
        )  # fmt: skip
    console.print(members)
    upload = "masked uint32 per parameter" if cfg.secagg.enabled else "bf16"
    console.print(
        f"shards updated per round: {report.updated_shards:,} of {sum(k.shards for k in report.kinds.values()):,} "
        f"({len(plan.skipped):,} not scheduled); store growth per round {_human(report.store_growth_bytes)} "
        f"(only changed shards are written); first download of a new member {_human(report.total_bytes)}.\n"
        f"upload = the member's {upload}; download = the shards the previous round changed.\n"
        f"coordinator aggregation memory: {_human(report.accumulator_bytes)} of running sums for the round's "
        f"shards + {_human(report.reply_in_flight_bytes)} for the reply in flight; largest shard "
        f"{_human(report.largest_shard_bytes)}."
    )
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    console.print(f"planned in {seconds:.1f}s, peak RSS {peak_mb:.0f} MB")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    """Write a committed round in the Hugging Face layout (index + safetensors files)."""
    from shared_model.export import export_hf
    from shared_model.store import ShardStore, StoreError

    store_dir = Path(args.run_dir) / "store"
    if not (store_dir / "HEAD").is_file():
        console.print(f"[red]{args.run_dir} has no committed rounds ({store_dir}/HEAD missing)[/]")
        return 2
    store = ShardStore(store_dir)
    round_number = store.head().round if args.round is None else args.round
    try:
        result = export_hf(store, round_number, args.out, overwrite=args.overwrite)
    except (StoreError, FileExistsError, ValueError) as err:
        console.print(f"[red]export failed:[/] {err}")
        return 1
    console.print(
        f"round {result.round}: {result.n_tensors} tensors, {_human(result.total_size)} in {len(result.files)} "
        f"file(s) under {result.out_dir} (model.safetensors.index.json)"
    )
    return 0


def cmd_gc(args: argparse.Namespace) -> int:
    """Remove store objects no retained round references (run it between runs or rounds)."""
    from shared_model.store import ShardStore, StoreError

    store = ShardStore(Path(args.run_dir) / "store")
    try:
        report = store.gc(keep_last=args.keep_last)
    except StoreError as err:
        console.print(f"[red]gc refused:[/] {err}")
        return 1
    console.print(
        f"kept rounds {sorted(report.kept_rounds)} ({report.kept_objects} objects); removed "
        f"{len(report.removed_rounds)} rounds, {report.removed_objects} objects ({_human(report.removed_bytes)})"
    )
    return 0


def _human(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1024 or unit == "TB":
            return f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TB"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kyodo-coordinator", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="run the default federation under Flower's simulation engine")
    demo.add_argument("--model", default="small", help="model preset (configs/model/*.yaml)")
    demo.add_argument("--federation", default="default", help="federation preset (configs/federation/*.yaml)")
    demo.add_argument("--rounds", type=int, default=None, help="shortcut for train.rounds=N")
    demo.add_argument("--fresh-data", action="store_true", help="regenerate the members' synthetic data")
    demo.add_argument("--verbose", action="store_true", help="Flower debug logging")
    demo.add_argument("overrides", nargs="*", help="config overrides as a dotlist: train.lr=0.01 model.n_layers=2")
    demo.set_defaults(func=cmd_demo)
    info = sub.add_parser("model-info", help="parameter and shard counts of a model size (meta device)")
    info.add_argument("--model", default="small", help="model preset (configs/model/*.yaml)")
    info.add_argument("overrides", nargs="*", help="config overrides as a dotlist")
    info.set_defaults(func=cmd_model_info)
    plan = sub.add_parser("plan", help="per-round bytes per shard kind, member and store, for a model size")
    plan.add_argument("--model", default="trillion", help="model preset (configs/model/*.yaml)")
    plan.add_argument("--members", type=int, default=10, help="number of members (robots cycle over embodiments)")
    plan.add_argument("--round", type=int, default=1, help="which round's plan (experts rotate)")
    plan.add_argument("overrides", nargs="*", help="config overrides as a dotlist, e.g. train.min_cohort=3")
    plan.set_defaults(func=cmd_plan)
    export = sub.add_parser("export", help="write a committed round in the Hugging Face safetensors layout")
    export.add_argument("run_dir", help="a run directory (holds store/)")
    export.add_argument("--round", type=int, default=None, help="round to export (default: HEAD)")
    export.add_argument("--out", required=True, help="output directory")
    export.add_argument("--overwrite", action="store_true", help="replace a model already in --out")
    export.set_defaults(func=cmd_export)
    gc = sub.add_parser("gc", help="remove store objects that no retained round references")
    gc.add_argument("run_dir", help="a run directory (holds store/)")
    gc.add_argument("--keep-last", type=int, default=None, help="keep only the newest N rounds (HEAD always)")
    gc.set_defaults(func=cmd_gc)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
