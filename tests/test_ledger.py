"""The signed, hash-chained privacy ledger, its receipts, and the member's signing key."""

from __future__ import annotations

import datetime as dt
import json
import os
import stat
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from privacy.accountant import Mechanism, epsilon
from privacy.keys import KeyFormatError, load_or_create_signing_key, load_public_key, public_key_hex
from privacy.ledger import (
    CALLER_FIELDS,
    GENESIS_HASH,
    Ledger,
    LedgerError,
    canonical_json,
    entry_hash,
    receipt_from_json,
    receipt_to_json,
    signing_payload,
    verify_chain,
    verify_entry,
)

DELTA = 1e-5
ROUNDS = [(1.0, 0.01, 100), (1.0, 0.01, 100), (1.2, 0.02, 50), (1.0, 0.01, 80)]


@pytest.fixture
def key(tmp_path: Path) -> Ed25519PrivateKey:
    return load_or_create_signing_key(tmp_path / "keys" / "member.pem")


def append_round(ledger: Ledger, rnd: int, noise: float, rate: float, steps: int, run: str = "run-1") -> dict:
    history = [*ledger.history(), Mechanism(noise, rate, steps)]
    return ledger.append(
        run=run,
        round=rnd,
        member="clinic-a",
        shards=["experts.0.3", "lora_b"],
        mechanism={
            "noise_multiplier": noise,
            "sample_rate": rate,
            "steps": steps,
            "clipping_norm": 1.0,
            "opacus_mode": "ghost",
            "noise_source": "chacha20-box-muller-f64",
        },
        dataset_fingerprint="sha256:" + "ab" * 32,
        epsilon=epsilon(history, DELTA),
        delta=DELTA,
        accountant="rdp",
        decision="full",
    )


@pytest.fixture
def ledger(tmp_path: Path, key: Ed25519PrivateKey) -> Ledger:
    led = Ledger(tmp_path / "ledger.jsonl", key)
    for rnd, (noise, rate, steps) in enumerate(ROUNDS, start=1):
        append_round(led, rnd, noise, rate, steps)
    return led


def raw_entries(path: Path) -> list[dict[str, Any]]:
    """Parse a ledger file without verifying it (what an attacker would edit)."""
    return [json.loads(line) for line in path.read_text().splitlines()]


def write_entries(path: Path, entries: list[dict[str, Any]]) -> None:
    path.write_bytes(b"".join(canonical_json(e) + b"\n" for e in entries))


def problems_after(ledger: Ledger, key: Ed25519PrivateKey, entries: list[dict[str, Any]]) -> list[str]:
    """Write tampered entries, check the reader refuses them, and return the auditor's problem list."""
    write_entries(ledger.path, entries)
    with pytest.raises(LedgerError) as excinfo:
        Ledger(ledger.path).entries()
    assert str(ledger.path) in str(excinfo.value)
    problems = verify_chain(entries, public_key_hex(key))
    assert problems
    return problems


# --------------------------------------------------------------------------- canonical JSON


def test_canonical_json_is_sorted_compact_utf8_and_round_trips_floats() -> None:
    obj = {"b": [1, 0.1 + 0.2, -0.0, 1e-7], "a": "Grüße", "c": {"z": None, "y": True}}
    data = canonical_json(obj)
    assert data == '{"a":"Grüße","b":[1,0.30000000000000004,-0.0,1e-07],"c":{"y":true,"z":null}}'.encode()
    assert canonical_json(json.loads(data)) == data


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_canonical_json_rejects_non_finite(bad: float) -> None:
    with pytest.raises(ValueError, match=r"non-finite .* at \$\.m\.x"):
        canonical_json({"m": {"x": bad}})


def test_canonical_json_rejects_ambiguous_values() -> None:
    with pytest.raises(ValueError, match="keys must be strings"):
        canonical_json({1: "a"})
    with pytest.raises(ValueError, match="cannot hold a set"):
        canonical_json({"a": {1, 2}})


# --------------------------------------------------------------------------- round trip


def test_append_read_round_trip(ledger: Ledger, key: Ed25519PrivateKey) -> None:
    entries = ledger.entries()
    assert [e["round"] for e in entries] == [1, 2, 3, 4]
    assert entries[0]["prev_hash"] == GENESIS_HASH
    for prev, entry in zip(entries, entries[1:], strict=False):
        assert entry["prev_hash"] == entry_hash(prev)
    first = entries[0]
    assert first["version"] == 4 and first["privacy_unit"] == "episode" and first["release"] == "dp-sgd"
    assert first["public_key"] == public_key_hex(key)
    assert first["time"].endswith("+00:00")
    assert ledger.head_hash() == entry_hash(entries[-1])
    # One canonical line per entry.
    assert ledger.path.read_bytes() == b"".join(canonical_json(e) + b"\n" for e in entries)


