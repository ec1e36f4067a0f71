"""``kyodo-coordinator status RUN_DIR``: what a run did, from its files only.

Reads the run directory the ServerApp writes (``store/`` manifests, ``rounds.jsonl``), so it
works while a run is in progress, after it ended, and on a copy handed to someone else; it
needs no SuperLink. The store is the truth about what was committed (a round is committed
when HEAD names it); ``rounds.jsonl`` says who trained, declined or failed and how each shard
was aggregated.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from rich import box
from rich.markup import escape
from rich.table import Table

from coordinator.records import committed_record, read_records
from shared_model.shards import is_shard_id
from shared_model.store import Manifest, ShardStore, StoreError


@dataclass
class RunReport:
    run_dir: Path
    head: int | None
    manifests: dict[int, Manifest] = field(default_factory=dict)  # round -> manifest (still stored)
    records: dict[int, dict[str, Any]] = field(default_factory=dict)  # round -> rounds.jsonl record
    planned: int | None = None  # train.rounds of the run's config.yaml (None: not readable)

    @property
    def budgets(self) -> dict[str, float]:
        """Each member's budget as the run was submitted with it (its newest record's
        ``budgets``: the published ones, in a deployment); empty for runs before records had them."""
        for rnd in sorted(self.records, reverse=True):
            budgets = self.records[rnd].get("budgets")
            if isinstance(budgets, dict):
                return {m: float(e) for m, e in budgets.items() if isinstance(e, (int, float))}
        return {}

    @property
    def members(self) -> list[str]:
        names: set[str] = set()
        for rec in self.records.values():
            for key in ("evaluation", "train", "declined", "failed", "sync_bytes", "absent"):
                names.update(rec.get(key) or {})
            for cohort in (rec.get("cohorts") or {}).values():
                names.update(cohort)
        return sorted(n for n in names if not is_shard_id(n))  # "failed" also names shards


def load_report(run_dir: Path | str) -> RunReport:
    """The run's committed rounds and records; raises ``FileNotFoundError`` for a non-run."""
    run_dir = Path(run_dir)
    store_dir = run_dir / "store"
    if not (store_dir / "HEAD").is_file() and not (run_dir / "rounds.jsonl").is_file():
        raise FileNotFoundError(f"{run_dir} is not a run directory (no store/HEAD, no rounds.jsonl)")
    report = RunReport(run_dir=run_dir, head=None, planned=planned_rounds(run_dir))
    if (store_dir / "HEAD").is_file():
        store = ShardStore(store_dir)
        head = store.head()
        report.head = head.round if head else None
        for rnd in store.rounds():
            report.manifests[rnd] = store.manifest(rnd)
    for rec in read_records(run_dir):
        report.records[int(rec["round"])] = rec  # a resumed round's later record wins
    # rounds.jsonl gets a round's line only after its committed model is evaluated (a minute
    # and more deployed); until then the manifest's record says who trained, else status showed
    # a committed round as if no member had.
    for rnd, manifest in report.manifests.items():
        if rnd not in report.records and (committed := committed_record(manifest)) is not None:
            report.records[rnd] = {**committed, "being_evaluated": True}
    return report


def head_round(run_dir: Path) -> int | None:
    """The run's HEAD round (None before its round 0 is committed)."""
    if not (run_dir / "store" / "HEAD").is_file():
        return None
    head = ShardStore(run_dir / "store").head()
    return head.round if head else None


def run_settings(run_dir: Path) -> dict[str, Any]:
    """The settings the run was last submitted with (its ``config.yaml``); {} when it has none
    that read (a run not started yet, or a damaged file)."""
    try:
        settings = yaml.safe_load((run_dir / "config.yaml").read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError):
        return {}
    return settings if isinstance(settings, dict) else {}


def planned_rounds(run_dir: Path) -> int | None:
    """The rounds the run was last submitted for, so that a run that stopped early reads as such."""
    train = run_settings(run_dir).get("train")
    rounds = train.get("rounds") if isinstance(train, dict) else None
    return rounds if isinstance(rounds, int) else None


