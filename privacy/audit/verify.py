"""The auditor's checks of a run: its members' ledgers (``ledger_checks``), receipts, coverage, the store.

The auditor trusts the consortium file (members' published keys and budgets) and
mathematics, nothing else: not the ledgers' own ``public_key`` fields, not the member's
accountant, not the coordinator's round records, not the store's file names. What it
establishes, per check (``findings.CHECKS``):

* **signature / identity / format / chain**: every ledger entry verifies under the
  consortium's key for that member (``privacy.ledger.verify_chain`` with the *published*
  key); an entry that verifies under another member's key is named as such; entries name
  their own member; the hash chain holds from 64 zeros (no gap, no reorder, no fork) and no
  entry repeats an earlier one (replay).
* **accounting**: every recorded epsilon is recomputed from the recorded mechanisms of the
  entry and everything before it, independently (``privacy.audit.accounting``,
  dp-accounting), and must not be below it beyond the documented tolerance.
* **budget**: everything a member's ledger records composes, at the member's published
  delta, to at most its published epsilon; no entry claims at a looser delta or above it.
* **receipt**: every member whose update the round records accepted (``train``) holds a
  receipt for each round whose shards it trained and that were updated; each receipt
  verifies under the consortium key, names that member, this run, this round, exactly the
  shards the record assigned it and the steps it reported, and is byte for byte (hash) the
  entry in the member's ledger (a validly signed receipt that differs from the ledger entry
  of the same run and round is a fork). A record that reports no steps for a member fails:
  the receipt's steps cannot be checked. Every held-out error a record holds (``evaluation``)
  carries a valid evaluation receipt that is in the member's ledger: every consortium member
  publishes a budget, so one without a receipt is a release outside it (``accounting``).
  A held-out error carried into a continued run's round 0 (``evaluation_same_model``: the
  member released it for that model in an earlier run) carries the receipt of that release,
  which must name the run and round the record says and be in the member's ledger.
* **coverage**: every ledger entry of this run appears as a receipt in its round's record,
  or is explained: the member's reply failed in that round (``failed``: it spent budget but
  its update never reached the model), it declined the committed attempt of a round it had
  spent in an earlier, uncommitted one (``declined``, after a coordinator restart), the round
  was never committed (later than anything recorded or stored), or the round's record was
  rebuilt from the store after a crash (``recovered_from_store``), when the store check
  matches that round's changed shards against the ledgers instead. Explained entries are
  notes, not failures.
* **store**: every committed round's manifest verifies along the hash chain from HEAD and
  belongs to this run; every object it references exists and hashes to its id
  (``ShardStore.read_object``); every shard whose object changed in a round was aggregated
  in that round according to its record (a model change without contributions fails);
  every recorded round is committed.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from functools import partial
from pathlib import Path
from typing import Any

from privacy.audit.consortium import Consortium, load_consortium
from privacy.audit.findings import NOTE, AuditResult, RoundRow
from privacy.audit.inputs import LedgerFile, RunFiles, find_ledgers, read_run
from privacy.audit.ledger_checks import (
    LedgerIndex,
    audit_ledgers,
    check_ledger,
    classify_problem,
    entry_label,
    identity_problems,
)
from privacy.ledger import (
    RELEASE_EVALUATION,
    RELEASE_TRAIN,
    LedgerError,
    entry_hash,
    parse_strict_json,
    receipt_from_json,
    release_of,
    verify_entry,
)
from privacy.round_signature import round_signature_problem
from shared_model.store import ROUND_RECORD_KEY, Manifest, ShardStore, StoreError

# --------------------------------------------------------------------------- round records


def _records_by_round(result: AuditResult, run: RunFiles) -> dict[int, dict[str, Any]]:
    out: dict[int, dict[str, Any]] = {}
    for record in run.records:
        rnd = record["round"]
        if rnd in out:
            result.add("input", f"round {rnd}", "recorded twice in rounds.jsonl")
            continue
        out[rnd] = record
    return out


def _round_fields(result: AuditResult, rnd: int, record: dict[str, Any]) -> dict[str, Any] | None:
    """The record's fields the checks use, type-checked (a damaged record is an input finding)."""
    want = {
        "cohorts": dict,
        "train": dict,
        "receipts": dict,
        "failed": dict,
        "declined": dict,
        "updated_shards": list,
    }
    out = {}
    for name, kind in want.items():
        value = record.get(name, kind())
        if not isinstance(value, kind):
            result.add("input", f"round {rnd}", f"record field {name!r} is not a {kind.__name__}")
            return None
        out[name] = value
    cohorts = out["cohorts"]
    if not all(isinstance(v, list) for v in cohorts.values()):
        result.add("input", f"round {rnd}", "record field 'cohorts' must map shards to member lists")
        return None
    return out


