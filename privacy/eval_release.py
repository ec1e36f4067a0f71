"""A member's held-out evaluation, released to the coordinator as a Gaussian mechanism.

Why: the held-out action error is computed from the member's private episodes. Sent exactly,
it is a release outside DP-SGD's accounting: a per-round number that moves with one episode
(a membership signal the coordinator could read every round). So under DP the node releases
it the way it releases its shard updates: with noise, under its budget, in its ledger.

The mechanism: each held-out episode's error (the mean over its evaluation windows) is
clipped to ``[0, L]``; the node adds Gaussian noise to the pair

    (sum of clipped errors / L,  number of held-out episodes)

Adding or removing one episode moves that pair by at most (1, 1), an L2 sensitivity of
sqrt(2), so noise of standard deviation ``z * sqrt(2)`` on each coordinate is the Gaussian
mechanism with noise multiplier ``z``: for the accountant, one step at sample rate 1
(``Mechanism(z, 1.0, 1)``), composed with every DP-SGD step in the same ledger. The count is
noised too because under add/remove adjacency the exact count is itself a membership signal.
The reported error, ``L * noisy sum / noisy count`` clamped to ``[0, L]``, is post-processing.

The noise comes from the operating system's CSPRNG (``secrets.SystemRandom``): the release
is one draw per coordinate, so there is no throughput reason to use a faster generator.
"""

from __future__ import annotations

import math
import secrets
from dataclasses import dataclass
from random import Random
from typing import Any

import numpy as np

from privacy.accountant import Mechanism

MECHANISM_NAME = "gaussian-sum-count"  # what the ledger's "opacus_mode" field holds for evaluations
NOISE_SOURCE = "os-csprng-gauss"  # the ledger's "noise_source": secrets.SystemRandom().gauss
SENSITIVITY = math.sqrt(2.0)  # L2 change of (clipped sum / L, count) when one episode is added or removed


@dataclass(frozen=True)
class EvalPrivacy:
    """The member's own settings for releasing its held-out error (never the coordinator's).

    ``noise_multiplier`` 0 means the node releases no held-out error under DP at all.
    ``loss_bound`` is in the normalised action units of ``action_mse``: per-episode errors
    above it count as ``loss_bound``, so a policy worse than that reads as ``loss_bound``.
    """

    noise_multiplier: float
    loss_bound: float

    def __post_init__(self) -> None:
        if not (math.isfinite(self.noise_multiplier) and self.noise_multiplier >= 0):
            raise ValueError(f"evaluation noise multiplier must be finite and >= 0, got {self.noise_multiplier!r}")
        if not (math.isfinite(self.loss_bound) and self.loss_bound > 0):
            raise ValueError(f"evaluation loss bound must be finite and > 0, got {self.loss_bound!r}")

    @property
    def enabled(self) -> bool:
        return self.noise_multiplier > 0

    def mechanism(self) -> Mechanism:
        """The accountant's view of one release."""
        return Mechanism(self.noise_multiplier, 1.0, 1)

    def ledger_mechanism(self) -> dict[str, Any]:
        """The ledger's ``mechanism`` field of one release (the clipping norm is the loss bound)."""
        return {
            "noise_multiplier": float(self.noise_multiplier),
            "sample_rate": 1.0,
            "steps": 1,
            "clipping_norm": float(self.loss_bound),
            "opacus_mode": MECHANISM_NAME,
            "noise_source": NOISE_SOURCE,
        }

    def noise_std_of_mean(self, episodes: int) -> float:
        """About how far the released error strays from the clipped true one, for ``episodes`` held out."""
        return self.loss_bound * self.noise_multiplier * SENSITIVITY / max(1, episodes)


@dataclass(frozen=True)
class ReleasedEvaluation:
    action_mse: float  # noised, clipped per episode to the loss bound
    episodes: int  # noised count of held-out episodes, rounded, at least 0


def release_evaluation(
    per_episode_error: np.ndarray, privacy: EvalPrivacy, rng: Random | None = None
) -> ReleasedEvaluation:
    """Release the mean held-out error of ``per_episode_error`` (one value per episode).

    ``rng`` is for tests only; by default the noise comes from the OS CSPRNG.
    """
    if not privacy.enabled:
        raise ValueError("evaluation release is disabled (noise multiplier 0)")
    errors = np.asarray(per_episode_error, dtype=np.float64).reshape(-1)
    # An episode whose error is not finite (a diverged or crafted model) counts as the worst,
    # the bound: still a function of that episode alone within [0, bound], so the sensitivity
    # holds. Refusing instead would answer, at no cost, whether some held-out episode
    # overflows: a data-dependent bit outside the guarantee.
    errors = np.where(np.isfinite(errors), errors, privacy.loss_bound)
    rng = rng if rng is not None else secrets.SystemRandom()
    std = privacy.noise_multiplier * SENSITIVITY
    clipped_sum = float(np.clip(errors, 0.0, privacy.loss_bound).sum()) / privacy.loss_bound
    noisy_sum = clipped_sum + rng.gauss(0.0, std)
    noisy_count = float(errors.size) + rng.gauss(0.0, std)
    mean = privacy.loss_bound * noisy_sum / max(noisy_count, 1.0)
    return ReleasedEvaluation(
        action_mse=float(min(max(mean, 0.0), privacy.loss_bound)),
        episodes=max(0, round(noisy_count)),
    )
