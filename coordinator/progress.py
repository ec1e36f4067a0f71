"""What the operator sees: a progress bar per round and tables of cohorts, losses and errors."""

from __future__ import annotations

import json
from collections import defaultdict

from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from coordinator.planner import RoundPlan
from coordinator.rounds import RoundResult
from shared_model.protocol import EvaluateReply
from shared_model.shards import is_shard_id
from shared_model.text import shortened

STAGES = ("query", "plan", "train + aggregate", "evaluate")


def make_progress(console: Console) -> Progress:
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        TextColumn("{task.completed}/{task.total} {task.fields[stage]}"),
        TimeElapsedColumn(),
        console=console,
        transient=False,
    )


def cohort_table(plan: RoundPlan, updated: list[str] | None = None) -> Table:
    """Cohorts grouped by shard kind; expert shards listed per layer to stay readable. With
    ``updated`` (after the round), the caption also says which planned shards the round could
    not update: the table is the plan, and a member that failed changes what happened."""
    table = Table(title=f"Round {plan.round}: cohorts", show_lines=False)
    table.add_column("shard")
    table.add_column("cohort")
    experts: dict[str, list[str]] = defaultdict(list)
    for shard, cohort in plan.cohorts.items():
        if shard.startswith("expert/"):
            _, layer, expert = shard.split("/")
            experts[", ".join(cohort)].append(f"{layer}/{expert}")
        else:
            table.add_row(shard, ", ".join(cohort))
    for cohort, shards in sorted(experts.items()):
        table.add_row(f"expert {' '.join(shards)}", cohort)
    captions = []
    if plan.skipped:
        captions.append(f"{len(plan.skipped)} shards not planned this round (rotation or cohort too small)")
    missed = sorted(set(plan.cohorts) - set(updated)) if updated is not None else []
    if missed:
        captions.append(f"{len(missed)} planned shards not updated ({shortened(missed, 4)}): see the warnings above")
    if captions:
        table.caption = "; ".join(captions)
    return table


def round_table(
    result: RoundResult,
    epsilons: dict[str, tuple[float, float]] | None = None,
    held: dict[str, float] | None = None,
) -> Table:
    """Per member: shards, steps run, loss, held-out error and privacy spent after the round.

    ``epsilons`` maps member -> (spent, budget) as the member reported in ``query``; the
    spent value of a member that trained comes from its signed receipt instead, and of one
    that did not from the newest receipt the coordinator holds (``held``): a node restored
    from a backup reports what its rolled-back ledger counts, less than it signed for.
    """
    table = Table(title=f"Round {result.round}: members ({result.seconds:.1f}s)")
    for col in ("member", "shards", "steps", "train loss", "held-out MSE", "held-out MAE", "ε spent / budget"):
        table.add_column(col, justify="right" if col != "member" else "left")
    members = sorted(set(result.plan.members) | set(result.evaluation) | set(result.failed) | set(result.declined))
    for member in members:
        if is_shard_id(member):  # ``failed`` also names the shards the round could not update
            continue
        reply = result.train.get(member)
        ev = result.evaluation.get(member)
        receipt = result.receipts.get(member)
        if reply:
            loss = f"{reply.loss:.4f}" if reply.loss == reply.loss else "private"
        elif member in result.declined:
            loss = "[yellow]declined"
        else:
            loss = "[red]failed" if member in result.failed else "-"
        budget = epsilons.get(member, (None, None))[1] if epsilons else None
        claimed = epsilons.get(member, (None, None))[0] if epsilons else None
        spent = receipt["epsilon"] if receipt else (held or {}).get(member, claimed)
        if ev and ev.receipt:  # the evaluation's release came after training: its receipt is the latest spend
            spent = json.loads(ev.receipt)["epsilon"]
        # no spaces: at 80 columns "12.23 / 16" wrapped after the "/" and lost the budget
        eps = "no DP" if reply and not receipt else (f"{spent:.2f}/{budget:g}" if spent is not None and budget else "-")
        if member in result.failed and not receipt and eps != "-":
            # A reply that failed after training took this round's receipt with it: the member
            # spent at least this, likely more (a fault test read 0.79 where its ledger said 2.0).
            eps = f">={eps}"
        table.add_row(
            member,
            str(len(result.plan.shards_of(member))),
            str(reply.steps) if reply else "-",
            loss,
            f"{ev.action_mse:.4f}" if ev else "-",  # under DP: the member's noised release
            ("private" if ev.receipt else f"{ev.action_mae:.4f}") if ev else "-",
            eps,
        )
    if result.declined:
        table.caption = "; ".join(f"{m} sat out: {reason}" for m, reason in sorted(result.declined.items()))
    return table


def summary_table(history: list[tuple[int, dict[str, EvaluateReply]]]) -> Table:
    """Held-out action MSE (normalised) per member after every round; round 0 is the start."""
    members = sorted({m for _, ev in history for m in ev})
    table = Table(title="Held-out action error (MSE, normalised units) by round")
    table.add_column("round", justify="right")
    for m in members:
        table.add_column(m, justify="right")
    # "-": the member released no held-out error that round (withheld under DP, or absent)
    table.add_column("mean", justify="right", style="bold", no_wrap=True)
    for rnd, ev in history:
        values = [ev[m].action_mse if m in ev else None for m in members]
        present = [v for v in values if v is not None]
        mean = f"{sum(present) / len(present):.4f}" if present else "withheld"
        if present and len(present) < len(members):
            # DP members release on their own schedules, so a round's mean is over whoever
            # released: say over how many, or two rounds' means read as comparable.
            mean += f" ({len(present)} of {len(members)})"
        table.add_row(str(rnd), *[f"{v:.4f}" if v is not None else "-" for v in values], mean)
    return table