def _check_receipt(
    result: AuditResult,
    consortium: Consortium,
    run_id: str | None,
    rnd: int,
    member: str,
    receipt: Any,
    assigned: list[str],
    train: Any,
    index: LedgerIndex | None,
    forks: set[tuple[str, int]],
) -> bool:
    """One receipt held by round ``rnd``'s record for ``member``; True when every check holds."""
    add = partial(result.add, member=member)
    subject = f"round {rnd} receipt of {member}"
    if not isinstance(receipt, dict):
        add("format", subject, f"is not a signed ledger entry but {type(receipt).__name__}")
        return False
    published = consortium.members.get(member)
    if published is None:
        add("consortium", subject, f"{member!r} is not a consortium member: the receipt cannot be verified")
        return False
    failures = len(result.failures)
    try:
        verify_entry(receipt, published.public_key)
    except LedgerError as exc:
        for problem in exc.problems:
            add(classify_problem(problem), subject, problem)
    for problem in identity_problems(receipt, member, consortium):
        add("identity", subject, problem)
    if receipt.get("run") != run_id:
        add(
            "receipt",
            subject,
            f"is for run {receipt.get('run')!r} (round {receipt.get('round')!r}), not this run {run_id!r}: "
            "a receipt replayed from another run",
        )
    elif receipt.get("round") != rnd:
        add("receipt", subject, f"is for round {receipt.get('round')!r}, but recorded in round {rnd}")
    if release_of(receipt) != RELEASE_TRAIN:
        add("receipt", subject, f"records a {release_of(receipt)!r} release, not the training behind an update")
    shards = receipt.get("shards")
    if isinstance(shards, list) and sorted(map(str, shards)) != assigned:
        add("receipt", subject, f"covers shards {sorted(map(str, shards))}, the record assigned {assigned}")
    steps = train.get("steps") if isinstance(train, dict) else None
    mech = receipt.get("mechanism")
    if not isinstance(steps, int) or isinstance(steps, bool):
        said = f"steps {steps!r}" if isinstance(train, dict) else "no accepted update"
        add(
            "receipt",
            subject,
            f"the record reports no step count for {member} ({said}): the steps the receipt accounts for "
            "cannot be checked against what ran",
        )
    elif isinstance(mech, dict) and mech.get("steps") != steps:
        add("receipt", subject, f"records {mech.get('steps')!r} steps, the record says {steps!r} ran")
    if index is None:
        add("receipt", subject, f"no ledger of {member!r} was given: the receipt cannot be matched to it")
        return False
    try:
        digest = entry_hash(receipt)
    except ValueError as exc:
        add("format", subject, f"cannot be hashed: {exc}")
        return False
    if digest in index.by_hash:
        i = index.by_hash[digest]
        if receipt.get("run") == run_id and receipt.get("round") == rnd and receipt.get("member") == member:
            index.matched.add(i)
            index.rows[i].status = f"receipt in round {rnd}"
    else:
        key = (receipt.get("run"), receipt.get("round"))
        other = index.by_run_round.get(key) if all(isinstance(k, (str, int)) for k in key) else None
        if other is not None:
            forks.add((member, other))
            add(
                "chain",
                subject,
                f"differs from {member}'s ledger {entry_label(other, index.entries[other])} for the same run and "
                "round: two different entries for one round (a fork, or an edited receipt or ledger)",
            )
        else:
            add("receipt", subject, _not_in_ledger(index, receipt, member))
    return len(result.failures) == failures


