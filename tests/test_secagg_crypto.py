"""The SecAgg+ primitives (``aggregation.secagg``): quantization, masks, Shamir, keys, graph.

The last tests run a whole round with the pure functions only (no Flower, no coordinator):
five members mask their quantized updates, one drops after masking, and the server's
unmasked sum must equal the survivors' plaintext sum exactly.
"""

from __future__ import annotations

import itertools
import json
import math
import os

import numpy as np
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms

from aggregation.secagg.errors import SecAggError
from aggregation.secagg.graph import default_degree, default_threshold, neighbours
from aggregation.secagg.keys import (
    RoundKeys,
    advert_payload,
    agree,
    mask_context,
    open_sealed,
    pair_context,
    seal,
    sign_advert,
    verify_advert,
)
from aggregation.secagg.masks import apply_mask, apply_masks, expand_mask, stream_nonce
from aggregation.secagg.quantize import (
    QuantizationPlan,
    add_into,
    dequantize_sum,
    plan_quantization,
    quantize,
    secure_rng,
    sub_into,
)
from aggregation.secagg.shamir import combine_shares, split_secret
from privacy.keys import load_or_create_signing_key, load_public_key, public_key_hex

SEED = bytes(range(32))


# ====================================================================== quantize: plans


def test_plan_picks_narrowest_modulus_that_cannot_wrap():
    # 65537 * 65535 = 2**32 - 1: the largest cohort at 16 bits that still fits uint32.
    plan = plan_quantization(65537, 16, 1.0)
    assert plan.modulus_bits == 32 and plan.dtype is np.uint32 and plan.levels == 65535
    plan = plan_quantization(65538, 16, 1.0)
    assert plan.modulus_bits == 64 and plan.dtype is np.uint64
    # 4 * (2**62 - 1) < 2**64 <= 5 * (2**62 - 1)
    assert plan_quantization(4, 62, 0.5).modulus_bits == 64
    with pytest.raises(SecAggError, match=r"cohort of 5 members at 62 bits"):
        plan_quantization(5, 62, 0.5)


@pytest.mark.parametrize(
    ("cohort", "bits", "clip", "match"),
    [
        (0, 16, 1.0, "cohort size"),
        (True, 16, 1.0, "cohort size"),
        (3, 0, 1.0, "bits"),
        (3, 63, 1.0, "bits"),
        (3, 16.0, 1.0, "bits"),
        (3, 16, 0.0, "clip range"),
        (3, 16, -1.0, "clip range"),
        (3, 16, math.nan, "clip range"),
        (3, 16, math.inf, "clip range"),
        (3, 16, "1", "clip range"),
    ],
)
def test_plan_rejects_bad_parameters(cohort, bits, clip, match):
    with pytest.raises(SecAggError, match=match):
        plan_quantization(cohort, bits, clip)


def test_plan_dict_round_trip_through_json():
    plan = plan_quantization(10, 20, 0.25)
    again = QuantizationPlan.from_dict(json.loads(json.dumps(plan.to_dict())))
    assert again == plan and again.dtype is np.uint32


@pytest.mark.parametrize(
    ("d", "match"),
    [
        ({"clip_range": 1.0, "bits": 16, "cohort_size": 3}, "missing keys"),
        ({"clip_range": 1.0, "bits": 16, "cohort_size": 3, "modulus_bits": 32, "x": 1}, "unknown keys"),
        ({"clip_range": 1.0, "bits": "16", "cohort_size": 3, "modulus_bits": 32}, "'bits'"),
        ({"clip_range": 1.0, "bits": 16, "cohort_size": 3.0, "modulus_bits": 32}, "'cohort_size'"),
        ({"clip_range": None, "bits": 16, "cohort_size": 3, "modulus_bits": 32}, "'clip_range'"),
        ({"clip_range": 1.0, "bits": 16, "cohort_size": 3, "modulus_bits": 16}, "modulus_bits"),
        ({"clip_range": 1.0, "bits": 16, "cohort_size": 70000, "modulus_bits": 32}, "wraps around"),
        ({"clip_range": -1.0, "bits": 16, "cohort_size": 3, "modulus_bits": 32}, "clip range"),
    ],
)
def test_plan_from_dict_rejects_bad_plans(d, match):
    with pytest.raises(SecAggError, match=match):
        QuantizationPlan.from_dict(d)


def test_plan_from_dict_needs_a_mapping():
    with pytest.raises(SecAggError, match="mapping"):
        QuantizationPlan.from_dict([("bits", 16)])


# ====================================================================== quantize: values


def test_quantize_maps_endpoints_exactly_and_keeps_shape():
    plan = plan_quantization(3, 8, 2.0)
    x = np.array([[-2.0, 2.0], [-2.0, 2.0]], dtype=np.float32)
    q, clipped = quantize(x, plan, secure_rng())
    assert q.dtype == np.uint32 and q.shape == (2, 2) and clipped == 0
    assert q.tolist() == [[0, 255], [0, 255]]


def test_quantize_clips_and_counts():
    plan = plan_quantization(3, 8, 1.0)
    q, clipped = quantize(np.array([-5.0, -1.0, 0.5, 1.0, 7.0, 1.0001]), plan, secure_rng())
    assert clipped == 3
    assert q[0] == 0 and q[4] == 255 and q[5] == 255 and q[3] == 255


