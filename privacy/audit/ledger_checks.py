"""The audit of members' ledgers: what signed ledgers establish by themselves.

Per ledger: every entry verifies under the consortium's published key for its member
(never a key inside the ledger), names that member, has the format's fields, and chains to
the one before it with no gap, reorder, fork or replay; every recorded epsilon is recomputed
independently (``privacy.audit.accounting``, dp-accounting) over the entry and everything
before it; the whole ledger composes within the member's published budget, and each release
within the budget its ledger declared before it. None of this needs a coordinator file, so
``audit_ledgers`` settles every member's budget over every run from the ledgers alone;
``privacy.audit.verify`` adds what a run's files show (receipts, coverage, store).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import partial
from typing import Any

from cryptography.exceptions import InvalidSignature

from privacy.audit.accounting import Mech, check_budget, check_claim, finite, totals_of
from privacy.audit.consortium import Consortium
from privacy.audit.findings import FAIL, NOTE, AuditResult, EntryRow, MemberRow
from privacy.audit.inputs import LedgerFile
from privacy.keys import load_public_key
from privacy.ledger import (
    RELEASE_BUDGET,
    RELEASE_TRAIN,
    declared_budget,
    entry_hash,
    field_problems,
    over_budget_problems,
    release_of,
    signing_payload,
    verify_chain,
)
from privacy.ledger import (
    entry_label as ledger_entry_label,
)


@dataclass
class LedgerIndex:
    """What the round and store checks need to know about one member's ledger."""

    member: str
    by_hash: dict[str, int] = field(default_factory=dict)
    by_run_round: dict[tuple[str, int], int] = field(default_factory=dict)
    entries: dict[int, dict[str, Any]] = field(default_factory=dict)  # index -> well-formed release
    budgets: dict[int, dict[str, Any]] = field(default_factory=dict)  # index -> well-formed budget declaration
    rows: dict[int, EntryRow] = field(default_factory=dict)
    matched: set[int] = field(default_factory=set)


def entry_label(index: int, entry: Any) -> str:
    """'entry 2 (line 3, run 'r', round 2)': the same naming as the ledger's own messages."""
    return ledger_entry_label(index, entry, line=True)


def classify_problem(problem: str) -> str:
    """Which check a problem reported by ``privacy.ledger`` belongs to."""
    if "signature does not verify" in problem:
        return "signature"
    if "field 'public_key' is" in problem:
        return "identity"
    if "prev_hash" in problem or ("field 'round'" in problem and "does not increase" in problem):
        return "chain"
    if "field 'epsilon' decreased" in problem:
        return "accounting"
    return "format"


def _signed_by(entry: Mapping[str, Any], consortium: Consortium) -> str | None:
    """The consortium member whose published key verifies this entry's signature, if any."""
    try:
        signature = bytes.fromhex(entry["signature"])
        payload = signing_payload(entry)
    except (KeyError, TypeError, ValueError):
        return None
    for member in consortium.members.values():
        try:
            load_public_key(member.public_key).verify(signature, payload)
        except (InvalidSignature, ValueError):
            continue
        return member.name
    return None


def identity_problems(entry: Any, member: str, consortium: Consortium) -> list[str]:
    """Another member's name, key or signature on an entry that should be ``member``'s."""
    if not isinstance(entry, dict):
        return []
    problems = []
    if entry.get("member") != member:
        problems.append(f"names member {entry.get('member')!r}, but this is {member}'s ledger")
    owner = consortium.key_owner(entry.get("public_key", "")) if isinstance(entry.get("public_key"), str) else None
    signer = _signed_by(entry, consortium)
    if signer is not None and signer != member:
        problems.append(
            f"is signed with {signer}'s published key, not {member}'s: "
            "a key swapped between members, or an entry written by another member"
        )
    elif owner is not None and owner != member:
        problems.append(f"carries {owner}'s public key instead of {member}'s")
    return problems