def _not_in_ledger(index: LedgerIndex, receipt: Mapping[str, Any], member: str) -> str:
    """Why a signed receipt is missing from the ledger, with the likelier cause first: a ledger
    that ends before the receipt was signed is an older copy (a backup, or a copy made before
    the run), not one with an entry cut out of it."""
    kept = {**index.entries, **index.budgets}
    signed = receipt.get("time")
    where = "holds no entry"
    if kept:
        last = max(kept)
        ends = kept[last].get("time")
        if not (isinstance(signed, str) and isinstance(ends, str) and signed > ends):
            return f"is not in {member}'s ledger: the entry was dropped from the ledger, or never written to it"
        where = f"ends at {entry_label(last, kept[last])}, {ends}, before this receipt was signed ({signed})"
    return (
        f"is not in {member}'s ledger, which {where}: an older copy of the ledger (restored from a backup, or "
        "copied before the run); ask the member for its current one"
    )


def _check_ledger_heads(
    result: AuditResult,
    consortium: Consortium,
    run_id: str | None,
    records: dict[int, dict[str, Any]],
    indexes: dict[str, LedgerIndex],
) -> None:
    """Every member's newest receipt the coordinator held when it wrote a round (``ledger_heads``)
    must be in that member's ledger. The receipts of this run are checked with their rounds;
    this catches a ledger rolled back behind a receipt of an *earlier* run, which an audit of
    this run alone would otherwise pass: the rolled-back node declines (it knows it lacks the
    entry), so this run holds no receipt of its own to miss.

    A head of this run is skipped only when a record holds it as a training or evaluation
    receipt (checked there). Not all of them: a reply that failed after its receipt was
    checked leaves the receipt in ``ledger_heads`` alone, and a review rolled a ledger back
    behind one and passed the audit."""
    seen: set[tuple[str, str]] = set()
    recorded = _recorded_receipt_hashes(records)
    for rnd, record in sorted(records.items()):
        heads = record.get("ledger_heads") or {}
        if not isinstance(heads, dict):
            result.add("format", f"round {rnd} record", "field 'ledger_heads' is not an object")
            continue
        for member, entry in sorted(heads.items()):
            subject = f"round {rnd} ledger head of {member}"
            published = consortium.members.get(member)
            if published is None or not isinstance(entry, dict):
                result.add("receipt", subject, "names no consortium member, or is not a signed ledger entry")
                continue
            try:
                verify_entry(entry, published.public_key)
                digest = entry_hash(entry)
            except (LedgerError, ValueError) as exc:
                result.add("receipt", subject, f"is not an entry {member}'s key signed ({exc})", member=member)
                continue
            index = indexes.get(member)
            if (member, digest) in seen or (entry.get("run") == run_id and digest in recorded):
                continue  # a receipt a record holds is checked with its round or evaluation
            if index is None or digest in index.by_hash:
                continue  # no ledger given: audit_inputs fails a member that released in this run
            seen.add((member, digest))
            result.add(
                "receipt",
                subject,
                f"{member}'s ledger lacks entry {digest[:16]}... (run {entry.get('run')!r}, round "
                f"{entry.get('round')!r}, epsilon {entry.get('epsilon')!r}), whose receipt {member} signed and the "
                "coordinator held: the ledger was rolled back (a state directory restored from a backup?) or the "
                "entry dropped, and its accountant counts less than the member released",
                member=member,
            )


def _held_receipt_of_this_run(records: Mapping[int, Mapping[str, Any]], member: str, run_id: str | None) -> bool:
    """Whether the coordinator held a receipt of ``member`` from this run (``ledger_heads``):
    a member whose reply then failed released as much as one that trained."""
    for record in records.values():
        heads = record.get("ledger_heads")
        entry = heads.get(member) if isinstance(heads, dict) else None
        if isinstance(entry, dict) and entry.get("run") == run_id:
            return True
    return False