def rounds_table(report: RunReport) -> Table:
    planned = f" of {report.planned} planned" if report.planned is not None else ""
    # No vertical rules and collapsed padding: at 80 columns (a log, a pipe) the boxed table
    # left the aggregation column one character wide ("a…").
    table = Table(
        title=f"rounds of {report.run_dir} (HEAD: round {report.head}{planned})",
        box=box.SIMPLE_HEAD,
        collapse_padding=True,
        pad_edge=False,
    )
    for col in ("round", "committed", "changed", "aggregation", "trained", "declined", "failed", "MSE", "s"):
        # Only the aggregation kinds may wrap, word by word; the short tokens stay whole.
        table.add_column(
            col,
            justify="left" if col in ("committed", "aggregation") else "right",
            no_wrap=col != "aggregation",
            min_width=12 if col == "aggregation" else None,
        )
    rounds = sorted(set(report.manifests) | set(report.records))
    for rnd in rounds:
        rec = report.records.get(rnd, {})
        manifest = report.manifests.get(rnd)
        parent = report.manifests.get(manifest.parent) if manifest and manifest.parent is not None else None
        changed = (
            "all" if manifest and manifest.parent is None
            else str(sum(manifest.shards[s] != parent.shards.get(s) for s in manifest.shards)) if manifest and parent
            # Its parent's manifest was collected: nothing left to compare with.
            else "? (gc)" if manifest
            else "-"
        )  # fmt: skip
        kinds = sorted(set((rec.get("aggregation") or {}).values()))
        if rec.get("recovered_from_store"):  # the coordinator died between commit and record
            kinds = ["record lost, resumed from store"]
        elif rec.get("evaluation_lost"):  # the same, with the record committed in the manifest
            kinds = [*kinds, "evaluation lost in a crash"]
        evaluation = {**(rec.get("evaluation_same_model") or {}), **(rec.get("evaluation") or {})}
        mse = sum(e["action_mse"] for e in evaluation.values()) / len(evaluation) if evaluation else None
        committed = (
            "HEAD" if rnd == report.head
            else "yes" if manifest
            # A record of a round before the oldest stored manifest: committed, then collected.
            else "yes (gc)" if report.manifests and rnd < min(report.manifests) and rec
            else "no"
        )  # fmt: skip
        table.add_row(
            str(rnd), committed, changed, ", ".join(kinds) or "-",
            str(len(rec.get("train") or {})), str(len(rec.get("declined") or {})),
            str(len([k for k in rec.get("failed") or {} if not is_shard_id(k)])),
            f"{mse:.4f}" if mse is not None else "-", f"{rec['seconds']:.0f}" if "seconds" in rec else "-",
        )  # fmt: skip
    evaluating = [str(r) for r, rec in sorted(report.records.items()) if rec.get("being_evaluated")]
    table.caption = "round 0: " + describe_round_zero(round_zero_source(report))
    if evaluating:
        table.caption += (
            f"; round {', '.join(evaluating)}: committed, its held-out errors not yet in (rounds.jsonl is written "
            "after them; the rest is from the manifest)"
        )
    return table


def round_zero_source(report: RunReport) -> Any:
    """Round 0's ``initial`` from its record, else from its manifest: a run stopped or killed
    after committing round 0 and before evaluating it has no round-0 record yet, and its
    manifest says the same (runs older than the field have neither)."""
    recorded = report.records.get(0, {}).get("initial")
    manifest = report.manifests.get(0)
    if recorded is not None or manifest is None or "initial" not in manifest.extra:
        return recorded
    try:
        return json.loads(manifest.extra["initial"])
    except (TypeError, ValueError):
        return None


def describe_round_zero(source: Any) -> str:
    """Where round 0 came from, from the round-0 record's ``initial``
    (``coordinator.public_checkpoint.initial_source``, ``coordinator.continuation``; runs
    before them did not record one)."""
    if not isinstance(source, dict):
        return "source not recorded"
    kind = source.get("source")
    if kind == "public-checkpoint":
        return f"public checkpoint {source.get('sha256')}"
    if kind == "run":
        return (
            f"continued from round {source.get('round')} of run {source.get('run')} (manifest {source.get('manifest')})"
        )
    if kind == "public-pretraining":
        return (
            f"pretrained on public episodes in the run ({source.get('rounds')} rounds, "
            f"{source.get('episodes')} episodes per embodiment, control rate x{source.get('fps_scale')})"
        )
    return f"random initialisation (model.init_seed {source.get('init_seed')})"


