"""``kyodo-member``: the member's command line.

Commands are grouped (``kyodo-member data synth``, ``kyodo-member data inspect``); each
group registers itself through a function in :data:`COMMAND_GROUPS`, so further groups
are added by appending one registrar, without touching the parser plumbing. ``init`` and
``start`` set up and run the member's Flower SuperNode (:mod:`member_node.supernode`). Every handler returns the process exit code; expected failures (bad
data, unknown embodiment) print one clear line on stderr, never a traceback.
"""

from __future__ import annotations

import argparse
import shlex
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from member_node.budget_plan import add_plan_command
from member_node.data_units import unit_problems, units_error, without_episodes_beyond_bounds
from member_node.lerobot import TASKS_PATH, DatasetError, LeRobotDataset, distinct_tasks, left_out_text, read_dataset
from member_node.status import add_status_command
from member_node.supernode import (
    MEMBERSHIP_FILE,
    MemberSetup,
    SetupError,
    SuperNodeRunner,
    change_budget,
    executor_command,
    free_port,
    init_member,
    load_setup,
    node_config_arg,
    preflight,
    supernode_command,
    trust_consortium,
    wait_for_superlink,
    warn_budget_spent,
    warn_unpadded_replies,
)
from member_node.synthetic import generate_dataset
from privacy.keys import FINGERPRINT_KEY_FILE, fingerprint_matches, load_or_create_fingerprint_key
from privacy.ledger import RELEASE_TRAIN, Ledger
from shared_model.config import ConfigError, EmbodimentConfig, load_config
from shared_model.flower_processes import log_to_stderr
from shared_model.text import shortened

Handler = Callable[[argparse.Namespace], int]
Registrar = Callable[["argparse._SubParsersAction[argparse.ArgumentParser]"], None]


class CommandError(Exception):
    """An expected failure: printed as ``error: <message>`` with exit code ``code``."""

    def __init__(self, message: str, code: int = 1) -> None:
        super().__init__(message)
        self.code = code


def load_embodiments() -> dict[str, EmbodimentConfig]:
    """The consortium's public embodiment list (configs/embodiments.yaml)."""
    return load_config().embodiments


def _embodiment(name: str) -> EmbodimentConfig:
    try:
        embodiments = load_embodiments()
    except ConfigError as err:
        raise CommandError(f"cannot load the configuration: {err}", code=2) from None
    if name not in embodiments:
        raise CommandError(f"unknown embodiment {name!r}; known: {', '.join(sorted(embodiments))}", code=2)
    return embodiments[name]


# ----------------------------------------------------------------------------- data


def _cmd_data_synth(args: argparse.Namespace) -> int:
    embodiment = _embodiment(args.embodiment)
    started = time.perf_counter()
    try:
        root = generate_dataset(
            args.out,
            args.embodiment,
            embodiment,
            args.episodes,
            args.seconds,
            args.seed,
            tasks=args.tasks,
            overwrite=args.force,
        )
    except FileExistsError as err:
        hint = "" if args.force else " (--force replaces an existing dataset)"
        raise CommandError(f"{err}{hint}") from None
    except ValueError as err:
        raise CommandError(str(err)) from None
    elapsed = time.perf_counter() - started
    dataset = read_dataset(root, embodiment, args.embodiment)
    Console(soft_wrap=True).print(
        f"wrote {len(dataset.episodes)} episodes, {dataset.num_frames} frames of {args.embodiment!r} "
        f"to {root} in {elapsed:.2f} s"
    )
    return 0