def _recorded_receipt_hashes(records: Mapping[int, Mapping[str, Any]]) -> set[str]:
    """Hashes of the training and evaluation receipts the round records hold."""
    held: list[Any] = []
    for record in records.values():
        receipts, evaluation = record.get("receipts"), record.get("evaluation")
        held += list(receipts.values()) if isinstance(receipts, dict) else []
        held += (
            [e.get("receipt") for e in evaluation.values() if isinstance(e, dict)]
            if isinstance(evaluation, dict)
            else []
        )
    hashes = set()
    for receipt in held:
        try:
            hashes.add(entry_hash(receipt_from_json(receipt) if isinstance(receipt, str) else receipt))
        except (LedgerError, ValueError, TypeError, AttributeError):
            continue  # a malformed receipt is reported where its record is checked
    return hashes


def _check_rounds(
    result: AuditResult,
    consortium: Consortium,
    run: RunFiles,
    records: dict[int, dict[str, Any]],
    indexes: dict[str, LedgerIndex],
) -> set[tuple[str, int]]:
    """Every contribution has a valid receipt; returns (member, entry index) pairs found forked."""
    forks: set[tuple[str, int]] = set()
    for rnd, record in sorted(records.items()):
        if record.get("recovered_from_store"):
            result.rounds.append(RoundRow(rnd, recovered=True))
            continue
        if "cohorts" not in record:
            continue  # round 0: the initial model's evaluation, nobody trained
        fields = _round_fields(result, rnd, record)
        if fields is None:
            continue
        cohorts, train, receipts = fields["cohorts"], fields["train"], fields["receipts"]
        updated = [str(s) for s in fields["updated_shards"]]
        row = RoundRow(rnd, updated_shards=sorted(updated))
        members = set(train) | set(receipts) | set(fields["failed"]) | set(fields["declined"])
        # A member that sat the round out at query is in no cohort: still one of the round's.
        members = {
            m
            for m in members
            if any(m in ms for ms in cohorts.values()) or m in train or m in receipts or m in fields["declined"]
        }
        for member in sorted(members):
            assigned = sorted(s for s, ms in cohorts.items() if member in ms)
            contributed = [s for s in assigned if s in updated] if member in train else []
            receipt_state = "-"
            if member in receipts:
                ok = _check_receipt(
                    result,
                    consortium,
                    run.run_id,
                    rnd,
                    member,
                    receipts[member],
                    assigned,
                    train.get(member),
                    indexes.get(member),
                    forks,
                )
                receipt_state = "ok" if ok else "invalid"
            elif contributed:
                receipt_state = "missing"
                result.add(
                    "receipt",
                    f"round {rnd}",
                    member=member,
                    message=f"{member} contributed to {len(contributed)} updated shard(s) ({', '.join(contributed)}) "
                    "but the record holds no receipt for it: a contribution without a signed privacy receipt",
                )
            elif member in train:
                # Its shards were not updated (the aggregate rejected, the cohort too small), but
                # its update reached the coordinator: a release, as an evaluation without a
                # receipt is one.
                receipt_state = "missing"
                result.add(
                    "receipt",
                    f"round {rnd}",
                    member=member,
                    message=f"{member}'s update reached the coordinator (its shards were not updated) but the record "
                    "holds no receipt for it: a release without a signed privacy receipt",
                )
            state = (
                "contributed"
                if contributed
                else "failed"
                if member in fields["failed"]
                else "declined"
                if member in fields["declined"]
                else "trained"
                if member in train
                else "assigned"
            )
            row.members[member] = {
                "shards": assigned,
                "contributed": contributed,
                "receipt": receipt_state,
                "state": state,
            }
        for shard in updated:
            if not any(m in train for m in cohorts.get(shard, [])):
                result.add(
                    "receipt",
                    f"round {rnd}",
                    f"shard {shard} was updated, but no member of its cohort {cohorts.get(shard, [])} has an "
                    "accepted contribution",
                )
        result.rounds.append(row)
    return forks


