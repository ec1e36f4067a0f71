"""DP-SGD's randomness (Gaussian noise, Poisson sampling) from a cryptographic source.

DP assumes an adversary who knows every other episode: given the released update it knows
the noise up to one clipped gradient. The guarantee then rests on that noise being
unpredictable and on every output being reachable from either neighbouring dataset.

Why kyodo draws its own instead of using torch's generator or Opacus' ``secure_mode``:

- torch's CPU generator is MT19937 behind a 64-bit seed: not a cryptographic generator.
- Opacus' ``secure_mode`` needs ``torchcsprng``, which has no release for this torch
  (``pip download torchcsprng`` finds no distribution; the project was archived at
  torch 1.x). Its fix against floating-point attacks draws four Gaussians per coordinate:
  measured 9.8 ms for the 868k trainable parameters of ``small`` with 2 experts, against
  3.3 ms for one ``torch.normal`` and 5.3 ms for this module. Over a whole ``bk`` step
  (``bench/dp_overhead.py --modes bk``, two runs each, interleaved with the old code) the
  difference is within the machine's noise: 1.19-1.23x / 1.65-1.68x of non-private (2 /
  all experts) against 1.20-1.25x / 1.64-1.66x with torch's generator; peak RSS +0-8 MB.
- Floating-point attacks (Mironov 2012 on the Laplace mechanism; Jin et al. 2022 on Opacus)
  use noise drawn at the output's own precision: it takes a sparse set of values, so some
  outputs are impossible under one neighbour. Here every uniform carries 52 random bits,
  Box-Muller runs in float64, and the noised sum is formed in float64 and rounded once to
  the parameter's dtype. That rounding is post-processing of a sum whose noise is far finer
  than the float32 grid, so the sparse-output failure does not arise. What remains is the
  sampler's cut: Box-Muller from 52-bit uniforms never exceeds about 8.57 standard
  deviations, so an output just beyond one neighbour's cut is reachable only from the
  other. Even with one episode's whole clipped gradient (C, i.e. 1/sigma standard
  deviations at sigma ~0.9) in a single coordinate, that needs a draw beyond 7.5 standard
  deviations: about 1e-13 per step, far inside delta (1e-5).

The stream is ChaCha20 (``cryptography``) under a 256-bit key from :mod:`secrets`, one key
per :class:`SecureRandom`. ``seed`` derives the key deterministically: tests only.

It runs on one CPU core: about 1.6e8 normals per second here (868k in 5.3 ms). That is
fine up to ``small``-sized shards, but a member training the 5.5e9 parameters per round the
``trillion`` plan gives it would spend about 35 s of every step drawing noise. On a node that
trains on an accelerator the float64 transform runs there (the uniforms are copied over);
the cipher itself still runs on one host core, about 2.8 GB/s, i.e. 3.5e8 uniforms per
second: at that scale it has to run across cores with one key per stream.
"""

from __future__ import annotations

import hashlib
import secrets

import numpy as np
import torch
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms

# Random bits per uniform: k + 1/2 must be exact in float64's 53-bit significand, so that
# no uniform rounds to 0 or 1 (log(0)) and every value keeps its own grid point.
_MANTISSA = 52
# What the ledger records as ``mechanism.noise_source`` for a DP-SGD round.
NOISE_SOURCE = "chacha20-box-muller-f64"


class SecureRandom:
    """Uniforms and standard normals from one ChaCha20 key stream (not thread-safe)."""

    def __init__(self, *, seed: int | None = None) -> None:
        if seed is None:
            key = secrets.token_bytes(32)
        else:
            key = hashlib.sha256(f"kyodo test noise {int(seed)}".encode()).digest()
        # The nonce can be fixed: every key is used for this one stream only.
        self._stream = Cipher(algorithms.ChaCha20(key, bytes(16)), mode=None).encryptor()

    def _words(self, n: int) -> np.ndarray:
        return np.frombuffer(self._stream.update(bytes(8 * n)), dtype=np.uint64)

    def uniform(self, n: int) -> np.ndarray:
        """``n`` float64 uniforms strictly inside (0, 1): (k + 1/2) / 2**52, k uniform on 52 bits."""
        if n < 0:
            raise ValueError(f"n must be >= 0, got {n}")
        k = self._words(n) >> np.uint64(64 - _MANTISSA)
        return (k.astype(np.float64) + 0.5) * 2.0**-_MANTISSA

    def normal(self, n: int, device: torch.device | str = "cpu") -> torch.Tensor:
        """``n`` float64 standard normals on ``device`` (Box-Muller: both the cosine and the sine half).

        The key stream is always made on the host (the cipher runs there); the uniforms go to
        ``device`` and the transform runs there, so an accelerator does the float64 work.
        """
        pairs = (n + 1) // 2
        u = torch.from_numpy(self.uniform(2 * pairs)).to(device)
        radius = torch.sqrt(-2.0 * torch.log(u[:pairs]))
        angle = (2.0 * torch.pi) * u[pairs:]
        return torch.cat((radius * torch.cos(angle), radius * torch.sin(angle)))[:n]

    def add_noise(self, value: torch.Tensor, std: float) -> torch.Tensor:
        """``value + N(0, std^2)`` per element, summed in float64, rounded once to ``value``'s dtype."""
        if not (std >= 0 and np.isfinite(std)):
            raise ValueError(f"std must be finite and >= 0, got {std}")
        if std == 0:
            return value.clone()
        noise = self.normal(value.numel(), value.device).view(value.shape)
        return (value.to(torch.float64) + noise * std).to(value.dtype)
