"""A whole federated run: initial model, initial evaluation, then ``train.rounds`` rounds."""

from __future__ import annotations

import json
import logging
import math
import re
import secrets
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from flwr.serverapp import Grid
from rich.console import Console

from coordinator.continuation import earlier_round, import_round, released_for_model, same_model_evaluations
from coordinator.progress import STAGES, cohort_table, make_progress, round_table, summary_table
from coordinator.public_checkpoint import initial_source, load_checkpoint, public_checkpoint
from coordinator.records import append_record, committed_record, earlier_runs_records, read_records
from coordinator.rounds import RoundResult, RoundRunner
from coordinator.run_lock import holding_run
from coordinator.run_state import RunState, failpoint
from coordinator.run_status import describe_round_zero
from coordinator.stop_request import clear_stop_request, stop_requested
from coordinator.sync import ModelSync
from privacy.keys import load_or_create_signing_key, public_key_hex
from privacy.round_signature import sign_round
from shared_model.config import KyodoConfig, to_yaml
from shared_model.policy import Policy
from shared_model.protocol import EvaluateReply
from shared_model.store import ROUND_RECORD_KEY, Manifest, StoreError

log = logging.getLogger("kyodo.coordinator")


@dataclass
class RunSummary:
    out_dir: Path
    history: list[tuple[int, dict[str, EvaluateReply]]] = field(default_factory=list)
    results: list[RoundResult] = field(default_factory=list)

    def mean_mse(self, index: int) -> float | None:
        """Mean held-out error of the members that released one (None when none did)."""
        ev = self.history[index][1]
        return sum(r.action_mse for r in ev.values()) / len(ev) if ev else None


def _fmt(mse: float | None) -> str:
    return "withheld by every member" if mse is None else f"{mse:.4f}"


def initial_model(cfg: KyodoConfig) -> dict[str, torch.Tensor]:
    """The round-0 model: the published public checkpoint (``public.checkpoint``), or one
    pretrained on public data in this process (``public.rounds`` > 0; both in
    ``coordinator.public_checkpoint``), else the policy's deterministic initialisation from
    ``model.init_seed``."""
    if cfg.public.checkpoint:
        return load_checkpoint(cfg)
    if cfg.public.rounds > 0:
        return public_checkpoint(cfg)
    return {k: v.detach().clone() for k, v in Policy(cfg.model, cfg.embodiments).state_dict().items()}


def _commit_round_zero(cfg: KyodoConfig, state: RunState, run_id: str) -> Manifest:
    """Commit round 0, saying in its manifest where it came from.

    An earlier run's HEAD (``continue_from``) is taken object by object and never loaded.
    Otherwise this is the one time the whole model is in RAM: the policy's initialisation,
    or the public checkpoint (imported, public.checkpoint, or pretrained here,
    public.rounds), written shard by shard and dropped; from here on the coordinator reads
    shards from the store."""
    if cfg.continue_from:
        earlier = earlier_round(cfg)
        objects = import_round(state, earlier)
        extra = {"run": run_id, "initial": json.dumps(earlier.source(), sort_keys=True)}
        log.info("round 0 is round %d of run %s (%s)", earlier.manifest.round, earlier.run_id, earlier.run_dir)
        return state.commit_initial_objects(objects, extra)
    extra = {"run": run_id, "initial": json.dumps(initial_source(cfg), sort_keys=True)}
    return state.commit_initial(initial_model(cfg), extra)


def _record(result: RoundResult, cfg: KyodoConfig, sync_bytes: dict[str, int], heads: dict[str, dict]) -> dict:
    """What the round did (cohorts, receipts, aggregation, updated shards): committed with the
    round's manifest before HEAD moves, so a coordinator that dies before it appends the line
    to ``rounds.jsonl`` loses only the evaluation, never the receipts."""
    return {
        "round": result.round,
        "secure_aggregation": cfg.secagg.enabled,
        "rejected": result.rejected,
        "sync_bytes": sync_bytes,
        "aggregation": result.aggregation,
        "weighting": result.weighting,
        "cohorts": result.plan.cohorts,
        "skipped": len(result.plan.skipped),
        "updated_shards": result.updated_shards,
        "failed": result.failed,
        "declined": result.declined,
        "absent": result.absent,
        # The budgets the run was submitted with (published ones, in a deployment): status sets
        # each member's spend against the budget in force then, not against today's.
        "budgets": {m.name: m.epsilon for m in cfg.federation.members},
        "receipts": result.receipts,
        "ledger_heads": heads,
        "train": {
            m: {"loss": r.loss if r.loss == r.loss else None, "num_examples": r.num_examples, "steps": r.steps}
            for m, r in result.train.items()
        },
    }