def test_chain_and_signatures_verify(ledger: Ledger, key: Ed25519PrivateKey) -> None:
    entries = ledger.entries()
    assert verify_chain(entries, public_key_hex(key)) == []
    assert verify_chain(entries, key.public_key()) == []
    for entry in entries:
        verify_entry(entry, public_key_hex(key))
        key.public_key().verify(bytes.fromhex(entry["signature"]), signing_payload(entry))


def test_history_is_the_accountant_state_across_restarts(ledger: Ledger, key: Ed25519PrivateKey) -> None:
    assert ledger.history() == [Mechanism(*r) for r in ROUNDS]
    reopened = Ledger(ledger.path, load_or_create_signing_key(ledger.path.parent / "keys" / "member.pem"))
    assert reopened.history() == ledger.history()
    assert reopened.spent_epsilon() == epsilon([Mechanism(*r) for r in ROUNDS], DELTA)
    entry = append_round(reopened, 5, 1.0, 0.01, 10)
    assert entry["prev_hash"] == entry_hash(ledger.entries()[3])
    assert Ledger(ledger.path).history()[-1] == Mechanism(1.0, 0.01, 10)
    assert reopened.find("run-1", 5) == entry and reopened.find("run-1", 6) is None


def test_empty_ledger(tmp_path: Path, key: Ed25519PrivateKey) -> None:
    led = Ledger(tmp_path / "none.jsonl", key)
    assert led.entries() == [] and led.history() == [] and led.spent_epsilon() == 0.0
    assert led.head_hash() == GENESIS_HASH


def test_rounds_restart_in_a_new_run(ledger: Ledger) -> None:
    entry = append_round(ledger, 1, 1.0, 0.01, 10, run="run-2")
    assert entry["run"] == "run-2" and len(ledger.entries()) == 5


def append_evaluation(ledger: Ledger, rnd: int, run: str = "run-1", shards: list[str] | None = None) -> dict:
    """A held-out error released under DP: one full-batch Gaussian step, no shards."""
    history = [*ledger.history(), Mechanism(5.0, 1.0, 1)]
    entry = {k: v for k, v in raw_entries(ledger.path)[-1].items() if k in CALLER_FIELDS}
    entry["mechanism"] = {"noise_multiplier": 5.0, "sample_rate": 1.0, "steps": 1, "clipping_norm": 0.05}
    entry["mechanism"] |= {"opacus_mode": "gaussian-sum-count", "noise_source": "os-csprng-gauss"}
    entry.update(run=run, round=rnd, shards=[] if shards is None else shards, release="evaluation")
    entry["epsilon"] = epsilon(history, DELTA)
    return ledger.append(**entry)


def test_a_round_is_trained_once_and_evaluated_once(ledger: Ledger) -> None:
    """Evaluations are releases of their own: the same round number as the training, once each."""
    evaluation = append_evaluation(ledger, 4)
    assert evaluation["release"] == "evaluation" and evaluation["shards"] == []
    assert ledger.find("run-1", 4) is not None and ledger.find("run-1", 4)["release"] == "dp-sgd"
    assert ledger.find("run-1", 4, "evaluation") == evaluation
    assert ledger.history()[-1] == Mechanism(5.0, 1.0, 1)  # the accountant composes it
    with pytest.raises(LedgerError, match=r"round' \(4\) does not increase within run 'run-1' for evaluations"):
        append_evaluation(ledger, 4)
    with pytest.raises(LedgerError, match=r"must be \[\] for an evaluation"):
        append_evaluation(ledger, 5, shards=["lora_b"])
    fields = raw_entries(ledger.path)[3]
    for name in ("version", "public_key", "prev_hash", "time", "signature"):
        del fields[name]
    fields.update(round=5, shards=[], epsilon=99.0)
    with pytest.raises(LedgerError, match="must name the shards a dp-sgd round trained"):
        ledger.append(**fields)


def test_version_1_entries_stay_valid_and_chain_into_the_current_version(
    tmp_path: Path, key: Ed25519PrivateKey
) -> None:
    """A ledger written before ``release`` existed: its entries are DP-SGD rounds."""
    old = Ledger(tmp_path / "old.jsonl", key)
    append_round(old, 1, 1.0, 0.01, 10)
    entry = raw_entries(old.path)[0]
    del entry["release"], entry["signature"], entry["mechanism"]["noise_source"]
    entry["version"] = 1
    entry["signature"] = key.sign(signing_payload(entry)).hex()
    write_entries(old.path, [entry])
    assert Ledger(old.path).entries() == [entry] and not verify_chain([entry], public_key_hex(key))
    assert old.find("run-1", 1) == entry
    second = append_round(old, 2, 1.0, 0.01, 10)
    assert second["version"] == 4 and not verify_chain(old.entries(), public_key_hex(key))
    entry["release"] = "dp-sgd"  # a version-1 entry has no such field
    assert any("'release' is not part of the format" in p for p in verify_chain([entry], public_key_hex(key)))


