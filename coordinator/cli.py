"""``kyodo-coordinator``: the operator's command line.

``demo`` runs the embedded default federation end to end under Flower's simulation engine:
each member prepares its own synthetic LeRobot dataset with its own tool (``kyodo-member
data synth``, run as a separate process, as a member would), then the ServerApp and the
ClientApps run for ``train.rounds`` rounds.

``pretrain`` makes the round-0 checkpoint a consortium publishes (its sha256) and every
run imports (``public.checkpoint``).

``init``, ``add-member``, ``start``, ``register``, ``run``, ``log``, ``stop`` and ``status`` deploy the same
ServerApp on a real SuperLink with TLS and node authentication (:mod:`coordinator.deploy`).
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

from shared_model.config import ConfigError, KyodoConfig, MemberConfig, load_config  # noqa: E402
from shared_model.flower_processes import log_to_stderr  # noqa: E402

# soft_wrap: messages are not re-wrapped at the terminal's width, so a path in one stays
# whole for copying (tables still fit the width).
console = Console(soft_wrap=True)


def prepare_member_data(cfg: KyodoConfig, fresh: bool = False) -> None:
    """Have every simulated member write its dataset, unless the one there was written with
    the same settings.

    Each dataset written here leaves a note of its settings beside it
    (``<data_root>/.<member>.synth.json``): with another federation or other episode counts
    over the same data_root, the old dataset was reused as it was, so a two-task federation
    could train on one-task data without a word. A dataset without that note may be the
    member's own recording: it is kept, and said so where it differs from the federation's.
    """
    for member in cfg.federation.members:
        out = Path(cfg.data_root) / member.name
        settings = {
            "embodiment": member.embodiment,
            "episodes": member.episodes,
            "seconds": member.episode_seconds,
            "seed": member.seed,
            "tasks": member.tasks,
        }
        note = Path(cfg.data_root) / f".{member.name}.synth.json"
        if (out / "meta" / "info.json").is_file() and not fresh:
            written = _read_note(note)
            if written == settings:
                continue
            if written is None:
                _say_if_other_data(out, member)
                continue
            console.print(f"member [cyan]{member.name}[/]: {out} was written with other settings; writing it again")
        cmd = [
            sys.executable, "-m", "member_node.cli", "data", "synth",
            "--embodiment", member.embodiment,
            "--episodes", str(member.episodes),
            "--seconds", str(member.episode_seconds),
            "--seed", str(member.seed),
            "--tasks", str(member.tasks),
            "--out", str(out), "--force",
        ]  # fmt: skip
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
        note.write_text(json.dumps(settings) + "\n", encoding="utf-8")
        console.print(f"member [cyan]{member.name}[/] ({member.embodiment}): synthetic episodes in {out}")


def _read_note(note: Path) -> dict | None:
    try:
        value = json.loads(note.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return value if isinstance(value, dict) else None


def _say_if_other_data(out: Path, member: MemberConfig) -> None:
    """A dataset kyodo did not write here (or wrote before it left notes) is used as it is."""
    try:
        info = json.loads((out / "meta" / "info.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return
    have = (info.get("robot_type"), info.get("total_episodes"), info.get("total_tasks"))
    want = (member.embodiment, member.episodes, member.tasks)
    if have != want:
        console.print(
            f"[yellow]member {member.name}: {out} holds {have[1]} episodes of {have[2]} task(s) of {have[0]!r}, "
            f"not the {want[1]} of {want[2]} of {want[0]!r} the federation names: used as it is "
            "(--fresh-data writes the federation's)[/]"
        )


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
    if cfg.public.checkpoint:  # a wrong file fails here, before members prepare data and Ray starts
        from coordinator.public_checkpoint import CheckpointError, load_checkpoint

        try:
            load_checkpoint(cfg)
        except CheckpointError as err:
            console.print(f"[red]error:[/] {err}", highlight=False)
            return 2
    if cfg.continue_from:  # likewise a run that cannot be continued
        from coordinator.continuation import ContinuationError, earlier_round

        try:
            earlier_round(cfg)
        except ContinuationError as err:
            console.print(f"[red]error:[/] {err}", highlight=False)
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
    if not first or last is None:
        change = "withheld by the members"
    else:
        private = any(m.dp for m in cfg.federation.members)
        how = "; as the members released it under DP: noised, clipped per episode" if private else ""
        change = f"{first:.4f} -> {last:.4f} ({last / first:.2f}x of the initial error{how})"
    console.print(
        f"[bold green]done[/] in {time.monotonic() - start:.0f}s: mean held-out action MSE {change}. "
        f"Run directory: {cfg.out_dir}"
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


def cmd_pretrain(args: argparse.Namespace) -> int:
    """Pretrain the round-0 checkpoint on public simulated episodes, once, outside any run."""
    from coordinator.public_checkpoint import checkpoint_metadata, public_checkpoint, write_checkpoint

    out = Path(args.out)
    if out.exists() and not args.overwrite:
        console.print(f"[red]error:[/] {out} exists (--overwrite replaces it)", highlight=False)
        return 2
    if not out.parent.is_dir():
        console.print(f"[red]error:[/] directory {out.parent} does not exist", highlight=False)
        return 2
    try:
        cfg = load_config(model=args.model, overrides=[f"public.rounds={args.rounds}", *args.overrides])
        if cfg.public.checkpoint:
            raise ConfigError("public.checkpoint is what pretrain makes, not an input: leave it unset")
    except ConfigError as err:
        console.print(f"[red]config error:[/] {err}", highlight=False)
        return 2
    from coordinator.progress import make_progress

    start = time.monotonic()
    with make_progress(console) as progress:
        bar = progress.add_task("pretraining", total=cfg.public.rounds * len(cfg.embodiments), stage="")
        state = public_checkpoint(
            cfg, on_block=lambda rnd, name: progress.update(bar, advance=1, stage=f"round {rnd}: {name}")
        )
    digest = write_checkpoint(state, out, checkpoint_metadata(cfg))
    console.print(
        f"model {cfg.model.name!r}: {cfg.public.rounds} rounds on public episodes in "
        f"{time.monotonic() - start:.0f}s; wrote {out}\nsha256 {digest}\n"
        f"publish the hash; runs import it with: public.checkpoint={out.resolve()} public.checkpoint_sha256={digest}",
        highlight=False,
        soft_wrap=True,
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


def _model_config(run_dir: str) -> dict | None:
    """The run's ``model`` and ``embodiments`` settings (its config.yaml), for the export's config.json."""
    from coordinator.run_status import run_settings

    settings = run_settings(Path(run_dir))
    return {key: settings[key] for key in ("model", "embodiments") if key in settings} or None


def cmd_export(args: argparse.Namespace) -> int:
    """Write a committed round in the Hugging Face layout (index + safetensors files)."""
    from shared_model.export import export_hf
    from shared_model.store import ShardStore, StoreError

    store_dir = Path(args.run_dir) / "store"
    if not (store_dir / "HEAD").is_file():
        console.print(f"[red]{args.run_dir} has no committed rounds ({store_dir}/HEAD missing)[/]")
        return 2
    try:
        store = ShardStore(store_dir)
        round_number = store.head().round if args.round is None else args.round
        result = export_hf(store, round_number, args.out, overwrite=args.overwrite, config=_model_config(args.run_dir))
    except (StoreError, FileExistsError, ValueError) as err:
        console.print(f"[red]export failed:[/] {err}")
        return 1
    console.print(
        f"round {result.round}: {result.n_tensors} tensors, {_human(result.total_size)} in {len(result.files)} "
        f"file(s) under {result.out_dir} (model.safetensors.index.json)"
    )
    return 0


def cmd_gc(args: argparse.Namespace) -> int:
    """Remove store objects no retained round references, from a run no coordinator runs now:
    a round in flight has written objects no manifest names yet, and gc would delete them (a
    walkthrough ran gc 38 times during a run; nothing stopped it). It holds the run's lock
    while it works, so no coordinator starts on the run meanwhile either."""
    from coordinator.run_lock import RunInUseError, holding_run
    from shared_model.store import ShardStore, StoreError

    run_dir = Path(args.run_dir)
    if not (run_dir / "store" / "HEAD").is_file():
        # ShardStore would create an empty store here: an operator directory, a typo.
        console.print(f"[red]gc refused:[/] {run_dir} is not a run directory (no store/HEAD)", highlight=False)
        return 1
    try:
        with holding_run(run_dir):
            report = ShardStore(run_dir / "store").gc(keep_last=args.keep_last)
    except RunInUseError as err:
        console.print(
            f"[red]gc refused:[/] a coordinator runs {run_dir} now{f' ({err.holder})' if err.holder else ''}, "
            "and a round in flight has objects no manifest names yet: run gc once the run has ended or is stopped",
            highlight=False,
        )
        return 1
    except StoreError as err:
        console.print(f"[red]gc refused:[/] {err}", highlight=False)
        return 1
    console.print(
        f"kept rounds {sorted(report.kept_rounds)} ({report.kept_objects} objects); removed "
        f"{len(report.removed_rounds)} rounds, {report.removed_objects} objects ({_human(report.removed_bytes)})"
    )
    if report.removed_rounds:
        console.print(
            f"rounds {sorted(report.removed_rounds)} can no longer be verified by `kyodo-audit verify` "
            "(it checks every committed round's manifest and shards): audit or archive a run before its gc"
        )
    return 0


# ----------------------------------------------------------------------------- deployment


def _deploy_errors(func):  # noqa: ANN001, ANN202 - decorator for the deployment handlers
    """Deployment failures the operator must fix print one line (exit 3), never a traceback."""
    from coordinator.deploy import DeployError

    def handler(args: argparse.Namespace) -> int:
        log_to_stderr("kyodo.coordinator")
        try:
            return int(func(args))
        except DeployError as err:
            console.print(f"[red]error:[/] {err}", highlight=False, soft_wrap=True)
            return 3

    handler.__doc__ = func.__doc__
    return handler


@_deploy_errors
def cmd_init(args: argparse.Namespace) -> int:
    """TLS material (CA + server certificate), consortium config and the flwr connection."""
    from coordinator.deploy import init_operator

    op = init_operator(
        args.dir, name=args.name, model=args.model, rounds=args.rounds, host=args.host, port=args.port,
        san=args.san or ["127.0.0.1", "localhost"], overrides=list(args.overrides),
    )  # fmt: skip
    console.print(
        f"operator directory {op.root}: SuperLink {args.host}:{args.port}, model {args.model!r}, {args.rounds} rounds.\n"
        f"give members [bold]{op.tls.ca_cert}[/] (never ca.key); admit each with "
        f"`kyodo-coordinator add-member {op.root} membership.json`",
        highlight=False,
    )
    return 0


@_deploy_errors
def cmd_add_member(args: argparse.Namespace) -> int:
    """Admit a member from its membership.json (public keys and budget)."""
    from coordinator.deploy import add_member

    entry = add_member(args.dir, args.membership, update=args.update)
    if args.update:
        console.print(
            f"member [cyan]{entry.name}[/]: published budget now ε={entry.epsilon:g} δ={entry.delta:g} "
            f"(consortium.yaml, audit-consortium.yaml)",
            highlight=False,
        )
        return 0
    console.print(
        f"member [cyan]{entry.name}[/] ({entry.embodiment}) added; its SuperNode key is registered when the "
        f"SuperLink starts, or now with `kyodo-coordinator register {args.dir}`",
        highlight=False,
    )
    return 0


@_deploy_errors
def cmd_remove_member(args: argparse.Namespace) -> int:
    """Take a member out of the consortium (it left); its earlier runs stay auditable."""
    from coordinator.deploy import remove_member

    entry, unregistered = remove_member(args.dir, args.member)
    key = "is unregistered" if unregistered else "is unregistered when the SuperLink next starts"
    console.print(
        f"member [cyan]{entry.name}[/] removed: runs submitted from now on neither wait for it nor seat it, and its "
        f"SuperNode key {key}. audit-consortium.yaml keeps its ledger key and budget as departed, for the runs it "
        f"trained in: auditors of those runs need a copy of its ledger (its state/ledger.jsonl), which it keeps",
        highlight=False,
    )
    return 0


@_deploy_errors
def cmd_start(args: argparse.Namespace) -> int:
    """The SuperLink, in the foreground (TLS, node authentication, database), members registered."""
    from coordinator.deploy import SuperLinkRunner, operator_dir

    return SuperLinkRunner(operator_dir(args.dir)).run(register=not args.no_register, start_timeout=args.timeout)


@_deploy_errors
def cmd_register(args: argparse.Namespace) -> int:
    """Register every member's SuperNode key the running SuperLink does not hold yet."""
    from coordinator.deploy import load_consortium, operator_dir, register_members

    op = operator_dir(args.dir)
    registered = register_members(op, load_consortium(op))
    for name, node in sorted(registered.items()):
        console.print(f"{name}: node {node}", highlight=False)
    return 0