def _cmd_data_inspect(args: argparse.Namespace) -> int:
    embodiment = _embodiment(args.embodiment)
    try:
        dataset = read_dataset(args.dir, embodiment, args.embodiment)
        fingerprint = dataset.fingerprint()
    except DatasetError as err:
        raise CommandError(str(err)) from None
    console = Console()
    problems = unit_problems(dataset, embodiment, args.embodiment)
    if problems:  # after the table: what was read is still worth seeing
        console.print(_summary_table(dataset, embodiment))
        raise CommandError(units_error(problems, args.embodiment))
    try:
        trained = without_episodes_beyond_bounds(dataset, embodiment)  # what the node trains on
    except DatasetError as err:
        raise CommandError(str(err)) from None
    console.print(_summary_table(trained, embodiment))
    # On its own line, unwrapped: it is meant to be copied into ledgers and compared.
    console.print(f"fingerprint {fingerprint}", soft_wrap=True, highlight=False)
    if args.state_dir:
        # Which of this node's receipts were made from this data: their fingerprints are keyed
        # (and each has its own nonce), so only the member, or an auditor it gives the key
        # to, can match them.
        key_file = Path(args.state_dir) / FINGERPRINT_KEY_FILE
        if not key_file.is_file():
            raise CommandError(f"{key_file} does not exist: the node creates it when it first starts")
        key = load_or_create_fingerprint_key(key_file)
        ledger = Path(args.state_dir) / "ledger.jsonl"
        entries = Ledger(ledger).releases() if ledger.exists() else []
        # and receipts made before kyodo read tasks, under the fingerprint it gave the data then
        forms = [fingerprint, *dataset.legacy_fingerprints()]
        matching = [
            e for e in entries if any(fingerprint_matches(key, f, str(e.get("dataset_fingerprint", ""))) for f in forms)
        ]
        rounds = ", ".join(f"{e['run']}/{e['round']} {e.get('release', RELEASE_TRAIN)}" for e in matching) or "none"
        console.print(
            f"receipts from this data: {len(matching)} of {len(entries)} ledger entries ({rounds})",
            soft_wrap=True,
            highlight=False,
        )
    return 0


def _left_out(left_out: Mapping[int, str]) -> str:
    return f"{left_out_text(left_out)}: the node trains without them" if left_out else "none"


def _summary_table(dataset: LeRobotDataset, emb: EmbodimentConfig) -> Table:
    lengths = [ep.length for ep in dataset.episodes]
    table = Table(title=f"LeRobot dataset {dataset.root}", show_header=False)
    table.add_column("field", style="bold")
    table.add_column("value")
    rows = [
        ("format", str(dataset.info.get("codebase_version"))),
        ("embodiment", f"{dataset.embodiment_name} ({emb.kind})"),
        ("episodes", str(len(dataset.episodes))),
        ("left out", _left_out(dataset.left_out)),
        ("frames", str(dataset.num_frames)),
        ("episode length", f"{min(lengths)}..{max(lengths)} frames" if lengths else "-"),
        ("fps", str(dataset.fps)),
        ("state / env state", f"{emb.state_dim} / {emb.env_state_dim}"),
        ("action", str(emb.action_dim)),
        ("image features", str(emb.image_feature_dim)),
        ("tasks", _tasks_summary(dataset)),
        ("data files", str(len(dataset.data_files))),
    ]
    for key, value in rows:
        table.add_row(key, value)
    return table


def _tasks_summary(dataset: LeRobotDataset) -> str:
    """How many task texts the episodes name, and the first few (the policy reads them where
    the consortium's model has ``task_buckets``)."""
    if dataset.task_problem:
        return f"unreadable, so none: {dataset.task_problem}"
    texts = distinct_tasks(dataset.episodes)
    if not texts:
        listed = any(rel == TASKS_PATH for rel, _, _ in dataset.manifest)
        return "none named" if listed else "none named (no meta/tasks.parquet)"
    clipped = [repr(t if len(t) <= 60 else t[:57] + "...") for t in texts]  # a task may be a paragraph
    return f"{len(texts)}: " + shortened(clipped, shown=3)