def test_version_2_entries_stay_valid_without_a_noise_source(tmp_path: Path, key: Ed25519PrivateKey) -> None:
    """Version 3 added ``mechanism.noise_source``: older entries lack it, newer ones must have it."""
    old = Ledger(tmp_path / "old.jsonl", key)
    append_round(old, 1, 1.0, 0.01, 10)
    entry = raw_entries(old.path)[0]
    del entry["mechanism"]["noise_source"], entry["signature"]
    entry["version"] = 2
    entry["signature"] = key.sign(signing_payload(entry)).hex()
    write_entries(old.path, [entry])
    assert not verify_chain([entry], public_key_hex(key))
    third = append_round(old, 2, 1.0, 0.01, 10)
    assert third["mechanism"]["noise_source"] and not verify_chain(old.entries(), public_key_hex(key))
    entry["mechanism"]["noise_source"] = "x"
    assert any("'mechanism.noise_source' is not part" in p for p in verify_chain([entry], public_key_hex(key)))
    fields = {k: v for k, v in third.items() if k in CALLER_FIELDS}
    del fields["mechanism"]["noise_source"]
    fields["round"] = 3
    with pytest.raises(LedgerError, match="'mechanism.noise_source' is missing"):
        old.append(**fields)
    fields["mechanism"]["noise_source"] = ""
    with pytest.raises(LedgerError, match="'mechanism.noise_source' must be a non-empty string"):
        old.append(**fields)


# --------------------------------------------------------------------------- refusals on append


def test_append_refuses_a_repeated_round(ledger: Ledger) -> None:
    with pytest.raises(LedgerError, match=r"field 'round' \(4\) does not increase within run 'run-1'"):
        append_round(ledger, 4, 1.0, 0.01, 10)


def test_append_refuses_an_understated_epsilon(ledger: Ledger) -> None:
    fields = raw_entries(ledger.path)[-1]
    for name in ("version", "public_key", "prev_hash", "time", "signature"):
        del fields[name]
    fields["round"] = 5
    with pytest.raises(LedgerError, match="epsilon.*below the rdp composition"):
        ledger.append(**fields)


def test_append_refuses_missing_or_bad_fields(ledger: Ledger) -> None:
    with pytest.raises(LedgerError, match="missing"):
        ledger.append(run="x", round=1)
    fields = raw_entries(ledger.path)[-1]
    for name in ("version", "public_key", "prev_hash", "time", "signature"):
        del fields[name]
    fields.update(round=9, decision="declined")
    with pytest.raises(LedgerError, match="field 'decision'"):
        ledger.append(**fields)


def test_read_only_ledger_cannot_append(ledger: Ledger) -> None:
    with pytest.raises(LedgerError, match="read-only"):
        Ledger(ledger.path).append(run="x")


def test_ledger_of_another_member_is_refused(ledger: Ledger) -> None:
    with pytest.raises(LedgerError, match="not the expected member key"):
        Ledger(ledger.path, Ed25519PrivateKey.generate()).entries()


# --------------------------------------------------------------------------- tampering


def test_edited_epsilon_is_detected(ledger: Ledger, key: Ed25519PrivateKey) -> None:
    entries = raw_entries(ledger.path)
    entries[1]["epsilon"] = entries[1]["epsilon"] / 2
    problems = problems_after(ledger, key, entries)
    assert problems[0] == (
        "entry 1 (run 'run-1', round 2): signature does not verify: the entry was altered after signing, or forged"
    )
    assert problems[1].startswith("entry 1 (run 'run-1', round 2): field 'epsilon' decreased from ")
    assert problems[2].startswith(
        "entry 2 (run 'run-1', round 3): field 'prev_hash' does not match the hash of entry 1"
    )
    assert len(problems) == 3


def test_edited_mechanism_is_detected(ledger: Ledger, key: Ed25519PrivateKey) -> None:
    entries = raw_entries(ledger.path)
    entries[2]["mechanism"]["noise_multiplier"] = 5.0
    write_entries(ledger.path, entries)
    with pytest.raises(LedgerError, match=r"entry 2 \(line 3, run 'run-1', round 3\): signature does not verify"):
        Ledger(ledger.path).entries()
    assert "entry 2 (run 'run-1', round 3): signature does not verify" in problems_after(ledger, key, entries)[0]


