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

The cipher runs on one host core (about 2.8 GB/s, 3.5e8 uniforms per second); the bit
work and the float64 transform run in torch's threads, in blocks of :data:`_BLOCK` numbers
through buffers allocated once per instance, and a step's tensors are noised in place from
one draw (:meth:`SecureRandom.add_noise_`). Measured on the 868k trainable parameters of
``small`` with 2 experts (40 tensors), 2 threads: 868k normals in 5.7 ms (``torch.randn``,
float32 from MT19937: 5.2 ms in the same run), the step's noise 6-7 ms, against 18 ms when
every tensor drew its own normals into fresh buffers (first-touching fresh memory is dear on
this VM: 12 ms for 7 MB). That is fine up to ``small``-sized shards, but a member training
the 5.5e9 parameters per round the ``trillion`` plan gives it would spend about 16 s of every
step on the cipher alone. On a node that trains on an accelerator the float64 transform runs
there (the uniforms are copied over); at that scale the cipher has to run across cores with
one key per stream.
"""

from __future__ import annotations

import hashlib
import secrets
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms

# Random bits per uniform: k + 1/2 must be exact in float64's 53-bit significand, so that
# no uniform rounds to 0 or 1 (log(0)) and every value keeps its own grid point.
_MANTISSA = 52
_LOW_BITS = (1 << _MANTISSA) - 1
# Numbers per draw block (even: a block of normals is whole Box-Muller pairs but the last).
_BLOCK = 1 << 18
# What the ledger records as ``mechanism.noise_source`` for a DP-SGD round.
NOISE_SOURCE = "chacha20-box-muller-f64"


@dataclass
class _Buffers:
    """One block's working memory, allocated on the first draw and reused by every later one."""

    zeros: bytes = field(default_factory=lambda: bytes(8 * _BLOCK))  # the cipher's input
    stream: bytearray = field(default_factory=lambda: bytearray(8 * _BLOCK))  # its output
    uniforms: torch.Tensor = field(default_factory=lambda: torch.empty(_BLOCK, dtype=torch.float64))
    cosines: torch.Tensor = field(default_factory=lambda: torch.empty(_BLOCK // 2, dtype=torch.float64))

    def __post_init__(self) -> None:
        self.words = torch.frombuffer(self.stream, dtype=torch.int64)  # a view: no copy


class SecureRandom:
    """Uniforms and standard normals from one ChaCha20 key stream.

    Draws run in blocks of :data:`_BLOCK` numbers through buffers allocated once per
    instance. Why: a DP step draws as many normals as there are trainable parameters, and
    fresh multi-megabyte buffers every step cost more than the arithmetic on them (on this
    VM first-touching 7 MB took 12 ms; the cipher's output for the same 868k normals, 1.7
    ms). Blocks also bound the extra memory (7 MB) whatever the shard size. A draw of ``n``
    normals is defined block by block (each block its own Box-Muller halves), so it gives
    the same numbers however the caller splits it across tensors. Because the buffers are
    shared, draws hold a lock: two threads drawing at once could otherwise both read the
    key stream one of them wrote, i.e. the same noise twice.
    """

    def __init__(self, *, seed: int | None = None) -> None:
        if seed is None:
            key = secrets.token_bytes(32)
        else:
            key = hashlib.sha256(f"kyodo test noise {int(seed)}".encode()).digest()
        # The nonce can be fixed: every key is used for this one stream only.
        self._stream = Cipher(algorithms.ChaCha20(key, bytes(16)), mode=None).encryptor()
        self._buffers: _Buffers | None = None
        self._lock = threading.Lock()

    def _uniform_block(self, n: int) -> torch.Tensor:
        """``n <= _BLOCK`` float64 uniforms in this instance's buffer (valid until the next draw)."""
        if self._buffers is None:
            self._buffers = _Buffers()
        buf = self._buffers
        self._stream.update_into(memoryview(buf.zeros)[: 8 * n], buf.stream)
        k = buf.words[:n].bitwise_and_(_LOW_BITS)  # the low 52 bits: k uniform on [0, 2**52)
        return buf.uniforms[:n].copy_(k).add_(0.5).mul_(2.0**-_MANTISSA)

    def uniform(self, n: int) -> np.ndarray:
        """``n`` float64 uniforms strictly inside (0, 1): (k + 1/2) / 2**52, k uniform on 52 bits."""
        if n < 0:
            raise ValueError(f"n must be >= 0, got {n}")
        out = np.empty(n, dtype=np.float64)
        with self._lock:
            for start in range(0, n, _BLOCK):
                size = min(_BLOCK, n - start)
                out[start : start + size] = self._uniform_block(size).numpy()
        return out

    def _normal_blocks(self, n: int, device: torch.device) -> Iterator[torch.Tensor]:
        """``n`` standard normals as consecutive float64 blocks on ``device`` (Box-Muller, both
        halves). Each block lives in a reused buffer: use it before asking for the next.

        The key stream is always made on the host (the cipher runs there); the uniforms go to
        ``device`` and the transform runs there, so an accelerator does the float64 work.
        """
        for start in range(0, n, _BLOCK):
            size = min(_BLOCK, n - start)
            pairs = (size + 1) // 2
            u = self._uniform_block(2 * pairs).to(device)
            radius = u[:pairs].log_().mul_(-2.0).sqrt_()
            angle = u[pairs:].mul_(2.0 * torch.pi)
            # Cosine half first, then the sine half; an odd block drops its last sine. The
            # cosines overwrite the radii they are scaled by, the sines their angles.
            if u.device.type == "cpu":
                assert self._buffers is not None  # made by _uniform_block
                cosine = torch.cos(angle, out=self._buffers.cosines[:pairs])
            else:
                cosine = torch.cos(angle)  # on the accelerator: its allocator caches
            angle.sin_().mul_(radius)
            radius.mul_(cosine)
            yield u[:size]

    def normal(self, n: int, device: torch.device | str = "cpu") -> torch.Tensor:
        """``n`` float64 standard normals on ``device``."""
        if n < 0:
            raise ValueError(f"n must be >= 0, got {n}")
        out = torch.zeros(n, dtype=torch.float64, device=device)
        self.add_noise_([out], 1.0)  # 0 + 1.0 * z is exactly z: one path for every draw
        return out

    def add_noise(self, value: torch.Tensor, std: float) -> torch.Tensor:
        """``value + N(0, std^2)`` per element, summed in float64, rounded once to ``value``'s dtype."""
        out = value.detach().clone(memory_format=torch.contiguous_format)
        self.add_noise_([out], std)
        return out

    def add_noise_(self, values: Sequence[torch.Tensor], std: float) -> None:
        """:meth:`add_noise` in place, for every tensor, from one draw of normals for all of them.

        The same numbers as :meth:`add_noise` of the tensors flattened and concatenated in
        this order (so a data-parallel member that noises one flat sum draws what a single
        process draws tensor by tensor). In place because a DP step's clipped sums are not
        needed after noising: new tensors for them cost 1-2 ms of a 100 ms ``small`` step here.
        """
        if not (std >= 0 and np.isfinite(std)):
            raise ValueError(f"std must be finite and >= 0, got {std}")
        # Every check before the first draw: a refusal half-way would leave some tensors
        # noised and key stream spent.
        for v in values:
            if not (v.is_contiguous() and v.is_floating_point() and not v.requires_grad):
                raise ValueError(
                    "add_noise_ writes in place: it needs contiguous floating-point tensors that do not"
                    f" require grad, got {v.dtype} {tuple(v.shape)} (contiguous={v.is_contiguous()},"
                    f" requires_grad={v.requires_grad})"
                )
        devices = {v.device for v in values}
        if len(devices) > 1:
            raise ValueError(f"every tensor must be on one device, got {sorted(map(str, devices))}")
        if std == 0 or not devices:
            return
        flat = [v.view(-1) for v in values]
        index, offset = 0, 0  # where the next noise goes: tensor, element
        with self._lock:
            for block in self._normal_blocks(sum(v.numel() for v in flat), devices.pop()):
                used = 0
                while used < block.numel():
                    while flat[index].numel() == offset:  # skip finished (and empty) tensors
                        index, offset = index + 1, 0
                    take = min(block.numel() - used, flat[index].numel() - offset)
                    target = flat[index][offset : offset + take]
                    target.copy_(block[used : used + take].mul_(std).add_(target))  # float64 sum, rounded once
                    used += take
                    offset += take