def _evaluation_entry(reply: EvaluateReply) -> dict:
    """One member's evaluation as the round record keeps it. A private release (with its
    receipt, which the auditor matches to the member's ledger) has no MAE: None, not NaN."""
    entry: dict = {"action_mse": reply.action_mse, "num_examples": reply.num_examples}
    entry["action_mae"] = reply.action_mae if math.isfinite(reply.action_mae) else None
    if reply.receipt:
        entry["receipt"] = reply.receipt
    return entry


def _replies(entries: dict) -> dict[str, EvaluateReply]:
    """Recorded held-out errors (``_evaluation_entry``'s form) as the summary keeps them."""
    return {
        member: EvaluateReply(
            member,
            int(entry.get("num_examples") or 0),
            float(entry["action_mse"]),
            float("nan") if entry.get("action_mae") is None else float(entry["action_mae"]),
        )
        for member, entry in entries.items()
        if isinstance(entry, dict) and isinstance(entry.get("action_mse"), (int, float))
    }


def _recorded_evaluations(records: list[dict], before: int) -> list[tuple[int, dict[str, EvaluateReply]]]:
    """Each recorded round's held-out errors (rounds < ``before``), those carried for round 0 included."""
    history: dict[int, dict[str, EvaluateReply]] = {}
    for record in records:
        rnd = record.get("round")
        if not isinstance(rnd, int) or rnd >= before:
            continue
        history[rnd] = {
            **_replies(record.get("evaluation_same_model") or {}),
            **_replies(record.get("evaluation") or {}),
        }
    return sorted(history.items())


def _evaluation(result: RoundResult) -> dict:
    return {
        "evaluation": {m: _evaluation_entry(e) for m, e in result.evaluation.items()},
        "seconds": round(result.seconds, 3),
    }


def _round_zero_model_evaluations(cfg: KyodoConfig, source: dict) -> dict[str, dict]:
    """A continued run's round 0 is the earlier run's HEAD: what its members released for it."""
    if source.get("source") != "run":
        return {}
    return same_model_evaluations(Path(cfg.continue_from).expanduser(), source["run"], source["round"])


def _unchanged_model_evaluations(state: RunState, manifest: Manifest, previous: dict, run_id: str) -> dict[str, dict]:
    """A round that changed no shard (nobody could train, or every shard was skipped) left the
    model of the round before: what members released for that one."""
    if manifest.parent is None or previous.get("round") != manifest.parent:
        return {}
    try:
        parent = state.store.manifest(manifest.parent)
    except StoreError:  # collected: then nothing is known to be the same
        return {}
    if parent.shards != manifest.shards:
        return {}
    return released_for_model(previous, run_id)


def _evaluate(runner: RoundRunner, rnd: int, same_model: dict[str, dict]) -> tuple[dict[str, EvaluateReply], dict]:
    """Held-out errors of the round's model: the members that released one for this very
    model already are not asked again (each release spends a DP member's budget; the number
    is the consortium's already), their release is carried; the rest are asked."""
    members = {m.name for m in runner.members.values()}
    carried = {m: e for m, e in same_model.items() if m in members}
    asked = runner.evaluate(rnd, [node for node, m in runner.members.items() if m.name not in carried])
    return asked, carried


def _carried_note(carried: dict[str, dict]) -> str:
    return f"the held-out errors {', '.join(sorted(carried))} released for that model are carried, not released again"


def _heads_from_earlier_runs(runner: RoundRunner, cfg: KyodoConfig, out_dir: Path) -> None:
    """Members' ledger heads from the consortium's earlier runs beside this one.

    Only for members pinned to a ledger key (a deployment's consortium), and only receipts
    that key signed: simulated runs give every member fresh state, so their old receipts
    name entries of ledgers that no longer exist."""
    keys = {m.name: m.ledger_public_key for m in cfg.federation.members if m.ledger_public_key}
    if keys:
        for records in earlier_runs_records(out_dir):
            runner.restore_ledger_heads(records, keys=keys)


