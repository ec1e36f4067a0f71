"""t-out-of-n Shamir sharing of 32-byte secrets (mask private keys and self-mask seeds).

SecAgg+ needs the server to recover exactly one of two secrets per member (the mask key of a
member that dropped, the self-mask seed of one that survived) from any ``threshold`` of its
neighbours, and nothing from fewer. pycryptodome's ``Shamir`` works in GF(2**128) on 16-byte
secrets, so a 32-byte secret is split as two halves with independent polynomials evaluated at
the same share indices; a share is the two 16-byte evaluations concatenated.

Randomness: ``Shamir.split`` draws its polynomial coefficients with
``Crypto.Random.get_random_bytes``, which is ``os.urandom``, the OS CSPRNG (checked in the
source of the installed pycryptodome 3.24.1: ``Crypto/Random/__init__.py`` has
``get_random_bytes = urandom``, and ``SecretSharing.py`` imports it as its ``rng``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from Crypto.Protocol.SecretSharing import Shamir

from aggregation.secagg.errors import SecAggError

SECRET_BYTES = 32
SHARE_BYTES = 32
_HALF = 16
# The share index is a nonzero field element; 1..255 keeps indices one byte wide on the wire
# and is far above any neighbourhood size the SecAgg+ graph produces.
MAX_SHARE_ID = 255


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_threshold(threshold: object, available: int) -> int:
    if not _is_int(threshold) or not 1 <= threshold <= available:
        raise SecAggError(f"threshold must be an integer in 1..{available}, got {threshold!r}")
    return threshold  # type: ignore[return-value]


def _check_id(share_id: object) -> int:
    if not _is_int(share_id) or not 1 <= share_id <= MAX_SHARE_ID:
        raise SecAggError(f"share ids must be integers in 1..{MAX_SHARE_ID}, got {share_id!r}")
    return share_id  # type: ignore[return-value]


def split_secret(secret: bytes, threshold: int, share_ids: Sequence[int]) -> dict[int, bytes]:
    """Share ``secret`` so that any ``threshold`` of the shares named by ``share_ids`` recover it.

    Ids are caller-chosen (e.g. a member's position in the round's sorted member list), so
    every holder can be told which evaluation point its share belongs to without extra state.
    """
    if not isinstance(secret, bytes | bytearray) or len(secret) != SECRET_BYTES:
        shown = len(secret) if isinstance(secret, bytes | bytearray) else type(secret).__name__
        raise SecAggError(f"secret must be {SECRET_BYTES} bytes, got {shown}")
    ids = [_check_id(i) for i in share_ids]
    if len(set(ids)) != len(ids):
        raise SecAggError(f"share ids must be distinct, got {sorted(ids)}")
    _check_threshold(threshold, len(ids))
    # pycryptodome numbers its shares 1..n, so evaluate at 1..max(id) and keep the requested
    # points: at most 255 evaluations, a few milliseconds per half.
    top = max(ids)
    # Coefficients come from os.urandom inside Shamir.split (see the module docstring).
    halves = [dict(Shamir.split(threshold, top, bytes(secret[o : o + _HALF]))) for o in (0, _HALF)]
    return {i: halves[0][i] + halves[1][i] for i in ids}


def _combine_half(points: list[tuple[int, bytes]], offset: int) -> bytes:
    return Shamir.combine([(i, share[offset : offset + _HALF]) for i, share in points])


def combine_shares(shares: Mapping[int, bytes], threshold: int) -> bytes:
    """Recover the secret from at least ``threshold`` shares (``{share id: share}``).

    With more than ``threshold`` shares, the secret is interpolated twice, from the lowest and
    from the highest ``threshold`` ids: shares that do not lie on one polynomial (a corrupted
    or forged share) then almost surely disagree, and that is reported instead of returning a
    wrong key that would silently corrupt the aggregate. Fewer than ``threshold`` shares carry
    no information about the secret, so that is an error, not a guess.
    """
    if not isinstance(shares, Mapping):
        raise SecAggError(f"shares must be a mapping of share id to share, got {type(shares).__name__}")
    if not _is_int(threshold) or threshold < 1:
        raise SecAggError(f"threshold must be an integer >= 1, got {threshold!r}")
    if len(shares) < threshold:
        raise SecAggError(f"need at least {threshold} shares to reconstruct the secret, got {len(shares)}")
    points: list[tuple[int, bytes]] = []
    for share_id, share in shares.items():
        _check_id(share_id)
        if not isinstance(share, bytes | bytearray) or len(share) != SHARE_BYTES:
            shown = len(share) if isinstance(share, bytes | bytearray) else type(share).__name__
            raise SecAggError(f"share {share_id} must be {SHARE_BYTES} bytes, got {shown}")
        points.append((share_id, bytes(share)))
    points.sort()

    low = points[:threshold]
    secret = _combine_half(low, 0) + _combine_half(low, _HALF)
    if len(points) > threshold:
        high = points[-threshold:]
        if _combine_half(high, 0) + _combine_half(high, _HALF) != secret:
            raise SecAggError(
                f"shares {[i for i, _ in points]} do not lie on one degree-{threshold - 1} polynomial: "
                "at least one is corrupted or belongs to another secret"
            )
    return secret