def _check_coverage(
    result: AuditResult,
    run: RunFiles,
    records: dict[int, dict[str, Any]],
    indexes: dict[str, LedgerIndex],
    forks: set[tuple[str, int]],
) -> None:
    """Every ledger entry of this run appears in the round records, or is explained.

    A run cut short (HEAD moved back, the last lines deleted) looks like a coordinator that died
    before committing, except where members' ledgers say a round was committed: a member
    evaluates only a committed model, and trains round r only on round r - 1's. An evaluation
    past the run's last round, or training two rounds past it, is therefore not explained."""
    last = max([*records, result.head_round if result.head_round is not None else -1], default=-1)
    for member, index in sorted(indexes.items()):
        for i, entry in sorted(index.entries.items()):
            if entry["run"] != run.run_id:
                continue
            if member in result.members:
                result.members[member].run_entries += 1
            if i in index.matched or (member, i) in forks:
                continue
            rnd = entry["round"]
            subject = f"{member} ledger"
            label = entry_label(i, entry)
            record = records.get(rnd)
            explained = cut = None
            if release_of(entry) == RELEASE_EVALUATION:
                if rnd > last:
                    cut = f"it evaluated round {rnd}'s model, and the run ends at round {last}"
                else:
                    explained = (
                        f"an evaluation release that round {rnd}'s record does not hold (not used, or lost in a "
                        "crash): spent, not used"
                    )
            elif record is None:
                if rnd == last + 1:
                    explained = f"round {rnd} was never committed (the run ends at round {last}): spent, not used"
                elif rnd > last:
                    cut = f"it trained round {rnd} on round {rnd - 1}'s model, and the run ends at round {last}"
            elif record.get("recovered_from_store"):
                explained = f"round {rnd}'s record was rebuilt from the store after a crash; see the store check"
            elif isinstance(record.get("failed"), dict) and member in record["failed"]:
                explained = f"its reply failed in round {rnd} ({record['failed'][member]}): spent, update not used"
            elif isinstance(record.get("declined"), dict) and member in record["declined"]:
                explained = (
                    f"it declined the committed attempt of round {rnd} ({record['declined'][member]}): "
                    "spent in an earlier attempt that never committed"
                )
            if explained is not None:
                index.rows[i].status = "explained"
                result.add(
                    "coverage", subject, f"{label}: not in the round records; explained: {explained}", NOTE, member
                )
            else:
                index.rows[i].status = "unmatched"
                result.add(
                    "coverage",
                    subject,
                    f"{label}: spent budget in this run, but "
                    + (
                        f"{cut}: a member only does that with a committed model, so the store or the round records "
                        "were cut back after it"
                        if cut
                        else f"round {rnd} has no record although later rounds do"
                        if record is None
                        else f"round {rnd}'s record holds no receipt of it and does not list {member} as failed "
                        "or declined"
                    ),
                    member=member,
                )


# --------------------------------------------------------------------------- store


def _check_lineage(result: AuditResult, consortium: Consortium, zero: Manifest) -> None:
    """A run continued from another (``continue_from``): round 0 names the earlier run's round
    and manifest with that coordinator's signature. A signature that does not verify is a
    forged lineage; one by a key other than the consortium's is said, not failed (the
    local demo signs each run with a key of its own)."""
    try:
        source = json.loads(zero.extra.get("initial", "null"))
    except (TypeError, ValueError):
        source = None
    if not (isinstance(source, dict) and source.get("source") == "run"):
        return
    subject = "store round 0"
    signed, digest = source.get("coordinator"), str(source.get("manifest", "")).removeprefix("sha256:")
    key = signed.get("public_key") if isinstance(signed, dict) else None
    where = f"round {source.get('round')} of run {source.get('run')!r}"
    if not isinstance(key, str) or not isinstance(source.get("round"), int):
        result.add("store", subject, f"round 0 continues {where} but names no signed manifest of it")
        return
    problem = round_signature_problem(
        {**signed, "manifest": digest}, str(source.get("run")), source["round"], digest, key
    )
    if problem:
        result.add("store", subject, f"round 0 continues {where}, but {problem}")
    elif consortium.coordinator_public_key and key != consortium.coordinator_public_key:
        result.add(
            "store", subject,
            f"round 0 continues {where}, signed by a coordinator key that is not the consortium's: "
            "that model's lineage is not vouched for here (audit that run with its own key)",
            severity=NOTE,
        )  # fmt: skip