def _mechanism(entry: Any) -> Mech | None:
    """The entry's mechanism if it is well formed enough to compose, else None."""
    mech = entry.get("mechanism") if isinstance(entry, dict) else None
    if not isinstance(mech, dict):
        return None
    sigma, q, steps = mech.get("noise_multiplier"), mech.get("sample_rate"), mech.get("steps")
    numbers_ok = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in (sigma, q))
    if not numbers_ok or not isinstance(steps, int) or isinstance(steps, bool):
        return None
    if not (sigma > 0 and 0 < q <= 1 and steps >= 1):
        return None
    return Mech(float(sigma), float(q), int(steps))


def _number(value: Any) -> float | None:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


# --------------------------------------------------------------------------- ledgers


def check_ledger(result: AuditResult, consortium: Consortium, ledger: LedgerFile, run_id: str | None) -> LedgerIndex:
    """Signatures, identity, format, chain, replay and accounting of one member's ledger."""
    add = partial(result.add, member=ledger.member)
    name = ledger.member
    subject = f"{name} ledger"
    index = LedgerIndex(name)
    for problem in ledger.problems:
        add("input", subject, f"{ledger.path}: {problem}")
    member = consortium.members.get(name)
    if member is None:
        add(
            "consortium",
            subject,
            f"{ledger.path} is the ledger of {name!r}, which the consortium does not list: "
            "no published key to verify it against",
        )
        for i, entry in enumerate(ledger.entries):
            for problem in field_problems(entry):
                add("format", subject, f"{entry_label(i, entry)}: {problem}")
    else:
        for problem in verify_chain(ledger.entries, member.public_key, line_numbers=True):
            add(classify_problem(problem), subject, problem)
    seen: dict[str, int] = {}
    for i, entry in enumerate(ledger.entries):
        for problem in identity_problems(entry, name, consortium):
            add("identity", subject, f"{entry_label(i, entry)}: {problem}")
        if not isinstance(entry, dict):
            continue
        signature = entry.get("signature")
        if isinstance(signature, str) and signature in seen:
            add(
                "chain",
                subject,
                f"{entry_label(i, entry)}: repeats entry {seen[signature]} (same signature): a replayed entry",
            )
        elif isinstance(signature, str):
            seen[signature] = i
        if not field_problems(entry) and release_of(entry) == RELEASE_BUDGET:
            index.budgets[i] = entry
        elif not field_problems(entry):
            index.entries[i] = entry
            index.by_hash.setdefault(entry_hash(entry), i)
            if release_of(entry) == RELEASE_TRAIN:
                index.by_run_round.setdefault((entry["run"], entry["round"]), i)
    unrecorded = [i for i, entry in index.entries.items() if "noise_source" not in entry["mechanism"]]
    if unrecorded:
        add(
            "format",
            subject,
            f"{len(unrecorded)} entries (first: entry {unrecorded[0]}) predate ledger version 3 and do not "
            "record how their noise was drawn (kyodo nodes before version 3 drew DP-SGD noise from torch's "
            "generator, not a cryptographic one)",
            severity=NOTE,
        )
    history = _account(result, ledger, index, run_id)
    if member is not None:
        _check_budget(result, ledger, index, history, member.epsilon, member.delta)
        _check_declared_budgets(result, ledger, index, (member.epsilon, member.delta))
    return index