def add_data_commands(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """``data synth`` and ``data inspect``."""
    data = commands.add_parser("data", help="create and check robot datasets (LeRobot v3.0)")
    sub = data.add_subparsers(dest="data_command", required=True, metavar="COMMAND")

    synth = sub.add_parser("synth", help="generate a synthetic dataset for one embodiment")
    synth.add_argument("--embodiment", required=True, help="name from configs/embodiments.yaml")
    synth.add_argument("--episodes", type=int, default=60)
    synth.add_argument("--seed", type=int, default=0)
    synth.add_argument("--seconds", type=float, default=4.0, help="nominal episode length")
    synth.add_argument(
        "--tasks",
        type=int,
        default=1,
        choices=(1, 2),
        help="2: each episode is the goal task or a home task, told apart only by its task text",
    )
    synth.add_argument("--out", type=Path, required=True, help="dataset directory to create")
    synth.add_argument("--force", action="store_true", help="replace an existing dataset at --out")
    synth.set_defaults(handler=_cmd_data_synth)

    inspect = sub.add_parser("inspect", help="validate a dataset against an embodiment and summarise it")
    inspect.add_argument("dir", type=Path)
    inspect.add_argument("--embodiment", required=True, help="name from configs/embodiments.yaml")
    inspect.add_argument(
        "--state-dir",
        default="",
        help="the node's state directory: also say which of its receipts were made from this data",
    )
    inspect.set_defaults(handler=_cmd_data_inspect)


# ----------------------------------------------------------------------------- deployment


def _cmd_init(args: argparse.Namespace) -> int:
    try:
        embodiments = load_embodiments()
    except ConfigError as err:
        raise CommandError(f"cannot load the configuration: {err}", code=2) from None
    try:
        setup = init_member(
            args.dir,
            member=args.member,
            embodiment=args.embodiment,
            data_dir=args.data,
            epsilon=args.epsilon,
            delta=args.delta,
            dp=not args.no_dp,
            budget_rounds=args.budget_rounds,
            eval_noise_multiplier=args.eval_noise_multiplier,
            eval_loss_bound=args.eval_loss_bound,
            device=args.device,
            workers=args.workers,
            train_reply_after=args.train_reply_after,
            eval_reply_after=args.eval_reply_after,
            require_secagg=args.require_secagg,
            require_pinned_keys=args.require_pinned_keys,
            superlink=args.superlink,
            root_certificates=args.root_certificates,
            runtime_port=args.port,
            accountant=args.accountant,
            max_noise_multiplier=args.max_noise_multiplier,
            min_steps=args.min_steps,
            known_embodiments=embodiments,
        )
    except SetupError as err:
        raise CommandError(str(err), code=2) from None
    console = Console(soft_wrap=True)  # paths stay whole, to be copied
    console.print(f"member [cyan]{setup.member}[/] ({setup.embodiment}) set up in {setup.dir}", highlight=False)
    try:
        _check_data(setup)
    except SetupError as err:
        # Keys do not depend on the data, which may arrive later; `start` refuses until it is usable.
        console.print(f"  [yellow]warning[/]: {err}; `start` refuses until it is usable", highlight=False)
    console.print(f"  config           {setup.dir / 'member.yaml'}", highlight=False)
    console.print(f"  ledger key       {setup.signing_key} (Ed25519, stays here)", highlight=False)
    console.print(f"  SuperNode key    {setup.auth_key} (EC P-384, stays here)", highlight=False)
    for line in _init_settings(setup):
        console.print(f"  {line}", highlight=False)
    console.print(
        f"send [bold]{setup.dir / MEMBERSHIP_FILE}[/] (public keys and budget) to the operator", highlight=False
    )
    return 0


def _init_settings(setup: MemberSetup) -> list[str]:
    """The choices a member should see it made at init: its budget's pace, whether its updates
    may leave unmasked, and whether it must pin the other members' keys (each is one flag, easy
    to miss)."""
    if not setup.dp:
        budget = "budget           none: DP is off, updates and held-out errors leave exact"
    elif setup.budget_rounds:
        budget = (
            f"budget           ε={setup.epsilon:g} δ={setup.delta:g}, spread over at least {setup.budget_rounds} "
            f"training rounds (kyodo-member plan {setup.dir} shows what that buys)"
        )
    else:
        budget = (
            f"budget           ε={setup.epsilon:g} δ={setup.delta:g} with no pace: the first run may spend all of "
            f"it (kyodo-member budget {setup.dir} --budget-rounds N sets one; kyodo-member plan shows each)"
        )
    secagg = (
        "secure agg.      required: rounds that would send an update unmasked are declined"
        if setup.require_secagg
        else "secure agg.      not required (--no-require-secagg): the coordinator decides"
    )
    keys = (
        "identity keys    must be pinned before start: run kyodo-member trust with the consortium's published "
        "audit-consortium.yaml once the operator admits this member"
        if setup.require_pinned_keys
        else "identity keys    pinning not required (--no-require-pinned-keys): the coordinator supplies them"
    )
    own = [
        f"{name} {value:g}" if isinstance(value, float) else f"{name} {value}"
        for name, value in (
            ("accountant", setup.accountant),
            ("max noise multiplier", setup.max_noise_multiplier),
            ("min steps", setup.min_steps),
        )
        if value
    ]
    accounting = (
        f"accounting       the member's own: {', '.join(own)}; the rest as each run sets them"
        if own
        else "accounting       as each run sets it (privacy.accountant, max_noise_multiplier, min_steps)"
    )
    padded = f"train {setup.train_reply_after:g} s, evaluate {setup.eval_reply_after:g} s"
    timing = (
        f"reply timing     padded ({padded} after each request arrives)"
        if setup.train_reply_after and setup.eval_reply_after
        else f"reply timing     not padded for every reply ({padded}): how long the node works tells the "
        "coordinator about its dataset's size (--train-reply-after / --eval-reply-after, seconds)"
    )
    return [budget, secagg, keys, accounting, timing] if setup.dp else [budget, secagg, keys]


def _cmd_budget(args: argparse.Namespace) -> int:
    try:
        setup, spent = change_budget(args.dir, epsilon=args.epsilon, delta=args.delta, budget_rounds=args.budget_rounds)
    except SetupError as err:
        raise CommandError(str(err), code=2) from None
    pace = f", spread over at least {setup.budget_rounds} training rounds" if setup.budget_rounds else ""
    console = Console(soft_wrap=True)
    console.print(
        f"member [cyan]{setup.member}[/]: budget ε={setup.epsilon:g} δ={setup.delta:g}{pace}; "
        f"its ledger records ε {spent:.3f} spent",
        highlight=False,
    )
    console.print(
        "a lower epsilon holds for the running node from its next message; a higher one, and a new pace, once "
        f"the node is restarted (kyodo-member start {setup.dir}); it signs the budget it holds to into its ledger "
        "before its next release. Send "
        f"[bold]{setup.dir / MEMBERSHIP_FILE}[/] to the operator (kyodo-coordinator add-member DIR FILE --update): "
        "auditors check every receipt against the published budget",
        highlight=False,
    )
    return 0


def _cmd_trust(args: argparse.Namespace) -> int:
    try:
        pinned_before = load_setup(args.dir).consortium_file
        setup, members = trust_consortium(args.dir, args.consortium_file)
    except SetupError as err:
        raise CommandError(str(err), code=2) from None
    # The node reads the pinned file at every message, but only from the path its SuperNode was
    # started with: a first pin takes a (re)start, a later one does not.
    when = (
        "a running node takes it from its next message"
        if pinned_before == setup.consortium_file
        else f"it takes effect when the node starts (kyodo-member start {setup.dir}; restart it if it runs)"
    )
    console = Console(soft_wrap=True)
    console.print(
        f"member [cyan]{setup.member}[/]: secure aggregation now accepts only the identity keys of "
        f"{escape(', '.join(members))} ({len(members)} in {setup.consortium_file}); {when}. Run this again with "
        "the new file when the consortium admits or removes a member",
        highlight=False,
    )
    min_cohort = load_config().train.min_cohort
    if len(members) < min_cohort:
        # Not an error (the first member admitted pins a file listing itself), but the node
        # then trains its own embodiment adapter at most, and nothing else says why.
        console.print(
            f"[yellow]warning[/]: the file lists {len(members)} member(s); an expert or the shared adapter needs a "
            f"cohort of {min_cohort} (train.min_cohort) who pinned each other, so until this member runs trust "
            "again with a file listing more, the coordinator leaves it out of every round with the others",
            highlight=False,
        )
    return 0


def _check_data(setup: MemberSetup) -> None:
    """The dataset must exist and match the declared embodiment before a SuperNode announces it."""
    embodiment = _embodiment(setup.embodiment)
    try:
        dataset = read_dataset(setup.data_dir, embodiment, setup.embodiment)
    except (DatasetError, FileNotFoundError) as err:
        raise SetupError(
            f"data {setup.data_dir}: {err} (prepare it with `kyodo-member data synth` or point --data at a "
            "LeRobot v3.0 dataset)"
        ) from None
    problems = unit_problems(dataset, embodiment, setup.embodiment)
    if problems:
        raise SetupError(f"data {setup.data_dir}: {units_error(problems, setup.embodiment)}")


def _cmd_start(args: argparse.Namespace) -> int:
    log_to_stderr("kyodo.member")
    try:
        setup = load_setup(args.dir)
        if args.superlink:
            setup.superlink = args.superlink
        if args.root_certificates:
            setup.root_certificates = str(Path(args.root_certificates).expanduser().resolve())
        if args.port is not None:
            setup.runtime_port = args.port
        if args.device:
            setup.device = args.device
        if args.workers is not None:
            setup.workers = args.workers
        preflight(setup, check_data=_check_data)
        warn_unpadded_replies(setup)
        warn_budget_spent(setup)
        if args.dry_run:
            port = setup.runtime_port or free_port()
            print(shlex.join(supernode_command(setup, port)))
            print(f"beside it, answering its tasks with this installation: {shlex.join(executor_command(port))}")
            print(f"node config: {node_config_arg(setup.node_config())}")
            return 0
        wait_for_superlink(setup.superlink, setup.root_certificates, timeout=args.connect_timeout)
        return SuperNodeRunner(setup).run(rejoin_timeout=args.rejoin_timeout)
    except SetupError as err:
        raise CommandError(str(err), code=3) from None


def add_deploy_commands(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """``init`` (keys and member config) and ``start`` (the SuperNode)."""
    init = commands.add_parser("init", help="create this member's keys and config (member.yaml, membership.json)")
    init.add_argument("dir", type=Path, help="the member's directory (created; holds keys, config and state)")
    init.add_argument("--member", required=True, help="the member's name in the consortium")
    init.add_argument("--embodiment", required=True, help="its robot, a name from configs/embodiments.yaml")
    init.add_argument("--data", type=Path, required=True, help="its LeRobot v3.0 dataset directory")
    init.add_argument("--epsilon", type=float, default=8.0, help="privacy budget epsilon (the member's own)")
    init.add_argument("--delta", type=float, default=1e-5, help="privacy budget delta")
    init.add_argument("--no-dp", action="store_true", help="train without DP-SGD (debugging only)")
    init.add_argument(
        "--budget-rounds",
        type=int,
        default=0,
        help="spread the budget over at least this many training rounds, over every run "
        "(0: over the rounds each run's coordinator plans)",
    )
    init.add_argument(
        "--eval-noise-multiplier",
        type=float,
        default=5.0,
        help="noise of the held-out error the node releases under DP (0: release none)",
    )
    init.add_argument(
        "--eval-loss-bound",
        type=float,
        default=0.05,
        help="per-episode held-out error bound of that release (normalised action units)",
    )
    init.add_argument(
        "--device", default="cpu", help="where the node trains: cpu, cuda or cuda:N (checked here and at start)"
    )
    init.add_argument(
        "--workers", type=int, default=1, help="data-parallel DP-SGD processes (with cuda: one per device)"
    )
    init.add_argument(
        "--accountant",
        choices=("rdp", "prv"),
        default="",
        help="the accountant this member's epsilon is counted with, whatever a run asks "
        "(default: each run's privacy.accountant)",
    )
    init.add_argument(
        "--max-noise-multiplier",
        type=float,
        default=0.0,
        help="sit out a round whose planned noise multiplier is above this, whatever a run asks "
        "(0: each run's privacy.max_noise_multiplier)",
    )
    init.add_argument(
        "--min-steps",
        type=int,
        default=0,
        help="sit out a round the budget would shorten below this many steps, whatever a run asks "
        "(0: each run's privacy.min_steps)",
    )
    init.add_argument(
        "--train-reply-after",
        type=float,
        default=0.0,
        help="seconds after a train request arrives before its reply leaves, whatever the work took "
        "(hides the round time, which grows with the data; 0: off)",
    )
    init.add_argument(
        "--eval-reply-after",
        type=float,
        default=0.0,
        help="the same for evaluation replies (the held-out error; 0: off)",
    )
    init.add_argument(
        "--require-secagg",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="decline any round whose update would leave unmasked: no secure aggregation, or a cohort of one or "
        "two for a shard other than this member's embodiment adapter (default: on; --no-require-secagg for debugging)",
    )
    init.add_argument(
        "--require-pinned-keys",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="start only once the other members' identity keys are pinned to the consortium's published file "
        "(kyodo-member trust); without them the coordinator supplies every key (default: on; "
        "--no-require-pinned-keys for debugging)",
    )
    init.add_argument("--superlink", default="", help="HOST:PORT of the consortium's SuperLink")
    init.add_argument("--root-certificates", default="", help="the consortium's CA certificate (ca.pem)")
    init.add_argument("--port", type=int, default=0, help="SuperNode runtime API port (0: a free one at start)")
    init.set_defaults(handler=_cmd_init)

    budget = commands.add_parser(
        "budget", help="change this member's privacy budget (member.yaml and membership.json; keys unchanged)"
    )
    budget.add_argument("dir", type=Path, help="the member's directory (kyodo-member init)")
    budget.add_argument("--epsilon", type=float, default=None, help="new epsilon (not below what the ledger records)")
    budget.add_argument("--delta", type=float, default=None, help="new delta (only before the first ledger entry)")
    budget.add_argument(
        "--budget-rounds", type=int, default=None, help="new pace: at least this many training rounds (0: off)"
    )
    budget.set_defaults(handler=_cmd_budget)

    trust = commands.add_parser(
        "trust",
        help="pin the other members' identity keys to the consortium's published file (audit-consortium.yaml)",
    )
    trust.add_argument("dir", type=Path, help="the member's directory (kyodo-member init)")
    trust.add_argument("consortium_file", type=Path, help="the consortium file the operator publishes to auditors")
    trust.set_defaults(handler=_cmd_trust)

    start = commands.add_parser("start", help="run this member's Flower SuperNode (foreground)")
    start.add_argument("dir", type=Path, help="the member's directory (kyodo-member init)")
    start.add_argument("--superlink", default="", help="override member.yaml: HOST:PORT of the SuperLink")
    start.add_argument("--root-certificates", default="", help="override member.yaml: the consortium's ca.pem")
    start.add_argument("--port", type=int, default=None, help="override member.yaml: runtime API port")
    start.add_argument("--device", default="", help="override member.yaml: cpu, cuda or cuda:N")
    start.add_argument("--workers", type=int, default=None, help="override member.yaml: data-parallel processes")
    start.add_argument(
        "--connect-timeout", type=float, default=60.0, help="seconds to retry a SuperLink that refuses connections"
    )
    start.add_argument(
        "--rejoin-timeout",
        type=float,
        default=90.0,
        help="seconds to retry when the SuperLink refuses a key it accepted before (a lingering old session)",
    )
    start.add_argument(
        "--dry-run",
        action="store_true",
        help="check everything, print the command, start nothing (runtime port 0: a free one, new at each start)",
    )
    start.set_defaults(handler=_cmd_start)


# ----------------------------------------------------------------------------- plumbing

COMMAND_GROUPS: list[Registrar] = [add_data_commands, add_status_command, add_plan_command, add_deploy_commands]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kyodo-member", description="kyodo consortium member node")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for register in COMMAND_GROUPS:
        register(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    handler: Handler = args.handler
    try:
        return handler(args)
    except CommandError as err:
        Console(stderr=True).print(f"[bold red]error:[/] {escape(str(err))}", highlight=False, soft_wrap=True)
        return err.code


if __name__ == "__main__":
    sys.exit(main())
