"""SecureRandom: DP-SGD's noise and sampling stream (ChaCha20, float64 Gaussians)."""

from __future__ import annotations

import secrets

import numpy as np
import pytest
import torch
from scipy import stats

from privacy.secure_noise import SecureRandom


def test_uniforms_are_uniform_inside_the_open_interval_with_52_random_bits():
    u = SecureRandom(seed=1).uniform(200_000)
    assert u.dtype == np.float64 and u.min() > 0.0 and u.max() < 1.0
    assert stats.kstest(u, "uniform").pvalue > 1e-3
    k = u * 2.0**52 - 0.5
    assert np.array_equal(k, np.round(k))  # exactly the (k + 1/2) / 2^52 grid
    low_bit = k.astype(np.int64) & 1
    assert abs(low_bit.mean() - 0.5) < 0.01  # the last of the 52 bits is random too


def test_normals_are_standard_normal_for_any_length():
    rnd = SecureRandom(seed=2)
    z = rnd.normal(100_001)  # odd: the last Box-Muller pair is cut
    assert z.dtype == torch.float64 and z.shape == (100_001,)
    assert stats.kstest(z.numpy(), "norm").pvalue > 1e-3
    assert abs(float(z.mean())) < 0.02 and abs(float(z.std()) - 1) < 0.02
    assert rnd.normal(0).shape == (0,) and rnd.normal(1).shape == (1,)


def test_seed_is_for_tests_and_the_default_key_comes_from_secrets(monkeypatch):
    assert torch.equal(SecureRandom(seed=5).normal(16), SecureRandom(seed=5).normal(16))
    assert not torch.equal(SecureRandom(seed=5).normal(16), SecureRandom(seed=6).normal(16))
    calls = []
    real = secrets.token_bytes

    def spy(n):
        calls.append(n)
        return real(n)

    monkeypatch.setattr(secrets, "token_bytes", spy)
    a, b = SecureRandom().normal(16), SecureRandom().normal(16)
    assert calls == [32, 32] and not torch.equal(a, b)


def test_the_stream_never_repeats_within_one_key():
    rnd = SecureRandom(seed=3)
    assert not np.array_equal(rnd.uniform(64), rnd.uniform(64))


def test_add_noise_sums_in_float64_and_rounds_once_to_the_input_dtype():
    value = torch.full((50_000,), 1.25, dtype=torch.float32)
    out = SecureRandom(seed=4).add_noise(value, 0.5)
    assert out.dtype == torch.float32 and out.shape == value.shape
    assert abs(float((out - 1.25).std()) - 0.5) < 0.01
    want = (value.double() + SecureRandom(seed=4).normal(value.numel()) * 0.5).float()
    assert torch.equal(out, want)
    assert torch.equal(SecureRandom().add_noise(value, 0.0), value)
    for bad in (-1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="std"):
            SecureRandom().add_noise(value, bad)
    with pytest.raises(ValueError):
        SecureRandom().uniform(-1)


def test_noise_for_many_tensors_is_the_noise_for_their_concatenation_across_blocks():
    """One draw for all of a step's tensors, whatever their sizes: the same numbers as
    noising them flattened end to end, also where a tensor straddles a draw block."""
    from privacy.secure_noise import _BLOCK

    sizes = [(3, 5), (_BLOCK - 7,), (0,), (2, 17, 9), (_BLOCK + 1,), (1,)]  # odd and empty, across blocks
    values = [torch.randn(s, dtype=torch.float32) for s in sizes]
    flat = torch.cat([v.reshape(-1) for v in values])
    want = SecureRandom(seed=7).add_noise(flat, 0.3)
    noised = [v.clone() for v in values]
    SecureRandom(seed=7).add_noise_(noised, 0.3)
    assert torch.equal(torch.cat([v.reshape(-1) for v in noised]), want)
    assert [tuple(v.shape) for v in noised] == sizes and all(v.dtype == torch.float32 for v in noised)
    # A draw longer than a block is still standard normal, block seams included.
    z = SecureRandom(seed=8).normal(2 * _BLOCK + 3)
    assert stats.kstest(z.numpy(), "norm").pvalue > 1e-3
    assert stats.kstest(z[_BLOCK - 1000 : _BLOCK + 1000].numpy(), "norm").pvalue > 1e-3