def _account(result: AuditResult, ledger: LedgerFile, index: LedgerIndex, run_id: str | None) -> list[Mech]:
    """Recompute each entry's epsilon over the history up to it; one row per entry."""
    add = partial(result.add, member=ledger.member)
    subject = f"{ledger.member} ledger"
    history: list[Mech] = []
    incomplete = False
    for i, entry in enumerate(ledger.entries):
        if isinstance(entry, dict) and entry.get("release") == RELEASE_BUDGET:
            continue  # releases nothing; its format was checked with the chain
        mech = _mechanism(entry)
        if mech is None:
            incomplete = True
            add(
                "accounting",
                subject,
                f"{entry_label(i, entry)}: its mechanism cannot be read, so this and later epsilons "
                "cannot be fully recomputed",
            )
        else:
            history.append(mech)
        is_dict = isinstance(entry, dict)
        recorded = _number(entry.get("epsilon")) if is_dict else None
        delta = _number(entry.get("delta")) if is_dict else None
        accountant = entry.get("accountant", "?") if is_dict else "?"
        row = EntryRow(
            member=ledger.member,
            index=i,
            run=str(entry.get("run", "?")) if is_dict else "?",
            round=entry.get("round") if is_dict and isinstance(entry.get("round"), int) else None,
            shards=len(entry["shards"]) if is_dict and isinstance(entry.get("shards"), list) else 0,
            steps=mech.steps if mech else None,
            noise_multiplier=mech.noise_multiplier if mech else None,
            sample_rate=mech.sample_rate if mech else None,
            accountant=str(accountant),
            delta=delta,
            recorded=recorded,
            recomputed=None,
            method="-",
            rdp=None,
            ok=False,
            status="other run" if run_id is not None and is_dict and entry.get("run") != run_id else "",
        )
        index.rows[i] = row
        result.entries.append(row)
        if mech is None or recorded is None or delta is None or not 0 < delta < 1 or accountant not in ("rdp", "prv"):
            if mech is not None:
                add("accounting", subject, f"{entry_label(i, entry)}: epsilon, delta or accountant unreadable")
            continue
        verdict = check_claim(totals_of(history), recorded, delta, accountant)
        row.recomputed, row.method, row.rdp = finite(verdict.recomputed), verdict.method, finite(verdict.rdp)
        row.ok = verdict.ok and not incomplete
        if not verdict.ok:
            add("accounting", subject, f"{entry_label(i, entry)}: field 'epsilon': {verdict.detail}")
        elif verdict.detail:
            add("accounting", subject, f"{entry_label(i, entry)}: {verdict.detail}", NOTE)
    return history


def _check_budget(
    result: AuditResult,
    ledger: LedgerFile,
    index: LedgerIndex,
    history: list[Mech],
    budget_epsilon: float,
    budget_delta: float,
) -> None:
    """The member's claims and its whole recorded history against its published budget."""
    add = partial(result.add, member=ledger.member)
    subject = f"{ledger.member} budget"
    claims = []
    for i, entry in index.entries.items():
        claims.append(float(entry["epsilon"]))
        for problem in over_budget_problems(entry, (budget_epsilon, budget_delta), "published"):
            add("budget", subject, f"{entry_label(i, entry)}: {problem}")
    verdict = check_budget(totals_of(history), budget_epsilon, budget_delta)
    if not verdict.ok:
        add("budget", subject, verdict.detail)
    result.members[ledger.member] = MemberRow(
        member=ledger.member,
        epsilon_budget=budget_epsilon,
        delta_budget=budget_delta,
        entries=len(ledger.entries) - len(index.budgets),  # releases: a declaration releases nothing
        run_entries=0,
        epsilon_recorded=max(claims) if claims else None,
        epsilon_recomputed=finite(verdict.recomputed),
        method=verdict.method,
        epsilon_rdp=finite(verdict.rdp),
        within_budget=verdict.ok,
        ledger=str(ledger.path),
    )