def _check_store(
    result: AuditResult,
    consortium: Consortium,
    run: RunFiles,
    records: dict[int, dict[str, Any]],
    indexes: dict[str, LedgerIndex],
) -> None:
    """Manifests along HEAD's chain, every object's hash, that model changes were aggregated,
    and that the coordinator signed every committed round."""
    root = run.store_dir
    if not (root / "STORE").is_file() or not (root / "HEAD").is_file():
        result.add("store", str(root), "no shard store with a HEAD: the recorded rounds cannot be checked")
        return
    try:
        store = ShardStore(root)
        head = store.head()
        rounds = sorted(store.rounds()) if head is not None else []
    except StoreError as exc:
        result.add("store", str(root), str(exc))
        return
    if head is None:
        result.add("store", str(root), "the store has no committed round")
        return
    result.head_round = head.round
    if rounds and rounds[0] != 0:
        result.add(
            "store", str(root), f"manifests before round {rounds[0]} are gone (gc?): those rounds cannot be verified"
        )
    rows = {row.round: row for row in result.rounds}
    manifests = {}
    verified: set[str] = set()
    unsigned_lines: list[int] = []  # rounds whose signature covers the manifest, not the whole line
    for rnd in rounds:
        subject = f"store round {rnd}"
        try:
            manifest = store.manifest(rnd)
        except StoreError as exc:
            result.add("store", subject, str(exc))
            continue
        manifests[rnd] = manifest
        if manifest.extra.get("run") != run.run_id:
            result.add("store", subject, f"manifest belongs to run {manifest.extra.get('run')!r}, not {run.run_id!r}")
        _compare_committed_record(result, subject, manifest.extra.get(ROUND_RECORD_KEY), records.get(rnd))
        if consortium.coordinator_public_key and rnd in records and run.run_id:
            signed = records[rnd].get("coordinator")
            problem = round_signature_problem(
                signed, run.run_id, rnd, manifest.digest, consortium.coordinator_public_key, records[rnd]
            )
            if problem:
                result.add("store", subject, problem)
            elif not (isinstance(signed, dict) and signed.get("record")):
                unsigned_lines.append(rnd)
        if rnd == 0:
            _check_lineage(result, consortium, manifest)
        by_object = {oid: shard for shard, oid in manifest.shards.items()}
        for oid in sorted(manifest.object_ids()):
            if oid in verified:
                continue
            try:
                store.read_object(oid, shard_id=by_object.get(oid))
            except StoreError as exc:
                result.add("store", subject, f"shard {by_object.get(oid, '(optimiser state)')}: {exc}")
                continue
            verified.add(oid)
        parent = manifests.get(manifest.parent) if manifest.parent is not None else None
        if rnd == 0 and rnd not in records:
            # Its line holds the initial model's held-out errors and their evaluation receipts:
            # deleted, it took a ledger's rollback behind such a release out of sight.
            result.add("store", subject, "committed but there is no round record for it (rounds.jsonl lacks round 0)")
        if rnd == 0 or parent is None:
            continue
        changed = sorted(
            {s for s, oid in manifest.shards.items() if parent.shards.get(s) != oid}
            | (set(parent.shards) - set(manifest.shards))
        )
        record = records.get(rnd)
        if record is None:
            result.add("store", subject, f"committed (shards {changed} changed) but there is no round record for it")
            continue
        if record.get("recovered_from_store"):
            covered = {
                s
                for index in indexes.values()
                for e in index.entries.values()
                if e["run"] == run.run_id and e["round"] == rnd
                for s in e["shards"]
            }
            missing = [s for s in changed if s not in covered]
            if missing:
                result.add(
                    "store",
                    subject,
                    f"shards {missing} changed, and no member's ledger entry of this round covers them",
                )
            else:
                result.add(
                    "store",
                    subject,
                    "record rebuilt after a crash: every changed shard is covered by ledger entries",
                    NOTE,
                )
            if rnd in rows:
                rows[rnd].changed_in_store = changed
            continue
        updated = record.get("updated_shards", [])
        unexplained = [s for s in changed if s not in updated]
        if unexplained:
            result.add(
                "store",
                subject,
                f"shards {unexplained} changed in the store, but the round record aggregated no update for them",
            )
        unchanged = [s for s in updated if s not in changed]
        if unchanged:
            result.add("store", subject, f"shards {unchanged} are recorded as updated but kept their object", NOTE)
        if rnd in rows:
            rows[rnd].changed_in_store = changed
    result.objects_verified = len(verified)
    if unsigned_lines:
        result.add(
            "store",
            "rounds.jsonl",
            f"rounds {unsigned_lines} were signed by a coordinator that signed manifests only: what their lines add "
            "after the commit (held-out errors and their evaluation receipts) is not covered by a signature",
            NOTE,
        )
    for rnd, record in sorted(records.items()):
        if rnd not in manifests and ("cohorts" in record or record.get("recovered_from_store")):
            result.add(
                "store", f"store round {rnd}", f"is recorded but has no verified manifest (HEAD at {head.round})"
            )