def _reference_normals(seed: int, n: int) -> torch.Tensor:
    """Box-Muller written out from the uniform stream, block by block: what normal() must give."""
    from privacy.secure_noise import _BLOCK

    rnd, parts = SecureRandom(seed=seed), []
    for start in range(0, n, _BLOCK):
        size = min(_BLOCK, n - start)
        pairs = (size + 1) // 2
        u = torch.from_numpy(rnd.uniform(2 * pairs))
        radius, angle = torch.sqrt(-2.0 * torch.log(u[:pairs])), 2.0 * torch.pi * u[pairs:]
        parts.append(torch.cat((radius * torch.cos(angle), radius * torch.sin(angle)))[:size])
    return torch.cat(parts) if parts else torch.empty(0, dtype=torch.float64)


@pytest.mark.parametrize(
    "blocks_and_extra", [(0, 0), (0, 1), (0, 2), (0, 3), (1, -1), (1, 0), (1, 1), (2, 0), (2, 1), (3, -1)]
)
def test_normals_are_box_muller_of_fresh_uniforms_in_every_block(blocks_and_extra):
    """Pins every block to its own stretch of key stream: a block that reused an earlier
    block's uniforms or buffer, or a sine half that repeated the cosine half, would pass the
    distribution tests above but not this."""
    from privacy.secure_noise import _BLOCK

    blocks, extra = blocks_and_extra
    n = blocks * _BLOCK + extra
    z = SecureRandom(seed=11).normal(n)
    torch.testing.assert_close(z, _reference_normals(11, n), rtol=0, atol=1e-12)
    if n >= 2 * _BLOCK:
        assert not torch.equal(z[:_BLOCK], z[_BLOCK : 2 * _BLOCK])
        half = _BLOCK // 2
        assert abs(float(torch.corrcoef(torch.stack((z[:half], z[half:_BLOCK])))[0, 1])) < 0.01


def test_in_place_noise_across_tensors_and_blocks_is_the_draw_of_normals():
    from privacy.secure_noise import _BLOCK

    values = [torch.zeros(_BLOCK + 3, dtype=torch.float64), torch.zeros(7, 3, dtype=torch.float64), torch.zeros(_BLOCK)]
    SecureRandom(seed=12).add_noise_(values, 2.0)
    total = sum(v.numel() for v in values)
    want = _reference_normals(12, total) * 2.0
    got = torch.cat([v.reshape(-1).double() for v in values])
    torch.testing.assert_close(got[: _BLOCK + 24], want[: _BLOCK + 24], rtol=0, atol=1e-11)
    torch.testing.assert_close(got[_BLOCK + 24 :], want[_BLOCK + 24 :].float().double(), rtol=0, atol=1e-5)


def test_in_place_noise_refuses_what_it_cannot_write_and_leaves_it_untouched():
    value = torch.randn(8, 6)
    before = value.clone()
    with pytest.raises(ValueError, match="contiguous"):
        SecureRandom(seed=1).add_noise_([value.t()], 0.5)
    with pytest.raises(ValueError, match="std"):
        SecureRandom(seed=1).add_noise_([value], float("nan"))
    # Checked before any draw: the first tensor is not noised when the second is refused,
    # and no key stream is spent.
    rnd = SecureRandom(seed=1)
    for bad in (torch.zeros(5, requires_grad=True), torch.zeros(5, dtype=torch.int64)):
        with pytest.raises(ValueError, match="in place"):
            rnd.add_noise_([value, bad], 0.5)
    assert torch.equal(value, before)
    assert torch.equal(rnd.normal(4), SecureRandom(seed=1).normal(4))
    SecureRandom(seed=1).add_noise_([], 0.5)  # nothing to noise: no draw, no error


def _chacha20(key: bytes, block: int, word1: int, n: int) -> bytes:
    """``n`` bytes of ChaCha20 from block counter ``block`` under nonce word ``word1`` (reference)."""
    from cryptography.hazmat.primitives.ciphers import Cipher, algorithms

    nonce = block.to_bytes(4, "little") + word1.to_bytes(12, "little")
    return Cipher(algorithms.ChaCha20(key, nonce), mode=None).encryptor().update(bytes(n))


def _read(stream, n: int) -> bytes:
    out = bytearray(n)
    stream.read_into(memoryview(bytes(n)), memoryview(out))
    return bytes(out)


def test_the_key_stream_seeks_to_any_byte_and_matches_reading_on():
    from privacy.secure_noise import _KeyStream

    key = SecureRandom.new_key(seed=20)
    ahead = _read(_KeyStream(key), 1000)
    assert ahead == _chacha20(key, 0, 0, 1000)
    stream = _KeyStream(key)
    stream.seek(333)
    assert _read(stream, 400) == ahead[333:733] and stream.position == 733
    stream.seek(5)
    assert _read(stream, 64) == ahead[5:69]
    with pytest.raises(ValueError, match="position"):
        stream.seek(-1)