@_deploy_errors
def cmd_run(args: argparse.Namespace) -> int:
    """Submit the ServerApp to the SuperLink (flwr run), optionally waiting for it to finish."""
    from coordinator.deploy import operator_dir, resume_command, run_progress, submit_run, wait_for_run
    from coordinator.run_status import head_round

    submission = submit_run(
        args.dir,
        out_dir=args.out_dir,
        rounds=args.rounds,
        overrides=list(args.overrides),
        wait_members=args.wait_members,
        new=args.new,
    )
    what = "resumes the run in" if submission.resumes else "a new run in"
    console.print(f"run {submission.run_id} submitted: {what} {submission.out_dir}", highlight=False)
    console.print(f"its log: kyodo-coordinator log {args.dir} {submission.run_id} [--follow]", highlight=False)
    if not args.wait:
        return 0
    head_before = head_round(submission.out_dir)
    status = wait_for_run(operator_dir(args.dir), submission.run_id, timeout=args.timeout)
    console.print(f"run {submission.run_id}: {status}", highlight=False)
    resume = resume_command(args.dir, submission.out_dir)
    if status == "finished:completed":
        progress = run_progress(submission.out_dir, settle=60.0)
        if progress.unfinished:  # ended before its planned rounds: a stop after the round in flight
            console.print(
                f"it stopped after round {progress.head} of {progress.planned} as the operator asked "
                f"(kyodo-coordinator stop); to go on after it: {resume}",
                highlight=False,
            )
            return 1
        if submission.resumes and head_round(submission.out_dir) == head_before:
            console.print(
                f"nothing was trained: every planned round of {submission.out_dir} was committed already (HEAD "
                f"round {head_before}); --rounds N trains more in it, continue_from={submission.out_dir} goes on in a "
                "new run",
                highlight=False,
            )
        return 0
    if status == "finished:stopped":
        console.print(
            f"it was stopped (kyodo-coordinator stop, or flwr stop); to go on after its last committed round: {resume}",
            highlight=False,
        )
        return 1
    from coordinator.run_lock import RunInUseError, check_not_running

    try:
        check_not_running(submission.out_dir)
    except RunInUseError as err:  # this submission found the run directory taken, and ended
        console.print(f"why: {err}", highlight=False, soft_wrap=True)
        return 1
    from coordinator.deploy import superlink_answers

    first = (
        "" if superlink_answers(args.dir) else f"start the SuperLink again (kyodo-coordinator start {args.dir}), then "
    )
    console.print(
        f"why: kyodo-coordinator log {args.dir} {submission.run_id}\n"
        f"to go on after its last committed round, with the same settings: {first}{resume}",
        highlight=False,
    )
    return 1


