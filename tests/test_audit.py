"""The auditor (``kyodo-audit``): a clean run passes, every kind of tampering is caught and named.

The fixture is a small federated run built directly, without Flower: three members with
real Ed25519 keys and real ``privacy.ledger.Ledger`` files (one entry from an earlier run,
then two rounds of this run), round records written by the coordinator's own
``append_record``, and a real ``ShardStore`` with three committed rounds. Each tamper test
edits a copy of it the way an attacker would (on the raw JSON) and checks that the audit
fails with a finding that names the entry (or round) and the problem.
"""

from __future__ import annotations

import html
import json
import math
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from coordinator.records import append_record
from privacy.accountant import Mechanism, epsilon
from privacy.audit import accounting
from privacy.audit.bound import correct_probability, epsilon_lower_bound, p_value
from privacy.audit.cli import main as audit_main
from privacy.audit.consortium import ConsortiumError, dump_consortium, from_nodes, load_consortium, parse_consortium
from privacy.audit.findings import NOTE, AuditResult
from privacy.audit.inputs import InputError
from privacy.audit.report import render_markdown, write_report
from privacy.audit.verify import audit
from privacy.keys import load_or_create_signing_key, public_key_hex
from privacy.ledger import Ledger, canonical_json, entry_hash, signing_payload
from privacy.round_signature import sign_round
from shared_model.store import ROUND_RECORD_KEY, ShardStore

RUN, OLD_RUN = "run-a", "run-old"
MEMBERS = ("alpha", "beta", "gamma")
SIGMA, RATE, STEPS, DELTA, BUDGET = 1.5, 0.2, 20, 1e-5, 8.0
EVAL_SIGMA = 5.0
SHARDS = {1: ["adapter/shared", "expert/L0/E0"], 2: ["adapter/shared", "expert/L0/E1"]}
ALL_SHARDS = ["backbone", "adapter/shared", "expert/L0/E0", "expert/L0/E1"]


# --------------------------------------------------------------------------- the federation


def _append(ledger: Ledger, history: list[Mechanism], member: str, run: str, rnd: int, shards: list[str]) -> dict:
    mechanism = {"noise_multiplier": SIGMA, "sample_rate": RATE, "steps": STEPS, "clipping_norm": 0.1}
    return _append_entry(
        ledger,
        history,
        member,
        run,
        rnd,
        sorted(shards),
        {**mechanism, "opacus_mode": "bk", "noise_source": "chacha20-box-muller-f64"},
    )


def _append_evaluation(ledger: Ledger, history: list[Mechanism], member: str, run: str, rnd: int) -> dict:
    """A held-out error released under DP (``privacy.eval_release``) after round ``rnd``."""
    mechanism = {"noise_multiplier": EVAL_SIGMA, "sample_rate": 1.0, "steps": 1, "clipping_norm": 0.05}
    mechanism |= {"opacus_mode": "gaussian-sum-count", "noise_source": "os-csprng-gauss"}
    return _append_entry(ledger, history, member, run, rnd, [], mechanism, release="evaluation")


def _append_entry(
    ledger: Ledger,
    history: list[Mechanism],
    member: str,
    run: str,
    rnd: int,
    shards: list[str],
    mechanism: dict[str, Any],
    release: str = "dp-sgd",
) -> dict:
    history.append(Mechanism(mechanism["noise_multiplier"], mechanism["sample_rate"], mechanism["steps"]))
    epsilon_after = epsilon(history, DELTA)
    return ledger.append(
        budget=(BUDGET, DELTA),  # declared before the first release, as a node does
        run=run, round=rnd, member=member, shards=shards, mechanism=mechanism, dataset_fingerprint="ab" * 32,
        epsilon=epsilon_after, delta=DELTA, accountant="rdp", decision="full", release=release,
    )  # fmt: skip


def _tensors(seed: int) -> dict[str, torch.Tensor]:
    return {"w": torch.randn(4, 3, generator=torch.Generator().manual_seed(seed))}


def build_federation(
    root: Path, commit_records: bool = False, evaluations: bool = False, whole_lines: bool = True
) -> None:
    """Run dir ``root/run`` (run.json, rounds.jsonl, store/, nodes/<member>/) and ``root/consortium.yaml``.
    ``commit_records``: each round's record also goes into its manifest and is signed with a
    coordinator key the consortium file publishes, as the coordinator does (without, as older
    runs: the tampering tests below edit records freely). ``evaluations``: after round 2 each
    member releases its held-out error under DP (a ledger entry, a receipt in the record);
    without, members withheld it. ``whole_lines``: the coordinator's signature covers each
    record line (as it does now), not only its manifest (as older coordinators did)."""
    coordinator = Ed25519PrivateKey.generate()

    def signed(record: dict[str, Any], manifest: Any) -> dict[str, Any]:
        if not commit_records:
            return record
        line = record if whole_lines else None
        return {**record, "coordinator": sign_round(coordinator, RUN, manifest.round, manifest.digest, line).to_dict()}

    run_dir = root / "run"
    run_dir.mkdir(parents=True)
    (run_dir / "run.json").write_text(json.dumps({"run": RUN}))
    receipts: dict[int, dict[str, dict]] = {1: {}, 2: {}}
    released: dict[str, dict] = {}  # round 2's private held-out errors, with their receipts
    for member in MEMBERS:
        state = run_dir / "nodes" / member
        key = load_or_create_signing_key(state / "member_ed25519.pem")
        ledger, history = Ledger(state / "ledger.jsonl", key), []
        _append(ledger, history, member, OLD_RUN, 1, ["adapter/shared"])
        for rnd in (1, 2):
            receipts[rnd][member] = _append(ledger, history, member, RUN, rnd, SHARDS[rnd])
        if evaluations:
            receipt = canonical_json(_append_evaluation(ledger, history, member, RUN, 2)).decode()
            released[member] = {"action_mse": 0.01, "num_examples": 40, "receipt": receipt}
        published = {"member": member, "embodiment": "so100", "epsilon": BUDGET, "delta": DELTA}
        (state / "member.json").write_text(
            json.dumps({**published, "accountant": "rdp", "public_key": public_key_hex(key)})
        )
    store = ShardStore(run_dir / "store")
    head = store.commit(
        None,
        {s: store.put_shard(s, _tensors(i)) for i, s in enumerate(ALL_SHARDS)},
        model_config="cfg",
        extra={"run": RUN},
    )
    # round 0: every member withheld its held-out error (nothing recorded, nothing spent)
    append_record(run_dir, signed({"round": 0, "evaluation": {}}, head))
    for rnd in (1, 2):
        changed = {s: store.put_shard(s, _tensors(100 * rnd + i)) for i, s in enumerate(SHARDS[rnd])}
        record = {
            "round": rnd,
            "cohorts": {s: list(MEMBERS) for s in SHARDS[rnd]},
            "updated_shards": list(SHARDS[rnd]),
            "aggregation": dict.fromkeys(SHARDS[rnd], "secagg"),
            "train": {m: {"loss": None, "num_examples": 32, "steps": STEPS} for m in MEMBERS},
            "receipts": receipts[rnd],
            "failed": {},
            "declined": {},
            "rejected": {},
        }
        extra = {"run": RUN, **({ROUND_RECORD_KEY: json.dumps(record)} if commit_records else {})}
        head = store.commit(head, changed, round_number=rnd, extra=extra)
        evaluation = {"evaluation": released} if rnd == 2 else {}
        append_record(run_dir, signed({**record, **evaluation}, head))
    published = public_key_hex(coordinator) if commit_records else ""
    dump_consortium(from_nodes(run_dir / "nodes", coordinator_public_key=published), root / "consortium.yaml")