def test_the_key_stream_goes_past_chacha20s_32_bit_block_counter():
    """``cryptography`` refuses to run one nonce past 2**32 blocks (256 GiB: about six DP
    steps of the trillion plan's 5.5e9 trainable parameters); the stream moves on to the
    next nonce instead of stopping, and never repeats a block."""
    from privacy.secure_noise import _KeyStream

    key = SecureRandom.new_key(seed=21)
    boundary = 64 << 32
    stream = _KeyStream(key)
    stream.seek(boundary - 100)
    got = _read(stream, 300)
    assert got[:100] == _chacha20(key, (1 << 32) - 2, 0, 128)[28:]
    assert got[100:] == _chacha20(key, 0, 1, 200)
    assert got[100:164] != _chacha20(key, 0, 0, 64)  # not the stream's first block again
    stream.seek(boundary + 3 * 64)
    assert _read(stream, 10) == _chacha20(key, 3, 1, 10)


def test_a_draw_across_the_counter_boundary_is_a_draw_of_fresh_normals():
    rnd = SecureRandom(seed=22)
    rnd._stream.seek((64 << 32) - 8 * 1000)  # 1000 uniforms before the boundary
    z = rnd.normal(5000)
    assert torch.isfinite(z).all() and stats.kstest(z.numpy(), "norm").pvalue > 1e-3


def test_a_key_serves_one_stream_and_a_seed_is_not_a_key():
    key = SecureRandom.new_key()
    assert len(key) == 32 and key != SecureRandom.new_key()
    assert torch.equal(SecureRandom(key=key).normal(9), SecureRandom(key=key).normal(9))
    assert torch.equal(SecureRandom(key=SecureRandom.new_key(seed=3)).normal(9), SecureRandom(seed=3).normal(9))
    with pytest.raises(ValueError, match="32 bytes"):
        SecureRandom(key=key[:16])
    with pytest.raises(ValueError, match="not both"):
        SecureRandom(key=key, seed=1)


def _parts(total: int, cuts: list[int]) -> list[tuple[int, int]]:
    edges = [0, *cuts, total]
    return list(zip(edges[:-1], edges[1:], strict=True))


@pytest.mark.parametrize(
    "total_and_cuts",
    [
        (10, [4]),
        (3 * (1 << 18) + 5, [1 << 18, 2 << 18]),  # at block seams, the last block odd
        (3 * (1 << 18) + 5, [7, (1 << 18) + 1, (1 << 18) + 1, 3 * (1 << 18) + 4]),  # inside blocks; an empty part
        (2 * (1 << 18), [2 * (1 << 18)]),  # the last part empty
    ],
)
def test_disjoint_parts_of_one_draw_add_the_single_draws_noise_and_stay_in_step(total_and_cuts):
    """What data-parallel workers rely on: each noises its own slice of one flat sum with the
    shared key, and together they add exactly what one process adds to the whole; every
    worker's stream then sits where the single process's does."""
    total, cuts = total_and_cuts
    value = torch.linspace(-1, 1, total)
    whole = value.clone()
    single = SecureRandom(seed=23)
    single.add_noise_([whole], 0.7)
    got = value.clone()
    workers = []
    for start, stop in _parts(total, cuts):
        worker = SecureRandom(seed=23)
        part = got[start:stop]
        worker.add_noise_([part[: (stop - start) // 3], part[(stop - start) // 3 :]], 0.7, offset=start, total=total)
        workers.append(worker)
    assert torch.equal(got, whole)
    after = single.normal(6)
    assert all(torch.equal(w.normal(6), after) for w in workers)


def test_a_part_outside_its_draw_is_refused_before_any_draw():
    rnd = SecureRandom(seed=24)
    value = torch.zeros(5)
    for offset, total in ((-1, 10), (6, 10), (0, 4)):
        with pytest.raises(ValueError, match="not part of a draw"):
            rnd.add_noise_([value], 1.0, offset=offset, total=total)
    assert torch.equal(value, torch.zeros(5))
    assert torch.equal(rnd.normal(4), SecureRandom(seed=24).normal(4))


@pytest.mark.parametrize("first", [1, 3, (1 << 18) + 1])
def test_a_draw_of_odd_length_spends_its_last_pair_whole(first):
    """Box-Muller takes uniforms in pairs: an odd draw still spends the last pair's two, so the
    next draw starts on fresh key stream (spending one would hand the next step the same
    uniform again: correlated noise across steps)."""
    rnd = SecureRandom(seed=25)
    rnd.normal(first)
    spent = first + 1
    assert torch.equal(
        torch.from_numpy(rnd.uniform(3)), torch.from_numpy(SecureRandom(seed=25).uniform(spent + 3)[spent:])
    )
