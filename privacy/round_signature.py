"""The coordinator's signature on a committed round.

The coordinator signs, for every round it commits, the sha256 of that round's manifest in
the shard store. A manifest names its shard objects, the round's record (cohorts, receipts,
updated shards) and its parent manifest's sha256, so one signature commits the coordinator
to the whole history up to that round: it cannot later deny which receipts it aggregated
into which shards, and nobody else can forge a round in its name. Auditors check the
signature against the coordinator key published in the consortium file, never one found in
the run directory.

The signature also covers the sha256 of the round's whole line in ``rounds.jsonl``
(``record``). The manifest commits to the record as it stood at the commit; the evaluation
that follows (each member's held-out error and its evaluation receipt) was covered by
nothing, and a review showed that deleting a member's evaluation from the file hid a ledger
rolled back behind that release. Signatures of older runs lack ``record`` and verify as
before; one cannot be stripped of it, since the payload signed includes it.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from privacy.keys import KeyFormatError, load_public_key, public_key_hex
from privacy.ledger import canonical_json

PURPOSE = "kyodo-round-commit"  # domain separation: a ledger-entry signature can never pass as this


SIGNATURE_FIELD = "coordinator"  # the record's field that holds the signature (not itself signed)


def round_payload(run: str, round_number: int, manifest: str, record: str = "") -> bytes:
    """The bytes the coordinator signs for one committed round (``record``: see the module)."""
    payload = {"purpose": PURPOSE, "run": run, "round": round_number, "manifest": manifest}
    return canonical_json({**payload, "record": record} if record else payload)


def record_digest(record: Mapping[str, Any]) -> str:
    """sha256 of a round's line in ``rounds.jsonl``, its signature left out. Not
    ``canonical_json``: a record may hold a NaN (a diverged loss), which the line keeps as
    JSON's ``NaN`` and which reads back and serialises to the same bytes."""
    body = {k: v for k, v in record.items() if k != SIGNATURE_FIELD}
    # Through JSON first: the coordinator signs the dict it writes, the auditor the dict it
    # reads back, and they differ where JSON changes a value (an int key becomes a string and
    # sorts differently, a tuple becomes a list).
    body = json.loads(json.dumps(body))
    text = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


@dataclass(frozen=True)
class RoundSignature:
    manifest: str  # sha256 of the round's manifest (Manifest.digest)
    public_key: str  # hex Ed25519: which key signed (the auditor compares it with the published one)
    signature: str  # hex
    record: str = ""  # sha256 of the round's record line (record_digest); empty in older runs

    def to_dict(self) -> dict[str, str]:
        out = {"manifest": self.manifest, "public_key": self.public_key, "signature": self.signature}
        return {**out, "record": self.record} if self.record else out


def sign_round(
    key: Ed25519PrivateKey, run: str, round_number: int, manifest: str, record: Mapping[str, Any] | None = None
) -> RoundSignature:
    digest = record_digest(record) if record is not None else ""
    signature = key.sign(round_payload(run, round_number, manifest, digest)).hex()
    return RoundSignature(manifest, public_key_hex(key), signature, digest)


def round_signature_problem(
    signed: Any,
    run: str,
    round_number: int,
    manifest: str,
    trusted_public_key: str,
    record: Mapping[str, Any] | None = None,
) -> str | None:
    """Why ``signed`` (a record's ``coordinator`` field) does not prove that the holder of
    ``trusted_public_key`` committed ``manifest`` as round ``round_number`` of ``run``, and,
    given the round's ``record`` and a signature that covers one, wrote that very record;
    None if it does."""
    if not isinstance(signed, dict) or not all(isinstance(signed.get(k), str) for k in ("manifest", "signature")):
        return "the record carries no coordinator signature"
    if signed["manifest"] != manifest:
        return f"the coordinator signed manifest {signed['manifest'][:12]}..., the store holds {manifest[:12]}..."
    if signed.get("public_key") != trusted_public_key:
        return "signed with a key that is not the consortium's coordinator key"
    digest = signed.get("record", "")
    if not isinstance(digest, str):
        return "the coordinator signature's record digest is not a string"
    try:
        key = load_public_key(trusted_public_key)
        key.verify(bytes.fromhex(signed["signature"]), round_payload(run, round_number, manifest, digest))
    except (InvalidSignature, ValueError, KeyFormatError):
        return "the coordinator signature does not verify"
    if digest and record is not None and record_digest(record) != digest:
        return "the round record is not the one the coordinator signed (a field was changed, added or removed)"
    return None
