"""Which rounds went on without this node, for the member's own log.

The coordinator queries every node connected when a round begins; one that was stopped,
restarting or unreachable then is not asked, and nothing reaches it to say so. A member that
restarts its node quickly can miss a round this way (Flower keeps the old session for two
heartbeats, so the new node joins after the round's query went out), and a walkthrough's
member never learned it had. The node notes the newest round of each run it was queried for
and names the gap when the next query skips rounds.
"""

from __future__ import annotations

import json
from pathlib import Path

from shared_model.durable import replace_json

QUERIED_FILE = "queried_rounds.json"  # in the node's state directory: {run: newest round queried}
KEPT_RUNS = 64  # a run's entry matters only while it goes on; older ones are dropped


def note_queried(state_dir: Path, run: str, round_number: int) -> range:
    """Note that ``run`` queried this node for ``round_number``; the rounds it skipped since the
    node's previous query in that run, often none (and none for a run it had not seen: a member
    that starts its node late knows it, and a lost note must not invent a gap)."""
    path = Path(state_dir) / QUERIED_FILE
    try:
        seen = json.loads(path.read_text(encoding="utf-8"))
        seen = seen if isinstance(seen, dict) else {}
    except (OSError, ValueError):
        seen = {}  # none yet, or torn by a crash: the member loses one gap's note at most
    previous = seen.get(run)
    if not isinstance(previous, int):  # a run first seen now: it may have begun before this node did, knowingly
        previous = round_number - 1
    missed = range(previous + 1, round_number)
    if round_number > previous:
        seen.pop(run, None)  # re-inserted last: the newest runs are the ones kept
        seen[run] = round_number
        replace_json(path, dict(list(seen.items())[-KEPT_RUNS:]))
    return missed


def rounds_text(rounds: range) -> str:
    """ "round 3" or "rounds 3-5"."""
    return f"round {rounds.start}" if len(rounds) == 1 else f"rounds {rounds.start}-{rounds.stop - 1}"