@_deploy_errors
def cmd_log(args: argparse.Namespace) -> int:
    """The coordinator's log of a deployed run (flwr log)."""
    from coordinator.deploy import log_run_ids, operator_dir, show_log, split_run_argument

    root, which = split_run_argument(args.dir, args.run)
    op = operator_dir(root)
    run_ids = log_run_ids(op, which)
    if args.follow:
        return show_log(op, run_ids[-1], follow=True)
    code = 0
    for n, run_id in enumerate(run_ids, start=1):
        if len(run_ids) > 1:
            console.print(
                f"[bold]submission {n} of {len(run_ids)} of this run: Flower run {run_id}[/]", highlight=False
            )
        code = show_log(op, run_id) or code
    return code


@_deploy_errors
def cmd_stop(args: argparse.Namespace) -> int:
    """Stop a deployed run so that it can be resumed later (flwr stop, then wait for its end)."""
    from coordinator.deploy import resume_command, run_progress, stop_run

    stopped = stop_run(args.dir, args.run, timeout=args.timeout, now=args.now)
    if stopped.had_ended:
        console.print(f"run {stopped.run_id} had already ended ({stopped.status}): nothing to stop", highlight=False)
        return 0
    console.print(f"run {stopped.run_id}: {stopped.status}", highlight=False)
    if stopped.out_dir is None:
        return 0
    progress = run_progress(stopped.out_dir)
    if not progress.unfinished and progress.holder is None:  # the stop came during its last round
        console.print(f"it had committed all {progress.planned} planned rounds ({stopped.out_dir})", highlight=False)
        return 0
    head = progress.head
    committed = f"round {head} is its last committed round" if head is not None else "it committed no round"
    console.print(
        f"{committed} ({stopped.out_dir}); to go on after it, with the settings it was submitted with:\n"
        f"{resume_command(args.dir, stopped.out_dir)}",
        highlight=False,
    )
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    """Rounds, cohorts, shard versions and member participation of a run directory."""
    from coordinator.deploy import DeployError, operator_dir, submitted_run_dir
    from coordinator.run_status import StoreError, status_tables

    run_dir, op = Path(args.run_dir), operator_dir(args.run_dir)
    budgets = None
    try:
        if op.consortium.is_file():  # an operator directory: its newest run, or the one named
            run_dir = submitted_run_dir(op, args.run)
            console.print(f"{'newest run' if args.run is None else 'run'}: {run_dir}", highlight=False)
            budgets = _published_budgets(op.audit_consortium)
        elif args.run is not None:
            raise DeployError(
                f"{args.run_dir} is not an operator directory (no {op.consortium.name}): "
                f"a run id or run directory ({args.run}) needs the operator directory that submitted it"
            )
        tables = status_tables(run_dir, rounds=[args.round] if args.round is not None else None, budgets=budgets)
    except (FileNotFoundError, StoreError, DeployError, LookupError) as err:
        console.print(f"[red]error:[/] {err}", highlight=False)
        return 2
    for table in tables:
        console.print(table)
    console.print(_run_activity(run_dir, op.root if op.consortium.is_file() else None), highlight=False)
    return 0