def test_dropped_middle_entry_is_detected(ledger: Ledger, key: Ed25519PrivateKey) -> None:
    entries = raw_entries(ledger.path)
    del entries[1]
    problems = problems_after(ledger, key, entries)
    assert problems == [
        "entry 1 (run 'run-1', round 3): field 'prev_hash' does not match the hash of entry 0: "
        "an entry was dropped, inserted, reordered or edited before this one"
    ]


def test_dropped_first_entry_is_detected(ledger: Ledger, key: Ed25519PrivateKey) -> None:
    entries = raw_entries(ledger.path)[1:]
    problems = problems_after(ledger, key, entries)
    assert problems == [
        "entry 0 (run 'run-1', round 2): field 'prev_hash' is not 64 zeros although this is the first entry: "
        "earlier entries are missing"
    ]


def test_swapped_entries_are_detected(ledger: Ledger, key: Ed25519PrivateKey) -> None:
    entries = raw_entries(ledger.path)
    entries[1], entries[2] = entries[2], entries[1]
    problems = problems_after(ledger, key, entries)
    assert any(p.startswith("entry 1 (run 'run-1', round 3): field 'prev_hash' does not match") for p in problems)
    assert any(p.startswith("entry 2 (run 'run-1', round 2): field 'prev_hash' does not match") for p in problems)
    assert (
        "entry 2 (run 'run-1', round 2): field 'round' (2) does not increase within run 'run-1' (entry 1 had round 3)"
    ) in problems
    assert any(p.startswith("entry 2 (run 'run-1', round 2): field 'epsilon' decreased") for p in problems)


def test_entry_forged_with_another_key_is_detected(ledger: Ledger, key: Ed25519PrivateKey) -> None:
    forger = Ed25519PrivateKey.generate()
    entries = raw_entries(ledger.path)
    # Re-signed by someone else while still claiming to be the member:
    entries[3]["epsilon"] = entries[2]["epsilon"]
    entries[3]["signature"] = forger.sign(signing_payload(entries[3])).hex()
    assert problems_after(ledger, key, entries) == [
        "entry 3 (run 'run-1', round 4): signature does not verify: the entry was altered after signing, or forged"
    ]
    # ... or openly under the forger's key: the member's key no longer matches.
    entries[3]["public_key"] = public_key_hex(forger)
    entries[3]["signature"] = forger.sign(signing_payload(entries[3])).hex()
    problems = problems_after(ledger, key, entries)
    assert len(problems) == 1 and problems[0].startswith("entry 3 (run 'run-1', round 4): field 'public_key' is ")
    assert "not the expected member key" in problems[0]


