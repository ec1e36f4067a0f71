"""From correct membership guesses to a lower bound on epsilon (Steinke, Nasr, Jagielski 2023).

"Privacy auditing with one (1) training run" (NeurIPS 2023, arXiv:2305.08846): put m canaries
into one training run, each independently with probability 1/2; afterwards an auditor
guesses "in" or "out" for r of them (abstaining on the rest) and counts the correct
guesses W. For an (epsilon, delta)-DP training algorithm, whatever the guessing strategy,

    P[W >= v] <= f(v) + 2 m delta * max_{i = 1..v} (f(v - i) - f(v)) / i,
    f(v) = P[Binomial(r, e^eps / (1 + e^eps)) >= v]

(their main theorem): with delta = 0 the count of correct guesses is stochastically dominated
by a binomial whose success probability is that of eps-randomised response, because no
eps-DP mechanism lets a guess about one independent coin be right more often than
e^eps / (1 + e^eps); the delta term bounds the extra mass delta can move.

Reading it as a hypothesis test: having seen v correct guesses, every epsilon whose
p-value above is below 1 - confidence is rejected, so the algorithm is *not*
(epsilon, delta)-DP for any of them, with that confidence. The lower bound reported is the
largest rejected epsilon (0 when even epsilon = 0 is not rejected). It is valid for any
guesser, which is why the number of guesses must be fixed before looking at the scores.
"""

from __future__ import annotations

import math

import numpy as np
from scipy.stats import binom

_EPS_MAX = 100.0


def correct_probability(epsilon: float) -> float:
    """e^eps / (1 + e^eps): the best accuracy of one guess against an eps-DP mechanism."""
    return 1.0 / (1.0 + math.exp(-epsilon))


def p_value(m: int, r: int, v: int, epsilon: float, delta: float = 0.0) -> float:
    """Upper bound on P[at least ``v`` of ``r`` guesses correct] under (epsilon, delta)-DP, m canaries."""
    if not 0 <= v <= r <= m:
        raise ValueError(f"need 0 <= correct ({v}) <= guesses ({r}) <= canaries ({m})")
    if epsilon < 0 or not 0 <= delta <= 1:
        raise ValueError(f"need epsilon >= 0 and 0 <= delta <= 1, got {epsilon}, {delta}")
    p = correct_probability(epsilon)
    tail = float(binom.sf(v - 1, r, p))  # f(v) = P[Bin >= v]
    if delta == 0 or v == 0:
        return min(1.0, tail)
    # (f(v - i) - f(v)) / i = P[v - i <= Bin <= v - 1] / i for i = 1..v
    below = binom.cdf(v - 1, r, p) - binom.cdf(np.arange(v - 2, -2, -1), r, p)
    slack = float(np.max(below / np.arange(1, v + 1)))
    return min(1.0, tail + 2 * m * delta * slack)


def epsilon_lower_bound(m: int, r: int, v: int, delta: float = 0.0, confidence: float = 0.95) -> float:
    """Largest epsilon rejected at ``confidence`` after ``v`` correct of ``r`` guesses (0 if none is)."""
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    alpha = 1 - confidence
    if p_value(m, r, v, 0.0, delta) >= alpha:
        return 0.0
    lo, hi = 0.0, 1.0  # invariant: p_value(lo) < alpha <= p_value(hi)
    while p_value(m, r, v, hi, delta) < alpha:
        lo, hi = hi, hi * 2
        if hi > _EPS_MAX:
            return _EPS_MAX
    for _ in range(60):
        mid = (lo + hi) / 2
        if p_value(m, r, v, mid, delta) < alpha:
            lo = mid
        else:
            hi = mid
    return lo
