"""The coordinator's signature on a committed round.

The coordinator signs, for every round it commits, the sha256 of that round's manifest in
the shard store. A manifest names its shard objects, the round's record (cohorts, receipts,
updated shards) and its parent manifest's sha256, so one signature commits the coordinator
to the whole history up to that round: it cannot later deny which receipts it aggregated
into which shards, and nobody else can forge a round in its name. Auditors check the
signature against the coordinator key published in the consortium file, never one found in
the run directory.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from privacy.keys import KeyFormatError, load_public_key, public_key_hex
from privacy.ledger import canonical_json

PURPOSE = "kyodo-round-commit"  # domain separation: a ledger-entry signature can never pass as this


def round_payload(run: str, round_number: int, manifest: str) -> bytes:
    """The bytes the coordinator signs for one committed round."""
    return canonical_json({"purpose": PURPOSE, "run": run, "round": round_number, "manifest": manifest})


@dataclass(frozen=True)
class RoundSignature:
    manifest: str  # sha256 of the round's manifest (Manifest.digest)
    public_key: str  # hex Ed25519: which key signed (the auditor compares it with the published one)
    signature: str  # hex

    def to_dict(self) -> dict[str, str]:
        return {"manifest": self.manifest, "public_key": self.public_key, "signature": self.signature}


def sign_round(key: Ed25519PrivateKey, run: str, round_number: int, manifest: str) -> RoundSignature:
    signature = key.sign(round_payload(run, round_number, manifest)).hex()
    return RoundSignature(manifest, public_key_hex(key), signature)


def round_signature_problem(
    signed: Any, run: str, round_number: int, manifest: str, trusted_public_key: str
) -> str | None:
    """Why ``signed`` (a record's ``coordinator`` field) does not prove that the holder of
    ``trusted_public_key`` committed ``manifest`` as round ``round_number`` of ``run``; None if it does."""
    if not isinstance(signed, dict) or not all(isinstance(signed.get(k), str) for k in ("manifest", "signature")):
        return "the record carries no coordinator signature"
    if signed["manifest"] != manifest:
        return f"the coordinator signed manifest {signed['manifest'][:12]}..., the store holds {manifest[:12]}..."
    if signed.get("public_key") != trusted_public_key:
        return "signed with a key that is not the consortium's coordinator key"
    try:
        key = load_public_key(trusted_public_key)
        key.verify(bytes.fromhex(signed["signature"]), round_payload(run, round_number, manifest))
    except (InvalidSignature, ValueError, KeyFormatError):
        return "the coordinator signature does not verify"
    return None