def test_a_ledger_read_again_checks_only_what_was_appended(
    ledger: Ledger, key: Ed25519PrivateKey, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The node reads its ledger several times per request: signatures already checked in the
    same bytes are not checked again, and entries appended by another writer are."""
    import privacy.ledger as ledger_module

    checked: list[int] = []
    real = ledger_module._entry_problems
    monkeypatch.setattr(ledger_module, "_entry_problems", lambda e, *a: checked.append(e["round"]) or real(e, *a))
    reader = Ledger(ledger.path)
    reader.entries()
    assert checked == [1, 2, 3, 4]
    checked.clear()
    reader.entries(), ledger.entries(), reader.history()
    assert checked == [], "the writer signed every entry itself, and the reader checked each once"
    checked.clear()
    append_round(ledger, 5, 1.0, 0.01, 100)  # through another Ledger object on the same file
    assert [e["round"] for e in reader.entries()] == [1, 2, 3, 4, 5] and checked == [5]
    checked.clear()
    ledger.entries()
    assert checked == [], "the writer signed entry 5 itself"


def test_a_change_to_verified_bytes_is_caught_by_the_same_reader(ledger: Ledger, key: Ed25519PrivateKey) -> None:
    reader = Ledger(ledger.path)
    assert len(reader.entries()) == 4 and len(ledger.entries()) == 4
    original = ledger.path.read_bytes()
    entries = raw_entries(ledger.path)
    entries[1]["epsilon"] = entries[1]["epsilon"] * 1.5
    write_entries(ledger.path, entries)
    for read in (reader.entries, ledger.entries, lambda: append_round(ledger, 5, 1.0, 0.01, 100)):
        with pytest.raises(LedgerError, match=r"entry 1 \(line 2, run 'run-1', round 2\): signature does not verify"):
            read()
    ledger.path.write_bytes(original)
    assert len(reader.entries()) == 4
    # An entry forged after the bytes the reader verified is checked as well.
    forged = dict(raw_entries(ledger.path)[-1], round=5)
    forged["prev_hash"] = entry_hash(raw_entries(ledger.path)[-1])
    forged["signature"] = Ed25519PrivateKey.generate().sign(signing_payload(forged)).hex()
    ledger.path.write_bytes(original + canonical_json(forged) + b"\n")
    with pytest.raises(LedgerError, match=r"entry 4 \(line 5, run 'run-1', round 5\): signature does not verify"):
        reader.entries()
    # Truncated to fewer entries than were verified: verified afresh, and still a valid chain.
    ledger.path.write_bytes(original[: original.index(b"\n") + 1])
    assert [e["round"] for e in reader.entries()] == [1]


def _resigned(entry: dict, key: Ed25519PrivateKey, **changes: Any) -> bytes:
    """``entry`` changed and signed again with ``key``: a line as a buggy or forking writer makes it."""
    out = {k: v for k, v in entry.items() if k != "signature"} | changes
    out["signature"] = key.sign(signing_payload(out)).hex()
    return canonical_json(out) + b"\n"


@pytest.mark.parametrize("reader_kind", ["keyless", "writer"])
@pytest.mark.parametrize(
    "case, match",
    [
        ("round_repeats", r"round' \(4\) does not increase"),
        ("epsilon_drops", r"epsilon' decreased"),
        ("links_to_older", r"prev_hash' does not match the hash of entry 3"),
    ],
)
def test_entries_after_the_verified_bytes_meet_every_rule_against_those_before(
    ledger: Ledger, key: Ed25519PrivateKey, reader_kind: str, case: str, match: str
) -> None:
    """Signed with the member's own key (a spliced fork, a buggy writer), an entry appended
    after the bytes a reader verified is judged against the entries it did not check again."""
    reader = ledger if reader_kind == "writer" else Ledger(ledger.path)
    original = ledger.path.read_bytes()
    reader.entries()
    last, before = raw_entries(ledger.path)[-1], raw_entries(ledger.path)[-2]
    tail = {
        "round_repeats": _resigned(last, key, prev_hash=entry_hash(last)),
        "epsilon_drops": _resigned(last, key, round=5, epsilon=last["epsilon"] / 2, prev_hash=entry_hash(last)),
        "links_to_older": _resigned(last, key, round=5, prev_hash=entry_hash(before)),
    }[case]
    ledger.path.write_bytes(original + tail)
    for read in (Ledger(ledger.path).entries, reader.entries):  # a fresh reader, and one that verified the prefix
        with pytest.raises(LedgerError, match=match):
            read()


def test_the_writer_checks_what_replaced_or_followed_its_own_append(ledger: Ledger, key: Ed25519PrivateKey) -> None:
    before = ledger.path.read_bytes()
    append_round(ledger, 5, 1.0, 0.01, 100)
    mine = raw_entries(ledger.path)[-1]
    stranger = Ed25519PrivateKey.generate()
    ledger.path.write_bytes(
        before + canonical_json(mine) + b"\n" + _resigned(mine, stranger, round=6, prev_hash=entry_hash(mine))
    )
    with pytest.raises(LedgerError, match=r"entry 5 .*signature does not verify"):
        ledger.entries()
    ledger.path.write_bytes(before + _resigned(mine, stranger, decision="shortened"))
    with pytest.raises(LedgerError, match="signature does not verify"):
        ledger.entries()


def test_torn_last_line_is_detected(ledger: Ledger) -> None:
    data = ledger.path.read_bytes()
    ledger.path.write_bytes(data[:-40])
    with pytest.raises(LedgerError, match=r"line 4 is not valid JSON: torn last line"):
        ledger.entries()
    ledger.path.write_bytes(data[:-1])  # complete JSON but no final newline
    with pytest.raises(LedgerError, match=r"line 4: torn last line"):
        ledger.entries()


def test_malformed_field_is_named(ledger: Ledger, key: Ed25519PrivateKey) -> None:
    entries = raw_entries(ledger.path)
    entries[0]["mechanism"]["steps"] = -3
    entries[0]["shards"] = "lora_b"
    problems = problems_after(ledger, key, entries)
    assert "entry 0 (run 'run-1', round 1): field 'shards' must be a list of shard names, got 'lora_b'" in problems
    assert "entry 0 (run 'run-1', round 1): field 'mechanism.steps' must be an integer >= 1, got -3" in problems


def test_duplicate_keys_are_refused(ledger: Ledger) -> None:
    lines = ledger.path.read_text().splitlines()
    lines[0] = lines[0][:-1] + ',"epsilon":0.0}'
    ledger.path.write_text("\n".join(lines) + "\n")
    with pytest.raises(LedgerError, match="line 1 is not valid JSON.*duplicate key 'epsilon'"):
        ledger.entries()


# --------------------------------------------------------------------------- atomicity


def test_crash_during_append_leaves_the_old_ledger(
    ledger: Ledger, key: Ed25519PrivateKey, monkeypatch: pytest.MonkeyPatch
) -> None:
    before = ledger.path.read_bytes()

    def crash(src: str, dst: str) -> None:
        raise OSError("simulated power loss before the rename")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(OSError, match="simulated"):
        append_round(ledger, 5, 1.0, 0.01, 10)
    monkeypatch.undo()
    assert ledger.path.read_bytes() == before
    assert verify_chain(ledger.entries(), public_key_hex(key)) == []
    assert [p.name for p in ledger.path.parent.iterdir() if p.name.endswith(".tmp")] == []
    append_round(ledger, 5, 1.0, 0.01, 10)  # and the node carries on
    assert len(ledger.entries()) == 5


# --------------------------------------------------------------------------- receipts


def test_receipt_round_trip(ledger: Ledger, key: Ed25519PrivateKey) -> None:
    entry = ledger.entries()[-1]
    text = receipt_to_json(entry)
    assert isinstance(text, str)
    receipt = receipt_from_json(text)
    assert receipt == entry
    verify_entry(receipt, public_key_hex(key))
    assert entry_hash(receipt) == ledger.head_hash()


def test_receipt_validation() -> None:
    with pytest.raises(LedgerError, match="not valid JSON"):
        receipt_from_json("{not json")
    with pytest.raises(LedgerError, match="field 'signature' is missing"):
        receipt_from_json('{"run": "r"}')
    with pytest.raises(LedgerError, match="JSON text"):
        receipt_from_json(b"{}")  # type: ignore[arg-type]
    with pytest.raises(LedgerError, match="not a complete signed entry"):
        receipt_to_json({"run": "r", "round": 1})


def test_tampered_receipt_fails_verification(ledger: Ledger, key: Ed25519PrivateKey) -> None:
    receipt = receipt_from_json(receipt_to_json(ledger.entries()[-1]))
    receipt["mechanism"]["steps"] += 1
    with pytest.raises(LedgerError, match=r"entry \(run 'run-1', round 4\): signature does not verify"):
        verify_entry(receipt, public_key_hex(key))
    other = Ed25519PrivateKey.generate()
    with pytest.raises(LedgerError, match="not the expected member key"):
        verify_entry(ledger.entries()[-1], public_key_hex(other))


# --------------------------------------------------------------------------- keys


def test_key_file_is_private_and_never_overwritten(tmp_path: Path) -> None:
    path = tmp_path / "member.pem"
    key = load_or_create_signing_key(path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    data = path.read_bytes()
    assert data.startswith(b"-----BEGIN PRIVATE KEY-----")
    again = load_or_create_signing_key(path)
    assert path.read_bytes() == data
    assert public_key_hex(again) == public_key_hex(key)
    assert [p.name for p in tmp_path.iterdir()] == ["member.pem"]  # no temp files left


def test_key_file_of_another_type_is_refused_and_kept(tmp_path: Path) -> None:
    path = tmp_path / "member.pem"
    other = ec.generate_private_key(ec.SECP256R1()).private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    path.write_bytes(other)
    with pytest.raises(KeyFormatError, match="not an Ed25519 key"):
        load_or_create_signing_key(path)
    assert path.read_bytes() == other


def test_garbage_key_file_is_refused_without_echoing_it(tmp_path: Path) -> None:
    path = tmp_path / "member.pem"
    path.write_text("SECRET-MATERIAL-do-not-print")
    with pytest.raises(KeyFormatError, match="not an unencrypted PEM private key") as excinfo:
        load_or_create_signing_key(path)
    assert "SECRET" not in str(excinfo.value)
    assert path.read_text() == "SECRET-MATERIAL-do-not-print"


def test_public_key_hex_round_trip(key: Ed25519PrivateKey) -> None:
    text = public_key_hex(key)
    assert len(text) == 64 and text == public_key_hex(key.public_key())
    assert public_key_hex(load_public_key(text)) == text
    assert public_key_hex(load_public_key(text.upper())) == text


@pytest.mark.parametrize("bad", ["", "zz" * 32, "ab" * 31, "ab" * 33, 42])
def test_load_public_key_rejects_bad_input(bad: object) -> None:
    with pytest.raises(KeyFormatError, match="public key"):
        load_public_key(bad)  # type: ignore[arg-type]


def test_keyed_fingerprints_are_unlinkable_without_the_key_and_checkable_with_it():
    from privacy.keys import fingerprint_matches, keyed_fingerprint

    key, other = b"k" * 32, b"o" * 32
    a, b = keyed_fingerprint(key, "sha256:data"), keyed_fingerprint(key, "sha256:data")
    assert a != b  # a fresh nonce each time: the coordinator cannot tell the data is the same
    assert fingerprint_matches(key, "sha256:data", a) and fingerprint_matches(key, "sha256:data", b)
    assert not fingerprint_matches(key, "sha256:other", a)
    assert not fingerprint_matches(other, "sha256:data", a)
    assert not fingerprint_matches(key, "sha256:data", "hmac-sha256:zz:" + a.rsplit(":", 1)[1])
    assert not fingerprint_matches(key, "sha256:data", "sha256:data")
    # Receipts written before the nonce (HMAC of the manifest alone) still match.
    import hashlib
    import hmac

    legacy = "hmac-sha256:" + hmac.new(key, b"sha256:data", hashlib.sha256).hexdigest()
    assert fingerprint_matches(key, "sha256:data", legacy)


# --------------------------------------------------------------------------- budget declarations


def test_a_budget_is_declared_once_in_the_chain_and_is_not_a_release(tmp_path: Path, key: Ed25519PrivateKey) -> None:
    led = Ledger(tmp_path / "ledger.jsonl", key)
    first = led.declare_budget("clinic-a", 8, DELTA)
    assert first is not None and first["budget"] == {"epsilon": 8.0, "delta": DELTA} and first["version"] == 4
    assert led.declare_budget("clinic-a", 8.0, DELTA) is None, "the same budget is not declared again"
    append_round(led, 1, 1.0, 0.01, 100)
    raised = led.declare_budget("clinic-a", 12, DELTA)
    assert raised is not None
    append_round(led, 2, 1.0, 0.01, 100)
    assert [e["release"] for e in led.entries()] == ["budget", "dp-sgd", "budget", "dp-sgd"]
    assert not verify_chain(led.entries(), public_key_hex(key))
    assert [e["round"] for e in led.releases()] == [1, 2] and led.budgets() == [first, raised]
    assert led.history() == [Mechanism(1.0, 0.01, 100)] * 2
    assert led.spent_epsilon() == led.releases()[-1]["epsilon"] and led.find("run-1", 2) == led.entries()[-1]
    # a declaration is signed like every entry: editing its budget breaks the signature
    tampered = raw_entries(led.path)
    tampered[2]["budget"]["epsilon"] = 100.0
    assert any("entry 2" in p and "signature does not verify" in p for p in problems_after(led, key, tampered))


def test_a_declared_budget_must_hold_for_what_the_ledger_records(tmp_path: Path, key: Ed25519PrivateKey) -> None:
    led = Ledger(tmp_path / "ledger.jsonl", key)
    led.declare_budget("clinic-a", 8, DELTA)
    for rnd in (1, 2):
        append_round(led, rnd, 1.0, 0.01, 100)
    spent = led.spent_epsilon()
    with pytest.raises(LedgerError, match=f"epsilon 0.1 is below the {spent!r} the ledger already records"):
        led.declare_budget("clinic-a", 0.1, DELTA)
    with pytest.raises(LedgerError, match="delta 0.0001 differs from the 1e-05 the ledger's releases"):
        led.declare_budget("clinic-a", 8, 1e-4)
    with pytest.raises(LedgerError, match="delta 1e-06 differs from the 1e-05"):
        led.declare_budget("clinic-a", 8, 1e-6)  # stricter is refused too: every claim was made at 1e-05
    with pytest.raises(LedgerError, match="holds entries of \\['clinic-a'\\]"):
        led.declare_budget("clinic-b", 8, DELTA)
    with pytest.raises(LedgerError, match="needs the member's name, got ''"):
        led.declare_budget("", 9, DELTA)
    with pytest.raises(LedgerError, match="timezone-aware"):
        led.declare_budget("clinic-a", 9, DELTA, at=dt.datetime(2026, 1, 1))
    with pytest.raises(LedgerError, match="'budget.delta' must be a number in \\(0, 1\\)"):
        led.declare_budget("clinic-a", 8, 1.5)
    with pytest.raises(LedgerError, match="read-only"):
        Ledger(led.path).declare_budget("clinic-a", 9, DELTA)
    assert len(led.entries()) == 3, "a refused declaration writes nothing"


def test_the_ledger_never_signs_a_release_over_its_declared_budget(tmp_path: Path, key: Ed25519PrivateKey) -> None:
    led = Ledger(tmp_path / "ledger.jsonl", key)
    led.declare_budget("clinic-a", 100, DELTA)
    append_round(led, 1, 1.0, 0.01, 100)
    tight = led.spent_epsilon() * 1.01  # lowered: the newest declaration is the one in force
    led.declare_budget("clinic-a", tight, DELTA)
    assert led.spent_epsilon() == led.releases()[-1]["epsilon"], "a declaration is not a spend"
    with pytest.raises(LedgerError, match=f"over the declared budget {tight:g}"):
        append_round(led, 2, 1.0, 0.01, 100)
    # the release that would reach the budget to a millionth over it is refused as well
    next_eps = epsilon([*led.history(), Mechanism(1.0, 0.01, 100)], DELTA)
    led.declare_budget("clinic-a", next_eps * (1 - 1e-6), DELTA)
    with pytest.raises(LedgerError, match="over the declared budget"):
        append_round(led, 2, 1.0, 0.01, 100)
    assert [e["release"] for e in led.entries()] == ["budget", "dp-sgd", "budget", "budget"]


def test_a_release_at_a_looser_delta_than_declared_is_refused(tmp_path: Path, key: Ed25519PrivateKey) -> None:
    led = Ledger(tmp_path / "ledger.jsonl", key)
    led.declare_budget("clinic-a", 8, 1e-6)
    with pytest.raises(LedgerError, match="claims at delta 1e-05, looser than the declared budget's delta 1e-06"):
        append_round(led, 1, 1.0, 0.01, 100)


def test_a_release_declares_its_budget_in_the_same_write(
    tmp_path: Path, key: Ed25519PrivateKey, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``append(budget=...)`` is how a node writes: the declaration, when the newest one differs,
    and the release land together, so no other process's declaration comes between them."""
    import privacy.ledger as ledger_module

    led = Ledger(tmp_path / "ledger.jsonl", key)
    writes: list[int] = []
    real = ledger_module._atomic_write
    monkeypatch.setattr(
        ledger_module, "_atomic_write", lambda path, data: writes.append(data.count(b"\n")) or real(path, data)
    )
    for rnd, budget in ((1, 8.0), (2, 8.0), (3, 12.0), (4, 8.0)):
        history = [*led.history(), Mechanism(1.0, 0.01, 10)]
        led.append(
            budget=(budget, DELTA), run="run-1", round=rnd, member="clinic-a", shards=["lora_b"],
            mechanism={"noise_multiplier": 1.0, "sample_rate": 0.01, "steps": 10, "clipping_norm": 1.0,
                       "opacus_mode": "ghost", "noise_source": "chacha20-box-muller-f64"},
            dataset_fingerprint="fp", epsilon=epsilon(history, DELTA), delta=DELTA, accountant="rdp",
            decision="full",
        )  # fmt: skip
    assert [e["release"] for e in led.entries()] == [
        "budget",
        "dp-sgd",
        "dp-sgd",
        "budget",
        "dp-sgd",
        "budget",
        "dp-sgd",
    ]
    assert [e["budget"]["epsilon"] for e in led.budgets()] == [8.0, 12.0, 8.0]
    assert writes == [2, 3, 5, 7], "one write per release, holding its declaration"
    assert not verify_chain(led.entries(), public_key_hex(key))


@pytest.mark.parametrize(
    ("edit", "problem"),
    [
        (lambda e: e.update(version=3), "a budget declaration needs version 4 or later"),
        (lambda e: e.pop("budget"), "field 'budget' is missing"),
        (lambda e: e.update(epsilon=1.0), "field 'epsilon' is not part of the format"),
        (lambda e: e["budget"].update(epsilon=0), "field 'budget.epsilon' must be a finite number > 0"),
        (lambda e: e["budget"].pop("delta"), "field 'budget.delta' is missing"),
    ],
)
def test_a_malformed_budget_declaration_is_named(
    tmp_path: Path, key: Ed25519PrivateKey, edit: Any, problem: str
) -> None:
    led = Ledger(tmp_path / "ledger.jsonl", key)
    entry = led.declare_budget("clinic-a", 8, DELTA)
    assert entry is not None
    entry.pop("signature")
    edit(entry)
    entry["signature"] = key.sign(signing_payload(entry)).hex()
    assert any(problem in p and "entry 0" in p for p in problems_after(led, key, [entry]))


def test_spent_is_the_largest_epsilon_recorded_not_the_last(tmp_path: Path, key: Ed25519PrivateKey) -> None:
    """After the consortium switches accountant, a PRV claim can sit below the RDP one before
    it; `kyodo-member budget` compared the last and published a budget the ledger already broke."""
    led = Ledger(tmp_path / "ledger.jsonl", key)
    append_round(led, 1, 1.0, 0.08, 100)
    history = [*led.history(), Mechanism(1.0, 0.08, 1)]
    later = dict(led.releases()[-1], round=2, accountant="prv", epsilon=epsilon(history, DELTA, "prv"))
    later["mechanism"] = dict(later["mechanism"], steps=1)
    led.append(**{k: later[k] for k in ("run", "round", "member", "shards", "mechanism", "dataset_fingerprint",
                                         "epsilon", "delta", "accountant", "decision")})  # fmt: skip
    first, last = (float(e["epsilon"]) for e in led.releases())
    assert last < first, "the premise: the later PRV claim is the smaller"
    assert led.spent_epsilon() == first
    with pytest.raises(LedgerError, match="below the"):
        led.declare_budget("clinic-a", (first + last) / 2, DELTA)
