"""The node's append-only, hash-chained, signed privacy ledger, and the receipts cut from it.

One JSON line per release the node made from its data: per round it trained (``release``
"dp-sgd": the DP-SGD steps behind its shard update) and per held-out evaluation it reported
(``release`` "evaluation": a Gaussian mechanism on its clipped held-out error,
``privacy.eval_release``). Each line holds the mechanism (with the generator that drew its
noise, from version 3 on), the epsilon composed over
everything the node ever released, and the hash of the previous entry, signed with the
member's Ed25519 key. From version 4 on, a line may instead declare the member's budget
(``release`` "budget": the (epsilon, delta) its node enforces from then on), written before
the first release under a budget the ledger has not declared yet: which budget governed
which release, and when a member raised it, is then in the signed chain itself, where an
auditor reads it, not only in whatever the consortium publishes today.

The ledger is the node's persistent accountant state (``Ledger.history``), so a restarted
node neither forgets what it spent nor counts it twice. Each entry, as signed,
is also the *receipt* that travels with the round's update to the coordinator.

Auditors trust only the member's public key: ``verify_entry`` and ``verify_chain`` are the
checks they reuse, and their messages name the entry index, run, round and field.

Wire format: every line is ``canonical_json(entry)`` followed by ``\\n``. The signature
covers the canonical JSON of every field except ``signature``; ``prev_hash`` is the SHA-256
of the previous entry's canonical JSON *including* its signature (64 zeros for the first).
"""

from __future__ import annotations

import contextlib
import datetime as dt
import fcntl
import hashlib
import json
import math
import numbers
import os
import string
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from privacy.accountant import ACCOUNTANTS, PRV_EPS_ERROR, Mechanism, epsilon
from privacy.keys import KeyFormatError, load_public_key, public_key_hex
from shared_model.durable import fsync_dir

# Version 2 added ``release``; version-1 entries (no such field) are DP-SGD rounds and stay valid.
# Version 3 added ``mechanism.noise_source``: which generator drew the noise (a guarantee is
# only as good as its randomness, and an auditor could not tell otherwise); version-2
# entries without it stay valid.
# Version 4 added budget declarations (``release`` "budget", ``BUDGET_ENTRY_FIELDS``); its
# releases have version 3's fields.
VERSION = 4
VERSIONS = (1, 2, 3, 4)
RELEASE_TRAIN = "dp-sgd"
RELEASE_EVALUATION = "evaluation"
RELEASE_BUDGET = "budget"
RELEASES = (RELEASE_TRAIN, RELEASE_EVALUATION)
KINDS = (*RELEASES, RELEASE_BUDGET)
GENESIS_HASH = "0" * 64
PRIVACY_UNIT = "episode"
DECISIONS = ("full", "shortened")
MECHANISM_FIELDS = ("noise_multiplier", "sample_rate", "steps", "clipping_norm", "opacus_mode", "noise_source")
V2_MECHANISM_FIELDS = tuple(f for f in MECHANISM_FIELDS if f != "noise_source")
# Fields the caller of ``Ledger.append`` provides (``privacy_unit`` defaults to "episode",
# ``release`` to "dp-sgd").
CALLER_FIELDS = (
    "run",
    "round",
    "member",
    "shards",
    "privacy_unit",
    "mechanism",
    "dataset_fingerprint",
    "epsilon",
    "delta",
    "accountant",
    "decision",
    "release",
)
ENTRY_FIELDS = ("version", *CALLER_FIELDS, "public_key", "prev_hash", "time", "signature")
V1_ENTRY_FIELDS = tuple(f for f in ENTRY_FIELDS if f != "release")
# A budget declaration releases nothing: no run, round, shards, mechanism or spend.
BUDGET_ENTRY_FIELDS = ("version", "release", "member", "budget", "public_key", "prev_hash", "time", "signature")
BUDGET_FIELDS = ("epsilon", "delta")

_HEX = frozenset(string.hexdigits.lower())
# A node must never under-state its epsilon; this only absorbs float noise.
_CLAIM_RTOL = 1e-9


class LedgerError(Exception):
    """The ledger, an entry or a receipt is damaged, tampered with, or would become invalid.

    ``problems`` lists every problem found (the message joins them).
    """

    def __init__(self, message: str, problems: Sequence[str] = ()) -> None:
        super().__init__(message)
        self.problems = list(problems) or [message]


# --------------------------------------------------------------------------- canonical form


def canonical_json(obj: Any) -> bytes:
    """Deterministic JSON bytes for hashing and signing.

    Sorted keys, no whitespace, UTF-8, floats written by ``repr`` (shortest round-trip exact
    form, so parse -> serialise gives the same bytes). NaN and infinities are refused: they
    are not JSON and would make two parties disagree on what was signed.
    """
    _check_canonical(obj, "$")
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode("utf-8")