def test_quantize_error_is_below_one_level_and_values_in_range():
    plan = plan_quantization(5, 12, 0.5)
    rng = np.random.default_rng(1)
    x = rng.uniform(-0.5, 0.5, 100_000).astype(np.float32)
    q, _ = quantize(x, plan, secure_rng())
    assert q.max() <= plan.levels
    step = 2 * plan.clip_range / plan.levels
    err = np.abs(dequantize_sum(q, 1, plan) - x.astype(np.float64))
    assert err.max() < step * (1 + 2.0 ** (plan.bits - 23))


@pytest.mark.parametrize("bits", [4, 16, 20])  # float32 and float64 mapping paths
def test_stochastic_rounding_is_unbiased(bits):
    plan = plan_quantization(2, bits, 1.0)
    step = 2.0 / plan.levels
    value = np.float32(-1.0 + step * 3.3)  # 30 % of the way between levels 3 and 4
    n = 200_000
    q, _ = quantize(np.full(n, value, dtype=np.float32), plan, secure_rng())
    assert set(np.unique(q).tolist()) == {3, 4}
    mean = dequantize_sum(q, 1, plan).mean()
    # Each draw lands on one of two levels: std <= step / 2, so 6 sigma of the mean is tight.
    assert abs(mean - float(value)) < 6 * (step / 2) / math.sqrt(n)


def test_quantize_wide_grid_stays_below_top_level():
    plan = plan_quantization(2, 62, 1.0)
    q, _ = quantize(np.array([-1.0, 1.0, 0.0, 1.0 - 1e-17]), plan, secure_rng())
    assert q.dtype == np.uint64 and q[0] == 0 and q[1] == plan.levels and (q <= plan.levels).all()


def test_quantize_accepts_ints_and_scalars_and_empty():
    plan = plan_quantization(2, 8, 4.0)
    q, clipped = quantize(np.array([-4, 4, 9]), plan, secure_rng())
    assert q.tolist() == [0, 255, 255] and clipped == 1
    q, _ = quantize(np.float32(4.0), plan, secure_rng())
    assert q.shape == () and int(q) == 255
    q, clipped = quantize(np.zeros((0, 3), np.float32), plan, secure_rng())
    assert q.shape == (0, 3) and q.dtype == np.uint32 and clipped == 0


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_quantize_rejects_non_finite(bad):
    plan = plan_quantization(2, 8, 1.0)
    x = np.zeros(10, np.float32)
    x[3] = bad
    with pytest.raises(SecAggError, match="non-finite") as err:
        quantize(x, plan, secure_rng())
    assert "1" not in str(err.value), "no count of the member's overflowed entries in a text it replies"


def test_quantize_rejects_non_numbers_and_non_plans():
    plan = plan_quantization(2, 8, 1.0)
    with pytest.raises(SecAggError, match="dtype bool"):
        quantize(np.array([True, False]), plan, secure_rng())
    with pytest.raises(SecAggError, match="dtype complex"):
        quantize(np.array([1j]), plan, secure_rng())
    with pytest.raises(SecAggError, match="QuantizationPlan"):
        quantize(np.zeros(2), plan.to_dict(), secure_rng())


def test_secure_rng_is_fresh_each_call():
    a, b = secure_rng(), secure_rng()
    assert isinstance(a, np.random.Generator)
    assert not np.array_equal(a.integers(0, 2**63, 4), b.integers(0, 2**63, 4))