def _recover_record(out_dir: Path, head: Manifest, key: Ed25519PrivateKey, run_id: str) -> None:
    """The coordinator died after moving HEAD, before writing the round's line: write it from
    the record committed with the manifest (older runs' manifests lack it: a marker only)."""
    committed = committed_record(head)
    if committed is not None:
        record = {**committed, "evaluation": {}, "evaluation_lost": True}
    else:
        record = {"round": head.round, "recovered_from_store": True}
    append_record(out_dir, _signed(record, key, run_id, head))


def _signed(record: dict, key: Ed25519PrivateKey, run_id: str, manifest: Manifest) -> dict:
    """The record with the coordinator's signature on the round's manifest (``privacy.round_signature``)."""
    return {**record, "coordinator": sign_round(key, run_id, manifest.round, manifest.digest, record).to_dict()}


def _coordinator_key_path(cfg: KyodoConfig) -> Path:
    return Path(cfg.coordinator_key) if cfg.coordinator_key else Path(cfg.out_dir) / "coordinator_ed25519.pem"


def _run_id(out_dir: Path, coordinator_public_key: str) -> str:
    """The run id members' ledgers key their entries by: kept in ``run.json`` so a resumed
    run is the same run (a member never trains one of its rounds twice). ``run.json`` also
    names the key that signs the run's rounds (auditors take it from the consortium file;
    this copy is for the local demo and for operators to publish)."""
    path = out_dir / "run.json"
    data = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
    if "run" not in data:
        data["run"] = f"{re.sub(r'[^A-Za-z0-9_.-]', '-', out_dir.name)[:40]}-{secrets.token_hex(4)}"
    if data.get("coordinator_public_key") != coordinator_public_key:
        path.write_text(json.dumps({**data, "coordinator_public_key": coordinator_public_key}), encoding="utf-8")
    return str(data["run"])


