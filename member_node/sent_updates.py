"""Which training rounds' updates actually left the node, for the member's own status.

A ledger entry is written before the update leaves, so the ledger alone cannot say whether it
did: a node killed after its receipt, or a round whose secure aggregation ended before the
masked-input stage, spent and sent nothing (a walkthrough's status claimed "Δ" for such a
round). The node notes each update as it hands it to Flower: in the train reply (without
secure aggregation) or as its masked input.
"""

from __future__ import annotations

import json
from pathlib import Path

from member_node.private_eval import release_key

SENT_FILE = "sent_updates.jsonl"  # in the node's state directory, one line per update handed out
PLAIN, MASKED = "update", "masked update"


def note_sent(state_dir: Path, run: str, round_number: int, kind: str) -> None:
    """Append one line; a torn line from a crash is skipped by the reader (it is the member's
    own view, never evidence for anyone else: the receipts and round records are that)."""
    line = json.dumps({"run": run, "round": round_number, "sent": kind}, sort_keys=True)
    with open(Path(state_dir) / SENT_FILE, "a", encoding="utf-8") as out:
        out.write(line + "\n")


def start_noting(state_dir: Path) -> None:
    """Create the file, so its presence tells status that rounds missing from it sent nothing
    (a node from before this file existed leaves status saying what it said before)."""
    (Path(state_dir) / SENT_FILE).touch(exist_ok=True)


def sent_updates(state_dir: Path) -> dict[str, str] | None:
    """:func:`release_key` -> what left for that training round; None when the node never noted any."""
    path = Path(state_dir) / SENT_FILE
    if not path.is_file():
        return None
    sent: dict[str, str] = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            item = json.loads(line)
            sent[release_key(str(item["run"]), int(item["round"]))] = str(item["sent"])
        except (ValueError, KeyError, TypeError):
            continue
    return sent