def _published_budgets(path: Path) -> dict[str, float] | None:
    """Members' published epsilons from the operator's audit-consortium.yaml (departed members
    included: the runs they trained in still show what they were held to); None, with a
    warning, when it cannot be read: status still shows the run."""
    from privacy.audit.consortium import ConsortiumError, load_consortium

    if not path.is_file():
        return None
    try:
        return {name: member.epsilon for name, member in load_consortium(path).members.items()}
    except ConsortiumError as err:
        console.print(f"[yellow]warning:[/] published budgets not shown: {err}", highlight=False)
        return None


def _run_activity(run_dir: Path, operator: Path | None) -> str:
    """Whether a coordinator runs this run now, and, for one that stopped short of its planned
    rounds, the command that goes on: after a SuperLink crash the run's log reads like a stop by
    the operator ("Task stopped by user"), and status was the place the operator looked."""
    from coordinator.deploy import run_progress, split_run_argument
    from coordinator.stop_request import stop_requested

    progress = run_progress(run_dir)
    if progress.holder is not None:
        requested = stop_requested(run_dir)
        stopping = (
            f"; asked to stop{f' at {requested}' if requested else ''}: it ends once the round in flight is committed"
            if requested is not None
            else ""
        )
        return f"running now: a coordinator holds it{f' ({progress.holder})' if progress.holder else ''}{stopping}"
    if not progress.unfinished:
        return f"finished: all {progress.planned} planned rounds committed"
    return f"not running: {progress.stopped_short(operator or split_run_argument(run_dir, None)[0], run_dir)}"


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
    pretrain = sub.add_parser("pretrain", help="pretrain a round-0 checkpoint on public simulated episodes")
    pretrain.add_argument("--model", default="small", help="model preset (configs/model/*.yaml)")
    pretrain.add_argument("--rounds", type=int, default=16, help="rounds of pretraining (public.rounds)")
    pretrain.add_argument("--out", required=True, help="the safetensors file to write (outside the app directory)")
    pretrain.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    pretrain.add_argument("overrides", nargs="*", help="config overrides as a dotlist: public.fps_scale=2")
    pretrain.set_defaults(func=cmd_pretrain)
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

    init = sub.add_parser("init", help="create the operator directory: TLS (CA, server cert), consortium config")
    init.add_argument("dir", help="the operator directory (outside the app directory)")
    init.add_argument("--name", default="kyodo", help="consortium name (CA name, federation name in run configs)")
    init.add_argument("--model", default="small", help="model preset of the consortium's runs")
    init.add_argument("--rounds", type=int, default=4, help="rounds per run (the schedule)")
    init.add_argument("--host", default="127.0.0.1", help="address the SuperLink listens on and members dial")
    init.add_argument("--port", type=int, default=9093, help="the SuperLink's one HTTPS port")
    init.add_argument("--san", action="append", help="names in the server certificate (repeatable)")
    init.add_argument("overrides", nargs="*", help="config overrides for every run: train.local_steps=20")
    init.set_defaults(func=cmd_init)
    add = sub.add_parser("add-member", help="admit a member from its membership.json (public keys)")
    add.add_argument("dir", help="the operator directory")
    add.add_argument("membership", help="the membership.json `kyodo-member init` wrote")
    add.add_argument(
        "--update", action="store_true", help="take an admitted member's new budget (`kyodo-member budget`)"
    )
    add.set_defaults(func=cmd_add_member)
    remove = sub.add_parser("remove-member", help="take a member that left out (its earlier runs stay auditable)")
    remove.add_argument("dir", help="the operator directory")
    remove.add_argument("member", help="the member's name")
    remove.set_defaults(func=cmd_remove_member)
    start = sub.add_parser("start", help="run the SuperLink (foreground; TLS, node auth, database)")
    start.add_argument("dir", help="the operator directory")
    start.add_argument("--no-register", action="store_true", help="do not register the members' keys")
    start.add_argument("--timeout", type=float, default=60.0, help="seconds to wait for the SuperLink's health")
    start.set_defaults(func=cmd_start)
    register = sub.add_parser("register", help="register members' SuperNode keys with the running SuperLink")
    register.add_argument("dir", help="the operator directory")
    register.set_defaults(func=cmd_register)
    run = sub.add_parser("run", help="submit a run of the ServerApp to the SuperLink (flwr run)")
    run.add_argument("dir", help="the operator directory")
    run.add_argument("--out-dir", default=None, help="run directory to resume (default: a new DIR/runs/<time>)")
    run.add_argument("--new", action="store_true", help="--out-dir names a directory for a new run, not one to resume")
    run.add_argument("--rounds", type=int, default=None, help="override the consortium's rounds")
    run.add_argument("--wait", action="store_true", help="wait until the run finishes; exit 1 unless it completed")
    run.add_argument("--timeout", type=float, default=3600.0, help="seconds --wait waits")
    run.add_argument(
        "--wait-members",
        type=float,
        default=120.0,
        help="seconds to wait for every member to be online; then the run goes on without those still down "
        "if at least train.min_cohort are up (0: do not wait)",
    )
    run.add_argument("overrides", nargs="*", help="config overrides for this run: train.local_steps=20")
    run.set_defaults(func=cmd_run)
    show = sub.add_parser("log", help="the coordinator's log of a deployed run (flwr log)")
    show.add_argument("dir", help="the operator directory (or a run directory under it)")
    show.add_argument(
        "run",
        nargs="?",
        default=None,
        help="the Flower run id `run` printed, or the run's directory (DIR/runs.jsonl has both); default: the newest. "
        "A run resumed after a stop or a crash shows every submission's log, oldest first",
    )
    show.add_argument("--follow", action="store_true", help="keep streaming until the run ends")
    show.set_defaults(func=cmd_log)
    stop = sub.add_parser(
        "stop",
        help="stop a deployed run once the round in flight is committed (--now: at once, flwr stop) and wait "
        "until it can be resumed",
    )
    stop.add_argument("dir", help="the operator directory")
    stop.add_argument(
        "run", nargs="?", default=None, help="the Flower run id or the run's directory; default: the newest"
    )
    stop.add_argument(
        "--timeout", type=float, default=900.0, help="seconds to wait for the round in flight and the ServerApp to end"
    )
    stop.add_argument(
        "--now",
        action="store_true",
        help="stop at once, wherever the round is (a round whose members' masked updates already left is then "
        "lost to their budgets)",
    )
    stop.set_defaults(func=cmd_stop)
    status = sub.add_parser("status", help="rounds, cohorts, shard versions and participation of a run")
    status.add_argument(
        "run_dir", help="a run directory (store/, rounds.jsonl), or the operator directory for its newest run"
    )
    status.add_argument(
        "run",
        nargs="?",
        default=None,
        help="with the operator directory: the Flower run id `run` printed, "
        "or the run's directory (DIR/runs.jsonl has both); default: the newest",
    )
    status.add_argument("--round", type=int, default=None, help="show the cohorts of this round only")
    status.set_defaults(func=cmd_status)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    # argparse matches a positional DIR and the dotlist in one go: a dotlist after options
    # (`init DIR --model tiny train.lr=0.01`) arrives here and still belongs to the overrides.
    if extra:
        if hasattr(args, "overrides") and all("=" in e and not e.startswith("-") for e in extra):
            args.overrides = [*args.overrides, *extra]
        elif getattr(args, "run", "") is None and len(extra) == 1 and not extra[0].startswith("-"):
            # the same for an optional RUN after an option (`stop DIR --now 5`): argparse
            # fills optional positionals only before the first option
            args.run = extra[0]
        else:
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
