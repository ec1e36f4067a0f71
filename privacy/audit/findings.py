"""What an audit found: the data model shared by the checks, the CLI and the report.

Every check appends :class:`Finding` objects rather than raising, so one run of the auditor
reports *every* problem (a tampered ledger usually breaks several things at once: the
signature, the next entry's chain link, the accounting) and the report can show them all.
A finding names its subject the way the ledger's own messages do ("honda ledger entry 2
(line 3, run 'r', round 2)"), so a person can go straight to the line in question.

Severity ``fail`` makes the audit fail (exit code 1); ``note`` is shown but does not fail it:
something a reader should know (a member with no ledger that never trained, a round whose
spend is explained by a failed reply) that is not a violation.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

FAIL = "fail"
NOTE = "note"

# The checks, in the order the report lists them, with what each one establishes.
CHECKS: dict[str, str] = {
    "consortium": "the consortium file lists each member once, with a valid key and budget",
    "input": "ledgers, round records and run files can be read",
    "format": "every ledger entry and receipt has exactly the fields of the format, well typed",
    "signature": "every entry and receipt verifies under the consortium's key for its member",
    "identity": "every entry and receipt is its member's own: its name and key, not another member's",
    "chain": "each ledger is one unbroken hash chain: no gap, reorder, fork or replay",
    "accounting": (
        "every recorded epsilon is a valid bound by the independent dp-accounting recomputation "
        "(within 2% of its conservative RDP, else at least its tight PLD)"
    ),
    "budget": "every member stayed within its published (epsilon, delta) budget",
    "receipt": (
        "every contribution in the round records has a matching valid receipt, and every receipt the "
        "coordinator held is in its member's ledger"
    ),
    "coverage": "every ledger entry for this run appears in the round records, or is explained",
    "store": (
        "every committed round's manifest and objects exist with their recorded hashes, and each round "
        "record and manifest is signed by the consortium's coordinator key (where it publishes one)"
    ),
}
# What only a run's files can establish: an audit of ledgers alone does not make these checks.
RUN_CHECKS = ("receipt", "coverage", "store")


@dataclass(frozen=True)
class Finding:
    """One problem (or note): which check, about what, and what exactly is wrong."""

    check: str
    subject: str
    message: str
    severity: str = FAIL
    member: str | None = None  # the member it concerns, when it concerns one

    def text(self) -> str:
        return f"{self.subject}: {self.message}"


@dataclass
class EntryRow:
    """One ledger entry as the auditor sees it: what it claims and what mathematics gives."""

    member: str
    index: int
    run: str
    round: int | None
    shards: int
    steps: int | None
    noise_multiplier: float | None
    sample_rate: float | None
    accountant: str
    delta: float | None
    recorded: float | None
    recomputed: float | None  # dp-accounting, same family as the entry's accountant
    method: str  # how ``recomputed`` was obtained: "rdp", "pld" (or "-" when impossible)
    rdp: float | None  # dp-accounting RDP, always computed when possible
    ok: bool
    status: str = ""  # how the entry relates to this run's round records


@dataclass
class MemberRow:
    """One member's summary line."""

    member: str
    epsilon_budget: float
    delta_budget: float
    entries: int
    run_entries: int
    epsilon_recorded: float | None  # the last entry's claim
    epsilon_recomputed: float | None  # independent, at the budget's delta: what decided the budget check
    method: str  # "rdp" or "pld": which dp-accounting accountant gave ``epsilon_recomputed``
    epsilon_rdp: float | None  # dp-accounting RDP at the budget's delta (shown next to a PLD decision)
    within_budget: bool | None
    ledger: str | None
    ok: bool = True


@dataclass
class RoundRow:
    """One trained round of the run: who contributed to what, and with which receipt state."""

    round: int
    updated_shards: list[str] = field(default_factory=list)
    # member -> {"shards": [...], "receipt": "ok" | "missing" | "invalid", "state": ...}
    members: dict[str, dict[str, Any]] = field(default_factory=dict)
    changed_in_store: list[str] | None = None
    recovered: bool = False


@dataclass
class AuditResult:
    """Everything one audit established, ready for a table, JSON or the HTML report."""

    run: str | None
    ledgers_dir: str
    run_dir: str
    consortium: str
    members: dict[str, MemberRow] = field(default_factory=dict)
    entries: list[EntryRow] = field(default_factory=list)
    rounds: list[RoundRow] = field(default_factory=list)
    findings: list[Finding] = field(default_factory=list)
    head_round: int | None = None
    objects_verified: int = 0
    # An audit of members' ledgers alone (no run directory): every run they ever released in,
    # checked for what signed ledgers establish by themselves, not the RUN_CHECKS.
    ledgers_only: bool = False

    @property
    def scope(self) -> str:
        """What was audited, as a title says it."""
        return "every run in the members' ledgers (ledgers only)" if self.ledgers_only else f"run {self.run}"

    def add(self, check: str, subject: str, message: str, severity: str = FAIL, member: str | None = None) -> None:
        if check not in CHECKS:
            raise ValueError(f"unknown check {check!r}")
        self.findings.append(Finding(check, subject, message, severity, member))

    @property
    def failures(self) -> list[Finding]:
        return [f for f in self.findings if f.severity == FAIL]

    @property
    def ok(self) -> bool:
        return not self.failures

    def check_status(self) -> dict[str, int]:
        """Failures per check made (0 = the check holds)."""
        counts = {name: 0 for name in CHECKS if not (self.ledgers_only and name in RUN_CHECKS)}
        for f in self.failures:
            counts[f.check] += 1
        return counts

    def to_json(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "run": self.run,
            "ledgers_only": self.ledgers_only,
            "inputs": {"ledgers": self.ledgers_dir, "rounds": self.run_dir, "consortium": self.consortium},
            "checks": {
                name: {"ok": count == 0, "failures": count, "what": CHECKS[name]}
                for name, count in self.check_status().items()
            },
            "members": {name: asdict(row) for name, row in sorted(self.members.items())},
            "entries": [asdict(e) for e in self.entries],
            "rounds": [asdict(r) for r in self.rounds],
            "store": {"head_round": self.head_round, "objects_verified": self.objects_verified},
            "findings": [asdict(f) for f in self.findings],
        }
