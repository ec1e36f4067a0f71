"""Reading what the auditor is given: members' ledgers and the coordinator's run directory.

Nothing here verifies anything; it only finds and parses, strictly, and reports what it
could not read (naming the file and line) instead of stopping, so the checks in
``privacy.audit.verify`` see every entry that exists and can report all damage at once.

Ledger layouts accepted under ``--ledgers DIR``:

* ``DIR/nodes/<member>/ledger.jsonl``: a run directory of a local federation;
* ``DIR/<member>/ledger.jsonl``: member state directories side by side (``nodes/``);
* ``DIR/<member>.jsonl``: ledgers collected into one folder, named by member;
* ``DIR/ledger.jsonl``: one member's state directory (its other files are not ledgers).

The member a ledger belongs to is the ``member`` of a ``member.json`` next to it when there
is one, else the directory (or file) name. That name only selects which consortium key the
ledger is checked against: a ledger filed under the wrong name fails that check.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from privacy.ledger import parse_strict_json

LEDGER_FILE = "ledger.jsonl"
RECORDS_FILE = "rounds.jsonl"
RUN_FILE = "run.json"
STORE_DIR = "store"


class InputError(Exception):
    """The inputs cannot be audited at all (a directory is missing, nothing to read)."""


@dataclass
class LedgerFile:
    """One member's ledger as it lies on disk.

    ``entries`` holds one item per line: the parsed JSON object, or, for a line that is not
    valid JSON, a string describing why (so entry indices stay equal to line numbers - 1 and
    the hash chain check sees the gap).
    """

    member: str
    path: Path
    entries: list[Any] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)


@dataclass
class RunFiles:
    """The coordinator's run directory: run id, round records, store location."""

    run_dir: Path
    run_id: str | None
    records: list[dict[str, Any]]
    problems: list[str]
    store_dir: Path


def strict_json(text: str) -> Any:
    """JSON without NaN/Infinity and without duplicate keys: either could hide an edit. The
    ledger's own parser: parsing is not where the auditor's independence matters."""
    return parse_strict_json(text)


def read_ledger(path: Path, member: str) -> LedgerFile:
    """Parse a ledger file line by line, keeping a placeholder for each line that does not parse."""
    ledger = LedgerFile(member=member, path=path)
    try:
        raw = path.read_bytes()
    except OSError as exc:
        ledger.problems.append(f"cannot read {path}: {exc.strerror or exc}")
        return ledger
    if not raw:
        return ledger
    lines = raw.split(b"\n")
    torn = lines[-1].strip() != b""
    # Blank lines at the end (an editor's, a mail client's) carry nothing and hide nothing;
    # a blank line between entries is still a line that does not parse.
    while lines and not lines[-1].strip():
        lines.pop()
    for number, line in enumerate(lines, start=1):
        try:
            entry = strict_json(line.decode("utf-8"))
        except (UnicodeDecodeError, ValueError) as exc:
            why = f"line {number} is not valid JSON ({exc})"
            if number == len(lines) and torn:
                why = f"line {number} is not valid JSON and has no final newline: a torn last write (interrupted?)"
            ledger.problems.append(why)
            ledger.entries.append(why)
            continue
        if number == len(lines) and torn:
            ledger.problems.append(f"line {number} has no final newline: torn last write?")
        if not isinstance(entry, dict):
            ledger.problems.append(f"line {number} is not a JSON object")
        ledger.entries.append(entry)
    return ledger


def _member_name(state_dir: Path) -> str:
    """``member`` from the directory's ``member.json`` if it has one, else the directory name."""
    published = state_dir / "member.json"
    if published.is_file():
        try:
            data = json.loads(published.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return state_dir.name
        if isinstance(data, dict) and isinstance(data.get("member"), str) and data["member"].strip():
            return data["member"].strip()
    return state_dir.name


def find_ledgers(root: str | Path) -> dict[str, LedgerFile]:
    """Every member ledger under ``root`` (see the module docstring for the layouts)."""
    root = Path(root)
    if not root.is_dir():
        what = "is a file, not a directory: pass the directory that holds it" if root.exists() else "does not exist"
        raise InputError(f"ledgers directory {root} {what}")
    if (root / "runs.jsonl").is_file() and (root / "consortium.yaml").is_file():
        raise InputError(
            f"{root} is an operator directory, not members' ledgers: give a directory holding <member>/{LEDGER_FILE} "
            "or <member>.jsonl (each member hands over a copy of its state directory's ledger)"
        )
    base = root / "nodes" if (root / "nodes").is_dir() else root
    found: dict[str, LedgerFile] = {}
    candidates = [(p.parent, _member_name(p.parent)) for p in sorted(base.glob(f"*/{LEDGER_FILE}"))]
    if (base / LEDGER_FILE).is_file():
        # One member's state directory: its other *.jsonl files (what it sent, its notes)
        # are its node's, not other members' ledgers (a walkthrough read 226 failures off them).
        candidates.append((base, _member_name(base)))
    else:
        candidates += [(p, p.stem) for p in sorted(base.glob("*.jsonl")) if p.name != RECORDS_FILE]
    for location, member in candidates:
        path = location / LEDGER_FILE if location.is_dir() else location
        if member in found:
            raise InputError(f"two ledgers for member {member!r}: {found[member].path} and {path}")
        found[member] = read_ledger(path, member)
    if not found:
        raise InputError(
            f"no ledgers under {root}: expected <member>/{LEDGER_FILE}, nodes/<member>/{LEDGER_FILE} or <member>.jsonl"
        )
    return found


def read_run(run_dir: str | Path) -> RunFiles:
    """The run id (``run.json``), the round records (``rounds.jsonl``) and where the store is."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise InputError(f"run directory {run_dir} does not exist")
    problems: list[str] = []
    run_id: str | None = None
    try:
        data = strict_json((run_dir / RUN_FILE).read_text(encoding="utf-8"))
        if isinstance(data, dict) and isinstance(data.get("run"), str) and data["run"]:
            run_id = data["run"]
        else:
            problems.append(f"{run_dir / RUN_FILE} does not name the run ('run': '<id>')")
    except OSError:
        problems.append(f"{run_dir / RUN_FILE} is missing: the run id that ledger entries name is unknown")
    except ValueError as exc:
        problems.append(f"{run_dir / RUN_FILE} is not valid JSON: {exc}")
    records: list[dict[str, Any]] = []
    path = run_dir / RECORDS_FILE
    try:
        text = path.read_text(encoding="utf-8")
    except OSError:
        problems.append(f"{path} is missing: there are no round records to check")
        text = ""
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = strict_json(line)
        except ValueError as exc:
            problems.append(f"{path} line {number} is not valid JSON: {exc}")
            continue
        if (
            not isinstance(record, dict)
            or not isinstance(record.get("round"), int)
            or isinstance(record["round"], bool)
        ):
            problems.append(f"{path} line {number} is not a round record (no integer 'round')")
            continue
        records.append(record)
    return RunFiles(run_dir, run_id, records, problems, run_dir / STORE_DIR)
