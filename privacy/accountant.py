"""Privacy accounting for the DP-SGD steps a member node has run, over its whole life.

A node's guarantee is about *every* step it ever ran on its episodes, across rounds, runs and
restarts. The history therefore lives in the node's signed ledger (``privacy.ledger``) and
this module only turns such a history into an epsilon. The analysis itself is Opacus':
``opacus.accountants.analysis.rdp`` for Renyi DP (the default) and
``opacus.accountants.analysis.prv`` for the tighter numerical PRV composition. Nothing here
re-derives privacy math; it groups, caches and searches.

Speed matters because the budget check runs before every round and binary-searches the
number of steps: RDP vectors are computed once per distinct (noise multiplier, sample rate)
and cached for the life of the process, so re-evaluating a long history costs microseconds
per distinct mechanism.
"""

from __future__ import annotations

import math
import numbers
import warnings
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, replace
from functools import lru_cache

import numpy as np

# Opacus is imported where an epsilon is first computed, not here. Importing any part of it
# runs ``opacus/__init__`` (the privacy engine, torch.distributed.tensor, scipy.stats): 2.0 s
# of the 3.7 s a member's ClientApp took to import, measured. Flower's default SuperNode starts
# a ClientApp process per message, and the secure-aggregation stages (four messages a round)
# never compute an epsilon; ``bench/clientapp_start.py`` measures what this saves them.

ACCOUNTANTS = ("rdp", "prv")

# RDP orders: Google's dp-accounting default set (so node and auditor optimise over the same
# orders) minus the fractional orders below 1.6. Those only ever win when epsilon is far
# beyond any sane budget (> ~45), their series converge slowly (they cost two thirds of the
# computation) and dp-accounting drops them when they fail to converge. Leaving out orders
# can only raise epsilon, so the bound stays valid and conservative.
RDP_ORDERS: tuple[float, ...] = tuple(
    [1 + x / 10.0 for x in range(6, 100)] + [float(a) for a in range(11, 64)] + [128.0, 256.0, 512.0, 1024.0]
)

# PRV tolerances: Opacus' defaults. The returned value is the upper end of the PRV estimate,
# at most ``PRV_EPS_ERROR`` above the exact epsilon of the discretised composition.
PRV_EPS_ERROR = 0.01
PRV_DELTA_ERROR_FRACTION = 1e-3
# Most distinct (noise multiplier, sample rate) pairs one PRV composition takes. Its cost grows
# faster than linearly with them (1 pair: 0.4 s, 2: 1.1 s, 4: 4.6 s, 8: 13.7 s, 50: 142 s
# for 5000 steps here), and a node plans one noise multiplier per run, so a node with PRV
# that has run for a year would spend minutes per request. Beyond this many, the closest
# noise multipliers are composed at the smallest of them (``_fewer_mechanisms``), and the
# RDP bound is taken where it is the tighter of the two.
PRV_MAX_MECHANISMS = 6
# Largest discretisation grid the PRV accountant may build. Grids this large only arise when
# epsilon is far beyond any budget (dozens); there the RDP bound (valid, looser) is returned.
PRV_MAX_DOMAIN_POINTS = 4_000_000

_NOISE_SEARCH_MIN = 1e-2
_NOISE_SEARCH_MAX = 1e3


class PrvFallbackWarning(RuntimeWarning):
    """The PRV composition was infeasible numerically; the (valid, looser) RDP bound was used."""


@dataclass(frozen=True)
class Mechanism:
    """One round of Poisson-subsampled Gaussian DP-SGD: ``steps`` steps at rate ``sample_rate``.

    The noise multiplier is the noise standard deviation divided by the clipping norm; the
    clipping norm itself does not enter the privacy analysis, so it is not part of this.
    """

    noise_multiplier: float
    sample_rate: float
    steps: int

    def __post_init__(self) -> None:
        nm = _real(self.noise_multiplier, "noise_multiplier")
        q = _real(self.sample_rate, "sample_rate")
        if not (math.isfinite(nm) and nm > 0):
            raise ValueError(f"noise_multiplier must be a finite number > 0, got {self.noise_multiplier!r}")
        if not (math.isfinite(q) and 0 < q <= 1):
            raise ValueError(f"sample_rate must satisfy 0 < sample_rate <= 1, got {self.sample_rate!r}")
        if isinstance(self.steps, bool) or not isinstance(self.steps, numbers.Integral) or self.steps < 0:
            raise ValueError(f"steps must be an integer >= 0, got {self.steps!r}")
        # Normalise types so equal mechanisms hash and group equally (1 vs 1.0, numpy scalars).
        object.__setattr__(self, "noise_multiplier", nm)
        object.__setattr__(self, "sample_rate", q)
        object.__setattr__(self, "steps", int(self.steps))