def _check_canonical(obj: Any, where: str) -> None:
    """Refuse values without one canonical JSON form, naming where they are."""
    if obj is None or isinstance(obj, (str, bool, int)):
        return
    if isinstance(obj, float):
        if not math.isfinite(obj):
            raise ValueError(f"canonical JSON cannot hold the non-finite number {obj!r} at {where}")
        return
    if isinstance(obj, Mapping):
        for key, value in obj.items():
            if not isinstance(key, str):
                raise ValueError(f"canonical JSON object keys must be strings, got {key!r} at {where}")
            _check_canonical(value, f"{where}.{key}")
        return
    if isinstance(obj, (list, tuple)):
        for i, value in enumerate(obj):
            _check_canonical(value, f"{where}[{i}]")
        return
    raise ValueError(f"canonical JSON cannot hold a {type(obj).__name__} at {where}")


def entry_hash(entry: Mapping[str, Any]) -> str:
    """SHA-256 hex of an entry's canonical JSON, signature included: what the next entry chains to."""
    return hashlib.sha256(canonical_json(entry)).hexdigest()


def signing_payload(entry: Mapping[str, Any]) -> bytes:
    """The bytes the signature covers: the canonical JSON of every field but ``signature``."""
    return canonical_json({k: v for k, v in entry.items() if k != "signature"})


def parse_strict_json(text: str) -> Any:
    """Strict JSON: no NaN/Infinity, no duplicate keys (either could hide an edit from the signature)."""

    def no_constants(name: str) -> Any:
        raise ValueError(f"{name} is not allowed")

    def no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for key, value in pairs:
            if key in out:
                raise ValueError(f"duplicate key {key!r}")
            out[key] = value
        return out

    return json.loads(text, parse_constant=no_constants, object_pairs_hook=no_duplicates)


# --------------------------------------------------------------------------- field checks