def _compare_committed_record(result: AuditResult, subject: str, committed: Any, record: Any) -> None:
    """``rounds.jsonl`` must say what the coordinator committed with the manifest (hash-chained
    in the store): cohorts, receipts, updated shards. Older runs committed no record."""
    if committed is None or not isinstance(record, dict):
        return
    if record.get("recovered_from_store"):
        # A coordinator rebuilds a lost line from the committed record when the manifest has one
        # (coordinator.federation._recover_record) and marks it recovered only when it has none.
        # The mark switches the round's receipt checks off, so on a manifest with a record it is
        # a line that replaced what was committed.
        result.add(
            "store",
            subject,
            "rounds.jsonl says this round's record was rebuilt after a crash, but its manifest holds the committed "
            "record: the line replaces it, and the round's receipts go unchecked",
        )
        return
    try:
        committed = parse_strict_json(committed) if isinstance(committed, str) else None
    except ValueError:
        committed = None
    if not isinstance(committed, dict):
        result.add("store", subject, "the round record committed with the manifest is not a JSON object")
        return
    differ = sorted(k for k in committed if k != "sync_bytes" and record.get(k) != committed[k])
    if differ:
        result.add("store", subject, f"the round record differs from the one committed with the manifest in {differ}")


# --------------------------------------------------------------------------- entry point


def _check_evaluations(
    result: AuditResult,
    consortium: Consortium,
    run: RunFiles,
    records: dict[int, dict[str, Any]],
    indexes: dict[str, LedgerIndex],
) -> None:
    """Every held-out error a round record holds came with a receipt that is in its member's ledger.

    Every consortium member publishes a budget, so a held-out error recorded without a valid
    evaluation receipt is a release outside its accounting: a failure, whatever the number
    was, whether or not the member trained in this run (a node that switched DP off, a
    debugging switch, fails here as its training fails the receipt check). A member the
    consortium does not list has no budget an evaluation could be accounted against. An
    error carried from an earlier release of the same model (``evaluation_same_model``: an earlier
    round whose model no shard changed, or the run a continued run started from) spends nothing
    in this run, but its receipt must be that release's.
    """
    for rnd, record in sorted(records.items()):
        for field_name in ("evaluation", "evaluation_same_model"):
            evaluation = record.get(field_name)
            if not isinstance(evaluation, dict):
                continue
            for member, reported in sorted(evaluation.items()):
                carried = field_name == "evaluation_same_model"
                subject = f"round {rnd} evaluation of {member}" + (
                    " (carried from an earlier release)" if carried else ""
                )
                if carried and isinstance(reported, dict):
                    released_in = (reported.get("run"), reported.get("round"))
                else:
                    released_in = (run.run_id, rnd)
                _check_evaluation(result, consortium, indexes, member, reported, subject, released_in, carried)