def _real(value: object, name: str) -> float:
    """Float value of a real number, refusing bools and non-numbers with a named error."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"{name} must be a real number, got {value!r}")
    return float(value)


def check_delta(delta: float) -> float:
    """Validate delta (0 < delta < 1); shared by the budget and the ledger."""
    d = _real(delta, "delta")
    if not (0 < d < 1):
        raise ValueError(f"delta must satisfy 0 < delta < 1, got {delta!r}")
    return d


def check_accountant(accountant: str) -> str:
    """Validate an accountant name so a typo fails loudly instead of silently using the default."""
    if accountant not in ACCOUNTANTS:
        raise ValueError(f"unknown accountant {accountant!r}; expected one of {', '.join(ACCOUNTANTS)}")
    return accountant


def group(history: Iterable[Mechanism]) -> dict[tuple[float, float], int]:
    """Total steps per distinct (noise multiplier, sample rate).

    Composition is commutative, so the order of rounds does not matter and identical
    mechanisms can be composed once with their summed step count.
    """
    totals: dict[tuple[float, float], int] = {}
    for m in history:
        if not isinstance(m, Mechanism):
            raise TypeError(f"history must contain Mechanism objects, got {type(m).__name__}")
        if m.steps:
            key = (m.noise_multiplier, m.sample_rate)
            totals[key] = totals.get(key, 0) + m.steps
    return totals


@lru_cache(maxsize=4096)
def _rdp_per_step(noise_multiplier: float, sample_rate: float) -> np.ndarray:
    """RDP of one step at every order in ``RDP_ORDERS`` (Opacus' analysis), cached.

    RDP composes additively, so ``steps * this`` is the RDP of ``steps`` steps.
    """
    from opacus.accountants.analysis import rdp as rdp_analysis

    vec = np.asarray(
        rdp_analysis.compute_rdp(q=sample_rate, noise_multiplier=noise_multiplier, steps=1, orders=list(RDP_ORDERS)),
        dtype=np.float64,
    )
    vec.setflags(write=False)
    return vec


def _rdp_epsilon(totals: dict[tuple[float, float], int], delta: float) -> float:
    """Epsilon from summed RDP curves, converted with Opacus' (Balle et al. 2020) conversion."""
    from opacus.accountants.analysis import rdp as rdp_analysis

    curve = np.zeros(len(RDP_ORDERS))
    for nm, q in sorted(totals):  # a fixed order: the same history gives the same bits
        curve = curve + totals[nm, q] * _rdp_per_step(nm, q)
    with warnings.catch_warnings():
        # "Optimal order is the smallest/largest alpha": the bound is still valid, only loose.
        warnings.filterwarnings("ignore", message="Optimal order is the")
        eps, _ = rdp_analysis.get_privacy_spent(orders=list(RDP_ORDERS), rdp=curve, delta=delta)
    return float(eps)


def _prv_epsilon(totals: dict[tuple[float, float], int], delta: float) -> float:
    """Upper bound on epsilon from Opacus' PRV composition (Gopi et al. 2021).

    Mirrors ``opacus.accountants.PRVAccountant`` with the same tolerances, but sizes the
    discretisation grid first so a hopeless history (epsilon in the dozens) cannot allocate
    gigabytes; there, and on the analysis' own numerical failures, the RDP bound is returned.
    """
    from opacus.accountants.analysis.prv import (
        Domain,
        PoissonSubsampledGaussianPRV,
        TruncatedPrivacyRandomVariable,
        compose_heterogeneous,
        compute_safe_domain_size,
        discretize,
    )

    joined = _fewer_mechanisms(totals, PRV_MAX_MECHANISMS)
    if joined != totals:
        # Both are valid upper bounds; the joined composition can be the looser one when the
        # noise multipliers are far apart (20 runs at 0.7-5.0: joined 54.8, RDP 41.7, exact 38.9).
        return min(_prv_epsilon(joined, delta), _rdp_epsilon(totals, delta))
    keys = sorted(totals)  # a fixed order: the same history gives the same bits
    counts = [totals[k] for k in keys]
    delta_error = delta * PRV_DELTA_ERROR_FRACTION
    with np.errstate(all="ignore"), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Optimal order is the")
        prvs = [PoissonSubsampledGaussianPRV(q, nm) for nm, q in keys]
        half_width = compute_safe_domain_size(
            prvs=prvs, max_self_compositions=counts, eps_error=PRV_EPS_ERROR, delta_error=delta_error
        )
        mesh = PRV_EPS_ERROR / math.sqrt(sum(counts) * math.log(12 / delta_error) / 2)
        if not math.isfinite(half_width) or 2 * half_width / mesh > PRV_MAX_DOMAIN_POINTS:
            return _prv_fallback(totals, delta, "the discretisation grid would be too large")
        domain = Domain.create_aligned(-half_width, half_width, mesh)
        try:
            dprvs = [discretize(TruncatedPrivacyRandomVariable(p, domain.t_min, domain.t_max), domain) for p in prvs]
            composed = compose_heterogeneous(dprvs=dprvs, num_self_compositions=counts)
            _, _, eps_upper = composed.compute_epsilon(delta, delta_error, PRV_EPS_ERROR)
        except (RuntimeError, ValueError) as exc:
            return _prv_fallback(totals, delta, str(exc))
    eps = float(eps_upper)
    if not math.isfinite(eps):
        return _prv_fallback(totals, delta, "non-finite result")
    return max(eps, 0.0)


def _fewer_mechanisms(totals: dict[tuple[float, float], int], limit: int) -> dict[tuple[float, float], int]:
    """At most ``limit`` distinct mechanisms (one per sample rate at least), never a smaller epsilon.

    Repeatedly joins the two mechanisms of the same sample rate whose noise multipliers are
    closest (in ratio) and composes their steps at the smaller of them. Valid because a
    Gaussian mechanism with more noise is a post-processing of one with less (add the
    difference as independent noise), so replacing a noise multiplier by a smaller one only
    makes the composed bound larger. Measured (delta 1e-5, q 0.08, 200 rounds of 25 steps in
    20 runs): noise multipliers 2.00-2.19, exact 15.80 in 18.4 s, joined to 6 15.94 in 4.9 s
    (RDP 16.91); 2.00-2.95 with an evaluation release per round, exact 13.57 in 12.9 s, joined
    14.13 in 4.3 s (RDP 14.54).
    """
    clusters = [[nm, nm, q, steps] for (nm, q), steps in sorted(totals.items(), key=lambda kv: (kv[0][1], kv[0][0]))]
    while len(clusters) > limit:
        spans = [
            (math.log(clusters[i + 1][1] / clusters[i][0]), i)
            for i in range(len(clusters) - 1)
            if clusters[i][2] == clusters[i + 1][2]
        ]
        if not spans:
            break
        _, i = min(spans)
        low, high = clusters[i], clusters[i + 1]
        clusters[i : i + 2] = [[low[0], high[1], low[2], low[3] + high[3]]]
    return {(lowest, q): steps for lowest, _, q, steps in clusters}


def _prv_fallback(totals: dict[tuple[float, float], int], delta: float, why: str) -> float:
    """Return the RDP bound when PRV cannot be computed, and say so (it is valid but looser)."""
    warnings.warn(f"PRV accountant fell back to RDP ({why})", PrvFallbackWarning, stacklevel=3)
    return _rdp_epsilon(totals, delta)


def epsilon(history: Sequence[Mechanism], delta: float, accountant: str = "rdp") -> float:
    """Epsilon, at ``delta``, of composing every mechanism in ``history`` (0.0 when nothing ran)."""
    delta = check_delta(delta)
    check_accountant(accountant)
    totals = group(history)
    if not totals:
        return 0.0
    if accountant == "rdp":
        return _rdp_epsilon(totals, delta)
    return _prv_epsilon(totals, delta)


def max_steps_within(
    history: Sequence[Mechanism],
    candidate: Mechanism,
    epsilon_budget: float,
    delta: float,
    accountant: str = "rdp",
) -> int:
    """Largest ``s`` in ``0..candidate.steps`` with ``epsilon(history + [candidate@s]) <= epsilon_budget``.

    Epsilon grows with steps, so a binary search finds it. The search only ever returns a
    step count it has evaluated and found within budget (or 0), so even a numerically
    non-monotone accountant cannot make it overshoot.
    """
    steps, _ = search_steps(history, candidate, epsilon_budget, delta, accountant, {})
    return steps


def search_steps(
    history: Sequence[Mechanism],
    candidate: Mechanism,
    epsilon_budget: float,
    delta: float,
    accountant: str,
    memo: dict[int, float],
) -> tuple[int, float]:
    """``max_steps_within`` that also returns the epsilon at the chosen steps.

    ``memo`` (steps -> epsilon) receives every evaluation, so a caller such as the budget
    check can reuse them (epsilon before the round, epsilon of the full plan) instead of
    paying again: PRV evaluations cost up to a second each. The full plan is tried first
    because it fits in the common case, which then costs one evaluation.
    """
    budget = _real(epsilon_budget, "epsilon_budget")
    if not budget > 0:
        raise ValueError(f"epsilon_budget must be > 0, got {epsilon_budget!r}")
    delta = check_delta(delta)
    check_accountant(accountant)
    if not isinstance(candidate, Mechanism):
        raise TypeError(f"candidate must be a Mechanism, got {type(candidate).__name__}")
    base = list(history)

    def eps_at(steps: int) -> float:
        if steps not in memo:
            memo[steps] = epsilon([*base, replace(candidate, steps=steps)], delta, accountant)
        return memo[steps]

    if eps_at(candidate.steps) <= budget:
        return candidate.steps, eps_at(candidate.steps)
    if eps_at(0) > budget:
        return 0, eps_at(0)
    lo, hi = 0, candidate.steps  # invariant: eps_at(lo) <= budget < eps_at(hi)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if eps_at(mid) <= budget:
            lo = mid
        else:
            hi = mid
    return lo, eps_at(lo)


class UnreachableTarget(ValueError):
    """No noise multiplier meets the target: the budget is spent, or too nearly. Apart from
    the ValueErrors of bad arguments, so a caller that declines on it does not decline (and
    word as 'budget exhausted') on a fault of its own."""


def noise_for_target(
    target_epsilon: float,
    delta: float,
    sample_rate: float,
    steps_per_round: int,
    rounds: int,
    accountant: str = "rdp",
    history: Sequence[Mechanism] = (),
) -> float:
    """Smallest noise multiplier whose ``rounds`` planned rounds, after ``history``, stay within target.

    For planning a run. The returned value always meets the target: it is the feasible end
    of a bracket on the noise multiplier narrowed to a relative width of 1e-4 (RDP) or 1e-3
    (PRV). Raises UnreachableTarget (a ValueError) when no noise multiplier up to 1000 meets the target, e.g.
    because the history alone has already spent it.
    """
    target = _real(target_epsilon, "target_epsilon")
    if not (math.isfinite(target) and target > 0):
        raise ValueError(f"target_epsilon must be a finite number > 0, got {target_epsilon!r}")
    delta = check_delta(delta)
    check_accountant(accountant)
    if isinstance(rounds, bool) or not isinstance(rounds, numbers.Integral) or rounds < 1:
        raise ValueError(f"rounds must be an integer >= 1, got {rounds!r}")
    Mechanism(1.0, sample_rate, steps_per_round)  # validates sample rate and steps with clear errors
    base = list(history)
    total_steps = int(steps_per_round) * int(rounds)
    if total_steps == 0:
        raise ValueError("steps_per_round must be >= 1 to plan a noise multiplier")
    memo: dict[float, float] = {}

    def eps_at(noise: float) -> float:
        if noise not in memo:
            memo[noise] = epsilon([*base, Mechanism(noise, sample_rate, total_steps)], delta, accountant)
        return memo[noise]

    already = epsilon(base, delta, accountant)
    if already >= target:
        raise UnreachableTarget(
            f"target epsilon {target:g} is unreachable: the existing history has already spent {already:.4g}"
        )
    bracket = _bracket(eps_at, target, _initial_guess(target, delta, sample_rate, total_steps, accountant, base))
    if bracket is None:
        raise UnreachableTarget(
            f"target epsilon {target:g} is unreachable at delta {delta:g}: even noise multiplier "
            f"{_NOISE_SEARCH_MAX:g} gives {eps_at(_NOISE_SEARCH_MAX):.4g} (history alone: {already:.4g})"
        )
    return _solve(eps_at, target, *bracket, rtol=1e-4 if accountant == "rdp" else 1e-3)


def _initial_guess(
    target: float, delta: float, sample_rate: float, total_steps: int, accountant: str, base: list[Mechanism]
) -> float:
    """Starting point for the noise search: 1.0 for RDP; the RDP answer for PRV.

    PRV evaluations are ~10x dearer than RDP ones and the PRV answer lies a few percent
    below the RDP one, so seeding PRV with RDP saves most of its evaluations.
    """
    if accountant == "rdp":
        return 1.0
    try:
        return noise_for_target(target, delta, sample_rate, total_steps, 1, "rdp", base)
    except ValueError:
        return 1.0


def _bracket(eps_at: Callable[[float], float], target: float, guess: float) -> tuple[float, float] | None:
    """Noise values lo <= hi with eps_at(lo) > target >= eps_at(hi), searching out from ``guess``.

    lo == hi means even the search floor meets the target; None means even the ceiling
    (1000) does not.
    """
    guess = min(max(guess, _NOISE_SEARCH_MIN), _NOISE_SEARCH_MAX)
    factor = 1.05 if guess != 1.0 else 2.0
    if eps_at(guess) <= target:
        hi = guess
        lo = max(hi / factor, _NOISE_SEARCH_MIN)
        while eps_at(lo) <= target:
            if lo <= _NOISE_SEARCH_MIN:
                return lo, lo
            hi, lo = lo, max(lo / factor, _NOISE_SEARCH_MIN)
            factor *= factor
        return lo, hi
    lo = guess
    hi = min(lo * factor, _NOISE_SEARCH_MAX)
    while eps_at(hi) > target:
        if hi >= _NOISE_SEARCH_MAX:
            return None
        lo, hi = hi, min(hi * factor, _NOISE_SEARCH_MAX)
        factor *= factor
    return lo, hi


def _solve(eps_at: Callable[[float], float], target: float, lo: float, hi: float, rtol: float) -> float:
    """Narrow [lo, hi] (lo over the target, hi within it) to hi / lo <= 1 + rtol; return hi.

    log(epsilon) is smooth and nearly linear in log(noise), so a secant step through the two
    latest points lands close to the root, and once steps are tiny one probe just across
    the estimate closes the bracket: typically 3-5 evaluations instead of bisection's ~15.
    Steps are kept inside the bracket, and a bisection step whenever two rounds did not
    halve it bounds the worst case. Only an evaluated, feasible noise value is returned.
    """
    if hi <= lo:
        return hi
    tol = math.log1p(rtol)

    def g(noise: float) -> float:
        return math.log(max(eps_at(noise), 1e-300)) - math.log(target)

    a, b, best = math.log(lo), math.log(hi), hi
    ga, gb = g(lo), g(hi)
    points = [(a, ga), (b, gb)]

    def probe(x: float) -> bool:
        """Evaluate at log-noise x and move the matching end of the bracket; True if over target."""
        nonlocal a, b, best
        noise = math.exp(x)
        gx = g(noise)
        points.append((x, gx))
        if gx > 0:
            a = x
            return True
        b, best = x, noise
        return False

    widths = [b - a]
    while b - a > tol:
        (x0, g0), (x1, g1) = points[-2], points[-1]
        secant = x1 - g1 * (x1 - x0) / (g1 - g0) if math.isfinite(g0 - g1) and g0 != g1 else (a + b) / 2
        x = min(max(secant, a + tol / 4), b - tol / 4) if a < secant < b else (a + b) / 2
        over = probe(x)
        if b - a > tol and abs(x - x1) < 10 * tol:
            across = x + tol / 2 if over else x - tol / 2
            if a < across < b:
                probe(across)
        if len(widths) >= 2 and b - a > widths[-2] / 2:  # no halving over two rounds: bisect
            probe((a + b) / 2)
        widths.append(b - a)
    return best
