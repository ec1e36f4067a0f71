"""The SecAgg+ communication graph: who masks with whom and who holds whose shares.

Bell et al. (2020) replace the complete graph of the original protocol (Bonawitz et al. 2017)
by a sparse k-regular graph over a random ordering of the members, cutting each member's work
from O(n) to O(k) key agreements, shares and mask expansions while keeping the masks of the
honest members connected.
"""

from __future__ import annotations

import hashlib
import hmac
import math
from collections.abc import Sequence

from aggregation.secagg.errors import SecAggError

# A graph seed shorter than this is too easy to pick on purpose or to collide by accident.
MIN_SEED_BYTES = 16
_ORDER_DOMAIN = b"kyodo/secagg/graph-order/v1"


def _random_order(members: list[str], seed: bytes) -> list[str]:
    """A permutation of ``members`` determined by ``seed``: sort by a keyed hash of each name.

    HMAC-SHA256 under the seed acts as a pseudorandom function, so the order is a uniformly
    random permutation to anyone who did not know the seed, and every party holding the seed
    derives the same one (no numpy RNG whose output could differ across versions).
    """
    key = hmac.new(seed, _ORDER_DOMAIN, hashlib.sha256).digest()
    return sorted(members, key=lambda m: (hmac.new(key, m.encode("utf-8"), hashlib.sha256).digest(), m))


def neighbours(members: Sequence[str], degree: int, seed: bytes) -> dict[str, tuple[str, ...]]:
    """Each member's neighbours in a Harary-style ``degree``-regular ring graph.

    Members are placed on a ring in a seed-derived random order and linked to the ``degree/2``
    nearest on each side. This graph is ``degree``-connected: no set of fewer than ``degree``
    dropped or corrupted members can cut the survivors apart. The random placement is what
    makes it unlikely that any one member's neighbourhood is mostly corrupted (which would let
    the corrupted neighbours pool ``threshold`` shares of its secrets). With
    ``degree >= len(members) - 1`` every member neighbours every other (the original SecAgg).

    Returns ``{member: sorted neighbour names}`` for every member; symmetric, no self loops.
    """
    if isinstance(members, str) or not isinstance(members, Sequence):
        raise SecAggError(f"members must be a sequence of names, got {type(members).__name__}")
    names = list(members)
    for m in names:
        if not isinstance(m, str) or not m:
            raise SecAggError(f"member names must be non-empty str, got {m!r}")
    if len(set(names)) != len(names):
        dupes = sorted({m for m in names if names.count(m) > 1})
        raise SecAggError(f"member names must be distinct, got duplicates {dupes}")
    if not names:
        raise SecAggError("the graph needs at least one member")
    if not isinstance(seed, bytes | bytearray) or len(seed) < MIN_SEED_BYTES:
        shown = f"{len(seed)} bytes" if isinstance(seed, bytes | bytearray) else type(seed).__name__
        raise SecAggError(f"graph seed must be at least {MIN_SEED_BYTES} random bytes, got {shown}")
    n = len(names)
    if isinstance(degree, bool) or not isinstance(degree, int) or degree < 0:
        raise SecAggError(f"degree must be a non-negative integer, got {degree!r}")
    if n > 1 and degree < 1:
        raise SecAggError(f"degree must be >= 1 for {n} members: with no neighbours nothing masks an update")
    if degree >= n - 1:
        return {m: tuple(sorted(x for x in names if x != m)) for m in names}
    if degree % 2:
        raise SecAggError(
            f"degree {degree} is odd and below {n - 1} (complete graph for {n} members): "
            "a ring graph links degree/2 members on each side, so the degree must be even"
        )

    ring = _random_order(sorted(names), bytes(seed))
    half = degree // 2
    linked: dict[str, set[str]] = {m: set() for m in ring}
    for i, m in enumerate(ring):
        for step in range(1, half + 1):
            other = ring[(i + step) % n]
            linked[m].add(other)
            linked[other].add(m)
    return {m: tuple(sorted(linked[m])) for m in names}


def default_degree(n: int) -> int:
    """Degree for a cohort of ``n``: complete up to 8 members, else ``2 * ceil(log2 n)``, at most n-1.

    Bell et al. show that a degree logarithmic in ``n`` suffices for both privacy and dropout
    tolerance once the ordering is random; ``2 * ceil(log2 n)`` is even (as the ring needs) and
    equals ``n - 1`` at ``n = 9``, so the sparse graph takes over smoothly. Small cohorts keep the
    complete graph: its extra cost there is a handful of key agreements, and it tolerates the
    most dropouts and corrupted neighbours (every member is backed by all others).
    """
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise SecAggError(f"cohort size must be an integer >= 1, got {n!r}")
    if n <= 8:
        return n - 1
    k = 2 * math.ceil(math.log2(n))
    return min(k + (k % 2), n - 1)


def default_threshold(degree: int) -> int:
    """Shares needed to recover a secret: a strict majority of the ``degree`` neighbours, at least 1.

    Honest neighbours reveal, per member, either its self-mask seed share or its mask-key share,
    never both; with ``threshold > degree / 2`` the two groups of revealers would together need
    more than ``degree`` members, so a server cannot collect both secrets (and so the member's
    unmasked update) from honest neighbours. Up to ``degree - threshold`` neighbours may drop
    out before the member's secrets become unrecoverable.
    """
    if isinstance(degree, bool) or not isinstance(degree, int) or degree < 0:
        raise SecAggError(f"degree must be a non-negative integer, got {degree!r}")
    return max(1, degree // 2 + 1)
