"""Fixed-point encoding of float updates for masking, and arithmetic modulo 2**modulus_bits.

Masks only cancel in a finite ring, so every member must map its floats onto the same
integer grid. The plan fixes that grid for the whole cohort and picks a modulus wide enough
that the sum of ``cohort_size`` members can never wrap: a wrapped sum would silently decode
to garbage, whereas a too-wide modulus costs only bandwidth.
"""

from __future__ import annotations

import math
import secrets
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from aggregation.secagg.errors import SecAggError

# Up to this many bits the level mapping runs in float32: its 24-bit mantissa then keeps the
# mapping within 2**(bits - 24) <= 1/256 of a level, far below the rounding noise itself, and
# halves the memory traffic. Wider grids use float64 (error within 2**(bits - 53) of a level).
_FLOAT32_MAX_BITS = 16
# Beyond float64's 53-bit mantissa the extra grid bits carry nothing (the mapping stays at
# float64 resolution, 2**-53 of the range), but they are harmless: the limit is 62 bits, as in
# ``shared_model.config`` (a uint64 ring then still holds the sum of up to 4 members).
_MAX_BITS = 62
_FLOAT64_EXACT_BITS = 53
_PLAN_KEYS = frozenset({"clip_range", "bits", "cohort_size", "modulus_bits"})


def _is_int(value: object) -> bool:
    """True for real integers; bool is an int subclass but a flag here, never a count."""
    return isinstance(value, int | np.integer) and not isinstance(value, bool | np.bool_)