def run_federation(cfg: KyodoConfig, grid: Grid, console: Console | None = None) -> RunSummary:
    out_dir = Path(cfg.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    with holding_run(out_dir):
        return _run_federation(cfg, grid, console or Console(), out_dir)


def _run_federation(cfg: KyodoConfig, grid: Grid, console: Console, out_dir: Path) -> RunSummary:
    key = load_or_create_signing_key(_coordinator_key_path(cfg))
    run_id = _run_id(out_dir, public_key_hex(key))
    state = RunState(cfg, out_dir)
    resumed = state.resume()
    # after the resume check: a resume refused for another model must leave the run's own
    # settings (what its rounds are, what export and status read) as they were
    (out_dir / "config.yaml").write_text(to_yaml(cfg), encoding="utf-8")
    summary = RunSummary(out_dir=out_dir)
    if resumed is None:
        initial_manifest = _commit_round_zero(cfg, state, run_id)
        source = json.loads(initial_manifest.extra["initial"])
        runner = RoundRunner(cfg, grid, state, run_id=run_id, sync=ModelSync(state.store))
        _heads_from_earlier_runs(runner, cfg, out_dir)
        first_round = 1
        t0 = time.monotonic()
        runner.query(0)
        initial, carried = _evaluate(runner, 0, _round_zero_model_evaluations(cfg, source))
        summary.history.append((0, {**_replies(carried), **initial}))
        record = {
            "round": 0,
            "initial": source,
            "evaluation": {m: _evaluation_entry(e) for m, e in initial.items()},
            "evaluation_withheld": dict(runner.eval_withheld),
            "sync_bytes": dict(runner.sync.sent_bytes),
            "ledger_heads": runner.head_receipts(),
        }
        if carried:
            record["evaluation_same_model"] = carried
        append_record(out_dir, _signed(record, key, run_id, initial_manifest))
        console.print(
            f"[bold]kyodo[/] run: model [cyan]{cfg.model.name}[/], {len(runner.members)} members "
            f"({', '.join(sorted(m.name for m in runner.members.values()))}), {cfg.train.rounds} rounds; "
            f"initial held-out MSE {_fmt(summary.mean_mse(0))} ({time.monotonic() - t0:.1f}s); "
            f"round 0: {describe_round_zero(source)}" + (f"; {_carried_note(carried)}" if carried else "")
        )
        previous = record
    else:
        # Weights and optimiser state stay in the store: the runner reads each shard when it needs it.
        runner = RoundRunner(cfg, grid, state, run_id=run_id, sync=ModelSync(state.store))
        first_round = resumed.round + 1
        records = read_records(out_dir)
        if resumed.round not in {r["round"] for r in records}:  # died after moving HEAD, before the record
            _recover_record(out_dir, state.store.manifest(resumed.round), key, run_id)
            records = read_records(out_dir)
        _heads_from_earlier_runs(runner, cfg, out_dir)
        runner.restore_ledger_heads(records)
        # The rounds before the restart stay in the summary (and summary.json): without them a
        # resumed run compared its last round with itself.
        summary.history.extend(_recorded_evaluations(records, before=first_round))
        previous = next((r for r in records if r.get("round") == resumed.round), {})
        if first_round > cfg.train.rounds:
            console.print(
                f"[bold]kyodo[/] run {run_id}: all {cfg.train.rounds} rounds are committed already (HEAD round "
                f"{resumed.round}); nothing to train. To train it further: resume with --rounds N (N > "
                f"{resumed.round}), or start a new run with continue_from={out_dir}",
                soft_wrap=True,
            )
        else:
            console.print(
                f"[bold]kyodo[/] run {run_id}: resuming after round {resumed.round} (HEAD of {state.store.root}), "
                f"rounds {first_round}..{cfg.train.rounds}"
            )

    with make_progress(console) as progress:
        for rnd in range(first_round, cfg.train.rounds + 1):
            requested = stop_requested(out_dir)
            if requested is not None:
                progress.console.print(
                    f"[bold]kyodo[/] run {run_id}: stopped before round {rnd} as the operator asked"
                    f"{f' at {requested}' if requested else ''} (kyodo-coordinator stop); round {rnd - 1} is its last "
                    "committed round, and a resume goes on from there",
                    highlight=False,
                    soft_wrap=True,
                )
                break
            task = progress.add_task(f"round {rnd}", total=len(STAGES), stage=STAGES[0])
            runner.sync.start_round()
            start = time.monotonic()
            runner.query(rnd)
            progress.update(task, advance=1, stage=STAGES[1])
            plan = runner.plan(rnd)
            result = runner.new_result(rnd, plan)
            progress.update(task, advance=1, stage=STAGES[2])
            if plan.members:
                runner.train_and_aggregate(rnd, plan, result)
            else:
                log.warning("round %d: no member available, nothing trained", rnd)
            failpoint(rnd, "after-train")
            record = _record(result, cfg, dict(runner.sync.sent_bytes), runner.head_receipts())
            # As a JSON string: the receipts' 64-hex hashes and keys must not read as store object ids.
            extra = {"run": run_id, ROUND_RECORD_KEY: json.dumps(record, sort_keys=True)}
            manifest = state.commit_objects(rnd, runner.pending, runner.pending_state, extra)
            runner.sync.set_head(manifest)
            failpoint(rnd, "after-commit")
            progress.update(task, advance=1, stage=STAGES[3])
            result.evaluation, carried = _evaluate(
                runner, rnd, _unchanged_model_evaluations(state, manifest, previous, run_id)
            )
            result.seconds = time.monotonic() - start
            progress.update(task, advance=1, stage="done")
            # sync_bytes again: evaluation sends members the objects they still lack
            record = {
                **record,
                "sync_bytes": dict(runner.sync.sent_bytes),
                **_evaluation(result),
                "evaluation_withheld": dict(runner.eval_withheld),
            }
            if carried:
                record["evaluation_same_model"] = carried
            append_record(out_dir, _signed(record, key, run_id, manifest))
            previous = record
            summary.results.append(result)
            summary.history.append((rnd, {**_replies(carried), **result.evaluation}))
            progress.console.print(cohort_table(plan, result.updated_shards))
            held = {member: head.epsilon for member, head in runner.ledger_heads.items()}
            table = round_table(result, runner.epsilon, held)
            if carried:
                note = f"no shard changed: {_carried_note(carried)}"
                table.caption = f"{table.caption}; {note}" if table.caption else note
            progress.console.print(table)

    clear_stop_request(out_dir)  # one that came during the last round found nothing left to stop
    console.print(summary_table(summary.history))
    (out_dir / "summary.json").write_text(
        json.dumps(
            {
                "rounds": cfg.train.rounds,
                "mean_mse": [summary.mean_mse(i) for i in range(len(summary.history))],
                "per_member": {str(rnd): {m: e.action_mse for m, e in ev.items()} for rnd, ev in summary.history},
            },
            indent=2,
        ),
        encoding="utf-8",
    )
    return summary