def cohorts_table(report: RunReport, rounds: Sequence[int] | None = None) -> Table:
    table = Table(title="cohorts (who trained which shard)")
    for col in ("round", "shard", "cohort", "aggregated as"):
        table.add_column(col)
    for rnd in sorted(rounds if rounds is not None else report.records):
        rec = report.records.get(rnd, {})
        aggregation = rec.get("aggregation") or {}
        for shard, cohort in sorted((rec.get("cohorts") or {}).items()):
            failed = (rec.get("rejected") or {}).get(shard) or (rec.get("failed") or {}).get(shard)
            how = aggregation.get(shard) or (f"not updated: {failed}" if failed else "not updated")
            table.add_row(str(rnd), shard, ", ".join(cohort), how)
    return table


def shards_table(report: RunReport) -> Table:
    """Per shard: how many versions the stored rounds hold, when it last changed, its object at HEAD."""
    oldest = min(report.manifests, default=0)
    # gc removed the manifests before ``oldest``: a shard's first kept version may be older.
    collected = oldest > 0 and report.manifests[oldest].parent is not None
    title = "shard versions (from the store's manifests"
    title += f"; gc removed those before round {oldest}: + and <= mark what they held)" if collected else ")"
    table = Table(title=title)
    for col in ("shard", "versions", "last changed", "object at HEAD"):
        table.add_column(col, justify="right" if col == "versions" else "left")
    if report.head is None or report.head not in report.manifests:
        return table
    head = report.manifests[report.head]
    for shard in head.shard_order():
        versions: list[tuple[int, str]] = []
        for rnd in sorted(report.manifests):
            oid = report.manifests[rnd].shards.get(shard)
            if oid and (not versions or versions[-1][1] != oid):
                versions.append((rnd, oid))
        unknown_before = collected and bool(versions) and versions[0][0] == oldest
        last = (
            "-" if not versions else f"round {'<= ' if unknown_before and len(versions) == 1 else ''}{versions[-1][0]}"
        )
        table.add_row(shard, f"{len(versions)}{'+' if unknown_before else ''}", last, head.shards[shard][:12])
    return table


def participation_table(report: RunReport, budgets: Mapping[str, float] | None = None) -> Table:
    """Per member and round: trained (T), trained but failed in a later stage (T!: its update
    was lost, its budget spent; T~: part of it was used, e.g. its own adapter's), declined (D),
    failed (F: no update arrived; whether it spent is in its ledger, not here), evaluated only
    (e), absent (-: no node of it answered that round's query).

    Beside what each member's newest receipt says it spent, its budget, so that the operator
    sees who is about to run out without asking the members, and a receipt over it is flagged
    (auditors will fail it): the budget the run's records name (published when the run was
    submitted), else ``budgets`` (the operator's audit-consortium.yaml: published now)."""
    rounds = sorted(r for r in report.records if r > 0)
    table = Table(
        title="member participation (T trained, T! trained then failed: update lost, T~ trained then failed: "
        "part of it used, D declined, F failed: no update arrived, e evaluated only, - absent)"
    )
    table.add_column("member")
    for rnd in rounds:
        table.add_column(f"r{rnd}", justify="center")
    if report.budgets:
        budgets, whose = report.budgets, " / budget published for the run"
    else:
        whose = " / budget published now" if budgets else ""
    spent_column = "ε after last receipt held" + whose
    for col in ("rounds trained", spent_column, "bytes received"):
        table.add_column(col, justify="right")
    for member in report.members:
        cells, trained, received = [], 0, 0
        for rnd in rounds:
            rec = report.records[rnd]
            if member in (rec.get("train") or {}):
                cells.append(_trained_cell(rec, member))
                trained += 1
            elif member in (rec.get("declined") or {}):
                cells.append("D")
            elif member in (rec.get("failed") or {}):
                cells.append("F")
            elif member in (rec.get("evaluation") or {}):
                cells.append("e")
            else:
                cells.append("-")
        epsilon = _newest_receipt_epsilon(report, member)
        for rec in report.records.values():
            received += int((rec.get("sync_bytes") or {}).get(member, 0))
        table.add_row(member, *cells, str(trained), _spent_cell(epsilon, (budgets or {}).get(member)), f"{received:,}")
    return table


