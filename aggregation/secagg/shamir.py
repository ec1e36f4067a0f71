"""t-out-of-n Shamir sharing of 32-byte secrets (mask private keys and self-mask seeds).

SecAgg+ needs the server to recover exactly one of two secrets per member (the mask key of a
member that dropped, the self-mask seed of one that survived) from any ``threshold`` of its
neighbours, and nothing from fewer. pycryptodome's ``Shamir`` works in GF(2**128) on 16-byte
secrets, so a 32-byte secret is split as two halves with independent polynomials evaluated at
the same share indices; a share is the two 16-byte evaluations concatenated.

Reconstruction is Lagrange interpolation at zero in the same field (x^128 + x^7 + x^2 + x + 1,
a 16-byte share read big endian, as pycryptodome encodes it), done here rather than with
``Shamir.combine``: that one multiplies 128-bit elements bit by bit through string masks and
inverts one denominator per share. The coordinator recovers one secret per member and round,
twice (the consistency check below), so at N=8 that was 110 ms of its 180 ms per round at 1M
parameters, and 240 of 310 ms at N=16 (bench/secagg.py). Here the Lagrange coefficients depend
only on the public share ids and are cached, and a secret share is multiplied by a coefficient
in a fixed 128-step loop driven by the coefficient's bits. Measured per recovered secret
(2-core box, median of 9): threshold 4 of 7 shares 11.5 ms -> 1.0 ms, 5 of 8 14.9 ms -> 1.3 ms.
The tests check it against ``Shamir.combine``.

Randomness: ``Shamir.split`` draws its polynomial coefficients with
``Crypto.Random.get_random_bytes``, which is ``os.urandom``, the OS CSPRNG (checked in the
source of the installed pycryptodome 3.24.1: ``Crypto/Random/__init__.py`` has
``get_random_bytes = urandom``, and ``SecretSharing.py`` imports it as its ``rng``).
"""

from __future__ import annotations

import functools
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


# GF(2**128) as pycryptodome defines it: bit i of an int is the coefficient of x**i.
_FIELD_BITS = 128
_IRREDUCIBLE = (1 << 128) | 0x87  # x^128 + x^7 + x^2 + x + 1


def _clmul(a: int, b: int) -> int:
    """Carry-less product of two polynomials over GF(2), unreduced (public operands only)."""
    z = 0
    while b:
        if b & 1:
            z ^= a
        a <<= 1
        b >>= 1
    return z


def _reduce(v: int) -> int:
    """``v`` modulo the field polynomial (public operands only: the loop count depends on ``v``)."""
    while v.bit_length() > _FIELD_BITS:
        v ^= _IRREDUCIBLE << (v.bit_length() - _FIELD_BITS - 1)
    return v


def _inverse(a: int) -> int:
    """Inverse of a nonzero public field element (extended Euclid over GF(2)[x])."""
    if a == 0:
        raise SecAggError("zero has no inverse")
    r0, r1, s0, s1 = a, _IRREDUCIBLE, 1, 0
    while r1:
        q, r, d = 0, r0, r1.bit_length()
        while r.bit_length() >= d:
            shift = r.bit_length() - d
            q ^= 1 << shift
            r ^= r1 << shift
        r0, r1, s0, s1 = r1, r, s1, s0 ^ _clmul(q, s1)
    return _reduce(s0)  # r0 == 1: the polynomial is irreducible


def _mul_secret(secret: int, coefficient: int) -> int:
    """``secret * coefficient`` in the field. The loop runs exactly 128 times, branches only on the
    public coefficient's bits, and reduces without branching on the secret."""
    z = 0
    for i in range(_FIELD_BITS):
        z ^= secret * ((coefficient >> i) & 1)
        secret <<= 1
        secret ^= _IRREDUCIBLE * (secret >> _FIELD_BITS)
    return z


@functools.lru_cache(maxsize=4096)
def _lagrange_at_zero(ids: tuple[int, ...]) -> tuple[int, ...]:
    """l_j(0) = prod_{m != j} x_m / (x_j + x_m) for the share ids ``ids`` (public, so cached)."""
    out = []
    for j, xj in enumerate(ids):
        num = den = 1
        for m, xm in enumerate(ids):
            if m != j:
                num = _reduce(_clmul(num, xm))
                den = _reduce(_clmul(den, xj ^ xm))
        out.append(_reduce(_clmul(num, _inverse(den))))
    return tuple(out)


def _interpolate(points: list[tuple[int, bytes]]) -> bytes:
    """The secret (both halves) through ``points``: the constant term of their polynomial."""
    coefficients = _lagrange_at_zero(tuple(i for i, _ in points))
    out = b""
    for offset in (0, _HALF):
        acc = 0
        for (_, share), coefficient in zip(points, coefficients, strict=True):
            acc ^= _mul_secret(int.from_bytes(share[offset : offset + _HALF], "big"), coefficient)
        out += acc.to_bytes(_HALF, "big")
    return out


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

    secret = _interpolate(points[:threshold])
    if len(points) > threshold and _interpolate(points[-threshold:]) != secret:
        raise SecAggError(
            f"shares {[i for i, _ in points]} do not lie on one degree-{threshold - 1} polynomial: "
            "at least one is corrupted or belongs to another secret"
        )
    return secret