def _check_evaluation(
    result: AuditResult,
    consortium: Consortium,
    indexes: dict[str, LedgerIndex],
    member: str,
    reported: Any,
    subject: str,
    released_in: tuple[Any, Any],
    carried: bool,
) -> None:
    """One recorded held-out error against its receipt and the member's ledger (see above)."""
    add = partial(result.add, member=member)
    index = indexes.get(member)
    published = consortium.members.get(member)
    if published is None:
        add(
            "consortium",
            subject,
            f"{member!r} is not a consortium member: no published key or budget accounts for its held-out error",
        )
        return
    text = reported.get("receipt") if isinstance(reported, dict) else None
    if text is None:
        add(
            "accounting",
            subject,
            "the held-out error was recorded without a receipt: a release outside the member's ledger "
            "and its published budget",
        )
        return
    try:
        receipt = receipt_from_json(text)
        verify_entry(receipt, published.public_key)
    except LedgerError as exc:
        for problem in exc.problems:
            add(classify_problem(problem), subject, problem)
        return
    found = {"run": receipt.get("run"), "round": receipt.get("round"), "member": receipt.get("member")}
    found["release"] = release_of(receipt)
    run_id, rnd = released_in
    expected = {"run": run_id, "round": rnd, "member": member, "release": RELEASE_EVALUATION}
    wrong = [f"{k} {found[k]!r} != {v!r}" for k, v in expected.items() if found[k] != v]
    if wrong:
        add("receipt", subject, "receipt does not belong here: " + "; ".join(wrong))
        return
    if index is None:
        add("receipt", subject, f"no ledger of {member!r} was given: the receipt cannot be matched to it")
        return
    i = index.by_hash.get(entry_hash(receipt))
    if i is None:
        add("receipt", subject, f"receipt {_not_in_ledger(index, receipt, member)}")
        return
    if not carried:  # a carried release is an entry of the earlier run, accounted for there
        index.matched.add(i)
        index.rows[i].status = f"evaluation in round {rnd}"


def audit_inputs(
    consortium: Consortium,
    ledgers: dict[str, LedgerFile],
    run: RunFiles,
    *,
    ledgers_dir: str = "",
    consortium_path: str = "",
) -> AuditResult:
    """Run every check on loaded inputs (tests call this; the CLI goes through :func:`audit`)."""
    result = AuditResult(run=run.run_id, ledgers_dir=ledgers_dir, run_dir=str(run.run_dir), consortium=consortium_path)
    for problem in run.problems:
        result.add("input", str(run.run_dir), problem)
    indexes = {name: check_ledger(result, consortium, ledger, run.run_id) for name, ledger in sorted(ledgers.items())}
    records = _records_by_round(result, run)
    for name in sorted(consortium.members):
        if name not in ledgers:
            # A member the round records say trained or released a held-out error must be
            # matched to its ledger; one that did neither in this run is only a note, and a
            # member that left the consortium before it, nothing at all.
            released = any(
                isinstance(r.get(field), dict) and name in r[field]
                for r in records.values()
                for field in ("train", "receipts", "evaluation")
            ) or _held_receipt_of_this_run(records, name, run.run_id)
            if not released and consortium.members[name].departed:
                continue
            result.add(
                "input" if released else "budget",
                f"{name} ledger",
                "no ledger was given for this consortium member"
                + (
                    ": its releases in the round records (training, evaluations, receipts the coordinator held) cannot be matched to it"
                    if released
                    else " (it neither trained nor released a held-out error in this run)"
                ),
                severity="fail" if released else NOTE,
            )
    forks = _check_rounds(result, consortium, run, records, indexes)
    _check_ledger_heads(result, consortium, run.run_id, records, indexes)
    _check_evaluations(result, consortium, run, records, indexes)
    _check_store(result, consortium, run, records, indexes)
    if not consortium.coordinator_public_key:
        result.add(
            "store",
            consortium_path or "consortium",
            "publishes no coordinator_public_key: round signatures not checked",
            NOTE,
        )
    _check_coverage(result, run, records, indexes, forks)
    for finding in result.failures:
        if finding.member in result.members:
            result.members[finding.member].ok = False
    return result


def audit(ledgers_dir: str | Path, run_dir: str | Path | None, consortium_path: str | Path) -> AuditResult:
    """Load the inputs and run every check (of the ledgers alone when ``run_dir`` is None).
    ConsortiumError / InputError when they cannot be read."""
    consortium = load_consortium(consortium_path)
    ledgers = find_ledgers(ledgers_dir)
    if run_dir is None:
        return audit_ledgers(consortium, ledgers, ledgers_dir=str(ledgers_dir), consortium_path=str(consortium_path))
    run = read_run(run_dir)
    return audit_inputs(consortium, ledgers, run, ledgers_dir=str(ledgers_dir), consortium_path=str(consortium_path))
