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
step on the cipher in one process. On a node that trains on an accelerator the float64
transform runs there (the uniforms are copied over); the stream is addressable by position
(:class:`_KeyStream`), so a member's data-parallel workers each draw their own slice of one
step's noise from one key, on their own cores (``add_noise_(..., offset=, total=)``).
"""

from __future__ import annotations

import hashlib
import secrets
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

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


class _KeyStream:
    """ChaCha20's key stream under one key, addressable by byte position.

    Why not one ``cryptography`` encryptor for the whole stream: it refuses to go past its
    32-bit block counter (256 GiB of key stream, ``ValueError``), and the ``trillion`` plan's
    5.5e9 trainable parameters per member draw 44 GB of it per DP step, so a round would
    stop at its sixth step. Block ``p`` of this stream is ChaCha20's block counter
    ``p mod 2**32`` under the nonce ``p // 2**32`` (bytes 4-12 of ``cryptography``'s 16-byte
    nonce): a 64-bit counter, and below 2**32 blocks exactly the stream of an all-zero nonce.
    Seeking lets data-parallel workers draw disjoint parts of one step's noise
    (:meth:`SecureRandom.add_noise_` with ``offset``), each from its own core.
    """

    _SEGMENT = 64 << 32  # bytes under one nonce: 2**32 blocks of 64 bytes

    def __init__(self, key: bytes) -> None:
        self._key = key
        self.position = 0  # bytes of the stream read so far
        self._encryptor: Any = None  # positioned at ``self.position`` when not None

    def seek(self, position: int) -> None:
        if position < 0:
            raise ValueError(f"position must be >= 0, got {position}")
        if position != self.position:
            self.position, self._encryptor = position, None

    def read_into(self, zeros: memoryview, out: memoryview) -> None:
        """Fill ``out`` with the next ``len(out)`` bytes (``zeros``: as many zero bytes)."""
        done = 0
        while done < len(out):
            if self._encryptor is None:
                block, skip = divmod(self.position, 64)
                nonce = (block % (1 << 32)).to_bytes(4, "little") + (block >> 32).to_bytes(12, "little")
                self._encryptor = Cipher(algorithms.ChaCha20(self._key, nonce), mode=None).encryptor()
                self._encryptor.update(bytes(skip))
            take = min(len(out) - done, self._SEGMENT - self.position % self._SEGMENT)
            self._encryptor.update_into(zeros[:take], out[done : done + take])
            done += take
            self.position += take
            if self.position % self._SEGMENT == 0:
                self._encryptor = None  # the next byte is under the next nonce


def _draw_bytes(n: int) -> int:
    """Key-stream bytes a draw of ``n`` numbers uses: whole blocks, then the last one's pairs."""
    full, rest = divmod(n, _BLOCK)
    return 8 * _BLOCK * full + 16 * ((rest + 1) // 2)


@dataclass
class _Buffers:
    """One block's working memory, allocated on the first draw and reused by every later one."""

    zeros: bytes = field(default_factory=lambda: bytes(8 * _BLOCK))  # the cipher's input
    stream: bytearray = field(default_factory=lambda: bytearray(8 * _BLOCK))  # its output
    uniforms: torch.Tensor = field(default_factory=lambda: torch.empty(_BLOCK, dtype=torch.float64))
    cosines: torch.Tensor = field(default_factory=lambda: torch.empty(_BLOCK // 2, dtype=torch.float64))

    def __post_init__(self) -> None:
        self.words = torch.frombuffer(self.stream, dtype=torch.int64)  # a view: no copy


def _check_key(key: bytes, seed: int | None) -> bytes:
    if seed is not None:
        raise ValueError("give a key or a seed, not both")
    if not isinstance(key, bytes) or len(key) != 32:
        raise ValueError("a ChaCha20 key is 32 bytes")
    return key


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

    def __init__(self, *, seed: int | None = None, key: bytes | None = None) -> None:
        self._stream = _KeyStream(self.new_key(seed) if key is None else _check_key(key, seed))
        self._buffers: _Buffers | None = None
        self._lock = threading.Lock()

    @staticmethod
    def new_key(seed: int | None = None) -> bytes:
        """A fresh 256-bit key from :mod:`secrets`; from ``seed``, a fixed one (tests only).

        Each key serves one stream only, so ChaCha20's nonce can stay fixed. Data-parallel
        workers of one member share their rank 0's key and draw disjoint parts of it.
        """
        if seed is None:
            return secrets.token_bytes(32)
        return hashlib.sha256(f"kyodo test noise {int(seed)}".encode()).digest()

    def _uniform_block(self, n: int) -> torch.Tensor:
        """``n <= _BLOCK`` float64 uniforms in this instance's buffer (valid until the next draw)."""
        if self._buffers is None:
            self._buffers = _Buffers()
        buf = self._buffers
        self._stream.read_into(memoryview(buf.zeros)[: 8 * n], memoryview(buf.stream)[: 8 * n])
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

    def _normal_blocks(
        self, total: int, first: int, stop: int, device: torch.device
    ) -> Iterator[tuple[int, torch.Tensor]]:
        """Numbers ``[first, stop)`` of a draw of ``total`` standard normals that starts at the
        stream's current position, as ``(index of the block's first number, float64 block on
        device)`` for every block of the draw that holds some of them (Box-Muller, both
        halves). Each block lives in a reused buffer: use it before asking for the next.

        The key stream is always made on the host (the cipher runs there); the uniforms go to
        ``device`` and the transform runs there, so an accelerator does the float64 work.
        """
        base = self._stream.position
        for start in range(first - first % _BLOCK, stop, _BLOCK):
            size = min(_BLOCK, total - start)
            pairs = (size + 1) // 2
            self._stream.seek(base + 8 * start)  # every earlier block of the draw is whole
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
            yield start, u[:size]

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

    def add_noise_(
        self, values: Sequence[torch.Tensor], std: float, *, offset: int = 0, total: int | None = None
    ) -> None:
        """:meth:`add_noise` in place, for every tensor, from one draw of normals for all of them.

        The same numbers as :meth:`add_noise` of the tensors flattened and concatenated in
        this order. In place because a DP step's clipped sums are not needed after noising:
        new tensors for them cost 1-2 ms of a 100 ms ``small`` step here.

        With ``total``, the tensors are numbers ``[offset, offset + their size)`` of a draw of
        ``total`` normals, and the stream moves past the whole draw (also when this part is
        empty). So data-parallel workers that share one key and noise disjoint slices of one
        flat sum, each its own, add exactly the noise one process adds to all of it, and
        their streams stay in step for the next draw.
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
        size = sum(v.numel() for v in values)
        total = size if total is None else total
        if not (offset >= 0 and offset + size <= total):
            raise ValueError(f"numbers [{offset}, {offset + size}) are not part of a draw of {total}")
        if std == 0:
            return
        flat = [v.view(-1) for v in values if v.numel()]
        index, position = 0, 0  # where the next noise goes: tensor, element within it
        with self._lock:
            end = self._stream.position + _draw_bytes(total)
            if flat:
                for start, block in self._normal_blocks(total, offset, offset + size, devices.pop()):
                    used = max(offset - start, 0)  # numbers of this block before the part
                    need = min(block.numel(), offset + size - start)
                    while used < need:
                        take = min(need - used, flat[index].numel() - position)
                        target = flat[index][position : position + take]
                        target.copy_(block[used : used + take].mul_(std).add_(target))  # float64 sum, rounded once
                        used += take
                        position += take
                        if position == flat[index].numel():
                            index, position = index + 1, 0
            self._stream.seek(end)