def _check_declared_budgets(
    result: AuditResult, ledger: LedgerFile, index: LedgerIndex, published: tuple[float, float]
) -> None:
    """Each release against the budget the member's ledger declared before it (version 4 on),
    and the declarations against what the ledger already recorded and what is published.

    The published budget is only today's; the declarations say which budget governed which
    release and when the member changed it, signed into the chain where nothing can drop
    them unseen. A version-4 release with no declaration before it fails: a kyodo node
    declares before its first release, so a ledger without one hides the budget it ran under
    (it could be declared only after an overspend, or never)."""
    add = partial(result.add, member=ledger.member)
    subject = f"{ledger.member} budget"
    in_force: tuple[tuple[float, float], int] | None = None
    legacy, spent, deltas, steps, undeclared = 0, 0.0, set(), [], []
    for i in sorted([*index.entries, *index.budgets]):
        entry = ledger.entries[i]
        if i in index.budgets:
            declared = declared_budget(entry)
            if declared[0] < spent:
                add(
                    "budget",
                    subject,
                    f"{entry_label(i, entry)}: declares epsilon {declared[0]!r}, below the {spent!r} the ledger "
                    "already records",
                )
            if deltas - {declared[1]}:
                add(
                    "budget",
                    subject,
                    f"{entry_label(i, entry)}: declares delta {declared[1]:g}, but the releases before it were "
                    f"accounted at {', '.join(f'{d:g}' for d in sorted(deltas))}",
                )
            # "from release N" as `kyodo-member status` says it; the entry index locates it in the file
            releases = sum(1 for j in index.entries if j < i)
            when = entry["time"][:19]
            steps.append(f"ε={declared[0]:g} δ={declared[1]:g} from release {releases + 1} (entry {i}, {when})")
            in_force = (declared, i)
            continue
        spent = max(spent, float(entry["epsilon"]))
        deltas.add(float(entry["delta"]))
        if in_force is not None:
            for problem in over_budget_problems(entry, in_force[0]):
                add("budget", subject, f"{entry_label(i, entry)}: {problem} (declared at entry {in_force[1]})")
        elif entry["version"] >= 4:
            undeclared.append(entry_label(i, entry))
        else:
            legacy += 1
    if undeclared:  # one failure: a ledger missing its first declaration has every release here
        span = f"{undeclared[0]} to {undeclared[-1]} ({len(undeclared)} releases)" if undeclared[1:] else undeclared[0]
        add(
            "budget",
            subject,
            f"{span}: version-4 releases with no budget declared before them: the ledger does not "
            "say which budget the node held them to",
        )
    if legacy:
        where = "its" if in_force is None else "its first"
        add(
            "budget",
            subject,
            f"{where} {legacy} releases predate ledger version 4 and declare no budget: checked against the "
            "published budget only",
            NOTE,
        )
    if in_force is None:
        return
    if len(steps) > 1:
        add("budget", subject, "the member changed its budget: " + ", then ".join(steps), NOTE)
    last, at = in_force
    if last != published:
        add(
            "budget",
            subject,
            f"the ledger last declares ε={last[0]:g} δ={last[1]:g} (entry {at}), the consortium publishes "
            f"ε={published[0]:g} δ={published[1]:g}: one of the two is out of date "
            "(a member sends its changed membership.json; the operator publishes it with "
            "`kyodo-coordinator add-member ... --update`)",
            NOTE,
        )


def audit_ledgers(
    consortium: Consortium, ledgers: dict[str, LedgerFile], *, ledgers_dir: str = "", consortium_path: str = ""
) -> AuditResult:
    """Every member's whole ledger, over every run it ever released in, against its published
    key and budget: what signed ledgers establish alone (signatures, identity, format, chain,
    accounting, budget), with no coordinator file trusted or needed.

    Whether a member's budget held is a property of its whole ledger, not of one run, so an
    auditor can settle it before, or without, any run's files. What only a run's files can
    show (receipts against round records, coverage, the store) is a run audit's.
    A consortium member without a ledger fails: its budget cannot be verified (an empty file
    stands for a member that never released anything); one that left is a note."""
    result = AuditResult(run=None, ledgers_dir=ledgers_dir, run_dir="", consortium=consortium_path, ledgers_only=True)
    for _, ledger in sorted(ledgers.items()):
        check_ledger(result, consortium, ledger, None)
    for name, member in sorted(consortium.members.items()):
        if not member.dp:
            # Its node sends no receipts, so its ledger, if any, is empty whatever it released.
            result.add(
                "budget",
                f"{name} budget",
                "the consortium publishes dp: false for this member: its node trains without DP, so its updates "
                "and held-out errors leave exact and no budget holds for them, whatever its (empty) ledger says",
                member=name,
            )
        if name not in ledgers:
            result.add(
                "input",
                f"{name} ledger",
                "no ledger was given for this consortium member: its budget cannot be verified "
                "(an empty ledger.jsonl stands for a member that never released anything)",
                severity=NOTE if member.departed else FAIL,
            )
    result.add(
        "input",
        "ledgers only",
        "a ledger cut short (its last entries dropped, or emptied) reads here as one that released less: "
        "the receipts a run's coordinator holds show it (audit each run with --rounds RUN_DIR)",
        severity=NOTE,
    )
    for finding in result.failures:
        if finding.member in result.members:
            result.members[finding.member].ok = False
    return result
