"""``kyodo-member``: the member's command line.

Commands are grouped (``kyodo-member data synth``, ``kyodo-member data inspect``); each
group registers itself through a function in :data:`COMMAND_GROUPS`, so further groups
(``init``, ``start``, ``status``) are added by appending one registrar, without touching
the parser plumbing. Every handler returns the process exit code; expected failures (bad
data, unknown embodiment) print one clear line on stderr, never a traceback.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from member_node.lerobot import DatasetError, LeRobotDataset, read_dataset
from member_node.status import add_status_command
from member_node.synthetic import generate_dataset
from shared_model.config import ConfigError, EmbodimentConfig, load_config

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
            args.out, args.embodiment, embodiment, args.episodes, args.seconds, args.seed, overwrite=args.force
        )
    except FileExistsError as err:
        hint = "" if args.force else " (--force replaces an existing dataset)"
        raise CommandError(f"{err}{hint}") from None
    except ValueError as err:
        raise CommandError(str(err)) from None
    elapsed = time.perf_counter() - started
    dataset = read_dataset(root, embodiment, args.embodiment)
    Console().print(
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
    console.print(_summary_table(dataset, embodiment))
    # On its own line, unwrapped: it is meant to be copied into ledgers and compared.
    console.print(f"fingerprint {fingerprint}", soft_wrap=True, highlight=False)
    return 0


def _summary_table(dataset: LeRobotDataset, emb: EmbodimentConfig) -> Table:
    lengths = [ep.length for ep in dataset.episodes]
    table = Table(title=f"LeRobot dataset {dataset.root}", show_header=False)
    table.add_column("field", style="bold")
    table.add_column("value")
    rows = [
        ("format", str(dataset.info.get("codebase_version"))),
        ("embodiment", f"{dataset.embodiment_name} ({emb.kind})"),
        ("episodes", str(len(dataset.episodes))),
        ("frames", str(dataset.num_frames)),
        ("episode length", f"{min(lengths)}..{max(lengths)} frames" if lengths else "-"),
        ("fps", str(dataset.fps)),
        ("state / env state", f"{emb.state_dim} / {emb.env_state_dim}"),
        ("action", str(emb.action_dim)),
        ("image features", str(emb.image_feature_dim)),
        ("data files", str(len(dataset.data_files))),
    ]
    for key, value in rows:
        table.add_row(key, value)
    return table


def add_data_commands(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """``data synth`` and ``data inspect``."""
    data = commands.add_parser("data", help="create and check robot datasets (LeRobot v3.0)")
    sub = data.add_subparsers(dest="data_command", required=True, metavar="COMMAND")

    synth = sub.add_parser("synth", help="generate a synthetic dataset for one embodiment")
    synth.add_argument("--embodiment", required=True, help="name from configs/embodiments.yaml")
    synth.add_argument("--episodes", type=int, default=60)
    synth.add_argument("--seed", type=int, default=0)
    synth.add_argument("--seconds", type=float, default=4.0, help="nominal episode length")
    synth.add_argument("--out", type=Path, required=True, help="dataset directory to create")
    synth.add_argument("--force", action="store_true", help="replace an existing dataset at --out")
    synth.set_defaults(handler=_cmd_data_synth)

    inspect = sub.add_parser("inspect", help="validate a dataset against an embodiment and summarise it")
    inspect.add_argument("dir", type=Path)
    inspect.add_argument("--embodiment", required=True, help="name from configs/embodiments.yaml")
    inspect.set_defaults(handler=_cmd_data_inspect)


# ----------------------------------------------------------------------------- plumbing

COMMAND_GROUPS: list[Registrar] = [add_data_commands, add_status_command]


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
