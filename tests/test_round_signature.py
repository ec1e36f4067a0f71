"""The coordinator's signature on a committed round: it verifies only for the key, run, round
and manifest it was made for, and a member's ledger signature can never pass as one."""

from __future__ import annotations

import json

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from privacy.keys import public_key_hex
from privacy.ledger import canonical_json
from privacy.round_signature import round_payload, round_signature_problem, sign_round

MANIFEST = "ab" * 32
KEY = Ed25519PrivateKey.generate()
PUBLIC = public_key_hex(KEY)


def test_a_signed_round_verifies_against_the_published_key():
    signed = sign_round(KEY, "run-1", 3, MANIFEST).to_dict()
    assert signed["public_key"] == PUBLIC
    assert round_signature_problem(signed, "run-1", 3, MANIFEST, PUBLIC) is None


@pytest.mark.parametrize(
    ("run", "rnd", "manifest", "message"),
    [
        ("run-2", 3, MANIFEST, "does not verify"),
        ("run-1", 4, MANIFEST, "does not verify"),
        ("run-1", 3, "cd" * 32, "the store holds"),
    ],
)
def test_a_signature_for_another_run_round_or_manifest_fails(run, rnd, manifest, message):
    signed = sign_round(KEY, "run-1", 3, MANIFEST).to_dict()
    assert message in round_signature_problem(signed, run, rnd, manifest, PUBLIC)


def test_another_key_a_forged_signature_or_none_fails():
    other = Ed25519PrivateKey.generate()
    forged = sign_round(other, "run-1", 3, MANIFEST).to_dict()
    assert "not the consortium's coordinator key" in round_signature_problem(forged, "run-1", 3, MANIFEST, PUBLIC)
    # Claiming the published key does not help without its private half.
    forged["public_key"] = PUBLIC
    assert "does not verify" in round_signature_problem(forged, "run-1", 3, MANIFEST, PUBLIC)
    forged["signature"] = "zz"
    assert "does not verify" in round_signature_problem(forged, "run-1", 3, MANIFEST, PUBLIC)
    assert "no coordinator signature" in round_signature_problem(None, "run-1", 3, MANIFEST, PUBLIC)


def test_the_payload_is_domain_separated_from_ledger_entries():
    payload = round_payload("run-1", 3, MANIFEST)
    assert b'"purpose":"kyodo-round-commit"' in payload
    entry_like = canonical_json({"run": "run-1", "round": 3, "manifest": MANIFEST})
    signed = {"manifest": MANIFEST, "public_key": PUBLIC, "signature": KEY.sign(entry_like).hex()}
    assert "does not verify" in round_signature_problem(signed, "run-1", 3, MANIFEST, PUBLIC)


def test_a_signature_on_the_whole_record_line_fails_for_any_change_to_it():
    """The evaluation joins a round's line after its commit: only this digest covers it."""
    record = {
        "round": 3,
        "evaluation": {"sony": {"action_mse": 0.01, "receipt": "{}"}},
        "train": {"sony": {"loss": float("nan")}},
    }
    signed = sign_round(KEY, "run-1", 3, MANIFEST, record).to_dict()
    line = json.loads(json.dumps({**record, "coordinator": signed}))  # as rounds.jsonl keeps it (NaN included)
    assert round_signature_problem(signed, "run-1", 3, MANIFEST, PUBLIC, line) is None
    assert round_signature_problem(signed, "run-1", 3, MANIFEST, PUBLIC) is None  # lineage: the manifest alone
    del line["evaluation"]["sony"]
    assert "not the one the coordinator signed" in round_signature_problem(signed, "run-1", 3, MANIFEST, PUBLIC, line)
    stripped = {k: v for k, v in signed.items() if k != "record"}
    assert "does not verify" in round_signature_problem(stripped, "run-1", 3, MANIFEST, PUBLIC, record)
    # Signed as the coordinator holds the record, checked as the file gives it back.
    held = {"round": 3, "sync_bytes": {2: 5, 10: 7}, "cohorts": {"adapter/shared": ("a", "b")}}
    signed = sign_round(KEY, "run-1", 3, MANIFEST, held).to_dict()
    assert round_signature_problem(signed, "run-1", 3, MANIFEST, PUBLIC, json.loads(json.dumps(held))) is None
    # An older coordinator's signature covers the manifest only, and still verifies.
    old = sign_round(KEY, "run-1", 3, MANIFEST).to_dict()
    assert "record" not in old and round_signature_problem(old, "run-1", 3, MANIFEST, PUBLIC, line) is None