@dataclass(frozen=True)
class QuantizationPlan:
    """The integer grid and ring every member of one round's cohort encodes its update on.

    Validated on construction so that a plan that could wrap the cohort sum cannot exist,
    whichever way it was built (``plan_quantization``, ``from_dict`` or directly).
    """

    clip_range: float
    bits: int
    cohort_size: int
    modulus_bits: int

    def __post_init__(self) -> None:
        _check_inputs(self.cohort_size, self.bits, self.clip_range)
        if not _is_int(self.modulus_bits) or self.modulus_bits not in (32, 64):
            raise SecAggError(f"modulus_bits must be 32 or 64, got {self.modulus_bits!r}")
        worst_sum = self.cohort_size * self.levels
        if worst_sum >= 1 << self.modulus_bits:
            raise SecAggError(
                f"a cohort of {self.cohort_size} members at {self.bits} bits sums to up to {worst_sum}, "
                f"which wraps around the 2**{self.modulus_bits} modulus"
            )

    @property
    def dtype(self) -> type[np.unsignedinteger]:
        """The unsigned type whose native wrap-around is exactly arithmetic mod 2**modulus_bits."""
        return np.uint32 if self.modulus_bits == 32 else np.uint64

    @property
    def levels(self) -> int:
        """The top grid value: ``-clip_range`` encodes as 0 and ``+clip_range`` as ``levels``."""
        return (1 << self.bits) - 1

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able form, so the coordinator can ship the plan in a round's config."""
        return {
            "clip_range": float(self.clip_range),
            "bits": int(self.bits),
            "cohort_size": int(self.cohort_size),
            "modulus_bits": int(self.modulus_bits),
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> QuantizationPlan:
        """Parse a plan received from the network: it is untrusted, so check every field."""
        if not isinstance(d, Mapping):
            raise SecAggError(f"quantization plan must be a mapping, got {type(d).__name__}")
        keys = set(d)
        if keys != _PLAN_KEYS:
            missing = sorted(_PLAN_KEYS - keys)
            extra = sorted(str(k) for k in keys - _PLAN_KEYS)
            raise SecAggError(f"quantization plan has missing keys {missing} and unknown keys {extra}")
        for name in ("bits", "cohort_size", "modulus_bits"):
            if not _is_int(d[name]):
                raise SecAggError(f"quantization plan field {name!r} must be an integer, got {d[name]!r}")
        clip = d["clip_range"]
        if isinstance(clip, bool) or not isinstance(clip, int | float | np.integer | np.floating):
            raise SecAggError(f"quantization plan field 'clip_range' must be a number, got {clip!r}")
        return cls(
            clip_range=float(clip),
            bits=int(d["bits"]),
            cohort_size=int(d["cohort_size"]),
            modulus_bits=int(d["modulus_bits"]),
        )


def _check_inputs(cohort_size: object, bits: object, clip_range: object) -> None:
    """Shared validation of the three free parameters of a plan."""
    if not _is_int(cohort_size) or cohort_size < 1:
        raise SecAggError(f"cohort size must be an integer >= 1, got {cohort_size!r}")
    if not _is_int(bits) or not 1 <= bits <= _MAX_BITS:
        raise SecAggError(f"quantization bits must be an integer in 1..{_MAX_BITS}, got {bits!r}")
    if (
        isinstance(clip_range, bool)
        or not isinstance(clip_range, int | float | np.integer | np.floating)
        or not math.isfinite(clip_range)
        or clip_range <= 0
    ):
        raise SecAggError(f"clip range must be a finite number > 0, got {clip_range!r}")


def plan_quantization(cohort_size: int, bits: int, clip_range: float) -> QuantizationPlan:
    """Pick the narrowest modulus (32 or 64 bits) in which the cohort's sum cannot wrap.

    uint32 halves the bytes of every masked update, so it is used whenever
    ``cohort_size * (2**bits - 1) < 2**32``.
    """
    _check_inputs(cohort_size, bits, clip_range)
    worst_sum = cohort_size * ((1 << bits) - 1)
    if worst_sum >= 1 << 64:
        raise SecAggError(
            f"a cohort of {cohort_size} members at {bits} bits sums to up to {worst_sum} >= 2**64: "
            "no supported modulus can hold it; use fewer bits or a smaller cohort"
        )
    modulus_bits = 32 if worst_sum < 1 << 32 else 64
    return QuantizationPlan(
        clip_range=float(clip_range), bits=int(bits), cohort_size=int(cohort_size), modulus_bits=modulus_bits
    )


def secure_rng() -> np.random.Generator:
    """A generator for stochastic-rounding noise, seeded from the OS CSPRNG.

    The rounding noise protects no secret (the masks do), but a fixed or guessable seed would
    make members' rounding errors correlated or reproducible, so each call draws 128 fresh bits.
    """
    return np.random.Generator(np.random.PCG64(secrets.randbits(128)))


def quantize(x: np.ndarray, plan: QuantizationPlan, rng: np.random.Generator) -> tuple[np.ndarray, int]:
    """Clip ``x`` to ``[-R, R]`` and round it stochastically onto the plan's grid.

    Stochastic rounding keeps the encoding unbiased (E[q] equals the exact grid position), so
    the rounding error averages out over members and rounds instead of accumulating as a
    systematic drift. Returns the grid values in ``plan.dtype`` (same shape as ``x``) and the
    number of entries that had to be clipped, which the caller should report: clipping does
    bias the result.
    """
    if not isinstance(plan, QuantizationPlan):
        raise SecAggError(f"plan must be a QuantizationPlan, got {type(plan).__name__}")
    values = np.asarray(x)
    if values.dtype.kind not in "fiu":
        raise SecAggError(f"can only quantize real numbers, got an array of dtype {values.dtype}")
    if values.size == 0:
        return np.zeros(values.shape, plan.dtype), 0

    # min/max are two fast reductions that both detect NaN/inf (which clipping would hide or
    # propagate into a garbage integer) and tell whether any clipping is needed at all.
    lo, hi = values.min(), values.max()
    if not (np.isfinite(lo) and np.isfinite(hi)):
        # No count of them: a member's node passes this text on to the coordinator, and how
        # many entries of its update overflowed is about its data.
        raise SecAggError("cannot quantize non-finite values (NaN or infinite entries)")

    work = np.float32 if plan.bits <= _FLOAT32_MAX_BITS else np.float64
    r = float(plan.clip_range)
    buf = np.empty(values.shape, work)
    if lo < -r or hi > r:
        clipped = int(np.count_nonzero(values < -r)) + int(np.count_nonzero(values > r))
        np.clip(values, -r, r, out=buf, casting="same_kind")
    else:
        clipped = 0
        buf[...] = values

    levels = plan.levels
    # Grid position y = x * L / (2R) + L / 2 lies in [0, L]; floor(y + u) with u ~ U[0, 1)
    # equals ceil(y) with probability frac(y), hence E = y. L is odd, so L / 2 = h + 1/2 with
    # h = (L - 1) / 2 an integer: the float part computes floor(x * L / (2R) + 1/2 + u) and h is
    # added after the floor, where it is exact. Rounding then happens at the precision of
    # x * L / (2R) itself, which is fine for the small entries updates mostly consist of,
    # instead of at the precision of numbers near L / 2 (2**-8 of a level at 16 bits in float32).
    # When widths match, the noise is drawn straight into the output's memory (overwritten by
    # the final cast): fresh pages cost about as much as the arithmetic at this size.
    out = np.empty(values.shape, plan.dtype)
    same_width = out.dtype.itemsize == np.dtype(work).itemsize
    noise = out.view(work) if same_width else np.empty(values.shape, work)
    rng.random(out=noise, dtype=work)
    noise += work(0.5)
    buf *= work(levels / (2 * r))
    buf += noise
    del noise
    np.floor(buf, out=buf)
    buf += work((levels - 1) // 2)
    # Float rounding of the scale can push an entry one level past either end; clamp so every
    # member stays within the range the plan's no-wrap guarantee assumes.
    np.clip(buf, work(0), work(levels), out=buf)
    np.copyto(out, buf, casting="unsafe")
    if plan.bits > _FLOAT64_EXACT_BITS:
        # float64(L) rounds up to 2**bits there, one above the top level: clamp in integers.
        np.minimum(out, plan.dtype(levels), out=out)
    return out, clipped


def dequantize_sum(total: np.ndarray, contributors: int, plan: QuantizationPlan) -> np.ndarray:
    """Turn the unmasked sum of ``contributors`` members' grid values back into a float sum.

    Each member's value decodes as ``q * 2R / L - R``, so the sum decodes as
    ``total * 2R / L - contributors * R``. A grid sum above ``contributors * L`` cannot come
    from honest members and means the masks did not cancel (a wrong member set, a wrong share
    or tampering), so it is rejected rather than decoded into a plausible-looking update.
    """
    if not isinstance(plan, QuantizationPlan):
        raise SecAggError(f"plan must be a QuantizationPlan, got {type(plan).__name__}")
    total = np.asarray(total)
    if total.dtype != plan.dtype:
        raise SecAggError(f"aggregate must have the plan's dtype {np.dtype(plan.dtype)}, got {total.dtype}")
    if not _is_int(contributors) or not 1 <= contributors <= plan.cohort_size:
        raise SecAggError(
            f"contributors must be an integer in 1..{plan.cohort_size} (the plan's cohort size), got {contributors!r}"
        )
    ceiling = contributors * plan.levels
    if total.size and int(total.max()) > ceiling:
        raise SecAggError(
            f"aggregate holds {int(total.max())}, above the largest possible sum {ceiling} of {contributors} "
            "members: the masks did not cancel"
        )
    r = float(plan.clip_range)
    # One pass converts and scales (no separate float64 copy of the sum to scale afterwards).
    out = np.multiply(total, 2 * r / plan.levels, dtype=np.float64)
    out -= contributors * r
    return out


def _check_ring_operands(acc: np.ndarray, x: np.ndarray) -> None:
    """Both operands must share one unsigned dtype: mixing would promote and lose the wrap-around."""
    if not isinstance(acc, np.ndarray) or not isinstance(x, np.ndarray):
        raise SecAggError("ring arithmetic needs numpy arrays")
    if acc.dtype not in (np.uint32, np.uint64):
        raise SecAggError(f"ring arithmetic needs uint32 or uint64 arrays, got {acc.dtype}")
    if x.dtype != acc.dtype:
        raise SecAggError(f"ring operands must share one dtype, got {acc.dtype} and {x.dtype}")
    if x.shape != acc.shape:
        raise SecAggError(f"ring operands must share one shape, got {acc.shape} and {x.shape}")
    if not acc.flags.writeable:
        raise SecAggError("ring accumulator is read-only")


def add_into(acc: np.ndarray, x: np.ndarray) -> np.ndarray:
    """``acc += x`` mod 2**bits, in place (numpy's unsigned wrap-around is the modular reduction)."""
    _check_ring_operands(acc, x)
    np.add(acc, x, out=acc)
    return acc


def sub_into(acc: np.ndarray, x: np.ndarray) -> np.ndarray:
    """``acc -= x`` mod 2**bits, in place: how masks are removed."""
    _check_ring_operands(acc, x)
    np.subtract(acc, x, out=acc)
    return acc