def _is_number(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_hex(value: Any, length: int) -> bool:
    return isinstance(value, str) and len(value) == length and set(value) <= _HEX


def _is_text(value: Any) -> bool:
    return isinstance(value, str) and bool(value.strip())


def _is_utc_time(value: Any) -> bool:
    if not isinstance(value, str):
        return False
    try:
        parsed = dt.datetime.fromisoformat(value)
    except ValueError:
        return False
    return parsed.tzinfo is not None and parsed.utcoffset() == dt.timedelta(0)


def _mechanism_problems(mech: Any, version: Any = VERSION) -> list[str]:
    if not isinstance(mech, dict):
        return [f"field 'mechanism' must be an object, got {type(mech).__name__}"]
    fields = V2_MECHANISM_FIELDS if version in (1, 2) else MECHANISM_FIELDS
    problems = _key_problems(mech, fields, "mechanism.")
    checks = {
        "noise_multiplier": (lambda v: _is_number(v) and v > 0, "a finite number > 0"),
        "sample_rate": (lambda v: _is_number(v) and 0 < v <= 1, "a number in (0, 1]"),
        "steps": (lambda v: _is_int(v) and v >= 1, "an integer >= 1"),
        "clipping_norm": (lambda v: _is_number(v) and v > 0, "a finite number > 0"),
        "opacus_mode": (_is_text, "a non-empty string"),
        "noise_source": (_is_text, "a non-empty string"),
    }
    for name, (ok, want) in checks.items():
        if name in mech and not ok(mech[name]):
            problems.append(f"field 'mechanism.{name}' must be {want}, got {mech[name]!r}")
    return problems


def _key_problems(obj: Mapping[str, Any], expected: Sequence[str], prefix: str = "") -> list[str]:
    missing = [k for k in expected if k not in obj]
    unknown = sorted(k for k in obj if k not in expected)
    problems = [f"field '{prefix}{k}' is missing" for k in missing]
    problems += [f"field '{prefix}{k}' is not part of the format" for k in unknown]
    return problems


_FIELD_CHECKS: dict[str, tuple[Any, str]] = {
    "version": (lambda v: _is_int(v) and v in VERSIONS, f"one of {VERSIONS}"),
    "run": (_is_text, "a non-empty string"),
    "round": (lambda v: _is_int(v) and v >= 0, "an integer >= 0"),
    "member": (_is_text, "a non-empty string"),
    "public_key": (lambda v: _is_hex(v, 64), "64 lowercase hex characters"),
    "shards": (lambda v: isinstance(v, list) and all(_is_text(s) for s in v), "a list of shard names"),
    "release": (lambda v: v in KINDS, f"one of {KINDS}"),
    "privacy_unit": (lambda v: v == PRIVACY_UNIT, f"{PRIVACY_UNIT!r}"),
    "dataset_fingerprint": (_is_text, "a non-empty string"),
    "epsilon": (lambda v: _is_number(v) and v >= 0, "a finite number >= 0"),
    "delta": (lambda v: _is_number(v) and 0 < v < 1, "a number in (0, 1)"),
    "accountant": (lambda v: v in ACCOUNTANTS, f"one of {ACCOUNTANTS}"),
    "decision": (lambda v: v in DECISIONS, f"one of {DECISIONS}"),
    "prev_hash": (lambda v: _is_hex(v, 64), "64 lowercase hex characters"),
    "time": (_is_utc_time, "a UTC ISO-8601 timestamp"),
    "signature": (lambda v: _is_hex(v, 128), "128 lowercase hex characters"),
}


def release_of(entry: Mapping[str, Any]) -> str:
    """What an entry released: "dp-sgd" (a round's training) or "evaluation"; version 1 knew only
    training. A budget declaration says "budget" (it released nothing)."""
    return str(entry.get("release", RELEASE_TRAIN))


def is_release(entry: Mapping[str, Any]) -> bool:
    """Whether the entry records a release from the member's data (not a budget declaration)."""
    return release_of(entry) != RELEASE_BUDGET


def declared_budget(entry: Mapping[str, Any]) -> tuple[float, float]:
    """A budget declaration's (epsilon, delta)."""
    return float(entry["budget"]["epsilon"]), float(entry["budget"]["delta"])


def _budget_problems(budget: Any) -> list[str]:
    if not isinstance(budget, dict):
        return [f"field 'budget' must be an object, got {type(budget).__name__}"]
    problems = _key_problems(budget, BUDGET_FIELDS, "budget.")
    if "epsilon" in budget and not (_is_number(budget["epsilon"]) and budget["epsilon"] > 0):
        problems.append(f"field 'budget.epsilon' must be a finite number > 0, got {_short(budget['epsilon'])}")
    if "delta" in budget and not (_is_number(budget["delta"]) and 0 < budget["delta"] < 1):
        problems.append(f"field 'budget.delta' must be a number in (0, 1), got {_short(budget['delta'])}")
    return problems


def _fields_of(entry: Mapping[str, Any]) -> tuple[str, ...]:
    if entry.get("version") == 1:
        return V1_ENTRY_FIELDS
    if entry.get("release") == RELEASE_BUDGET:
        return BUDGET_ENTRY_FIELDS
    return ENTRY_FIELDS


def field_problems(entry: Any, fields: Sequence[str] | None = None) -> list[str]:
    """Every missing, unknown or ill-typed field of an entry (empty when well formed).

    ``fields`` defaults to the fields of the entry's own version and kind."""
    if not isinstance(entry, dict):
        return [f"not a JSON object but {type(entry).__name__}"]
    if fields is None:
        fields = _fields_of(entry)
    problems = _key_problems(entry, fields)
    if entry.get("release") == RELEASE_BUDGET and _is_int(entry.get("version")) and entry["version"] < 4:
        problems.append(f"a budget declaration needs version 4 or later, got version {entry['version']}")
    for name in fields:
        if name not in entry:
            continue
        if name == "mechanism":
            problems += _mechanism_problems(entry[name], entry.get("version"))
            continue
        if name == "budget":
            problems += _budget_problems(entry[name])
            continue
        ok, want = _FIELD_CHECKS[name]
        if not ok(entry[name]):
            problems.append(f"field '{name}' must be {want}, got {_short(entry[name])}")
    shards = entry.get("shards")
    if isinstance(shards, list) and entry.get("release", RELEASE_TRAIN) in RELEASES:
        # A training round trained some shards; an evaluation released no shard at all.
        if release_of(entry) == RELEASE_TRAIN and not shards:
            problems.append("field 'shards' must name the shards a dp-sgd round trained, got []")
        elif release_of(entry) == RELEASE_EVALUATION and shards:
            problems.append(f"field 'shards' must be [] for an evaluation, got {_short(shards)}")
    return problems


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def entry_label(index: int | None, entry: Any, line: bool = False) -> str:
    """'entry 3 (line 4, run 'demo', round 7)': how every message names an entry."""
    parts = []
    if line and index is not None:
        parts.append(f"line {index + 1}")
    if isinstance(entry, dict):
        if "run" in entry:
            parts.append(f"run {_short(entry['run'])}")
        if "round" in entry:
            parts.append(f"round {_short(entry['round'])}")
        if entry.get("release") in (RELEASE_EVALUATION, RELEASE_BUDGET):
            parts.append(str(entry["release"]))
    head = "entry" if index is None else f"entry {index}"
    return f"{head} ({', '.join(parts)})" if parts else head


# --------------------------------------------------------------------------- verification


def _as_public_key(public_key: Ed25519PublicKey | str) -> tuple[Ed25519PublicKey, str]:
    if isinstance(public_key, str):
        key = load_public_key(public_key)
    elif isinstance(public_key, Ed25519PublicKey):
        key = public_key
    else:
        raise TypeError(f"public_key must be an Ed25519PublicKey or hex string, got {type(public_key).__name__}")
    return key, public_key_hex(key)


def _entry_problems(entry: Any, key: Ed25519PublicKey, key_hex: str) -> list[str]:
    """Format, key and signature problems of one entry, without its label."""
    problems = field_problems(entry)
    if not isinstance(entry, dict):
        return problems
    if _is_hex(entry.get("public_key"), 64) and entry["public_key"] != key_hex:
        problems.append(
            f"field 'public_key' is {entry['public_key'][:16]}..., not the expected member key "
            f"{key_hex[:16]}...: signed by another member's key"
        )
        return problems
    if not _is_hex(entry.get("signature"), 128):
        return problems
    try:
        key.verify(bytes.fromhex(entry["signature"]), signing_payload(entry))
    except InvalidSignature:
        problems.append("signature does not verify: the entry was altered after signing, or forged")
    except ValueError as exc:  # not canonicalisable (e.g. NaN in memory)
        problems.append(f"cannot be canonicalised for verification: {exc}")
    return problems


def verify_entry(entry: Mapping[str, Any], public_key: Ed25519PublicKey | str) -> None:
    """Check one entry (or receipt): every field well formed, the member's key, a valid signature.

    Raises LedgerError naming the run, round and every problem; returns None when it holds.
    """
    key, key_hex = _as_public_key(public_key)
    problems = _entry_problems(entry, key, key_hex)
    if problems:
        label = entry_label(None, entry)
        raise LedgerError(f"{label}: " + "; ".join(problems), [f"{label}: {p}" for p in problems])


def verify_chain(
    entries: Sequence[Mapping[str, Any]], public_key: Ed25519PublicKey | str, *, line_numbers: bool = False
) -> list[str]:
    """Every problem of a ledger's entries, in order; an empty list means the chain holds.

    Checks each entry (format, key, signature), the hash chain (first entry chained to 64
    zeros, each next one to the previous entry's hash: catches dropped, inserted, reordered
    and edited entries), rounds strictly increasing within a run (per kind of release), and epsilon never
    decreasing for the same accountant and delta. It does not recompute epsilon: that is the
    auditor's job, with an independent accountant.
    """
    return _chain_problems(entries, public_key, line_numbers, verified=0)


def _chain_problems(
    entries: Sequence[Mapping[str, Any]], public_key: Ed25519PublicKey | str, line_numbers: bool, verified: int
) -> list[str]:
    """``verify_chain``, where the first ``verified`` entries are known to pass already (the
    same bytes checked earlier under the same key, by ``Ledger``): their signatures and links
    are not checked again, only the rounds and epsilons they carry into the rules of the
    entries after them. Private: auditors always verify everything."""
    key, key_hex = _as_public_key(public_key)
    problems: list[str] = []
    last_round: dict[tuple[str, str], tuple[int, int]] = {}
    last_eps: dict[tuple[str, float], tuple[float, int]] = {}
    for i, entry in enumerate(entries):
        if i < verified:
            if is_release(entry):
                _round_problems(entry, i, last_round)
                _epsilon_problems(entry, i, last_eps)
            continue
        label = entry_label(i, entry, line_numbers)
        found = _entry_problems(entry, key, key_hex)
        found += _link_problems(entries, i)
        if isinstance(entry, dict) and not field_problems(entry) and is_release(entry):
            found += _round_problems(entry, i, last_round)
            found += _epsilon_problems(entry, i, last_eps)
        problems += [f"{label}: {p}" for p in found]
    return problems


def _link_problems(entries: Sequence[Any], i: int) -> list[str]:
    entry = entries[i]
    if not isinstance(entry, dict) or not _is_hex(entry.get("prev_hash"), 64):
        return []
    if i == 0:
        if entry["prev_hash"] != GENESIS_HASH:
            return ["field 'prev_hash' is not 64 zeros although this is the first entry: earlier entries are missing"]
        return []
    try:
        expected = entry_hash(entries[i - 1])
    except ValueError:
        return [f"field 'prev_hash' cannot be checked: entry {i - 1} cannot be canonicalised"]
    if entry["prev_hash"] != expected:
        return [
            f"field 'prev_hash' does not match the hash of entry {i - 1}: "
            "an entry was dropped, inserted, reordered or edited before this one"
        ]
    return []


def _round_problems(entry: dict[str, Any], i: int, last_round: dict[tuple[str, str], tuple[int, int]]) -> list[str]:
    """A round is trained once and evaluated once: rounds increase per run and kind of release."""
    run, rnd, release = entry["run"], entry["round"], release_of(entry)
    previous = last_round.get((run, release))
    last_round[run, release] = (rnd, i) if previous is None else (max(rnd, previous[0]), i)
    if previous is not None and rnd <= previous[0]:
        kind = "" if release == RELEASE_TRAIN else f" for {release}s"
        return [
            f"field 'round' ({rnd}) does not increase within run {run!r}{kind} "
            f"(entry {previous[1]} had round {previous[0]})"
        ]
    return []


def _epsilon_problems(entry: dict[str, Any], i: int, last_eps: dict[tuple[str, float], tuple[float, int]]) -> list[str]:
    """Epsilon composes over all rounds, so it never goes down under one accountant and delta.

    PRV is a numerical bound: it may wobble by up to its error tolerance, which is allowed.
    """
    group = (entry["accountant"], float(entry["delta"]))
    eps = float(entry["epsilon"])
    previous = last_eps.get(group)
    slack = PRV_EPS_ERROR if entry["accountant"] == "prv" else _CLAIM_RTOL * max(1.0, eps)
    if previous is None or eps >= previous[0]:
        last_eps[group] = (eps, i)
        return []
    if eps >= previous[0] - slack:
        return []
    return [f"field 'epsilon' decreased from {previous[0]!r} (entry {previous[1]}) to {eps!r}"]


# --------------------------------------------------------------------------- receipts


def mechanism_of(entry: Mapping[str, Any]) -> Mechanism:
    """The accountant's view of an entry: what the privacy analysis needs and nothing else."""
    mech = entry["mechanism"]
    return Mechanism(float(mech["noise_multiplier"]), float(mech["sample_rate"]), int(mech["steps"]))


def receipt_to_json(entry: Mapping[str, Any]) -> str:
    """The signed entry as canonical JSON text, to carry in a Flower ConfigRecord (a str value)."""
    problems = field_problems(dict(entry))
    if problems:
        raise LedgerError(
            f"{entry_label(None, entry)} is not a complete signed entry: " + "; ".join(problems), problems
        )
    return canonical_json(entry).decode("utf-8")


def receipt_from_json(text: str) -> dict[str, Any]:
    """Parse and check the format of a receipt; verify it with ``verify_entry`` and the member's key."""
    if not isinstance(text, str):
        raise LedgerError(f"receipt must be JSON text, got {type(text).__name__}")
    try:
        entry = parse_strict_json(text)
    except ValueError as exc:
        raise LedgerError(f"receipt is not valid JSON: {exc}") from None
    problems = field_problems(entry)
    if problems:
        raise LedgerError(f"receipt {entry_label(None, entry)} is malformed: " + "; ".join(problems), problems)
    return entry


# --------------------------------------------------------------------------- the ledger file


class Ledger:
    """A member node's ledger file. Reading verifies everything; appending needs the signing key.

    Without a signing key the ledger verifies against the key named in its first entry,
    which proves only internal consistency: auditors pass the member's known public key to
    ``verify_chain`` instead.
    """

    def __init__(self, path: str | os.PathLike[str], signing_key: Ed25519PrivateKey | None = None) -> None:
        if signing_key is not None and not isinstance(signing_key, Ed25519PrivateKey):
            raise TypeError(f"signing_key must be an Ed25519PrivateKey, got {type(signing_key).__name__}")
        self.path = Path(path)
        self._signing_key = signing_key
        self._public_hex = public_key_hex(signing_key) if signing_key is not None else None
        # The bytes last verified, the key they verified under and how many entries they
        # hold. A node reads its ledger several times per request (rollback check, replay
        # check, history, plan, append); Ed25519 verification is most of a read's cost
        # (1000 entries: 0.45 s per read here, 0.22 s of it verify()), so only the entries
        # appended since are checked again. Any other change to the file (an edit, a
        # truncation) no longer starts with those bytes and is verified in full.
        self._verified: tuple[bytes, str, int] = (b"", "", 0)

    # ---- reading

    def entries(self) -> list[dict[str, Any]]:
        """Every entry, parsed and verified; LedgerError names the line and problem otherwise."""
        return self._read()[1]

    def head_hash(self) -> str:
        """Hash of the last entry (what the next entry chains to); 64 zeros when empty."""
        entries = self.entries()
        return entry_hash(entries[-1]) if entries else GENESIS_HASH

    def holds(self, hash_hex: str) -> bool:
        """Whether an entry of this ledger hashes to ``hash_hex`` (:func:`entry_hash`)."""
        return any(entry_hash(entry) == hash_hex for entry in self.entries())

    def releases(self) -> list[dict[str, Any]]:
        """The entries that record a release from the member's data (budget declarations left out)."""
        return [e for e in self.entries() if is_release(e)]

    def budgets(self) -> list[dict[str, Any]]:
        """The budget declarations, oldest first."""
        return [e for e in self.entries() if not is_release(e)]

    def history(self) -> list[Mechanism]:
        """The accountant's history: one Mechanism per recorded release, in order."""
        return [mechanism_of(e) for e in self.releases()]

    def spent_epsilon(self) -> float:
        """The largest epsilon any release recorded (0.0 when nothing was released yet): what a
        budget must cover, as budget declarations and auditors hold it. Not the last release's:
        after the consortium switches accountant (RDP to PRV) a later claim can sit below an
        earlier one, and `kyodo-member budget` then accepted a budget the ledger already broke."""
        return max((float(e["epsilon"]) for e in self.releases()), default=0.0)

    def find(self, run: str, round_number: int, release: str = RELEASE_TRAIN) -> dict[str, Any] | None:
        """The entry of ``(run, round_number)`` and kind of release if the node already recorded it
        (e.g. before a crash)."""
        return next(
            (e for e in self.releases() if e["run"] == run and e["round"] == round_number and release_of(e) == release),
            None,
        )

    def _read(self) -> tuple[bytes, list[dict[str, Any]]]:
        try:
            raw = self.path.read_bytes()
        except FileNotFoundError:
            return b"", []
        entries = _parse_lines(raw, self.path)
        key_hex = self._public_hex or _ledger_key(entries, self.path)
        if key_hex is not None:
            known, known_key, count = self._verified
            verified = count if known_key == key_hex and raw.startswith(known) else 0
            problems = _chain_problems(entries, key_hex, line_numbers=True, verified=verified)
            if problems:
                raise LedgerError(
                    f"ledger {self.path} failed verification:\n  " + "\n  ".join(problems),
                    problems,
                )
            self._verified = (raw, key_hex, len(entries))
        return raw, entries

    # ---- appending

    def append(
        self, *, at: dt.datetime | None = None, budget: tuple[float, float] | None = None, **fields: Any
    ) -> dict[str, Any]:
        """Sign and durably append one round's entry; returns it (the receipt).

        The caller gives the release's facts (``CALLER_FIELDS``; ``privacy_unit`` defaults to
        "episode"); version, public key, previous hash, time and signature are filled here.
        ``time`` is ``at`` (timezone-aware; a node passes the moment the request reached it, so
        the receipt does not say how long the work on the member's data took) or now.
        ``budget`` is the (epsilon, delta) the release was planned under: declared first when
        the ledger's newest declaration says otherwise, under the same lock and in the same
        write, so no other process's declaration can come between the two.
        Refused (LedgerError) when the existing ledger does not verify, the round does not
        increase within its run, the claimed epsilon is below what the recorded history
        plus this round composes to (the ledger never signs an under-stated spend), or the
        release lies outside the budget declared last.
        """
        if self._signing_key is None:
            raise LedgerError(f"ledger {self.path} was opened without a signing key: it is read-only")
        with self._locked():
            raw, entries = self._read()
            new = []
            if budget is not None:
                declaration = self._declaration(entries, str(fields.get("member", "")), *budget, at)
                new += [declaration] if declaration is not None else []
            entry = self._new_entry(fields, entries + new, at)
            self._write(raw, len(entries), [*new, entry])
        return dict(entry)

    def declare_budget(
        self, member: str, epsilon_budget: float, delta_budget: float, *, at: dt.datetime | None = None
    ) -> dict[str, Any] | None:
        """Sign and append a budget declaration unless the newest one already says the same;
        returns the new entry (None when nothing was written).

        Refused (LedgerError) for a budget the ledger already breaks: an epsilon below what it
        records, or a new delta once releases were accounted at another one (every earlier
        claim would have to be re-read at it). A node declares through ``append(budget=...)``."""
        if self._signing_key is None:
            raise LedgerError(f"ledger {self.path} was opened without a signing key: it is read-only")
        with self._locked():
            raw, entries = self._read()
            entry = self._declaration(entries, member, epsilon_budget, delta_budget, at)
            if entry is not None:
                self._write(raw, len(entries), [entry])
        return None if entry is None else dict(entry)

    def _declaration(
        self,
        entries: list[dict[str, Any]],
        member: str,
        epsilon_budget: float,
        delta_budget: float,
        at: dt.datetime | None,
    ) -> dict[str, Any] | None:
        """The signed declaration of ``(epsilon_budget, delta_budget)`` to follow ``entries``,
        or None when the newest declaration already says it."""
        if at is not None and at.utcoffset() is None:
            raise LedgerError("an entry's time must be timezone-aware (UTC)")
        budget = {"epsilon": float(epsilon_budget), "delta": float(delta_budget)}
        problems = _budget_problems(budget)
        if problems:
            raise LedgerError("cannot declare the budget: " + "; ".join(problems), problems)
        member = _one_member(entries, member, self.path)
        declared = [e for e in entries if not is_release(e)]
        if declared and declared_budget(declared[-1]) == (budget["epsilon"], budget["delta"]):
            return None
        problems = _declaration_problems(entries, budget)
        if problems:
            raise LedgerError("cannot declare the budget: " + "; ".join(problems), problems)
        entry: dict[str, Any] = {
            "version": VERSION,
            "release": RELEASE_BUDGET,
            "member": member,
            "budget": budget,
            "public_key": self._public_hex,
            "prev_hash": entry_hash(entries[-1]) if entries else GENESIS_HASH,
            "time": (at or dt.datetime.now(dt.UTC)).astimezone(dt.UTC).isoformat(timespec="microseconds"),
        }
        assert self._signing_key is not None
        entry["signature"] = self._signing_key.sign(signing_payload(entry)).hex()
        return entry

    def _write(self, raw: bytes, count: int, new: list[dict[str, Any]]) -> None:
        """Append ``new`` (signed after the chain rules passed) to the file whose bytes were
        ``raw`` (``count`` entries), atomically: the grown file is as verified as before."""
        data = raw + b"".join(canonical_json(entry) + b"\n" for entry in new)
        _atomic_write(self.path, data)
        self._verified = (data, self._public_hex or "", count + len(new))

    def _new_entry(
        self, fields: dict[str, Any], entries: list[dict[str, Any]], at: dt.datetime | None = None
    ) -> dict[str, Any]:
        if at is not None and at.utcoffset() is None:
            raise LedgerError("an entry's time must be timezone-aware (UTC)")
        fields = dict(fields)
        fields.setdefault("privacy_unit", PRIVACY_UNIT)
        fields.setdefault("release", RELEASE_TRAIN)
        unknown = sorted(set(fields) - set(CALLER_FIELDS))
        missing = [k for k in CALLER_FIELDS if k not in fields]
        if unknown or missing:
            raise LedgerError(
                f"append() needs exactly the fields {CALLER_FIELDS}; missing {missing}, unexpected {unknown}"
            )
        entry = _normalise(fields)
        entry.update(
            version=VERSION,
            public_key=self._public_hex,
            prev_hash=entry_hash(entries[-1]) if entries else GENESIS_HASH,
            time=(at or dt.datetime.now(dt.UTC)).astimezone(dt.UTC).isoformat(timespec="microseconds"),
        )
        problems = field_problems(entry, [f for f in ENTRY_FIELDS if f != "signature"])
        if problems:
            raise LedgerError(f"cannot append {entry_label(None, entry)}: " + "; ".join(problems), problems)
        problems = _rule_problems(entries, entry)
        if problems:
            raise LedgerError(f"cannot append {entry_label(None, entry)}: " + "; ".join(problems), problems)
        _check_claim(entry, entries)
        assert self._signing_key is not None
        entry["signature"] = self._signing_key.sign(signing_payload(entry)).hex()
        return entry

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        """Serialise appends between processes (advisory lock on a sibling ``.lock`` file)."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path.with_name(self.path.name + ".lock"), os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)


def _rule_problems(entries: list[dict[str, Any]], entry: dict[str, Any]) -> list[str]:
    """The chain rules for a new release: its round increases within its run, epsilon does not
    decrease, and it stays within the budget the ledger declared last (if it declared one)."""
    last_round: dict[tuple[str, str], tuple[int, int]] = {}
    last_eps: dict[tuple[str, float], tuple[float, int]] = {}
    in_force: tuple[float, float] | None = None
    for i, old in enumerate(entries):
        if is_release(old):
            _round_problems(old, i, last_round)
            _epsilon_problems(old, i, last_eps)
        else:
            in_force = declared_budget(old)
    index = len(entries)
    problems = _round_problems(entry, index, last_round) + _epsilon_problems(entry, index, last_eps)
    if in_force is not None:
        problems += over_budget_problems(entry, in_force)
    return problems


def over_budget_problems(entry: Mapping[str, Any], budget: tuple[float, float], which: str = "declared") -> list[str]:
    """Where a release's claim lies outside an (epsilon, delta) budget: the ``which`` ("declared",
    "published") one."""
    epsilon_budget, delta_budget = budget
    problems = []
    if float(entry["delta"]) > delta_budget * (1 + 1e-12):
        problems.append(f"claims at delta {entry['delta']:g}, looser than the {which} budget's delta {delta_budget:g}")
    if float(entry["epsilon"]) > epsilon_budget * (1 + 1e-12):
        problems.append(f"records epsilon {entry['epsilon']:.6g}, over the {which} budget {epsilon_budget:g}")
    return problems


def _one_member(entries: list[dict[str, Any]], member: str, path: Path) -> str:
    """``member``, if every entry so far names it (a ledger is one member's)."""
    if not _is_text(member):
        raise LedgerError(f"ledger {path}: a budget declaration needs the member's name, got {member!r}")
    others = sorted({str(e["member"]) for e in entries} - {member})
    if others:
        raise LedgerError(f"ledger {path} holds entries of {others}: it cannot declare {member!r}'s budget")
    return member


def _declaration_problems(entries: list[dict[str, Any]], budget: Mapping[str, float]) -> list[str]:
    """A declared budget must hold for what the ledger already records."""
    releases = [e for e in entries if is_release(e)]
    deltas = sorted({float(e["delta"]) for e in releases})
    if deltas and deltas != [budget["delta"]]:
        return [
            f"delta {budget['delta']:g} differs from the {', '.join(f'{d:g}' for d in deltas)} the ledger's "
            "releases were accounted at (a new delta needs a new member identity and ledger)"
        ]
    spent = max((float(e["epsilon"]) for e in releases), default=0.0)
    if budget["epsilon"] < spent:
        return [f"epsilon {budget['epsilon']!r} is below the {spent!r} the ledger already records"]
    return []


def _check_claim(entry: dict[str, Any], entries: list[dict[str, Any]]) -> None:
    """Refuse to sign an epsilon below what the recorded history plus this round composes to."""
    history = [*(mechanism_of(e) for e in entries if is_release(e)), mechanism_of(entry)]
    composed = epsilon(history, entry["delta"], entry["accountant"])
    if entry["epsilon"] < composed * (1 - _CLAIM_RTOL):
        raise LedgerError(
            f"cannot append {entry_label(None, entry)}: field 'epsilon' {entry['epsilon']!r} is below the "
            f"{entry['accountant']} composition of the ledger's history plus this round ({composed!r})"
        )


def _normalise(fields: dict[str, Any]) -> dict[str, Any]:
    """Plain JSON types (numpy scalars, tuples and ints-as-floats would change the signed bytes)."""
    out = dict(fields)
    mech = fields["mechanism"]
    if isinstance(mech, Mapping):
        mech = dict(mech)
        for name in ("noise_multiplier", "sample_rate", "clipping_norm"):
            if _is_number(mech.get(name)):
                mech[name] = float(mech[name])
        if isinstance(mech.get("steps"), numbers.Integral) and not isinstance(mech.get("steps"), bool):
            mech["steps"] = int(mech["steps"])
        out["mechanism"] = mech
    if isinstance(fields["shards"], (list, tuple)):
        out["shards"] = list(fields["shards"])
    for name in ("epsilon", "delta"):
        if _is_number(fields[name]):
            out[name] = float(fields[name])
    if isinstance(fields["round"], numbers.Integral) and not isinstance(fields["round"], bool):
        out["round"] = int(fields["round"])
    return out


def _parse_lines(raw: bytes, path: Path) -> list[dict[str, Any]]:
    """Split and parse the file, naming the line of any damage (a torn tail included)."""
    if not raw:
        return []
    lines = raw.split(b"\n")
    torn_tail = lines[-1] != b""
    if not torn_tail:
        lines.pop()
    entries = []
    for number, line in enumerate(lines, start=1):
        last = number == len(lines)
        try:
            entry = parse_strict_json(line.decode("utf-8"))
        except (UnicodeDecodeError, ValueError) as exc:
            hint = ": torn last line (interrupted write?)" if last else ""
            raise LedgerError(f"ledger {path} line {number} is not valid JSON{hint} ({exc})") from None
        if not isinstance(entry, dict):
            raise LedgerError(f"ledger {path} line {number} is not a JSON object")
        if last and torn_tail:
            raise LedgerError(f"ledger {path} line {number}: torn last line (no final newline; interrupted write?)")
        entries.append(entry)
    return entries


def _ledger_key(entries: list[dict[str, Any]], path: Path) -> str | None:
    """The key a keyless reader verifies against: the one named by the first entry."""
    if not entries:
        return None
    key_hex = entries[0].get("public_key")
    try:
        load_public_key(key_hex)
    except KeyFormatError as exc:
        raise LedgerError(f"ledger {path} line 1 (entry 0): field 'public_key': {exc}") from None
    return key_hex


def _atomic_write(path: Path, data: bytes) -> None:
    """Replace ``path`` with ``data`` so a crash leaves the old file or the new one, never a mix.

    Temp file in the same directory (same filesystem, so the rename is atomic), fsync the
    data, rename over the old file, fsync the directory so the rename itself is durable.
    """
    mode = 0o644
    with contextlib.suppress(FileNotFoundError):
        mode = path.stat().st_mode & 0o777
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    fsync_dir(path.parent)