@pytest.fixture(scope="module")
def pristine(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("federation")
    build_federation(root)
    return root


@pytest.fixture
def fed(pristine: Path, tmp_path: Path) -> Path:
    """A fresh copy of the federation to tamper with."""
    root = tmp_path / "fed"
    shutil.copytree(pristine, root)
    return root


def run_audit(root: Path) -> AuditResult:
    return audit(root / "run" / "nodes", root / "run", root / "consortium.yaml")


def ledger_path(root: Path, member: str) -> Path:
    return root / "run" / "nodes" / member / "ledger.jsonl"


def read_entries(root: Path, member: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in ledger_path(root, member).read_text().splitlines()]


def write_entries(root: Path, member: str, entries: list[dict[str, Any]]) -> None:
    ledger_path(root, member).write_bytes(b"".join(canonical_json(e) + b"\n" for e in entries))


def read_records(root: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (root / "run" / "rounds.jsonl").read_text().splitlines()]


def write_records(root: Path, records: list[dict[str, Any]]) -> None:
    (root / "run" / "rounds.jsonl").write_text("".join(json.dumps(r, sort_keys=True) + "\n" for r in records))


def key_of(root: Path, member: str) -> Ed25519PrivateKey:
    return load_or_create_signing_key(root / "run" / "nodes" / member / "member_ed25519.pem")


def sign(entry: dict[str, Any], key: Ed25519PrivateKey) -> dict[str, Any]:
    entry = dict(entry, public_key=public_key_hex(key))
    entry["signature"] = key.sign(signing_payload(entry)).hex()
    return entry


def rewrite_ledger(root: Path, member: str, edit: Callable[[int, dict[str, Any]], None]) -> None:
    """Apply ``edit(index, entry)`` to each of ``member``'s entries, re-sign the whole chain with the
    member's own key and put the re-signed entries in the round records where the originals were
    receipts: a consistent rewrite by the member itself, which only checks of the content catch."""
    entries = read_entries(root, member)
    for i, entry in enumerate(entries):
        edit(i, entry)
    resign_ledger(root, member, entries)


def resign_ledger(root: Path, member: str, entries: list[dict[str, Any]]) -> None:
    """Write ``entries`` as ``member``'s ledger, chained and signed with its own key; an entry that
    carried a signature before replaces, in the round records, the receipt it was."""
    key, prev, renamed, rewritten = key_of(root, member), "0" * 64, {}, []
    for entry in entries:
        old_signature = entry.pop("signature", None)
        entry = sign(dict(entry, prev_hash=prev), key)
        if old_signature is not None:
            renamed[old_signature] = entry
        prev = entry_hash(entry)
        rewritten.append(entry)
    write_entries(root, member, rewritten)
    write_records(root, [_replace_receipts(r, renamed) for r in read_records(root)])


def add_member(root: Path, name: str) -> Ed25519PrivateKey:
    """Publish another consortium member (its member.json, with a budget; the consortium file
    rebuilt from the nodes, keeping its coordinator key). It has no ledger yet."""
    state = root / "run" / "nodes" / name
    key = load_or_create_signing_key(state / "member_ed25519.pem")
    published = {"member": name, "embodiment": "so100", "epsilon": BUDGET, "delta": DELTA, "accountant": "rdp"}
    (state / "member.json").write_text(json.dumps({**published, "public_key": public_key_hex(key)}))
    coordinator = load_consortium(root / "consortium.yaml").coordinator_public_key
    dump_consortium(from_nodes(root / "run" / "nodes", coordinator_public_key=coordinator), root / "consortium.yaml")
    return key


def set_budget(root: Path, member: str, budget: float) -> None:
    cons = load_consortium(root / "consortium.yaml").to_dict()
    next(m for m in cons["members"] if m["member"] == member)["epsilon"] = budget
    (root / "consortium.yaml").write_text(json.dumps(cons))


def failures(result: AuditResult, check: str) -> list[str]:
    return [f.text() for f in result.failures if f.check == check]


def assert_found(result: AuditResult, check: str, *needles: str) -> None:
    """Some failure of ``check`` mentions every needle (the entry and the problem)."""
    texts = failures(result, check)
    assert any(all(n in t for n in needles) for t in texts), f"no {check} failure with {needles}: {texts}"


# --------------------------------------------------------------------------- a clean run


def test_clean_run_passes(fed: Path, capsys: pytest.CaptureFixture[str]) -> None:
    result = run_audit(fed)
    assert result.ok, [f.text() for f in result.failures]
    assert result.run == RUN and result.head_round == 2 and result.objects_verified == 8
    assert {r.round for r in result.rounds} == {1, 2}
    assert all(info["receipt"] == "ok" for r in result.rounds for info in r.members.values())
    assert len(result.entries) == 9 and all(e.ok for e in result.entries)
    assert [e.status for e in result.entries if e.member == "alpha"] == [
        "other run",
        "receipt in round 1",
        "receipt in round 2",
    ]
    for row in result.members.values():
        assert row.within_budget and row.run_entries == 2 and row.entries == 3
        assert row.epsilon_recorded == pytest.approx(epsilon([Mechanism(SIGMA, RATE, STEPS)] * 3, DELTA))
    # the independent recomputation is close to, and never far above, the node's own
    for e in result.entries:
        assert e.recomputed is not None and e.recorded >= e.recomputed * (1 - accounting.RDP_RTOL)

    args = ["--ledgers", str(fed / "run"), "--rounds", str(fed / "run"), "--consortium", str(fed / "consortium.yaml")]
    assert audit_main(["verify", *args]) == 0
    assert "PASS" in capsys.readouterr().out
    assert audit_main(["verify", *args, "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["ok"] and all(c["ok"] for c in data["checks"].values()) and len(data["entries"]) == 9


def _replace_receipts(value: Any, new_by_signature: dict[str, dict[str, Any]]) -> Any:
    """``value`` (a round record) with every receipt, dict or JSON text, replaced by its re-signed entry."""
    if isinstance(value, dict):
        if value.get("signature") in new_by_signature:
            return new_by_signature[value["signature"]]
        return {k: _replace_receipts(v, new_by_signature) for k, v in value.items()}
    if isinstance(value, list):
        return [_replace_receipts(v, new_by_signature) for v in value]
    if isinstance(value, str) and value.startswith("{") and '"signature"' in value:
        parsed = json.loads(value)
        if parsed.get("signature") in new_by_signature:
            return canonical_json(new_by_signature[parsed["signature"]]).decode()
    return value


def test_entries_before_version_3_pass_with_a_note_on_their_noise_source(fed: Path) -> None:
    """A ledger written before ``mechanism.noise_source`` existed is still valid; the auditor says
    that it cannot tell how that noise was drawn."""
    assert not [f for f in run_audit(fed).findings if "predate ledger version 3" in f.message]

    def version_2(_: int, entry: dict[str, Any]) -> None:
        if entry["release"] != "budget":
            del entry["mechanism"]["noise_source"]
            entry["version"] = 2

    rewrite_ledger(fed, "alpha", version_2)
    result = run_audit(fed)
    assert result.ok, [f.text() for f in result.failures]
    notes = [f for f in result.findings if "predate ledger version 3" in f.message]
    assert len(notes) == 1 and notes[0].member == "alpha" and notes[0].severity == "note"
    assert notes[0].message.startswith(f"{len(read_entries(fed, 'alpha')) - 1} entries (first: entry 1)")


def test_flat_ledger_layout(fed: Path) -> None:
    flat = fed / "collected"
    flat.mkdir()
    for member in MEMBERS:
        shutil.copy(ledger_path(fed, member), flat / f"{member}.jsonl")
    assert audit(flat, fed / "run", fed / "consortium.yaml").ok


def test_one_members_state_directory_is_its_ledger_alone(fed: Path) -> None:
    """A node's state directory holds other JSONL files (what it sent, its notes); given as
    --ledgers, they were read as ledgers of members named after them: 226 failures."""
    state = ledger_path(fed, "alpha").parent
    (state / "sent_updates.jsonl").write_text('{"key": "run-a|1", "sent": "masked"}\n')
    result = audit(state, None, fed / "consortium.yaml")
    assert set(result.members) == {"alpha"} and not failures(result, "format") and not failures(result, "consortium")
    # The operator's directory (runs.jsonl beside consortium.yaml) is no ledger either: said so
    # rather than reading its submissions as a member "runs" with hundreds of format failures.
    operator = fed / "operator"
    operator.mkdir()
    (operator / "runs.jsonl").write_text('{"run_id": "1", "out_dir": "x"}\n')
    (operator / "consortium.yaml").write_text("members: []\n")
    with pytest.raises(InputError, match="is an operator directory, not members' ledgers"):
        audit(operator, None, fed / "consortium.yaml")


# --------------------------------------------------------------------------- tampering


def test_edited_epsilon(fed: Path) -> None:
    entries = read_entries(fed, "alpha")
    entries[2]["epsilon"] = entries[2]["epsilon"] / 2  # under-state the spend of run-a round 1
    write_entries(fed, "alpha", entries)
    result = run_audit(fed)
    assert not result.ok
    assert_found(result, "signature", "entry 2 (line 3, run 'run-a', round 1)", "signature does not verify")
    assert_found(result, "accounting", "entry 2 (line 3, run 'run-a', round 1)", "field 'epsilon'", "under-states")
    assert_found(result, "chain", "entry 3", "prev_hash")
    # the coordinator's receipt (the original) no longer matches the ledger: two entries for one round
    assert_found(result, "chain", "round 1 receipt of alpha", "fork")
    assert not result.members["alpha"].ok and result.members["beta"].ok


def test_edited_mechanism(fed: Path) -> None:
    entries = read_entries(fed, "beta")
    entries[3]["mechanism"]["noise_multiplier"] = 0.7  # less noise than the epsilon accounts for
    write_entries(fed, "beta", entries)
    result = run_audit(fed)
    assert_found(result, "signature", "entry 3 (line 4, run 'run-a', round 2)", "signature does not verify")
    assert_found(result, "accounting", "entry 3 (line 4, run 'run-a', round 2)", "below the independent recomputation")


def test_dropped_entry(fed: Path) -> None:
    entries = read_entries(fed, "gamma")
    del entries[2]  # run-a round 1 disappears from the ledger
    write_entries(fed, "gamma", entries)
    result = run_audit(fed)
    assert_found(result, "chain", "entry 2 (line 3, run 'run-a', round 2)", "prev_hash", "dropped")
    assert_found(result, "receipt", "round 1 receipt of gamma", "is not in gamma's ledger", "dropped from the ledger")


def test_dropped_last_entry(fed: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    """Truncating the newest entry keeps the chain intact: the round records still catch it."""
    write_entries(fed, "gamma", read_entries(fed, "gamma")[:-1])
    result = run_audit(fed)
    assert not failures(result, "chain")
    assert_found(result, "receipt", "round 2 receipt of gamma", "is not in gamma's ledger", "an older copy")
    # A failing audit lists each member's entries, readable at 80 columns (a pipe, a CI log).
    monkeypatch.setenv("COLUMNS", "80")
    args = ["--ledgers", str(fed / "run"), "--rounds", str(fed / "run"), "--consortium", str(fed / "consortium.yaml")]
    assert audit_main(["verify", *args]) == 1
    out = capsys.readouterr().out
    tables = out[: out.index("FAIL [receipt]")]
    assert "…" not in tables and "ledger entries of gamma" in tables
    assert any(
        line.split()[:7] == ["2", "run-a", "1", "20", "1.500", "0.200", "5.2343"] for line in tables.splitlines()
    )
    write_entries(fed, "gamma", [])  # an empty copy: every receipt is missing, and said so
    assert_found(run_audit(fed), "receipt", "receipt of gamma", "is not in gamma's ledger, which holds no entry")


def test_a_ledger_rolled_back_behind_a_receipt_the_coordinator_held_is_caught(fed: Path) -> None:
    """Each round record keeps every member's newest receipt the coordinator held
    (``ledger_heads``). A member whose node was restored from a backup declines in this run,
    so this run holds no receipt of its own to miss; the head it was sent still is one."""
    entries = read_entries(fed, "gamma")
    later = sign(dict(entries[-1], run="run-later", round=3, prev_hash=entry_hash(entries[-1])), key_of(fed, "gamma"))
    stranger = sign(dict(later), Ed25519PrivateKey.generate())
    stranger["public_key"] = later["public_key"]  # claims gamma's key, signed by another
    records = read_records(fed)
    records[1]["ledger_heads"] = {"gamma": entries[1], "alpha": read_entries(fed, "alpha")[-1]}  # both held
    records[2]["ledger_heads"] = {"gamma": later, "beta": stranger | {"member": "beta"}}
    write_records(fed, records)
    result = run_audit(fed)
    texts = failures(result, "receipt")
    assert_found(
        result, "receipt", "round 2 ledger head of gamma", "gamma's ledger lacks entry", "round 3", "rolled back"
    )
    assert_found(result, "receipt", "round 2 ledger head of beta", "is not an entry beta's key signed")
    assert not any("round 1 ledger head" in t for t in texts), "heads the ledgers hold are fine"
    # A receipt of this run is checked where it was recorded, not once more as a head.
    write_entries(fed, "alpha", read_entries(fed, "alpha")[:-1])
    records[2]["ledger_heads"] = {"alpha": records[2]["receipts"]["alpha"]}
    write_records(fed, records)
    texts = failures(run_audit(fed), "receipt")
    assert any("round 2 receipt of alpha" in t for t in texts) and not any("ledger head of alpha" in t for t in texts)


def test_blank_lines_after_the_last_entry_pass_and_a_torn_last_line_is_named(fed: Path) -> None:
    """A copy through an editor or a mail client may gain a blank line at the end: it carries
    nothing, so it fails nothing. A half-written last line is said to be one."""
    path = ledger_path(fed, "gamma")
    whole = path.read_bytes()
    path.write_bytes(whole + b"\n \r\n")
    result = run_audit(fed)
    assert result.ok, [f.text() for f in result.failures]
    assert len(result.entries) == 9
    path.write_bytes(whole.replace(b"\n", b"\n\n", 1))  # a blank line between entries still fails
    assert_found(run_audit(fed), "input", "line 2 is not valid JSON")
    path.write_bytes(whole[: len(whole) - 40])
    last = whole.count(b"\n")
    assert_found(run_audit(fed), "input", f"line {last} is not valid JSON and has no final newline: a torn last write")


def test_swapped_entries(fed: Path) -> None:
    entries = read_entries(fed, "alpha")
    entries[2], entries[3] = entries[3], entries[2]
    write_entries(fed, "alpha", entries)
    result = run_audit(fed)
    assert_found(result, "chain", "entry 2 (line 3, run 'run-a', round 2)", "prev_hash", "reordered")
    assert_found(result, "chain", "entry 3 (line 4, run 'run-a', round 1)", "field 'round'", "does not increase")


def test_forged_signature(fed: Path) -> None:
    entries = read_entries(fed, "beta")
    forger = Ed25519PrivateKey.generate()  # nobody's published key
    entries[3]["epsilon"] = 0.5
    entries[3]["signature"] = forger.sign(signing_payload(entries[3])).hex()
    write_entries(fed, "beta", entries)
    result = run_audit(fed)
    assert_found(result, "signature", "entry 3 (line 4, run 'run-a', round 2)", "signature does not verify")
    assert_found(result, "accounting", "entry 3", "under-states")


def test_key_swapped_between_members_in_consortium(fed: Path) -> None:
    cons = load_consortium(fed / "consortium.yaml").to_dict()
    keys = {m["member"]: m["public_key"] for m in cons["members"]}
    for m in cons["members"]:
        if m["member"] in ("alpha", "beta"):
            m["public_key"] = keys["beta" if m["member"] == "alpha" else "alpha"]
    (fed / "consortium.yaml").write_text(json.dumps(cons))
    result = run_audit(fed)
    assert_found(result, "identity", "alpha ledger", "entry 0", "signed with beta's published key, not alpha's")
    assert_found(result, "identity", "round 1 receipt of beta", "signed with alpha's published key, not beta's")
    assert result.members["gamma"].ok and not result.members["alpha"].ok


def test_entries_resigned_with_another_members_key(fed: Path) -> None:
    """Beta rewrites alpha's ledger under its own key (a consistent chain): caught by whose key signed."""
    beta = key_of(fed, "beta")
    entries, prev = [], "0" * 64
    for entry in read_entries(fed, "alpha"):
        entry = sign(dict(entry, prev_hash=prev), beta)
        entries.append(entry)
        prev = entry_hash(entry)
    write_entries(fed, "alpha", entries)
    result = run_audit(fed)
    assert_found(result, "identity", "entry 2 (line 3, run 'run-a', round 1)", "signed with beta's published key")
    # the rewritten chain is internally consistent; only the coordinator's receipts show the rewrite
    assert not [t for t in failures(result, "chain") if t.startswith("alpha ledger")]
    assert_found(result, "chain", "round 1 receipt of alpha", "fork")


def test_entry_replayed_from_another_run(fed: Path) -> None:
    records = read_records(fed)
    old = read_entries(fed, "alpha")[1]  # alpha's validly signed receipt of run-old round 1
    records[2]["receipts"]["alpha"] = old
    write_records(fed, records)
    result = run_audit(fed)
    assert_found(result, "receipt", "round 2 receipt of alpha", "run 'run-old'", "replayed from another run")
    # and alpha's real round-2 spend is now unaccounted for in the records
    assert_found(result, "coverage", "alpha ledger", "entry 3 (line 4, run 'run-a', round 2)", "no receipt")


def test_entry_replayed_inside_the_ledger(fed: Path) -> None:
    entries = read_entries(fed, "alpha")
    write_entries(fed, "alpha", [*entries, entries[1]])
    result = run_audit(fed)
    assert_found(result, "chain", "entry 4 (line 5, run 'run-old', round 1)", "repeats entry 1", "replayed")


def test_contribution_without_receipt(fed: Path) -> None:
    records = read_records(fed)
    del records[2]["receipts"]["gamma"]  # the record still says gamma's update was accepted
    write_records(fed, records)
    result = run_audit(fed)
    assert_found(result, "receipt", "round 2", "gamma contributed to 2 updated shard(s)", "no receipt")
    assert_found(result, "coverage", "gamma ledger", "entry 3 (line 4, run 'run-a', round 2)", "no receipt")
    assert result.rounds[1].members["gamma"]["receipt"] == "missing"


def test_contribution_claimed_for_a_member_who_never_trained(fed: Path) -> None:
    records = read_records(fed)
    records[1]["cohorts"]["expert/L0/E0"].append("mallory")
    records[1]["train"]["mallory"] = {"loss": None, "num_examples": 32, "steps": STEPS}
    write_records(fed, records)
    result = run_audit(fed)
    assert_found(result, "receipt", "round 1", "mallory contributed to 1 updated shard(s)", "no receipt")


def test_receipt_signature_is_verified(fed: Path) -> None:
    """A receipt the record holds is checked under the member's published key, not only matched
    to the ledger: an edited receipt is named as one whose signature does not verify."""
    records = read_records(fed)
    records[1]["receipts"]["alpha"]["epsilon"] *= 2  # over-states, so only the signature shows the edit
    write_records(fed, records)
    result = run_audit(fed)
    assert_found(result, "signature", "round 1 receipt of alpha", "signature does not verify")


def test_receipt_must_cover_the_shards_the_record_assigned(fed: Path) -> None:
    records = read_records(fed)
    records[1]["cohorts"]["expert/L0/E0"].remove("alpha")  # the record says alpha trained only adapter/shared
    write_records(fed, records)
    result = run_audit(fed)
    assert_found(
        result,
        "receipt",
        "round 1 receipt of alpha",
        "covers shards ['adapter/shared', 'expert/L0/E0'], the record assigned ['adapter/shared']",
    )


def test_receipt_must_record_the_steps_the_record_reports(fed: Path) -> None:
    """The receipt's steps are what the member paid for; the record's are what ran. A record that
    reports no steps for a member leaves the receipt unchecked, so that fails too."""
    records = read_records(fed)
    records[1]["train"]["alpha"]["steps"] = STEPS + 5
    del records[2]["train"]["beta"]["steps"]
    write_records(fed, records)
    result = run_audit(fed)
    assert_found(result, "receipt", "round 1 receipt of alpha", f"records {STEPS} steps, the record says {STEPS + 5}")
    assert_found(result, "receipt", "round 2 receipt of beta", "reports no step count for beta", "cannot be checked")
    assert not [t for t in failures(result, "receipt") if "gamma" in t]


def test_failed_reply_is_explained_not_a_failure(fed: Path) -> None:
    """A member whose reply failed spent budget its update never delivered: a note, not a failure."""
    records = read_records(fed)
    for field in ("receipts", "train"):
        del records[2][field]["gamma"]
    records[2]["failed"]["gamma"] = "no masked_input reply in time"
    write_records(fed, records)
    result = run_audit(fed)
    assert result.ok, [f.text() for f in result.failures]
    notes = [f.text() for f in result.findings if f.check == "coverage"]
    assert any("entry 3" in n and "reply failed" in n for n in notes)
    assert result.rounds[1].members["gamma"]["state"] == "failed"


def test_round_retried_after_a_coordinator_restart_is_explained(fed: Path) -> None:
    """gamma spent round 2 in an attempt that died before commit, then declined the retried round 2."""
    records = read_records(fed)
    for field in ("receipts", "train"):
        del records[2][field]["gamma"]
    records[2]["declined"]["gamma"] = "round 2 of run run-a was already trained"
    write_records(fed, records)
    result = run_audit(fed)
    assert result.ok, [f.text() for f in result.failures]
    assert any("declined the committed attempt" in f.message for f in result.findings if f.check == "coverage")


def test_a_member_that_sat_a_round_out_at_query_is_one_of_its_members(fed: Path) -> None:
    """Left out of every cohort (it declined at query), gamma still shows in the round's row:
    an auditor reading the rounds table sees that it declined, not that it was absent."""
    records = read_records(fed)
    for field in ("receipts", "train"):
        del records[2][field]["gamma"]
    records[2]["cohorts"] = {s: [m for m in ms if m != "gamma"] for s, ms in records[2]["cohorts"].items()}
    records[2]["declined"] = {"gamma": "privacy budget exhausted"}
    write_records(fed, records)
    row = next(r for r in run_audit(fed).rounds if r.round == 2)
    assert row.members["gamma"]["state"] == "declined" and row.members["gamma"]["receipt"] == "-"


def test_record_rebuilt_from_store_is_checked_against_ledgers(fed: Path) -> None:
    records = read_records(fed)
    records[2] = {"round": 2, "recovered_from_store": True}
    write_records(fed, records)
    result = run_audit(fed)
    assert result.ok, [f.text() for f in result.failures]
    # without the ledger entries that cover round 2's changed shards, the change is unexplained
    for member in MEMBERS:
        write_entries(fed, member, read_entries(fed, member)[:-1])
    assert_found(run_audit(fed), "store", "store round 2", "no member's ledger entry of this round covers them")


def test_round_records_must_match_the_records_committed_in_the_store(tmp_path: Path) -> None:
    build_federation(tmp_path, commit_records=True)
    result = run_audit(tmp_path)
    assert result.ok, [f.text() for f in result.failures]
    assert not any("round signatures not checked" in f.message for f in result.findings)
    # Dropping a member's receipt from rounds.jsonl (and its training) would hide it from the
    # coverage check; the manifest, hash-chained in the store, still holds the committed record.
    records = read_records(tmp_path)
    for field in ("receipts", "train"):
        del records[2][field]["gamma"]
    records[2]["declined"] = {"gamma": "round 2 of run run-a was already trained"}
    write_records(tmp_path, records)
    assert_found(
        run_audit(tmp_path),
        "store",
        "store round 2",
        "differs from the one committed with the manifest in ['declined', 'receipts', 'train']",
    )


def test_a_line_claiming_a_rebuilt_record_cannot_replace_a_committed_one(tmp_path: Path) -> None:
    """A review replaced round 2's line with {"round": 2, "recovered_from_store": true} and the
    original signature: the audit skipped the round's receipt checks and passed a ledger
    rolled back behind its round-2 receipt. A coordinator marks a line rebuilt only when the
    manifest holds no record to rebuild it from."""
    build_federation(tmp_path, commit_records=True)
    write_entries(tmp_path, "gamma", read_entries(tmp_path, "gamma")[:-1])
    assert not run_audit(tmp_path).ok
    records = read_records(tmp_path)
    records[2] = {"round": 2, "recovered_from_store": True, "coordinator": records[2]["coordinator"]}
    write_records(tmp_path, records)
    assert_found(run_audit(tmp_path), "store", "store round 2", "says this round's record was rebuilt", "replaces it")


def test_the_coordinator_signs_each_whole_line_so_an_evaluation_cannot_be_dropped(tmp_path: Path) -> None:
    """The evaluation (held-out errors and their receipts) joins a round's line after the
    commit, so the manifest does not cover it. Dropping a member's evaluation from the line
    hid a ledger rolled back behind that release; the signature now covers the whole line."""
    build_federation(tmp_path, commit_records=True, evaluations=True)
    result = run_audit(tmp_path)
    assert result.ok, [f.text() for f in result.failures]
    assert not any("signed manifests only" in f.message for f in result.findings)
    write_entries(tmp_path, "gamma", read_entries(tmp_path, "gamma")[:-1])  # gamma's evaluation release
    assert not run_audit(tmp_path).ok
    records = read_records(tmp_path)
    del records[2]["evaluation"]["gamma"]
    write_records(tmp_path, records)
    assert_found(run_audit(tmp_path), "store", "store round 2", "not the one the coordinator signed")
    # Stripping the digest from the signature does not make the line unsigned: the payload had it.
    records = read_records(tmp_path)
    records[2]["coordinator"].pop("record")
    write_records(tmp_path, records)
    assert_found(run_audit(tmp_path), "store", "store round 2", "signature does not verify")


def test_an_older_coordinators_manifest_only_signatures_still_verify_and_say_what_they_leave_out(
    tmp_path: Path,
) -> None:
    build_federation(tmp_path / "old", commit_records=True, evaluations=True, whole_lines=False)
    result = run_audit(tmp_path / "old")
    assert result.ok, [f.text() for f in result.failures]
    note = next(f for f in result.findings if f.subject == "rounds.jsonl")
    assert note.severity == NOTE and "rounds [0, 1, 2]" in note.message and "signed manifests only" in note.message


def test_every_committed_round_carries_the_published_coordinators_signature(tmp_path: Path) -> None:
    build_federation(tmp_path, commit_records=True)
    records = read_records(tmp_path)
    impostor = Ed25519PrivateKey.generate()
    head = ShardStore(tmp_path / "run" / "store").manifest(1)
    records[1]["coordinator"] = sign_round(impostor, RUN, 1, head.digest).to_dict()
    del records[2]["coordinator"]
    records[0]["coordinator"]["signature"] = records[0]["coordinator"]["signature"][::-1]
    write_records(tmp_path, records)
    result = run_audit(tmp_path)
    assert_found(result, "store", "store round 1", "not the consortium's coordinator key")
    assert_found(result, "store", "store round 2", "no coordinator signature")
    assert_found(result, "store", "store round 0", "does not verify")


def test_private_evaluations_are_matched_to_the_ledgers(tmp_path: Path) -> None:
    """Each DP member's held-out error of round 2 is a ledger entry and a receipt in the record."""
    build_federation(tmp_path, evaluations=True)
    result = run_audit(tmp_path)
    assert result.ok, [f.text() for f in result.failures]
    assert [e.status for e in result.entries if e.member == "alpha"][-1] == "evaluation in round 2"
    spent = epsilon([Mechanism(SIGMA, RATE, STEPS)] * 3 + [Mechanism(EVAL_SIGMA, 1.0, 1)], DELTA)
    assert result.members["alpha"].epsilon_recorded == pytest.approx(spent)
    assert spent > epsilon([Mechanism(SIGMA, RATE, STEPS)] * 3, DELTA)  # the release is paid for


def test_held_out_error_without_a_receipt_is_a_release_outside_the_ledger(tmp_path: Path) -> None:
    build_federation(tmp_path, evaluations=True)
    records = read_records(tmp_path)
    del records[2]["evaluation"]["beta"]["receipt"]  # beta's node sent its exact error
    records[2]["evaluation"]["gamma"]["receipt"] = records[2]["evaluation"]["alpha"]["receipt"]
    write_records(tmp_path, records)
    result = run_audit(tmp_path)
    assert_found(result, "accounting", "round 2 evaluation of beta", "without a receipt")
    assert_found(result, "identity", "round 2 evaluation of gamma", "signed by another member's key")
    # beta's and gamma's releases are still in their ledgers: spent, not used, and said so
    notes = [f.text() for f in result.findings if f.severity == "note" and f.check == "coverage"]
    assert any("beta ledger" in n and "evaluation release" in n for n in notes), notes


def test_an_evaluation_receipt_dropped_from_the_ledger_is_caught(tmp_path: Path) -> None:
    build_federation(tmp_path, evaluations=True)
    write_entries(tmp_path, "gamma", read_entries(tmp_path, "gamma")[:-1])
    assert_found(run_audit(tmp_path), "receipt", "round 2 evaluation of gamma", "is not in gamma's ledger")


def test_a_training_receipt_cannot_stand_in_for_an_evaluation_receipt(tmp_path: Path) -> None:
    build_federation(tmp_path, evaluations=True)
    records = read_records(tmp_path)
    trained = read_entries(tmp_path, "alpha")[2]  # alpha's round-2 training: this run, round, member
    records[2]["evaluation"]["alpha"]["receipt"] = canonical_json(trained).decode()
    write_records(tmp_path, records)
    result = run_audit(tmp_path)
    assert_found(result, "receipt", "round 2 evaluation of alpha", "release 'dp-sgd' != 'evaluation'")


def test_held_out_errors_carried_into_round_zero_must_carry_the_receipt_of_their_release(tmp_path: Path) -> None:
    """A continued run's round 0 carries the errors members released for the model it starts
    from (``evaluation_same_model``): nothing is spent for them in this run, but each must
    carry the receipt of the release it names, in the member's ledger."""
    build_federation(tmp_path, evaluations=True)
    records = read_records(tmp_path)
    # Round 2's releases stand in for an earlier run's (this ledger holds no other evaluation).
    carried = {m: {**records[2]["evaluation"][m], "run": RUN, "round": 2} for m in MEMBERS}
    records[0]["evaluation_same_model"] = carried
    write_records(tmp_path, records)
    clean = run_audit(tmp_path)
    assert clean.ok, [f.text() for f in clean.failures]
    assert [e.status for e in clean.entries if e.member == "alpha"][-1] == "evaluation in round 2"
    carried["beta"]["round"] = 1  # names a release the receipt is not
    del carried["gamma"]["receipt"]
    write_records(tmp_path, records)
    result = run_audit(tmp_path)
    assert_found(result, "receipt", "round 0 evaluation of beta (carried from an earlier release)", "round 2 != 1")
    assert_found(
        result, "accounting", "round 0 evaluation of gamma (carried from an earlier release)", "without a receipt"
    )
    assert not [t for t in failures(result, "receipt") + failures(result, "accounting") if "alpha" in t]


EXACT_ERROR = {"action_mse": 0.0123, "num_examples": 40, "action_mae": 0.21}  # no receipt: not a DP release


@pytest.mark.parametrize("ledger", ["missing", "another run only"])
def test_an_exact_held_out_error_fails_even_from_a_member_that_never_trained(fed: Path, ledger: str) -> None:
    """Every consortium member publishes a budget, so an evaluation value without a receipt is a
    release outside it, whether or not the member trained in this run or gave a ledger."""
    key = add_member(fed, "delta")
    if ledger == "another run only":
        _append(Ledger(ledger_path(fed, "delta"), key), [], "delta", OLD_RUN, 1, ["adapter/shared"])
    records = read_records(fed)
    for record in records:
        record.setdefault("evaluation", {})["delta"] = dict(EXACT_ERROR)
    write_records(fed, records)
    result = run_audit(fed)
    assert not result.ok
    for rnd in (0, 1, 2):
        assert_found(result, "accounting", f"round {rnd} evaluation of delta", "without a receipt")
    if ledger == "missing":
        assert_found(result, "input", "delta ledger", "no ledger was given", "cannot be matched")
    else:
        assert not failures(result, "input") and not result.members["delta"].ok


def test_a_held_out_error_of_a_member_outside_the_consortium_fails(fed: Path) -> None:
    records = read_records(fed)
    records[0]["evaluation"]["mallory"] = dict(EXACT_ERROR)
    write_records(fed, records)
    assert_found(run_audit(fed), "consortium", "round 0 evaluation of mallory", "not a consortium member")


def test_a_member_that_only_evaluated_needs_its_ledger(tmp_path: Path) -> None:
    """A DP member may release only its held-out error (no training in this run): with its ledger
    the release is matched and the audit passes; without it the release cannot be matched."""
    build_federation(tmp_path, evaluations=True)
    key = add_member(tmp_path, "delta")
    receipt = _append_evaluation(Ledger(ledger_path(tmp_path, "delta"), key), [], "delta", RUN, 2)
    records = read_records(tmp_path)
    records[2]["evaluation"]["delta"] = {
        "action_mse": 0.01,
        "num_examples": 40,
        "receipt": canonical_json(receipt).decode(),
    }
    write_records(tmp_path, records)
    result = run_audit(tmp_path)
    assert result.ok, [f.text() for f in result.failures]
    assert [e.status for e in result.entries if e.member == "delta"] == ["evaluation in round 2"]
    ledger_path(tmp_path, "delta").unlink()
    result = run_audit(tmp_path)
    assert_found(result, "input", "delta ledger", "no ledger was given", "cannot be matched")
    assert_found(result, "receipt", "round 2 evaluation of delta", "no ledger of 'delta' was given")


def test_a_consortium_without_a_coordinator_key_says_signatures_were_not_checked(fed: Path) -> None:
    result = run_audit(fed)
    assert result.ok
    assert any("round signatures not checked" in f.message for f in result.findings if f.severity == "note")


def test_uncommitted_round_is_explained(fed: Path) -> None:
    """The coordinator stopped after members trained round 3 but before committing it."""
    for member in MEMBERS:
        ledger = Ledger(ledger_path(fed, member), key_of(fed, member))
        _append(ledger, [Mechanism(SIGMA, RATE, STEPS)] * 3, member, RUN, 3, SHARDS[1])
    result = run_audit(fed)
    assert result.ok, [f.text() for f in result.failures]
    assert any("never committed" in f.message for f in result.findings if f.check == "coverage")


def declare_budgets(
    root: Path, member: str, declarations: dict[int, float | tuple[float, float]], version: int = 4
) -> None:
    """Rewrite ``member``'s ledger with other budget declarations, signed by the member itself:
    its releases (declarations dropped) at ``version``, with a declaration (epsilon at DELTA)
    before release ``i`` for each ``i: epsilon``; receipts in the round records follow their
    re-signed entries."""
    entries = []
    releases = [e for e in read_entries(root, member) if e["release"] != "budget"]
    for i, entry in enumerate(releases):
        if i in declarations:
            declared_epsilon, declared_delta = (
                declarations[i] if isinstance(declarations[i], tuple) else (declarations[i], DELTA)
            )
            budget = {"epsilon": float(declared_epsilon), "delta": float(declared_delta)}
            entries.append(
                {"version": 4, "release": "budget", "member": member, "budget": budget, "time": entry["time"]}
            )
        entries.append(dict(entry, version=version))
    resign_ledger(root, member, entries)


def notes_of(result: AuditResult, member: str) -> list[str]:
    return [f.message for f in result.findings if f.severity == "note" and f.member == member]


def test_every_node_declares_its_budget_before_its_first_release(fed: Path) -> None:
    result = run_audit(fed)
    assert result.ok and not [n for m in MEMBERS for n in notes_of(result, m) if "budget" in n]
    assert [e["release"] for e in read_entries(fed, "alpha")][:2] == ["budget", "dp-sgd"]
    assert result.members["alpha"].entries == 3, "a declaration is not a release"


def test_a_version_4_release_without_a_declared_budget_fails(fed: Path) -> None:
    """Leaving the declaration out would hide the budget a node ran under: an overspend of the
    budget published at the time, declared (raised) only afterwards, would pass."""
    declare_budgets(fed, "alpha", {})
    result = run_audit(fed)
    assert_found(
        result, "budget", "alpha budget", "entry 0 (line 1, run 'run-old', round 1) to entry 2", "(3 releases)"
    )
    # one failure for the lot: a ledger that lost its first line had a dozen identical ones
    assert len([t for t in failures(result, "budget") if "no budget declared" in t]) == 1
    declare_budgets(fed, "alpha", {2: 7.0})  # declared only before its last release
    result = run_audit(fed)
    assert_found(result, "budget", "alpha budget", "entry 1 (line 2, run 'run-a', round 1)", "no budget declared")
    assert not [t for t in failures(result, "budget") if "entry 3" in t]


def test_ledgers_older_than_version_4_are_checked_against_the_published_budget(fed: Path) -> None:
    declare_budgets(fed, "alpha", {}, version=3)
    result = run_audit(fed)
    assert result.ok, [f.text() for f in result.failures]
    assert any("its 3 releases predate ledger version 4 and declare no budget" in n for n in notes_of(result, "alpha"))


def test_budget_declarations_show_when_a_member_raised_its_budget(
    fed: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    declare_budgets(fed, "alpha", {0: 6.0, 2: 8.0})  # alpha spends ~6.4: raised before its last round
    result = run_audit(fed)
    assert result.ok, [f.text() for f in result.failures]
    notes = notes_of(result, "alpha")
    changed = "changed its budget: ε=6 δ=1e-05 from release 1 (entry 0,"
    assert any(changed in n and "then ε=8 δ=1e-05 from release 3 (entry 3," in n for n in notes), notes
    assert not any("declare no budget" in n or "out of date" in n for n in notes)
    # the consortium still publishing the old budget is said, not failed (the spend is checked against it anyway)
    set_budget(fed, "alpha", 7.0)
    notes = notes_of(run_audit(fed), "alpha")
    assert any("last declares ε=8 δ=1e-05 (entry 3), the consortium publishes ε=7 δ=1e-05" in n for n in notes)
    # It passes, and the verdict line, the one read last, says there is something to read.
    args = ["--ledgers", str(fed / "run"), "--rounds", str(fed / "run"), "--consortium", str(fed / "consortium.yaml")]
    assert audit_main(["verify", *args]) == 0
    out = capsys.readouterr().out
    verdict = " ".join(out[out.rindex("PASS") :].split())
    assert verdict.startswith("PASS: every check holds, ") and "note(s) above to read (" in verdict
    cons = load_consortium(fed / "consortium.yaml").to_dict()
    cons["members"][0].update(epsilon=8.0, delta=1e-6)  # a delta that differs alone is said too
    (fed / "consortium.yaml").write_text(json.dumps(cons))
    notes = notes_of(run_audit(fed), "alpha")
    assert any("the consortium publishes ε=8 δ=1e-06" in n for n in notes)


def test_a_release_over_the_budget_declared_before_it_fails(fed: Path) -> None:
    """Within the published budget, but over the one the member's own node declared at the time."""
    declare_budgets(fed, "alpha", {0: 5.0})
    result = run_audit(fed)
    assert_found(result, "budget", "alpha budget", "entry 3", "over the declared budget 5", "(declared at entry 0)")
    assert not failures(result, "signature") and not failures(result, "chain")


def test_a_declaration_below_what_the_ledger_records_fails(fed: Path) -> None:
    declare_budgets(fed, "alpha", {0: 8.0, 2: 1.0})
    result = run_audit(fed)
    assert_found(result, "budget", "alpha budget", "entry 3 (line 4, budget)", "declares epsilon 1.0, below the")


def test_a_declaration_at_another_delta_than_the_releases_before_it_fails(fed: Path) -> None:
    """The ledger refuses it (every earlier claim was made at the old delta); a member signing one
    with its own key is caught here."""
    declare_budgets(fed, "alpha", {0: 8.0, 2: (8.0, 1e-4)})
    result = run_audit(fed)
    assert_found(result, "budget", "entry 3 (line 4, budget)", "declares delta 0.0001", "accounted at 1e-05")


def test_budget_exceeded(fed: Path) -> None:
    cons = load_consortium(fed / "consortium.yaml").to_dict()
    cons["members"][0]["epsilon"] = 2.0  # alpha's published budget, below what it spent
    (fed / "consortium.yaml").write_text(json.dumps(cons))
    result = run_audit(fed)
    assert_found(result, "budget", "alpha budget", "over the published budget epsilon 2")
    assert_found(result, "budget", "alpha budget", "entry 2", "records epsilon")


def test_budget_is_composed_at_the_published_delta(fed: Path) -> None:
    """alpha's whole history composes to epsilon 5.77 (PLD; RDP 6.38) at delta 1e-5, but only to
    4.93 (PLD; RDP 5.56) at 1e-4: a budget of 5.6 is exceeded at the published delta only."""
    set_budget(fed, "alpha", 5.6)
    result = run_audit(fed)
    assert_found(result, "budget", "alpha budget", "composes to epsilon", "at delta 1e-05", "budget epsilon 5.6")


def test_a_budget_settled_by_pld_says_so_where_the_members_table_is_read(fed: Path) -> None:
    """A budget of 6.0 lies between alpha's PLD (5.77) and RDP (6.38) epsilon: within budget,
    and the table a reader sees (terminal, HTML, markdown) explains why RDP is over it."""
    from rich.console import Console

    from privacy.audit.cli import print_result
    from privacy.audit.report import PLD_DECIDED, render_html

    set_budget(fed, "alpha", 6.0)
    result = run_audit(fed)
    alpha = result.members["alpha"]
    assert alpha.within_budget and alpha.method == "pld" and alpha.epsilon_rdp > 6.0
    console = Console(record=True, width=400)
    print_result(result, console)
    shown = " ".join(console.export_text().split())
    assert PLD_DECIDED in shown
    # Its receipts (RDP, 6.37) are over the published 6.0: FAIL, and the table says why beside "yes".
    assert not alpha.ok and "alpha: the recomputed ε is within the budget, but the member's own signed" in shown
    assert PLD_DECIDED in render_markdown(result) and html.escape(PLD_DECIDED) in render_html(result)
    set_budget(fed, "alpha", 8.0)
    assert PLD_DECIDED not in render_markdown(run_audit(fed))


def test_claim_at_a_looser_delta_than_published(fed: Path) -> None:
    """An entry honest at delta 1e-4 (epsilon 5.55) hides that the spend at the published
    delta 1e-5 is 6.37: a claim at a looser delta is a budget failure of its own."""
    looser = 10 * DELTA

    def at_looser_delta(i: int, entry: dict[str, Any]) -> None:
        if i == 2:
            entry.update(delta=looser, epsilon=epsilon([Mechanism(SIGMA, RATE, STEPS)] * 3, looser))

    rewrite_ledger(fed, "alpha", at_looser_delta)
    result = run_audit(fed)
    assert not failures(result, "accounting") and not failures(result, "signature")
    assert_found(result, "budget", "alpha budget", "entry 2", "claims at delta 0.0001, looser than", "delta 1e-05")


def test_a_claim_ten_percent_below_the_true_epsilon_is_caught(fed: Path) -> None:
    """alpha records 90% of the tight (PLD) epsilon of its history at entry 2, a consistent rewrite
    signed with its own key. dp-accounting's RDP bound sits ~10% above PLD here, so the claim is
    within 20% of RDP and within 0.5 of PLD: only the documented tolerances (2%, 0.02) catch it."""
    totals = accounting.totals_of([accounting.Mech(SIGMA, RATE, STEPS)] * 2)
    true_epsilon = accounting.pld_epsilon(totals, DELTA)
    claim = 0.9 * true_epsilon

    def under_report(i: int, entry: dict[str, Any]) -> None:
        if i == 2:
            entry["epsilon"] = claim

    rewrite_ledger(fed, "alpha", under_report)
    result = run_audit(fed)
    assert not failures(result, "signature") and not failures(result, "chain")
    assert_found(result, "accounting", "entry 2 (line 3, run 'run-a', round 1)", "under-states the spend")
    assert [f.member for f in result.failures] == ["alpha"]


def test_an_evaluation_release_is_composed_into_the_history(fed: Path) -> None:
    """alpha appends an evaluation release (sigma 1) that claims it cost nothing: its recorded
    epsilon stays 6.37, while the history with the release composes to 8.24 (RDP; PLD 7.55).
    Its accounting fails, and so does a budget of 7 that the training alone (6.38) would keep."""
    entries = read_entries(fed, "alpha")
    mechanism = {"noise_multiplier": 1.0, "sample_rate": 1.0, "steps": 1, "clipping_norm": 0.05}
    mechanism |= {"opacus_mode": "gaussian-sum-count", "noise_source": "os-csprng-gauss"}
    free = {**entries[-1], "release": "evaluation", "shards": [], "mechanism": mechanism}
    del free["signature"]
    free = sign({**free, "prev_hash": entry_hash(entries[-1])}, key_of(fed, "alpha"))
    write_entries(fed, "alpha", [*entries, free])
    set_budget(fed, "alpha", 7.0)
    result = run_audit(fed)
    assert not failures(result, "signature") and not failures(result, "chain")
    assert_found(result, "accounting", "entry 4 (line 5, run 'run-a', round 2, evaluation)", "under-states")
    assert_found(result, "budget", "alpha budget", "composes to epsilon", "over the published budget epsilon 7")


def test_store_object_corrupted(fed: Path) -> None:
    store = ShardStore(fed / "run" / "store")
    oid = store.manifest(1).shards["expert/L0/E0"]
    path = store.object_path(oid)
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))
    result = run_audit(fed)
    assert_found(result, "store", "store round 1", "shard expert/L0/E0", "corrupt")


def test_model_change_without_contributions(fed: Path) -> None:
    records = read_records(fed)
    records[2]["updated_shards"].remove("expert/L0/E1")  # the store changed it anyway
    write_records(fed, records)
    result = run_audit(fed)
    assert_found(result, "store", "store round 2", "expert/L0/E1", "aggregated no update")


def test_unusable_inputs_exit_2(fed: Path, capsys: pytest.CaptureFixture[str]) -> None:
    base = ["verify", "--ledgers", str(fed / "run"), "--rounds", str(fed / "run")]
    assert audit_main([*base, "--consortium", str(fed / "missing.yaml")]) == 2
    assert "cannot read consortium file" in capsys.readouterr().err
    one_file = ["verify", "--ledgers", str(ledger_path(fed, "alpha")), "--rounds", str(fed / "run")]
    assert audit_main([*one_file, "--consortium", str(fed / "consortium.yaml")]) == 2
    assert "is a file, not a directory: pass the directory that holds it" in capsys.readouterr().err
    entries = read_entries(fed, "alpha")
    entries[1]["epsilon"] = 0.1
    write_entries(fed, "alpha", entries)
    assert audit_main([*base, "--consortium", str(fed / "consortium.yaml")]) == 1
    assert "FAIL" in capsys.readouterr().out


# --------------------------------------------------------------------------- consortium file


def test_consortium_round_trip_and_from_nodes(fed: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = fed / "c2.json"
    assert audit_main(["consortium", "--from-nodes", str(fed / "run" / "nodes"), "-o", str(out), "--name", "t"]) == 0
    c = load_consortium(out)
    assert sorted(c.members) == list(MEMBERS) and c.name == "t"
    assert c.members["alpha"].public_key == public_key_hex(key_of(fed, "alpha"))
    assert load_consortium(fed / "consortium.yaml").members == c.members
    assert c.coordinator_public_key == ""
    # The local demo: the coordinator's key as its run.json names it.
    coordinator = public_key_hex(Ed25519PrivateKey.generate())
    run_json = fed / "run" / "run.json"
    run_json.write_text(json.dumps({**json.loads(run_json.read_text()), "coordinator_public_key": coordinator}))
    args = ["consortium", "--from-nodes", str(fed / "run" / "nodes"), "-o", str(out), "--coordinator-from"]
    assert audit_main([*args, str(fed / "run")]) == 0
    assert load_consortium(out).coordinator_public_key == coordinator


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda d: d["members"].append(dict(d["members"][0])), "listed twice"),
        (lambda d: d["members"][1].update(public_key=d["members"][0]["public_key"]), "also listed for member"),
        (lambda d: d["members"][0].update(public_key="ab" * 31), "64 hex characters"),
        (lambda d: d["members"][0].update(epsilom=8.0), "unknown keys ['epsilom']"),
        (lambda d: d["members"][0].update(delta=2.0), "0 < delta < 1"),
        (lambda d: d.update(format="other"), "'format' must be"),
        (lambda d: d.update(coordinator_public_key="ab" * 31), "coordinator_public_key: .*64 hex characters"),
        (lambda d: d.update(coordinator_public_key=d["members"][0]["public_key"]), "is also member 'alpha'"),
    ],
)
def test_consortium_refuses_bad_files(fed: Path, mutate: Any, message: str) -> None:
    data = load_consortium(fed / "consortium.yaml").to_dict()
    mutate(data)
    with pytest.raises(ConsortiumError, match=message.replace("[", r"\[").replace("]", r"\]")):
        parse_consortium(data)


def test_consortium_yaml_refuses_duplicate_keys(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("format: kyodo-consortium\nversion: 1\nversion: 1\nmembers: []\n")
    with pytest.raises(ConsortiumError, match="duplicate key"):
        load_consortium(path)


# --------------------------------------------------------------------------- accounting, report


def test_rdp_from_cached_one_step_curves_is_dp_accountings_own_accountant() -> None:
    """The auditor composes each history from one-step RDP curves; dp-accounting's accountant,
    composing the same events afresh, must give the very same epsilon."""
    import random

    from dp_accounting import rdp as dp_rdp

    rng = random.Random(7)
    for _ in range(25):
        history = [
            accounting.Mech(rng.choice([0.6, 1.1, 2.3, 20.0]), rng.choice([0.01, 0.08, 0.3, 1.0]), rng.randint(1, 400))
            for _ in range(rng.randint(1, 6))
        ]
        totals, delta = accounting.totals_of(history), rng.choice([1e-5, 1e-6, 1e-3])
        fresh = dp_rdp.RdpAccountant()
        for sigma, q, steps in totals:
            fresh.compose(accounting._event(sigma, q), steps)
        assert accounting.rdp_epsilon(totals, delta) == pytest.approx(fresh.get_epsilon(delta), rel=1e-12)


def test_independent_accounting_matches_the_node_and_catches_understatement() -> None:
    history = [accounting.Mech(SIGMA, RATE, STEPS)] * 2
    totals = accounting.totals_of(history)
    honest = epsilon([Mechanism(SIGMA, RATE, STEPS)] * 2, DELTA)
    assert accounting.check_claim(totals, honest, DELTA, "rdp").ok
    low = accounting.check_claim(totals, honest * 0.8, DELTA, "rdp")
    assert not low.ok and low.pld is not None and low.pld > honest * 0.8
    # a PRV claim is judged against PLD: the node's PRV value passes, half of it does not
    prv = epsilon([Mechanism(SIGMA, RATE, STEPS)] * 2, DELTA, "prv")
    assert accounting.check_claim(totals, prv, DELTA, "prv").ok
    assert not accounting.check_claim(totals, prv / 2, DELTA, "prv").ok
    assert accounting.check_budget(totals, honest, DELTA).ok
    assert not accounting.check_budget(totals, honest / 2, DELTA).ok


def test_report_is_self_contained(fed: Path, tmp_path: Path) -> None:
    records = read_records(fed)
    del records[2]["receipts"]["gamma"]
    write_records(fed, records)
    result = run_audit(fed)
    html_path, md_path = write_report(result, tmp_path / "report")
    text = html_path.read_text()
    assert text.count("src='data:image/png;base64,") == 3
    assert "http://" not in text and "https://" not in text and "<script" not in text
    assert "gamma contributed to 2 updated shard(s)" in text
    md = md_path.read_text()
    assert "**FAIL**" in md and "## Problems" in md and "gamma" in md
    assert render_markdown(run_audit(fed)).startswith(f"# Privacy audit of run `{RUN}`")


# --------------------------------------------------------------------------- the one-run audit bound


def test_bound_matches_the_binomial_tail() -> None:
    # all r guesses right: P[Bin(r, p) >= r] = p^r = 0.05 at the bound (delta = 0)
    r = 40
    p = 0.05 ** (1 / r)
    assert epsilon_lower_bound(r, r, r, 0.0) == pytest.approx(math.log(p / (1 - p)), rel=1e-6)
    assert correct_probability(0.0) == 0.5
    assert epsilon_lower_bound(100, 40, 20) == 0.0  # chance level: nothing rejected
    bounds = [epsilon_lower_bound(100, 40, v, 1e-5) for v in range(28, 41)]
    assert bounds == sorted(bounds) and bounds[-1] > 2.5
    # delta only adds probability mass: the p-value grows, the bound shrinks
    assert p_value(100, 40, 35, 1.0, 1e-3) > p_value(100, 40, 35, 1.0, 0.0)
    assert epsilon_lower_bound(100, 40, 35, 1e-3) < epsilon_lower_bound(100, 40, 35, 0.0)


@pytest.mark.slow
def test_canary_audit_bounds_dp_below_claim_and_catches_non_private_training() -> None:
    """DP-SGD at epsilon 1: the empirical bound stays at or below 1. The same canaries without DP:
    the model memorises them and the bound is clearly higher (the audit has power here)."""
    from privacy.audit.canary import CanarySetup, run_canary_audit

    private = run_canary_audit(CanarySetup(dp=True, epsilon=1.0, deterministic=True))
    assert private.claimed_epsilon == pytest.approx(1.0, rel=1e-3)
    assert private.epsilon_lower_bound <= private.claimed_epsilon and private.consistent
    open_run = run_canary_audit(CanarySetup(dp=False, deterministic=True))
    assert open_run.correct > private.correct
    assert open_run.epsilon_lower_bound >= 1.5 > private.epsilon_lower_bound + 1.0


# --------------------------------------------------------------------------- a second review's attacks


def _fail_after_receipt(records: list[dict[str, Any]], rnd: int, member: str) -> None:
    """``member``'s reply of round ``rnd`` failed after the coordinator checked its receipt: the
    receipt is in ``ledger_heads`` alone (coordinator.rounds checks it before folding the update)."""
    receipt = records[rnd]["receipts"].pop(member)
    del records[rnd]["train"][member]
    records[rnd]["failed"] = {member: "invalid train reply"}
    records[rnd]["ledger_heads"] = {member: receipt}


def _declines(records: list[dict[str, Any]], rnd: int, member: str) -> None:
    for field in ("receipts", "train"):
        del records[rnd][field][member]
    records[rnd]["cohorts"] = {s: [m for m in ms if m != member] for s, ms in records[rnd]["cohorts"].items()}
    records[rnd]["declined"] = {member: "this node's ledger lacks the entry it was sent: restore the ledger"}


def test_a_ledger_rolled_back_behind_a_receipt_of_this_run_held_only_as_a_head_is_caught(fed: Path) -> None:
    """A head of this run was skipped as "checked with its round": not so for a reply that
    failed after its receipt was checked. The restored node then declines, as it should."""
    records = read_records(fed)
    _fail_after_receipt(records, 1, "alpha")
    _declines(records, 2, "alpha")
    write_records(fed, records)
    assert run_audit(fed).ok, "the ledger still holds the entry: nothing to find"
    write_entries(fed, "alpha", read_entries(fed, "alpha")[:-2])  # restored from before this run
    assert_found(run_audit(fed), "receipt", "round 1 ledger head of alpha", "alpha's ledger lacks entry", "rolled back")


def test_a_member_that_only_failed_after_its_receipt_must_still_give_its_ledger(fed: Path) -> None:
    records = read_records(fed)
    _fail_after_receipt(records, 1, "gamma")
    _declines(records, 2, "gamma")
    write_records(fed, records)
    ledger_path(fed, "gamma").unlink()
    assert_found(run_audit(fed), "input", "gamma ledger", "no ledger was given for this consortium member")


def test_round_zeros_line_cannot_be_deleted(fed: Path) -> None:
    """It holds the initial model's held-out errors and their evaluation receipts."""
    write_records(fed, read_records(fed)[1:])
    assert_found(run_audit(fed), "store", "store round 0", "no round record for it")


def test_an_update_that_reached_the_coordinator_needs_a_receipt_even_when_its_shard_was_not_updated(
    fed: Path,
) -> None:
    """A receipt was demanded for contributions to updated shards only: a member without DP
    whose cohort's aggregate was then rejected passed with none."""
    records = read_records(fed)
    record = records[2]
    del record["receipts"]["gamma"]
    record["cohorts"] = {s: ["alpha", "beta"] for s in SHARDS[2]} | {"expert/L0/E0": ["gamma"]}
    record["rejected"] = {"expert/L0/E0": "the aggregate's norm is over train.max_update_norm"}
    write_records(fed, records)
    assert_found(run_audit(fed), "receipt", "round 2", "gamma's update reached the coordinator", "without a signed")


def test_a_run_cut_back_after_members_evaluated_its_last_round_is_caught(tmp_path: Path) -> None:
    """A run cut short (HEAD moved back, the last line deleted) reads like a coordinator that
    died before committing; but a member evaluates only a committed model, so its evaluation
    of the cut round says the round was committed."""
    build_federation(tmp_path, commit_records=True, evaluations=True)
    store = ShardStore(tmp_path / "run" / "store")
    (store.root / "HEAD").write_text(json.dumps({"round": 1, "manifest": store.manifest(1).digest}))
    write_records(tmp_path, read_records(tmp_path)[:2])
    result = run_audit(tmp_path)
    assert_found(result, "coverage", "alpha ledger", "it evaluated round 2's model, and the run ends at round 1")
    # Its training of round 2 alone is what a crash before the commit leaves: a note.
    assert any("round 2 was never committed" in f.message for f in result.findings if f.severity == NOTE)
    # Training two rounds past the end: round 1, whose model it trained on, was committed.
    (store.root / "HEAD").write_text(json.dumps({"round": 0, "manifest": store.manifest(0).digest}))
    write_records(tmp_path, read_records(tmp_path)[:1])
    assert_found(run_audit(tmp_path), "coverage", "beta ledger", "it trained round 2 on round 1's model", "cut back")


# --------------------------------------------------------------------------- the ledgers alone


def test_ledgers_alone_settle_every_budget_over_every_run(fed: Path, tmp_path: Path, capsys) -> None:
    """Whether a member's budget held is a property of its whole ledger: an auditor settles it
    with the ledgers and the consortium file alone, before or without any run's files."""
    ledgers = audit(fed / "run" / "nodes", None, fed / "consortium.yaml")
    assert ledgers.ok and ledgers.ledgers_only, [f.text() for f in ledgers.failures]
    assert set(ledgers.check_status()) == {"consortium", "input", "format", "signature", "identity", "chain",
                                           "accounting", "budget"}  # fmt: skip
    assert len(ledgers.entries) == 9 and all(e.ok and e.status == "" for e in ledgers.entries)
    assert all(row.within_budget and row.entries == 3 for row in ledgers.members.values())
    args = ["--ledgers", str(fed / "run" / "nodes"), "--consortium", str(fed / "consortium.yaml")]
    assert audit_main(["verify", *args]) == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "kyodo audit of every run in the members' ledgers (ledgers only)" in out
    assert "PASS: every check holds, 1 note(s) above to read (9 ledger entries, 3 ledgers; give --rounds" in out
    assert "a ledger cut short (its last entries dropped, or emptied) reads here as one that released less" in out
    assert audit_main(["verify", *args, "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["ledgers_only"] and "receipt" not in data["checks"] and "store" not in data["checks"]
    assert audit_main(["report", *args, "--out", str(tmp_path / "report")]) == 0
    assert "Ledgers only: receipts, coverage and store not checked" in (tmp_path / "report" / "report.md").read_text()
    # An overspend fails here as in a run audit, and a member whose ledger is missing cannot
    # be verified: that fails too (an empty file stands for a member that never released).
    set_budget(fed, "alpha", 2.0)
    ledger_path(fed, "beta").rename(tmp_path / "beta-ledger.jsonl")
    result = audit(fed / "run" / "nodes", None, fed / "consortium.yaml")
    assert_found(result, "budget", "alpha budget", "over the published budget epsilon 2")
    assert_found(result, "input", "beta ledger", "its budget cannot be verified")
    assert not result.members["alpha"].ok and result.members["gamma"].ok
    ledger_path(fed, "beta").write_text("")
    assert not failures(audit(fed / "run" / "nodes", None, fed / "consortium.yaml"), "input")
    # A member published as training without DP keeps no budget, whatever its empty ledger says.
    cons = load_consortium(fed / "consortium.yaml").to_dict()
    next(m for m in cons["members"] if m["member"] == "beta")["dp"] = False
    (fed / "consortium.yaml").write_text(json.dumps(cons))
    result = audit(fed / "run" / "nodes", None, fed / "consortium.yaml")
    assert_found(result, "budget", "beta budget", "publishes dp: false", "no budget holds")
    assert not result.members["beta"].ok


def test_a_prv_members_claim_below_the_rdp_bound_is_explained_beside_the_table() -> None:
    """A live check read '3.4071 recorded, 3.9122 RDP recomputed' as a member under-stating."""
    from privacy.audit.findings import EntryRow, MemberRow
    from privacy.audit.report import RECORDED_UNDER_RDP, member_notes

    def result(accountant: str) -> AuditResult:
        out = AuditResult(run=None, ledgers_dir="", run_dir="", consortium="")
        out.members["alpha"] = MemberRow("alpha", 8.0, DELTA, 9, 0, 3.4071, 3.9122, "rdp", 3.9122, True, None)
        out.entries.append(
            EntryRow("alpha", 0, "r", 1, 1, 5, 1.0, 0.08, accountant, DELTA, 3.4071, 3.39, "pld", 3.9, True)
        )
        return out

    assert RECORDED_UNDER_RDP.format(names="alpha") in member_notes(result("prv"))
    assert not any("PRV" in note for note in member_notes(result("rdp")))