def _spent_cell(epsilon: float | None, budget: float | None) -> str:
    spent = f"{epsilon:.3f}" if epsilon is not None else "-"
    if budget is None:
        return spent
    over = epsilon is not None and epsilon > budget
    return f"[red]{spent}/{budget:g} over[/]" if over else f"{spent}/{budget:g}"


def _trained_cell(rec: dict, member: str) -> str:
    """T, or for a member that failed after it trained, whether any shard it trained was still
    updated (a lost shared cohort leaves its own adapter's cohort of one intact)."""
    if member not in (rec.get("failed") or {}):
        return "T"
    own = {shard for shard, cohort in (rec.get("cohorts") or {}).items() if member in cohort}
    return "T~" if own & set(rec.get("updated_shards") or ()) else "T!"


def _newest_receipt_epsilon(report: RunReport, member: str) -> float | None:
    """Epsilon of the member's newest receipt the records hold (by its time): a round's
    training, its evaluation release, or the head the coordinator held from an earlier run
    (``ledger_heads``): a member that only declined in this run still shows what it spent,
    not what its node, perhaps restored from a backup, claims."""
    newest: tuple[str, float] | None = None
    for rnd in sorted(report.records):
        rec = report.records[rnd]
        evaluation = ((rec.get("evaluation") or {}).get(member) or {}).get("receipt")
        candidates = (
            (rec.get("receipts") or {}).get(member),
            json.loads(evaluation) if evaluation else None,
            (rec.get("ledger_heads") or {}).get(member),
        )
        for entry in candidates:
            if isinstance(entry, dict) and isinstance(entry.get("epsilon"), (int, float)):
                seen = (str(entry.get("time", "")), float(entry["epsilon"]))
                newest = seen if newest is None or seen > newest else newest
    return newest[1] if newest else None


def declines_table(report: RunReport) -> Table | None:
    """Why members were absent, sat rounds out, failed, or released no held-out error ("no
    eval", round 0 included), one row per member and reason (None when none did): the
    participation table's -, D and F say only that they did."""
    reasons: dict[tuple[str, str, str], list[int]] = {}
    for rnd in sorted(report.records):
        rec = report.records[rnd]
        kinds = (
            ("absent", "absent"),
            ("declined", "declined"),
            ("failed", "failed"),
            ("no eval", "evaluation_withheld"),
        )
        for kind, key in kinds:
            for member, why in (rec.get(key) or {}).items():
                if not is_shard_id(member):  # a shard's failure is in the cohorts table
                    reasons.setdefault((member, kind, str(why)), []).append(rnd)
    if not reasons:
        return None
    table = Table(title="why members were absent, sat out or failed", box=box.SIMPLE_HEAD, collapse_padding=True)
    for col in ("member", "rounds", "", "reason"):
        table.add_column(col, no_wrap=col != "reason", overflow="fold")
    for (member, kind, why), rounds in sorted(reasons.items(), key=lambda item: (item[0][0], item[1])):
        table.add_row(member, ",".join(map(str, rounds)), kind, escape(why))
    return table


def status_tables(
    run_dir: Path | str, rounds: Sequence[int] | None = None, budgets: Mapping[str, float] | None = None
) -> list[Table]:
    """Every table ``status`` prints; raises ``FileNotFoundError`` or ``StoreError``, and
    ``LookupError`` for a round the run never committed (it printed an empty cohorts table).
    ``budgets``: members' published epsilons, for the participation table."""
    report = load_report(run_dir)
    known = set(report.manifests) | set(report.records)
    missing = sorted(set(rounds or ()) - known)
    if missing:
        raise LookupError(
            f"{run_dir} has no round {missing[0]} (its rounds: {', '.join(map(str, sorted(known))) or 'none yet'})"
        )
    tables = [
        rounds_table(report),
        cohorts_table(report, rounds),
        shards_table(report),
        participation_table(report, budgets),
    ]
    declines = declines_table(report)
    return [*tables, declines] if declines is not None else tables


__all__ = ["RunReport", "StoreError", "load_report", "status_tables"]
