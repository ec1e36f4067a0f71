"""Short lists of names in log lines and reasons, shared by the coordinator and the member node."""

from __future__ import annotations

from collections.abc import Sequence


def shortened(names: Sequence[str], shown: int = 5) -> str:
    """The first ``shown`` names and how many more: a consortium of thousands must not put
    thousands of names in one log line or one round record's reason."""
    more = len(names) - shown
    return ", ".join(names[:shown]) + (f" and {more} more" if more > 0 else "")
