"""Hold a reply until a fixed time after its request reached the node.

Why: a DP node's work grows with its private data (a DP step's Poisson sample is q x its
episodes; an evaluation runs over every held-out episode), so the moment its reply reaches
the coordinator tells the coordinator roughly how many episodes it holds, outside any DP
release. A member that cares sets a time its rounds always fit in (node config
``train-reply-after`` / ``eval-reply-after``, seconds); the reply then leaves at that
time whatever the data, and the coordinator learns nothing from it. When the work takes
longer, the reply leaves as soon as it is ready and the node warns: that round's duration
was visible. The ledger entries (receipts) of the node's releases are stamped with the
moment the request arrived, so they carry no duration either. Off (0) by default: waiting costs the whole consortium's
round time, and the coordinator's round timeout must exceed the padding.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

log = logging.getLogger("kyodo.member")


@dataclass(frozen=True)
class ReplyDelay:
    """Replies of one kind leave no earlier than ``seconds`` after their request arrived."""

    seconds: float
    what: str
    clock: Callable[[], float] = field(default=time.monotonic, repr=False)
    sleep: Callable[[float], None] = field(default=time.sleep, repr=False)

    def __post_init__(self) -> None:
        if not (math.isfinite(self.seconds) and self.seconds >= 0):
            raise ValueError(f"{self.what}-reply-after must be a finite number of seconds >= 0, got {self.seconds!r}")

    @contextmanager
    def held(self) -> Iterator[None]:
        """Run the request's work inside, then wait out the rest of ``seconds``, on an error
        too: an error reply's text is fixed, but when it leaves would say how far the work on
        the data got."""
        started = self.clock()
        try:
            yield
        finally:
            self._wait(started)

    def _wait(self, started: float) -> None:
        if self.seconds <= 0:
            return
        elapsed = self.clock() - started
        if elapsed > self.seconds:
            log.warning(
                "%s reply took %.1f s, more than %s-reply-after %.1f s: the coordinator saw how long it "
                "took (which grows with this node's episodes); raise %s-reply-after",
                self.what,
                elapsed,
                self.what,
                self.seconds,
                self.what,
            )
            return
        self.sleep(self.seconds - elapsed)
