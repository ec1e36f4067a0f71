"""``kyodo-audit``: the auditor's command line.

Commands:

* ``verify``: every check (``privacy.audit.verify``) on members' ledgers, a run directory
  and the consortium file; rich tables for people, ``--json`` for machines.
* ``report``: the same checks, written as one self-contained HTML file with plots and a
  Markdown summary.
* ``consortium``: assemble the consortium file from members' published ``member.json``.
* ``canary``: the empirical one-run audit of a member's DP-SGD training.

Exit codes: 0 every check holds (canary: the bound does not exceed the claim); 1 a check
failed (canary: the bound exceeds the claim); 2 the inputs could not be audited at all
(missing directory, unreadable or invalid consortium file, bad arguments).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

from rich import box
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from privacy.audit.consortium import ConsortiumError, dump_consortium, from_nodes
from privacy.audit.findings import CHECKS, FAIL, AuditResult
from privacy.audit.inputs import InputError
from privacy.audit.report import entries_cell, entries_head, member_notes

EXIT_OK, EXIT_FAILED, EXIT_UNUSABLE = 0, 1, 2


def _error(message: str) -> int:
    Console(stderr=True).print(f"[bold red]error:[/] {escape(message)}", highlight=False, soft_wrap=True)
    return EXIT_UNUSABLE


def _run_audit(args: argparse.Namespace) -> AuditResult | int:
    from privacy.audit.verify import audit

    try:
        return audit(args.ledgers, args.rounds, args.consortium)
    except (ConsortiumError, InputError) as exc:
        return _error(str(exc))


def _fmt(value: float | None, digits: int = 4) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def print_result(result: AuditResult, console: Console, verbose: bool = False) -> None:
    """Tables a person reads top-down: checks, members, rounds, entries, then every finding."""
    checks = Table(title=f"kyodo audit of {result.scope}", title_justify="left")
    for col in ("check", "result", "what it establishes"):
        checks.add_column(col)
    for name, count in result.check_status().items():
        checks.add_row(name, "[green]pass[/]" if count == 0 else f"[red]FAIL ({count})[/]", CHECKS[name])
    console.print(checks)

    members = Table(title="members", title_justify="left")
    for col in (
        "member",
        "budget ε / δ",
        entries_head(result),
        "ε recorded",
        "ε recomputed",
        "within budget",
        "status",
    ):
        members.add_column(col, justify="left" if col in ("member", "status") else "right")
    for name, m in sorted(result.members.items()):
        extra = "" if m.method == "rdp" or m.epsilon_rdp is None else f" (RDP {m.epsilon_rdp:.4f})"
        members.add_row(
            name,
            f"{m.epsilon_budget:g} / {m.delta_budget:g}",
            entries_cell(result, m),
            _fmt(m.epsilon_recorded),
            f"{_fmt(m.epsilon_recomputed)} {m.method.upper()}{extra}",
            "[green]yes[/]" if m.within_budget else "[red]NO[/]",
            "[green]ok[/]" if m.ok else "[red]FAIL[/]",
        )
    members.caption = "\n".join(member_notes(result)) or None
    members.caption_justify = "left"
    console.print(members)

    if result.rounds:
        names = sorted({m for r in result.rounds for m in r.members})
        rounds = Table(title="rounds: what each member did (receipt state)", title_justify="left")
        rounds.add_column("round", justify="right")
        rounds.add_column("updated", justify="right")
        for name in names:
            rounds.add_column(name)
        for r in result.rounds:
            if r.recovered:
                rounds.add_row(str(r.round), "?", *["record rebuilt from store"] + [""] * (len(names) - 1))
                continue
            cells = []
            for name in names:
                info = r.members.get(name)
                if info is None:
                    cells.append("")
                    continue
                colour = {"ok": "green", "missing": "red", "invalid": "red"}.get(info["receipt"], "white")
                cells.append(f"{info['state']} ([{colour}]{info['receipt']}[/])")
            rounds.add_row(str(r.round), str(len(r.updated_shards)), *cells)
        console.print(rounds)

    if verbose or not result.ok:
        for member in sorted({e.member for e in result.entries}):
            console.print(_entries_table(member, [e for e in result.entries if e.member == member]))

    for f in result.findings:
        style = "red" if f.severity == FAIL else "dim"
        console.print(f"[{style}]{f.severity.upper()} {escape(f'[{f.check}]')} {escape(f.text())}[/]", soft_wrap=True)
    notes = len(result.findings) - len(result.failures)
    # A note can need action (a published budget out of date): the last line says there are some.
    read_them = f", {notes} note(s) above to read" if notes else ""
    verdict = (
        f"[bold green]PASS[/]: every check holds{read_them}"
        if result.ok
        else f"[bold red]FAIL[/]: {len(result.failures)} problem(s){read_them}"
    )
    checked = (
        f"{len(result.members)} ledgers; give --rounds RUN_DIR to check a run's receipts, coverage and store"
        if result.ledgers_only
        else f"{len(result.rounds)} rounds, store HEAD round {result.head_round}, "
        f"{result.objects_verified} objects verified"
    )
    console.print(f"{verdict} ({len(result.entries)} ledger entries, {checked})")


def _entries_table(member: str, rows: list) -> Table:
    """One member's ledger entries. Numbers never wrap or get cut; the run id and the state
    fold instead, so the table stays readable at 80 columns (a pipe, a CI log)."""
    table = Table(title=f"ledger entries of {member}", title_justify="left", box=box.SIMPLE_HEAD, collapse_padding=True)
    for col in ("#", "run", "round", "steps", "σ", "q", "ε recorded", "ε recomputed", "state"):
        wraps = col in ("run", "state")
        table.add_column(
            col,
            justify="left" if wraps else "right",
            no_wrap=not wraps,
            overflow="fold" if col == "run" else "ellipsis",  # a run id has no spaces; a state wraps at words
            min_width=10 if col == "state" else None,  # "evaluation" whole
        )
    for e in rows:
        table.add_row(
            str(e.index),
            escape(e.run),
            "-" if e.round is None else str(e.round),
            "-" if e.steps is None else str(e.steps),
            _fmt(e.noise_multiplier, 3),
            _fmt(e.sample_rate, 3),
            _fmt(e.recorded),
            f"{_fmt(e.recomputed)} {e.method.upper()}",
            ("[green]ok[/]" if e.ok else "[red]NO[/]") + (f" {escape(e.status)}" if e.status else ""),
        )
    return table


def _cmd_verify(args: argparse.Namespace) -> int:
    result = _run_audit(args)
    if isinstance(result, int):
        return result
    if args.json:
        sys.stdout.write(json.dumps(result.to_json(), indent=2) + "\n")
    else:
        print_result(result, Console(), verbose=args.verbose)
    return EXIT_OK if result.ok else EXIT_FAILED


def _cmd_report(args: argparse.Namespace) -> int:
    from privacy.audit.report import write_report

    result = _run_audit(args)
    if isinstance(result, int):
        return result
    html_path, md_path = write_report(result, args.out)
    (Path(args.out) / "audit.json").write_text(json.dumps(result.to_json(), indent=2) + "\n", encoding="utf-8")
    console = Console()
    verdict = "[bold green]PASS[/]" if result.ok else f"[bold red]FAIL[/] ({len(result.failures)} problem(s))"
    console.print(f"{verdict}: report {html_path}, summary {md_path}, data {Path(args.out) / 'audit.json'}")
    return EXIT_OK if result.ok else EXIT_FAILED


def _cmd_consortium(args: argparse.Namespace) -> int:
    try:
        coordinator = args.coordinator_key
        if args.coordinator_from:
            run_file = Path(args.coordinator_from) / "run.json"
            try:
                coordinator = str(json.loads(run_file.read_text(encoding="utf-8"))["coordinator_public_key"])
            except (KeyError, TypeError, ValueError) as exc:
                return _error(f"{run_file} names no coordinator_public_key ({exc})")
        consortium = from_nodes(args.from_nodes, name=args.name, coordinator_public_key=coordinator)
        path = dump_consortium(consortium, args.output)
    except (ConsortiumError, OSError) as exc:
        return _error(str(exc))
    Console().print(
        f"wrote {path}: {len(consortium.members)} members ({', '.join(sorted(consortium.members))}); "
        "each member should confirm its own key and budget before the file is trusted"
    )
    return EXIT_OK


def _cmd_canary(args: argparse.Namespace) -> int:
    from privacy.audit.canary import CanarySetup, run_canary_audit

    setup = CanarySetup(
        embodiment=args.embodiment,
        model=args.model,
        data_dir=args.data,
        episodes=args.episodes,
        canaries=args.canaries,
        guesses=args.guesses,
        steps=args.steps,
        batch_size=args.batch_size,
        lr=args.lr,
        dp=not args.no_dp,
        epsilon=args.epsilon,
        delta=args.delta,
        noise_multiplier=args.noise_multiplier,
        max_grad_norm=args.max_grad_norm,
        shards=args.shards.split(",") if args.shards else [],
        confidence=args.confidence,
        seed=args.seed,
        deterministic=args.deterministic,
    )
    try:
        import torch

        torch.set_num_threads(args.threads)
        result = run_canary_audit(setup)
    except (ValueError, OSError) as exc:
        return _error(str(exc))
    if args.json:
        sys.stdout.write(json.dumps(result.to_json(), indent=2) + "\n")
    else:
        table = Table(title="canary audit (Steinke, Nasr, Jagielski 2023: one training run)", title_justify="left")
        table.add_column("quantity")
        table.add_column("value", justify="right")
        rows = [
            ("embodiment / model", f"{args.embodiment} / {args.model}"),
            ("member's training episodes", str(result.training_episodes)),
            ("canaries (included)", f"{args.canaries} ({result.included})"),
            ("training", "DP-SGD" if setup.dp else "non-private"),
            ("steps, sample rate q", f"{result.steps}, {result.sample_rate:.4f}"),
            ("noise multiplier σ", _fmt(result.noise_multiplier, 4)),
            ("guesses r / correct", f"{result.guesses} / {result.correct}"),
            ("claimed ε (node accountant)", _fmt(result.claimed_epsilon, 4) if setup.dp else "∞ (non-private)"),
            # Up to ~1% above the node's value: dp-accounting's series at fractional orders
            # is conservative (privacy.audit.accounting); `verify` settles such gaps with PLD.
            ("claimed ε (dp-accounting RDP, conservative)", _fmt(result.claimed_epsilon_dp_accounting, 4)),
            (f"empirical ε lower bound ({args.confidence:.0%})", f"{result.epsilon_lower_bound:.4f}"),
            ("seconds", f"{result.seconds:.1f}"),
        ]
        for row in rows:
            table.add_row(*row)
        console = Console()
        console.print(table)
        if not setup.dp:
            console.print("non-private training: no claim to check; the bound shows what the audit can detect here")
        elif result.consistent:
            console.print("[green]consistent[/]: the empirical lower bound does not exceed the claimed ε")
        else:
            console.print("[bold red]VIOLATION[/]: the training leaks more than its claimed ε")
    return EXIT_OK if result.consistent else EXIT_FAILED


def _audit_inputs(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--ledgers",
        required=True,
        help="members' ledgers: <member>/ledger.jsonl, nodes/<member>/ledger.jsonl or <member>.jsonl",
    )
    parser.add_argument(
        "--rounds",
        default=None,
        help="the coordinator's run directory (run.json, rounds.jsonl, store/); without it, the ledgers alone: "
        "every member's budget over every run, no receipts, coverage or store",
    )
    parser.add_argument("--consortium", required=True, help="consortium file (YAML or JSON): members, keys, budgets")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="kyodo-audit",
        description="Audit kyodo privacy ledgers and federated runs, trusting only members' public keys and mathematics.",
    )
    commands = parser.add_subparsers(dest="command", required=True)

    verify = commands.add_parser("verify", help="check signatures, chains, accounting, budgets, receipts and the store")
    _audit_inputs(verify)
    verify.add_argument("--json", action="store_true", help="print the full result as JSON (for machines)")
    verify.add_argument("--verbose", "-v", action="store_true", help="also list every ledger entry when all is well")
    verify.set_defaults(handler=_cmd_verify)

    report = commands.add_parser("report", help="verify and write report.html (plots embedded) and report.md")
    _audit_inputs(report)
    report.add_argument("--out", required=True, help="directory for report.html, report.md and audit.json")
    report.set_defaults(handler=_cmd_report)

    consortium = commands.add_parser("consortium", help="assemble the consortium file from members' member.json")
    consortium.add_argument("--from-nodes", required=True, help="directory of member state dirs (RUN_DIR/nodes)")
    consortium.add_argument("-o", "--output", required=True, help="consortium file to write (.yaml or .json)")
    consortium.add_argument("--name", default="", help="consortium name shown in reports")
    consortium.add_argument(
        "--coordinator-key",
        default="",
        help="the coordinator's published Ed25519 public key (hex): rounds must carry its signature",
    )
    consortium.add_argument(
        "--coordinator-from",
        default="",
        help="take that key from RUN_DIR/run.json (the local demo, where you run the coordinator)",
    )
    consortium.set_defaults(handler=_cmd_consortium)

    canary = commands.add_parser("canary", help="empirical one-run audit of a member's DP-SGD training with canaries")
    canary.add_argument("--embodiment", default="so100", help="the member's robot (configs/embodiments.yaml)")
    canary.add_argument("--model", default="tiny", help="model preset (configs/model)")
    canary.add_argument("--data", default=None, help="the member's LeRobot dataset (default: synthetic episodes)")
    canary.add_argument("--episodes", type=int, default=60, help="synthetic episodes when --data is not given")
    canary.add_argument("--canaries", type=int, default=100, help="m: canary episodes, each included with prob. 1/2")
    canary.add_argument("--guesses", type=int, default=40, help="r (even): half guessed in, half out")
    canary.add_argument("--steps", type=int, default=400, help="DP-SGD steps (as CanarySetup)")
    canary.add_argument("--batch-size", type=int, default=32, help="expected batch: q = batch / episodes")
    canary.add_argument("--lr", type=float, default=1e-3)
    canary.add_argument("--epsilon", type=float, default=8.0, help="the member's budget: sigma is planned to reach it")
    canary.add_argument("--delta", type=float, default=1e-5)
    canary.add_argument("--noise-multiplier", type=float, default=0.0, help="use this sigma instead of planning it")
    canary.add_argument(
        "--max-grad-norm", type=float, default=None, help="clipping norm (default: privacy.max_grad_norm)"
    )
    canary.add_argument("--shards", default="", help="comma-separated shards to train (default: adapters + experts)")
    canary.add_argument("--no-dp", action="store_true", help="train without DP (shows the audit's power)")
    canary.add_argument("--confidence", type=float, default=0.95)
    canary.add_argument("--seed", type=int, default=0, help="canaries, inclusion coins, window choice")
    canary.add_argument("--deterministic", action="store_true", help="also seed DP noise and sampling (reproducible)")
    canary.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    canary.add_argument("--json", action="store_true")
    canary.set_defaults(handler=_cmd_canary)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.handler(args)


if __name__ == "__main__":
    raise SystemExit(main())