def test_dequantize_sum_inverts_the_cohort_encoding():
    plan = plan_quantization(4, 8, 1.0)
    total = np.array([0, 3 * 255, 3 * 255 // 2 * 1, 255], dtype=np.uint32)
    out = dequantize_sum(total, 3, plan)
    assert out.dtype == np.float64
    np.testing.assert_allclose(out, total * (2.0 / 255) - 3.0)
    assert out[0] == -3.0 and out[1] == pytest.approx(3.0)


def test_dequantize_sum_rejects_inconsistent_inputs():
    plan = plan_quantization(4, 8, 1.0)
    ok = np.zeros(3, np.uint32)
    with pytest.raises(SecAggError, match="dtype"):
        dequantize_sum(ok.astype(np.uint64), 2, plan)
    with pytest.raises(SecAggError, match="contributors"):
        dequantize_sum(ok, 0, plan)
    with pytest.raises(SecAggError, match="contributors"):
        dequantize_sum(ok, 5, plan)
    with pytest.raises(SecAggError, match="did not cancel"):
        dequantize_sum(np.array([2 * 255 + 1], np.uint32), 2, plan)


@pytest.mark.parametrize("dtype", [np.uint32, np.uint64])
def test_ring_arithmetic_wraps_modulo_2_to_the_bits(dtype):
    top = np.iinfo(dtype).max
    acc = np.array([top, 0, 5], dtype=dtype)
    assert add_into(acc, np.array([1, 0, 2], dtype=dtype)) is acc
    assert acc.tolist() == [0, 0, 7]
    sub_into(acc, np.array([1, 1, 7], dtype=dtype))
    assert acc.tolist() == [top, top, 0]
    mask = np.array([top, 12345, 2], dtype=dtype)
    add_into(acc, mask)
    sub_into(acc, mask)
    assert acc.tolist() == [top, top, 0]


def test_ring_arithmetic_rejects_mixed_operands():
    acc = np.zeros(3, np.uint32)
    with pytest.raises(SecAggError, match="share one dtype"):
        add_into(acc, np.zeros(3, np.uint64))
    with pytest.raises(SecAggError, match="share one shape"):
        sub_into(acc, np.zeros(4, np.uint32))
    with pytest.raises(SecAggError, match="uint32 or uint64"):
        add_into(np.zeros(3, np.int64), np.zeros(3, np.int64))
    with pytest.raises(SecAggError, match="numpy arrays"):
        add_into(acc, [1, 2, 3])
    frozen = np.zeros(3, np.uint32)
    frozen.flags.writeable = False
    with pytest.raises(SecAggError, match="read-only"):
        add_into(frozen, acc)


# ====================================================================== masks


def _keystream(seed: bytes, stream: str, nbytes: int) -> bytes:
    return Cipher(algorithms.ChaCha20(seed, stream_nonce(stream)), mode=None).encryptor().update(bytes(nbytes))


def test_mask_is_the_little_endian_chacha20_keystream_across_chunks():
    n = (1 << 20) // 4 + 3  # crosses the 1 MiB chunk boundary
    mask = expand_mask(SEED, "shard/a", n, np.uint32)
    assert mask.dtype == np.uint32 and mask.shape == (n,)
    assert np.array_equal(mask, np.frombuffer(_keystream(SEED, "shard/a", 4 * n), dtype="<u4"))
    wide = expand_mask(SEED, "shard/a", 5, np.dtype(np.uint64))
    assert wide.dtype == np.uint64
    assert np.array_equal(wide, np.frombuffer(_keystream(SEED, "shard/a", 40), dtype="<u8"))


def test_stream_nonce_keeps_the_block_counter_at_zero():
    nonce = stream_nonce("expert/3")
    assert len(nonce) == 16 and nonce[:4] == bytes(4)
    assert stream_nonce("expert/3") == nonce != stream_nonce("expert/4")


def test_mask_is_deterministic_prefix_stable_and_separated_by_stream_and_seed():
    a = expand_mask(SEED, "s0", 1000, np.uint32)
    assert np.array_equal(a, expand_mask(bytearray(SEED), "s0", 1000, np.uint32))
    assert np.array_equal(a[:10], expand_mask(SEED, "s0", 10, np.uint32))
    other_stream = expand_mask(SEED, "s1", 1000, np.uint32)
    other_seed = expand_mask(bytes(31) + b"\x01", "s0", 1000, np.uint32)
    assert np.mean(a == other_stream) < 0.01 and np.mean(a == other_seed) < 0.01
    assert expand_mask(SEED, "s0", 0, np.uint64).shape == (0,)


@pytest.mark.parametrize("dtype", [np.uint32, np.uint64])
def test_mask_looks_uniform(dtype):
    n = 200_000
    mask = expand_mask(os.urandom(32), "u", n, dtype)
    bits = np.iinfo(dtype).bits
    # Mean of U{0..2^b-1} is (2^b - 1)/2 with std 2^b/sqrt(12); 6 sigma of the sample mean.
    scaled = mask.astype(np.float64) / 2.0**bits
    assert abs(scaled.mean() - 0.5) < 6 / math.sqrt(12 * n)
    # Every bit position is set about half of the time.
    ones = np.array([np.count_nonzero((mask >> dtype(b)) & dtype(1)) for b in range(bits)]) / n
    assert np.all(np.abs(ones - 0.5) < 6 * 0.5 / math.sqrt(n))


@pytest.mark.parametrize(
    ("seed", "length", "dtype", "match"),
    [
        (bytes(31), 4, np.uint32, "32 bytes, got 31"),
        (bytes(33), 4, np.uint32, "32 bytes, got 33"),
        ("x" * 32, 4, np.uint32, "32 bytes, got str"),
        (SEED, -1, np.uint32, "length"),
        (SEED, True, np.uint32, "length"),
        (SEED, 2.0, np.uint32, "length"),
        (SEED, 4, np.int32, "uint32 or uint64"),
        (SEED, 4, np.float32, "uint32 or uint64"),
        (SEED, 4, "not a dtype", "uint32 or uint64"),
        (SEED, 2**36, np.uint64, "exceeds one ChaCha20 stream"),
    ],
)
def test_mask_rejects_bad_arguments(seed, length, dtype, match):
    with pytest.raises(SecAggError, match=match):
        expand_mask(seed, "s", length, dtype)


def test_mask_stream_must_be_text():
    with pytest.raises(SecAggError, match="stream name"):
        expand_mask(SEED, b"s", 4, np.uint32)


@pytest.mark.parametrize("dtype", [np.uint32, np.uint64])
@pytest.mark.parametrize("n", [0, 1, 7, (256 << 10) // 4 + 5, (1 << 20) // 4 * 3 + 1])  # across block boundaries
def test_apply_mask_equals_adding_the_expanded_mask(dtype, n):
    acc = np.random.default_rng(n).integers(0, np.iinfo(dtype).max, n, dtype=dtype, endpoint=True)
    mask = expand_mask(SEED, "shard/a", n, dtype)
    added = apply_mask(acc.copy(), SEED, "shard/a")
    assert added.dtype == dtype and np.array_equal(added, add_into(acc.copy(), mask))
    assert np.array_equal(apply_mask(acc.copy(), bytearray(SEED), "shard/a", subtract=True), sub_into(acc.copy(), mask))
    assert np.array_equal(apply_mask(added, SEED, "shard/a", subtract=True), acc)  # in place, and undone exactly


@pytest.mark.parametrize("dtype", [np.uint32, np.uint64])
def test_apply_masks_equals_applying_each_mask_in_turn(dtype):
    n = (128 << 10) // np.dtype(dtype).itemsize * 2 + 11  # several blocks and a ragged end
    acc = np.random.default_rng(1).integers(0, np.iinfo(dtype).max, n, dtype=dtype, endpoint=True)
    seeds = [(os.urandom(32), i % 3 == 0) for i in range(5)]
    one_by_one = acc.copy()
    for seed, subtract in seeds:
        apply_mask(one_by_one, seed, "shard/b", subtract=subtract)
    assert np.array_equal(apply_masks(acc.copy(), "shard/b", seeds), one_by_one)
    assert np.array_equal(apply_masks(acc.copy(), "shard/b", []), acc)
    with pytest.raises(SecAggError, match="32 bytes"):
        apply_masks(acc.copy(), "shard/b", [(SEED, False), (bytes(8), True)])


@pytest.mark.parametrize(
    ("acc", "seed", "match"),
    [
        (np.zeros(4, np.uint32), bytes(31), "32 bytes, got 31"),
        (np.zeros(4, np.int64), SEED, "uint32 or uint64"),
        (np.zeros(4, np.float32), SEED, "uint32 or uint64"),
        ([0, 0], SEED, "uint32 or uint64"),
        (np.zeros((2, 2), np.uint32), SEED, "contiguous 1-D"),
        (np.zeros(8, np.uint32)[::2], SEED, "contiguous 1-D"),
        (np.frombuffer(bytes(16), np.uint32), SEED, "writeable"),
    ],
)
def test_apply_mask_rejects_bad_arguments(acc, seed, match):
    with pytest.raises(SecAggError, match=match):
        apply_mask(acc, seed, "s")


# ====================================================================== shamir


def test_every_threshold_subset_reconstructs_and_smaller_ones_do_not():
    secret = os.urandom(32)
    ids = [2, 5, 9, 10, 255]
    shares = split_secret(secret, 3, ids)
    assert sorted(shares) == ids and all(len(s) == 32 for s in shares.values())
    for k in (3, 4, 5):
        for subset in itertools.combinations(ids, k):
            assert combine_shares({i: shares[i] for i in subset}, 3) == secret
    for subset in itertools.combinations(ids, 2):
        with pytest.raises(SecAggError, match="need at least 3 shares"):
            combine_shares({i: shares[i] for i in subset}, 3)
        # Interpolating a lower-degree polynomial through too few points gives some other value.
        assert combine_shares({i: shares[i] for i in subset}, 2) != secret


def test_shamir_round_trips_many_random_secrets():
    rng = np.random.default_rng(7)  # picks ids and thresholds only; secrets come from os.urandom
    for _ in range(40):
        n = int(rng.integers(1, 12))
        ids = [int(i) for i in rng.choice(np.arange(1, 256), size=n, replace=False)]
        t = int(rng.integers(1, n + 1))
        secret = os.urandom(32)
        shares = split_secret(secret, t, ids)
        chosen = [int(i) for i in rng.choice(ids, size=t, replace=False)]
        assert combine_shares({i: shares[i] for i in chosen}, t) == secret


def test_shamir_threshold_one_and_fresh_randomness():
    secret = os.urandom(32)
    assert set(split_secret(secret, 1, [1, 2, 3]).values()) == {secret}
    assert split_secret(secret, 2, [1, 2]) != split_secret(secret, 2, [1, 2])


def test_shamir_detects_a_corrupted_share_among_extra_shares():
    secret = os.urandom(32)
    shares = split_secret(secret, 3, [1, 2, 3, 4, 5])
    shares[4] = bytes(b ^ 1 for b in shares[4])
    with pytest.raises(SecAggError, match="do not lie on one degree-2 polynomial"):
        combine_shares(shares, 3)


def test_shamir_reconstruction_agrees_with_pycryptodome():
    from Crypto.Protocol.SecretSharing import Shamir

    rng = np.random.default_rng(11)  # picks ids and thresholds only
    for _ in range(30):
        n = int(rng.integers(1, 16))
        t = int(rng.integers(1, n + 1))
        halves = [os.urandom(16), os.urandom(16)]
        split = [dict(Shamir.split(t, 255, h)) for h in halves]  # pycryptodome's own sharing
        ids = sorted(int(i) for i in rng.choice(np.arange(1, 256), size=t, replace=False))
        assert Shamir.combine([(i, split[0][i]) for i in ids]) == halves[0]
        assert combine_shares({i: split[0][i] + split[1][i] for i in ids}, t) == halves[0] + halves[1]


def test_field_arithmetic_inverse_and_secret_multiplication():
    from aggregation.secagg import shamir

    rng = np.random.default_rng(5)
    for _ in range(100):
        a, b = (int.from_bytes(rng.bytes(16), "big") for _ in range(2))
        a |= 1  # nonzero
        assert shamir._reduce(shamir._clmul(a, shamir._inverse(a))) == 1
        assert shamir._mul_secret(b, a) == shamir._reduce(shamir._clmul(a, b)) == shamir._mul_secret(a, b)
    with pytest.raises(SecAggError, match="no inverse"):
        shamir._inverse(0)


@pytest.mark.parametrize(
    ("secret", "threshold", "ids", "match"),
    [
        (bytes(31), 2, [1, 2], "32 bytes, got 31"),
        ("s" * 32, 2, [1, 2], "32 bytes, got str"),
        (bytes(32), 0, [1, 2], "threshold"),
        (bytes(32), 3, [1, 2], "threshold"),
        (bytes(32), True, [1, 2], "threshold"),
        (bytes(32), 2, [1, 1, 2], "distinct"),
        (bytes(32), 1, [0, 1], "1..255"),
        (bytes(32), 1, [1, 256], "1..255"),
        (bytes(32), 1, [True, 2], "1..255"),
        (bytes(32), 1, [], "threshold"),
    ],
)
def test_split_rejects_bad_arguments(secret, threshold, ids, match):
    with pytest.raises(SecAggError, match=match):
        split_secret(secret, threshold, ids)


def test_combine_rejects_bad_shares():
    shares = split_secret(os.urandom(32), 2, [1, 2, 3])
    with pytest.raises(SecAggError, match="share 2 must be 32 bytes"):
        combine_shares({1: shares[1], 2: shares[2][:16]}, 2)
    with pytest.raises(SecAggError, match="1..255"):
        combine_shares({0: shares[1], 2: shares[2]}, 2)
    with pytest.raises(SecAggError, match="threshold"):
        combine_shares(shares, 0)
    with pytest.raises(SecAggError, match="mapping"):
        combine_shares(list(shares.items()), 2)


# ====================================================================== keys


def test_round_keys_public_and_private_bytes_round_trip():
    keys = RoundKeys.generate(["g0", "g3"])
    cipher_pk, mask_pks = keys.public_bytes()
    assert sorted(mask_pks) == ["g0", "g3"]
    assert len({cipher_pk, *mask_pks.values()}) == 3 and all(len(k) == 32 for k in (cipher_pk, *mask_pks.values()))
    again = RoundKeys.from_private_bytes(*keys.private_bytes())
    assert again.public_bytes() == (cipher_pk, mask_pks)
    assert repr(keys) == "RoundKeys()"  # private keys stay out of logs and tracebacks
    cipher_sk, mask_sks = keys.private_bytes()
    with pytest.raises(SecAggError, match="cipher key as a mask key"):
        RoundKeys.from_private_bytes(cipher_sk, {"g0": cipher_sk})
    with pytest.raises(SecAggError, match="one mask key in two aggregation groups"):
        RoundKeys.from_private_bytes(cipher_sk, {"g0": mask_sks["g0"], "g3": mask_sks["g0"]})
    with pytest.raises(SecAggError, match="mask private key of group g3 must be 32 bytes"):
        RoundKeys.from_private_bytes(cipher_sk, {"g0": mask_sks["g0"], "g3": bytes(5)})
    assert RoundKeys.generate([]).public_bytes()[1] == {}, "a member only in cohorts of one masks nothing"


def test_agree_gives_both_ends_the_same_key_bound_to_its_context():
    alice, bob = RoundKeys.generate(["g0"]), RoundKeys.generate(["g0"])
    ctx_ab = mask_context("run-1", 3, "g0", "alice", "bob")
    assert ctx_ab == mask_context("run-1", 3, "g0", "bob", "alice")
    k_ab = agree(alice.mask_private["g0"], bob.public_bytes()[1]["g0"], ctx_ab)
    k_ba = agree(bob.mask_private["g0"], alice.public_bytes()[1]["g0"], ctx_ab)
    assert k_ab == k_ba and len(k_ab) == 32
    for other in (
        mask_context("run-1", 4, "g0", "alice", "bob"),
        mask_context("run-2", 3, "g0", "alice", "bob"),
        mask_context("run-1", 3, "g1", "alice", "bob"),
        pair_context("run-1", 3, "alice", "bob", "shares"),
        mask_context("run-1", 3, "g0", "alice", "carol"),
    ):
        assert agree(alice.mask_private["g0"], bob.public_bytes()[1]["g0"], other) != k_ab
    with pytest.raises(SecAggError, match="group id"):
        mask_context("run-1", 3, "", "alice", "bob")


def test_pair_context_is_unambiguous_and_validated():
    assert pair_context("r", 1, "ab", "c", "mask") != pair_context("r", 1, "a", "bc", "mask")
    assert pair_context("r", 1, "a", "b", "mask") != pair_context("r1", 1, "a", "b", "mask")
    with pytest.raises(SecAggError, match="two distinct members"):
        pair_context("r", 1, "a", "a", "mask")
    for bad_round in (-1, True, "1", 1.0):
        with pytest.raises(SecAggError, match="round"):
            pair_context("r", bad_round, "a", "b", "mask")
    with pytest.raises(SecAggError, match="run id"):
        pair_context("", 1, "a", "b", "mask")
    with pytest.raises(SecAggError, match="key purpose"):
        pair_context("r", 1, "a", "b", "")


def test_agree_rejects_bad_keys_and_context():
    keys = RoundKeys.generate([])
    peer = RoundKeys.generate([]).public_bytes()[0]
    with pytest.raises(SecAggError, match="small-order"):
        agree(keys.cipher_private, bytes(32), b"ctx")
    with pytest.raises(SecAggError, match="peer public key must be 32 bytes"):
        agree(keys.cipher_private, peer[:31], b"ctx")
    with pytest.raises(SecAggError, match="must not be empty"):
        agree(keys.cipher_private, peer, b"")
    with pytest.raises(SecAggError, match="X25519PrivateKey"):
        agree(Ed25519PrivateKey.generate(), peer, b"ctx")


def test_seal_round_trip_and_tampering():
    key, aad = os.urandom(32), b"run|1|alice|bob"
    blob = seal(key, b"shares", aad)
    assert open_sealed(key, blob, aad) == b"shares"
    assert seal(key, b"shares", aad) != blob  # fresh nonce each time
    for i in range(len(blob)):
        tampered = bytearray(blob)
        tampered[i] ^= 0x40
        with pytest.raises(SecAggError, match="failed authentication"):
            open_sealed(key, bytes(tampered), aad)
    with pytest.raises(SecAggError, match="failed authentication"):
        open_sealed(key, blob, b"run|1|alice|carol")
    with pytest.raises(SecAggError, match="failed authentication"):
        open_sealed(os.urandom(32), blob, aad)
    with pytest.raises(SecAggError, match="shorter than nonce and tag"):
        open_sealed(key, blob[:27], aad)
    with pytest.raises(SecAggError, match="encryption key must be 32 bytes"):
        seal(key[:16], b"x", aad)
    assert open_sealed(key, seal(key, b"", b""), b"") == b""


def test_adverts_verify_only_unchanged(tmp_path):
    signing = load_or_create_signing_key(tmp_path / "identity.pem")
    public = load_public_key(public_key_hex(signing))
    cipher_pk, mask_pks = RoundKeys.generate(["g0", "g1"]).public_bytes()
    setup = bytes(range(32))
    sig = sign_advert(signing, "run", 2, "alice", cipher_pk, mask_pks, setup, 40)
    assert len(sig) == 64
    verify_advert(public, sig, "run", 2, "alice", cipher_pk, mask_pks, setup, 40)
    swapped = {"g0": mask_pks["g1"], "g1": mask_pks["g0"]}  # a key moved to another group
    renamed = {"g0": mask_pks["g0"], "g7": mask_pks["g1"]}  # a key under another group id
    for changed in (
        ("run2", 2, "alice", cipher_pk, mask_pks, setup, 40),
        ("run", 3, "alice", cipher_pk, mask_pks, setup, 40),
        ("run", 2, "bob", cipher_pk, mask_pks, setup, 40),
        ("run", 2, "alice", mask_pks["g0"], {"g0": cipher_pk, "g1": mask_pks["g1"]}, setup, 40),
        ("run", 2, "alice", cipher_pk, swapped, setup, 40),
        ("run", 2, "alice", cipher_pk, renamed, setup, 40),
        ("run", 2, "alice", cipher_pk, {"g0": mask_pks["g0"]}, setup, 40),
        ("run", 2, "alice", cipher_pk, {**mask_pks, "g2": RoundKeys.generate([]).public_bytes()[0]}, setup, 40),
        ("run", 2, "alice", cipher_pk, mask_pks, bytes(32), 40),  # another setup
        ("run", 2, "alice", cipher_pk, mask_pks, setup, 41),  # another weight
    ):
        with pytest.raises(SecAggError, match="invalid signature"):
            verify_advert(public, sig, *changed)
    stranger = Ed25519PrivateKey.generate().public_key()
    with pytest.raises(SecAggError, match="invalid signature"):
        verify_advert(stranger, sig, "run", 2, "alice", cipher_pk, mask_pks, setup, 40)
    with pytest.raises(SecAggError, match="advert signature must be 64 bytes"):
        verify_advert(public, sig[:63], "run", 2, "alice", cipher_pk, mask_pks, setup, 40)
    with pytest.raises(SecAggError, match="cipher key as a mask key"):
        sign_advert(signing, "run", 2, "alice", cipher_pk, {"g0": cipher_pk}, setup, 40)
    with pytest.raises(SecAggError, match="one mask key in two aggregation groups"):
        sign_advert(signing, "run", 2, "alice", cipher_pk, {"g0": mask_pks["g0"], "g1": mask_pks["g0"]}, setup, 40)
    with pytest.raises(SecAggError, match="mapping of group id"):
        sign_advert(signing, "run", 2, "alice", cipher_pk, mask_pks["g0"], setup, 40)
    with pytest.raises(SecAggError, match="setup digest must be 32 bytes"):
        sign_advert(signing, "run", 2, "alice", cipher_pk, mask_pks, setup[:16], 40)
    with pytest.raises(SecAggError, match="Ed25519PublicKey"):
        verify_advert(signing, sig, "run", 2, "alice", cipher_pk, mask_pks, setup, 40)
    with pytest.raises(SecAggError, match="Ed25519PrivateKey"):
        sign_advert(X25519PrivateKey.generate(), "run", 2, "alice", cipher_pk, mask_pks, setup, 40)
    payload = advert_payload("run", 2, "alice", cipher_pk, mask_pks, setup, 40)
    assert payload != advert_payload("run", 2, "alic", cipher_pk, mask_pks, setup, 40)
    one, other = {"g1": mask_pks["g0"]}, {"g": b"1" + mask_pks["g0"][:31]}  # length-prefixed: not one string
    assert advert_payload("run", 2, "alice", cipher_pk, one, setup, 40) != advert_payload(
        "run", 2, "alice", cipher_pk, other, setup, 40
    )
    with pytest.raises(SecAggError, match="advert weight must be an integer >= 0"):
        advert_payload("run", 2, "alice", cipher_pk, mask_pks, setup, -1)


def test_a_survivor_set_signature_binds_run_round_group_session_active_and_survivors(tmp_path):
    from aggregation.secagg.keys import sign_survivors, survivors_payload, survivors_signed

    signing = load_or_create_signing_key(tmp_path / "identity.pem")
    public = load_public_key(public_key_hex(signing))
    setup = bytes(range(32))
    statement = ("run", 2, "g0", setup, ["a", "b", "c", "d"], ["a", "b", "c"])
    signature = sign_survivors(signing, *statement)
    assert survivors_signed(public, signature, *statement)
    assert survivors_signed(public, signature, "run", 2, "g0", setup, ["d", "c", "b", "a"], ["c", "b", "a"])
    for changed in (
        ("run2", 2, "g0", setup, ["a", "b", "c", "d"], ["a", "b", "c"]),
        ("run", 3, "g0", setup, ["a", "b", "c", "d"], ["a", "b", "c"]),
        ("run", 2, "g1", setup, ["a", "b", "c", "d"], ["a", "b", "c"]),
        ("run", 2, "g0", bytes(32), ["a", "b", "c", "d"], ["a", "b", "c"]),
        ("run", 2, "g0", setup, ["a", "b", "c"], ["a", "b", "c"]),
        ("run", 2, "g0", setup, ["a", "b", "c", "d"], ["a", "b"]),
        ("run", 2, "g0", setup, ["a", "b", "c", "d"], ["a", "b", "d"]),
    ):
        assert not survivors_signed(public, signature, *changed), changed
    assert not survivors_signed(Ed25519PrivateKey.generate().public_key(), signature, *statement)
    # Length-prefixed: moving a name between the two lists changes the bytes.
    assert survivors_payload("r", 1, "g0", setup, ["a", "b"], ["c"]) != survivors_payload(
        "r", 1, "g0", setup, ["a"], ["b", "c"]
    )
    with pytest.raises(SecAggError, match="Ed25519PrivateKey"):
        sign_survivors(X25519PrivateKey.generate(), *statement)


# ====================================================================== graph


def _is_connected(graph: dict[str, tuple[str, ...]], removed: set[str] = frozenset()) -> bool:
    alive = [m for m in graph if m not in removed]
    seen, todo = {alive[0]}, [alive[0]]
    while todo:
        for n in graph[todo.pop()]:
            if n not in removed and n not in seen:
                seen.add(n)
                todo.append(n)
    return len(seen) == len(alive)


def test_graph_is_symmetric_regular_and_deterministic():
    members = [f"m{i:02d}" for i in range(30)]
    graph = neighbours(members, 6, SEED)
    assert set(graph) == set(members)
    for m, ns in graph.items():
        assert len(ns) == 6 and m not in ns and list(ns) == sorted(ns)
        assert all(m in graph[n] for n in ns)
    assert neighbours(list(reversed(members)), 6, SEED) == graph
    assert neighbours(members, 6, bytes(32)) != graph
    rng = np.random.default_rng(0)  # which members drop: not a secret
    for _ in range(20):  # a degree-k Harary graph survives any k - 1 removals
        removed = set(rng.choice(members, size=5, replace=False).tolist())
        assert _is_connected(graph, removed)


def test_graph_order_is_random_not_alphabetical():
    members = [f"m{i:02d}" for i in range(30)]
    graph = neighbours(members, 2, SEED)
    # On an alphabetical ring m00 would neighbour m01 and m29; a random ring almost never does.
    alphabetical = sum(f"m{(i + 1) % 30:02d}" in graph[f"m{i:02d}"] for i in range(30))
    assert alphabetical < 10


@pytest.mark.parametrize(("n", "degree"), [(2, 1), (3, 2), (5, 4), (5, 9), (8, 7)])
def test_graph_is_complete_at_high_degree(n, degree):
    members = [f"n{i}" for i in range(n)]
    graph = neighbours(members, degree, SEED)
    assert all(graph[m] == tuple(x for x in members if x != m) for m in members)


def test_graph_of_one_member_has_no_edges():
    assert neighbours(["solo"], 0, SEED) == {"solo": ()}


@pytest.mark.parametrize(
    ("members", "degree", "seed", "match"),
    [
        ([], 0, SEED, "at least one member"),
        (["a", "b", "a"], 2, SEED, r"duplicates \['a'\]"),
        (["a", ""], 1, SEED, "non-empty str"),
        (["a", 3], 1, SEED, "non-empty str"),
        ("abc", 2, SEED, "sequence of names"),
        (["a", "b", "c"], 0, SEED, "must be >= 1"),
        (["a", "b", "c"], -2, SEED, "non-negative"),
        ([f"m{i}" for i in range(10)], 3, SEED, "odd"),
        (["a", "b"], 1, bytes(15), "at least 16 random bytes"),
        (["a", "b"], 1, "s" * 32, "at least 16 random bytes"),
    ],
)
def test_graph_rejects_bad_arguments(members, degree, seed, match):
    with pytest.raises(SecAggError, match=match):
        neighbours(members, degree, seed)


def test_default_degree_and_threshold():
    table = {1: 0, 2: 1, 5: 4, 8: 7, 9: 8, 10: 8, 16: 8, 17: 10, 100: 14, 1000: 20}
    assert {n: default_degree(n) for n in table} == table
    for n in range(9, 600):
        k = default_degree(n)
        assert k % 2 == 0 and k <= n - 1 and k >= 2 * math.ceil(math.log2(n)) - 1
    assert [default_threshold(k) for k in range(9)] == [1, 1, 2, 2, 3, 3, 4, 4, 5]
    with pytest.raises(SecAggError, match="cohort size"):
        default_degree(0)
    with pytest.raises(SecAggError, match="degree"):
        default_threshold(-1)


# ====================================================================== a whole round


def _mask_input(q, name, keys, self_seed, peers, mask_pks, plan, run, rnd, stream):
    """What a member sends: its quantized update plus self mask plus signed pairwise masks."""
    masked = q.copy()
    add_into(masked, expand_mask(self_seed, stream, q.size, plan.dtype))
    for peer in peers:
        seed = agree(keys.mask_private["g0"], mask_pks[peer], mask_context(run, rnd, "g0", name, peer))
        (add_into if name < peer else sub_into)(masked, expand_mask(seed, stream, q.size, plan.dtype))
    return masked


# 5 members on the complete graph (SecAgg), 7 on a sparse degree-4 ring (SecAgg+): the
# dropout's neighbours then keep 3 = threshold live neighbours each, as unmasking needs.
@pytest.mark.parametrize(("names", "degree"), [(["ana", "bo", "cy", "di", "ed"], 4), (list("abcdefg"), 4)])
def test_round_with_a_dropout_unmasks_exactly_the_survivors_sum(tmp_path, names, degree):
    run, rnd, stream, length = "run-x", 7, "expert/0", 100_000
    plan = plan_quantization(len(names), 16, 0.5)
    graph = neighbours(names, degree, os.urandom(32))
    threshold = default_threshold(degree)
    share_id = {m: i + 1 for i, m in enumerate(sorted(names))}
    data_rng = np.random.default_rng(3)  # test data only
    x = {m: data_rng.uniform(-0.45, 0.45, length).astype(np.float32) for m in names}

    # Stage 1: fresh round keys, adverts signed with the identity key, checked by the peers.
    identity = {m: load_or_create_signing_key(tmp_path / f"{m}.pem") for m in names}
    keys = {m: RoundKeys.generate(["g0"]) for m in names}
    adverts = {m: keys[m].public_bytes() for m in names}
    setup = os.urandom(32)  # the digest of the round's setup, the same for every member
    sigs = {m: sign_advert(identity[m], run, rnd, m, *adverts[m], setup, 0) for m in names}
    for m in names:
        for peer in graph[m]:
            verify_advert(
                load_public_key(public_key_hex(identity[peer])), sigs[peer], run, rnd, peer, *adverts[peer], setup, 0
            )
    mask_pks = {m: adverts[m][1]["g0"] for m in names}

    # Stage 2: share the self-mask seed and the mask key among neighbours, sealed per pair.
    self_seeds = {m: os.urandom(32) for m in names}
    inbox: dict[str, dict[str, bytes]] = {m: {} for m in names}  # recipient -> sender -> blob
    for m in names:
        ids = [share_id[p] for p in graph[m]]
        seed_shares = split_secret(self_seeds[m], threshold, ids)
        key_shares = split_secret(keys[m].private_bytes()[1]["g0"], threshold, ids)
        for p in graph[m]:
            k = agree(keys[m].cipher_private, adverts[p][0], pair_context(run, rnd, m, p, "shares"))
            inbox[p][m] = seal(k, seed_shares[share_id[p]] + key_shares[share_id[p]], f"{m}->{p}".encode())

    def held_share(holder: str, owner: str, kind: int) -> bytes:
        k = agree(keys[holder].cipher_private, adverts[owner][0], pair_context(run, rnd, holder, owner, "shares"))
        plain = open_sealed(k, inbox[holder][owner], f"{owner}->{holder}".encode())
        return plain[32 * kind : 32 * (kind + 1)]

    # Stage 3: everyone masks; the third member drops before its masked vector reaches the server.
    quantized, masked = {}, {}
    for m in names:
        quantized[m], clipped = quantize(x[m], plan, secure_rng())
        assert clipped == 0
        masked[m] = _mask_input(quantized[m], m, keys[m], self_seeds[m], graph[m], mask_pks, plan, run, rnd, stream)
    dropped = names[2]
    survivors = [m for m in names if m != dropped]

    # The server sees masked vectors only: none resembles its plaintext.
    for m in names:
        assert not np.array_equal(masked[m], quantized[m])
        assert np.mean(masked[m] == quantized[m]) < 1e-3
        r = np.corrcoef(masked[m].astype(np.float64), x[m].astype(np.float64))[0, 1]
        assert abs(r) < 0.05

    total = np.zeros(length, plan.dtype)
    for m in survivors:
        add_into(total, masked[m])

    # Stage 4: survivors hand over self-seed shares of survivors and mask-key shares of the dropout.
    for m in survivors:
        shares = {share_id[h]: held_share(h, m, 0) for h in graph[m] if h in survivors}
        seed = combine_shares(shares, threshold)
        assert seed == self_seeds[m]
        sub_into(total, expand_mask(seed, stream, length, plan.dtype))
    key_shares = {share_id[h]: held_share(h, dropped, 1) for h in graph[dropped] if h in survivors}
    dropped_key = X25519PrivateKey.from_private_bytes(combine_shares(key_shares, threshold))
    for peer in graph[dropped]:
        seed = agree(dropped_key, mask_pks[peer], mask_context(run, rnd, "g0", dropped, peer))
        # The peer added +mask if it sorts before the dropout, else -mask: undo that.
        (sub_into if peer < dropped else add_into)(total, expand_mask(seed, stream, length, plan.dtype))

    expected = np.zeros(length, plan.dtype)
    for m in survivors:
        add_into(expected, quantized[m])
    assert np.array_equal(total, expected)

    # Dequantized mean vs float mean: each member's value is off by less than one grid step
    # 2R/L (stochastic rounding moves at most one level; float32 mapping adds <= 2**(bits-23)
    # of a step), so the mean of the errors is too. Its average over entries is ~0 (unbiased).
    mean = dequantize_sum(total, len(survivors), plan) / len(survivors)
    float_mean = np.mean([x[m].astype(np.float64) for m in survivors], axis=0)
    step = 2 * plan.clip_range / plan.levels
    err = mean - float_mean
    assert np.abs(err).max() < step * (1 + 2.0 ** (plan.bits - 23))
    # Per entry the error has std <= step / (2 sqrt(survivors)); 6 sigma of its average.
    assert abs(err.mean()) < 6 * step / (2 * math.sqrt(len(survivors))) / math.sqrt(length)
