"""Server optimisers (per shard, exportable state) and aggregate validation.

The references below are written out in float64 numpy from the papers' update rules, so they
share no code with the implementation; float32 arithmetic there is compared with a tolerance.
"""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from safetensors.torch import load, save

from aggregation.server_opt import FedAdam, FedAvg, FedAvgM, make_server_optimizer
from aggregation.validate import check_aggregate
from aggregation.weighted_mean import ShardMean

SHARD = "expert/L0/E0"
OTHER = "expert/L0/E1"


def _params(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"w": torch.randn(3, 4, generator=g), "b": torch.randn(4, generator=g), "frozen": torch.ones(2)}


def _deltas(rounds: int, seed: int = 1) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [{"w": torch.randn(3, 4, generator=g) * 0.1, "b": torch.randn(4, generator=g) * 0.1} for _ in range(rounds)]


def _run(opt, params, deltas, shard=SHARD):
    params = dict(params)
    for delta in deltas:
        params.update(opt.apply(params, delta, shard))
    return params


# ------------------------------------------------------------------ FedAvg
def test_fedavg_unchanged():
    params = {"w": torch.ones(2, 3), "b": torch.zeros(3), "untouched": torch.ones(1)}
    out = FedAvg(server_lr=0.5).apply(params, {"w": torch.full((2, 3), 2.0)})
    assert set(out) == {"w"}
    assert torch.equal(out["w"], torch.full((2, 3), 2.0))
    assert torch.equal(params["w"], torch.ones(2, 3))  # inputs are not modified
    # keeps the parameter's dtype, computes in float32
    half = FedAvg(1.0).apply({"w": torch.ones(2, dtype=torch.bfloat16)}, {"w": torch.ones(2)})
    assert half["w"].dtype == torch.bfloat16
    opt = FedAvg()
    opt.apply(params, {"w": torch.ones(2, 3)}, SHARD)
    assert opt.state_dict(SHARD) == {}
    with pytest.raises(ValueError, match="keeps no state"):
        opt.load_state_dict(SHARD, {"step": torch.tensor(1)})
    with pytest.raises(ValueError):
        FedAvg(0)


# ------------------------------------------------------------------ references
def _fedavgm_reference(params, deltas, lr, beta):
    w = {k: params[k].double().numpy() for k in ("w", "b")}
    v = {k: np.zeros_like(x) for k, x in w.items()}
    for d in deltas:
        for k in w:
            v[k] = beta * v[k] + d[k].double().numpy()
            w[k] = w[k] + lr * v[k]
    return w


def _fedadam_reference(params, deltas, lr, b1, b2, tau, bias_correction=False):
    w = {k: params[k].double().numpy() for k in ("w", "b")}
    m = {k: np.zeros_like(x) for k, x in w.items()}
    v = {k: np.full_like(x, tau**2) for k, x in w.items()}
    for t, d in enumerate(deltas, start=1):
        for k in w:
            g = d[k].double().numpy()
            m[k] = b1 * m[k] + (1 - b1) * g
            v[k] = b2 * v[k] + (1 - b2) * g * g
            eta = lr * np.sqrt(1 - b2**t) / (1 - b1**t) if bias_correction else lr
            w[k] = w[k] + eta * m[k] / (np.sqrt(v[k]) + tau)
    return w


def test_fedavgm_matches_reference():
    params, deltas = _params(), _deltas(4)
    got = _run(FedAvgM(server_lr=0.7, momentum=0.9), params, deltas)
    want = _fedavgm_reference(params, deltas, 0.7, 0.9)
    for k in want:
        np.testing.assert_allclose(got[k].numpy(), want[k], rtol=1e-5, atol=1e-6)
    assert torch.equal(got["frozen"], params["frozen"])


def test_fedavgm_with_zero_momentum_is_fedavg():
    params, deltas = _params(), _deltas(3)
    got, want = _run(FedAvgM(0.5, momentum=0.0), params, deltas), _run(FedAvg(0.5), params, deltas)
    for k in ("w", "b"):
        torch.testing.assert_close(got[k], want[k])


@pytest.mark.parametrize("bias_correction", [False, True])
def test_fedadam_matches_reference(bias_correction):
    params, deltas = _params(), _deltas(4)
    opt = FedAdam(server_lr=0.05, beta1=0.9, beta2=0.99, tau=1e-3, bias_correction=bias_correction)
    got = _run(opt, params, deltas)
    want = _fedadam_reference(params, deltas, 0.05, 0.9, 0.99, 1e-3, bias_correction)
    for k in want:
        np.testing.assert_allclose(got[k].numpy(), want[k], rtol=1e-5, atol=1e-6)
    assert int(opt.state_dict(SHARD)["step"]) == 4


# ------------------------------------------------------------------ per-shard state
@pytest.mark.parametrize("name", ["fedavgm", "fedadam"])
def test_resume_from_state_is_bit_identical(name):
    params, deltas = _params(), _deltas(3)
    uninterrupted = _run(make_server_optimizer(name), params, deltas)

    first = make_server_optimizer(name)
    after_one = _run(first, params, deltas[:1])
    # through safetensors bytes, as the coordinator stores it
    stored = save(first.state_dict(SHARD))
    resumed = make_server_optimizer(name)
    resumed.load_state_dict(SHARD, load(stored))
    interrupted = _run(resumed, after_one, deltas[1:])

    for k in params:
        assert torch.equal(interrupted[k], uninterrupted[k]), k
    assert set(resumed.state_dict(SHARD)) == set(first.state_dict(SHARD))


def test_state_dict_is_a_copy():
    opt = FedAvgM()
    params = _run(opt, _params(), _deltas(1))
    snapshot = opt.state_dict(SHARD)
    kept = {k: v.clone() for k, v in snapshot.items()}
    _run(opt, params, _deltas(2, seed=5))
    for k in kept:
        assert torch.equal(snapshot[k], kept[k])


def test_shards_not_updated_keep_their_state():
    opt = FedAdam()
    params = _params()
    params.update(opt.apply(params, _deltas(1)[0], SHARD))
    other = {"x": torch.zeros(5)}
    other.update(opt.apply(other, {"x": torch.ones(5)}, OTHER))
    before = opt.state_dict(OTHER)
    for delta in _deltas(3, seed=7):  # only SHARD is updated in these rounds
        params.update(opt.apply(params, delta, SHARD))
    after = opt.state_dict(OTHER)
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert int(opt.state_dict(SHARD)["step"]) == 4 and int(after["step"]) == 1
    assert opt.state_dict("never/updated") == {}


def test_shard_derived_from_tensor_names():
    """Without shard_id, tensors are grouped by the model's shard naming rule."""
    name0 = "blocks.0.moe.experts.0.w_up.weight"
    name1 = "blocks.0.moe.experts.1.w_up.weight"
    params = {name0: torch.zeros(2), name1: torch.zeros(2)}
    opt = FedAvgM(momentum=0.5)
    opt.apply(params, {name0: torch.ones(2), name1: torch.ones(2)})
    assert set(opt.state_dict(SHARD)) == {"step", f"momentum/{name0}"}
    assert set(opt.state_dict(OTHER)) == {"step", f"momentum/{name1}"}


def test_load_state_dict_refuses_foreign_or_incomplete_state():
    adam, momentum = FedAdam(), FedAvgM()
    _run(momentum, _params(), _deltas(1))
    state = momentum.state_dict(SHARD)
    with pytest.raises(ValueError, match="unexpected"):
        adam.load_state_dict(SHARD, state)
    with pytest.raises(ValueError, match="step"):
        momentum.load_state_dict(SHARD, {k: v for k, v in state.items() if k != "step"})
    _run(adam, _params(), _deltas(1))
    with pytest.raises(ValueError, match="slots"):
        adam.load_state_dict(SHARD, {k: v for k, v in adam.state_dict(SHARD).items() if k != "v/w"})
    with pytest.raises(ValueError, match="float32"):
        momentum.load_state_dict(SHARD, {**state, "momentum/w": state["momentum/w"].double()})
    momentum.load_state_dict(SHARD, {})  # an empty state resets the shard
    assert momentum.state_dict(SHARD) == {}


def test_mismatched_shapes_leave_state_untouched():
    opt = FedAvgM()
    params = _run(opt, _params(), _deltas(1))
    before = opt.state_dict(SHARD)
    with pytest.raises(ValueError, match="shape"):
        opt.apply(params, {"w": torch.zeros(3, 4), "b": torch.zeros(5)}, SHARD)
    after = opt.state_dict(SHARD)
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_factory_errors():
    assert isinstance(make_server_optimizer("FedAdam", tau=1e-2), FedAdam)
    assert make_server_optimizer("fedavg", server_lr=0.5).server_lr == 0.5
    with pytest.raises(ValueError, match="unknown server optimizer"):
        make_server_optimizer("sgd")
    with pytest.raises(ValueError, match="does not take"):
        make_server_optimizer("fedavgm", beta1=0.9)
    for name, bad in [
        ("fedavgm", {"momentum": 1.0}),
        ("fedavgm", {"momentum": -0.1}),
        ("fedadam", {"beta2": 1.5}),
        ("fedadam", {"tau": 0}),
        ("fedadam", {"server_lr": float("nan")}),
        ("fedadam", {"bias_correction": 1}),
        ("fedavg", {"server_lr": True}),
    ]:
        with pytest.raises(ValueError):
            make_server_optimizer(name, **bad)


# ------------------------------------------------------------------ validation
def test_validation_accepts_normal_and_rejects_bad():
    good = {"w": torch.full((3, 4), 0.1), "b": torch.zeros(4)}
    assert check_aggregate(SHARD, good, max_norm=1.0) is None
    assert check_aggregate(SHARD, good, max_norm=None) is None
    assert check_aggregate(SHARD, {"w": torch.full((3, 4), 1e30)}, max_norm=0) is None  # 0: no bound

    norm = float(np.sqrt(12 * 0.1**2))
    reason = check_aggregate(SHARD, good, max_norm=norm * 0.99)
    assert reason is not None and "norm" in reason and SHARD in reason
    assert check_aggregate(SHARD, good, max_norm=norm * 1.01) is None

    for value in (float("nan"), float("inf"), float("-inf")):
        bad = {"w": torch.zeros(3, 4), "b": torch.tensor([0.0, value, 0.0, 0.0])}
        reason = check_aggregate(SHARD, bad, max_norm=None)
        assert reason is not None and "non-finite" in reason and "'b'" in reason
    with pytest.raises(ValueError, match="max_norm"):
        check_aggregate(SHARD, good, max_norm=-1.0)


def test_validation_large_finite_float32_is_not_mistaken_for_overflow():
    big = {"w": torch.full((4,), 3e38)}
    assert check_aggregate(SHARD, big, max_norm=None) is None
    reason = check_aggregate(SHARD, big, max_norm=1e38)
    assert reason is not None and "6e+38" in reason


# ------------------------------------------------------------------ ShardMean fast path
def test_shard_mean_matches_float64_reference_across_dtypes_and_layouts():
    g = torch.Generator().manual_seed(3)
    shape = (70_000, 3)  # more than one fold chunk
    members = ["a", "b", "c", "d"]
    deltas = [
        torch.randn(shape, generator=g),
        torch.randn(shape, generator=g).double(),
        torch.randn(shape[::-1], generator=g).t(),  # non-contiguous
        torch.randn(shape, generator=g).to(torch.bfloat16),  # torch fallback path
    ]
    weights = [3.0, 1.0, 250.0, 7.5]
    acc = ShardMean("s", members, {"w": shape})
    for member, delta, weight in zip(members, deltas, weights, strict=True):
        acc.add(member, {"w": delta}, weight)
    want = sum(w * d.double() for w, d in zip(weights, deltas, strict=True)) / sum(weights)
    got = acc.mean()["w"]
    assert got.dtype == torch.float32
    # float32 accumulation: a few float32 ulps of the largest value (see weighted_mean's docstring)
    assert float((got.double() - want).abs().max()) <= 4e-7 * float(want.abs().max())
    assert acc.total_weight == sum(weights)


def test_shard_mean_refuses_non_finite_beyond_first_chunk():
    acc = ShardMean("s", ["a", "b"], {"w": (600_000,)})
    acc.add("a", {"w": torch.ones(600_000)}, 1.0)
    bad = torch.zeros(600_000)
    bad[-1] = float("inf")
    acc.add("b", {"w": bad}, 1.0)
    with pytest.raises(ValueError, match="non-finite"):
        acc.mean()


def test_shard_mean_is_bit_identical_whether_its_sum_stays_in_ram_or_is_spilled(tmp_path):
    """Spilling changes where the sum lives, never its bits (ordered resumes rely on it)."""
    from aggregation.sums import SumPool

    g = torch.Generator().manual_seed(5)
    shapes = {"a": (70_001,), "b": (3, 50_000)}
    contributions = [({k: torch.randn(s, generator=g) for k, s in shapes.items()}, 10.0 + i) for i in range(5)]
    results = []
    for budget in (None, 0):
        pool = SumPool(budget, tmp_path)
        acc = ShardMean("s", [f"m{i}" for i in range(5)], shapes, pool=pool)
        for i, (d, w) in enumerate(contributions):
            acc.add(f"m{i}", d, w)
        results.append(acc.mean())
        assert pool.peak_resident_bytes == (0 if budget == 0 else acc.nbytes)
    assert all(torch.equal(results[0][k], results[1][k]) for k in shapes)


def test_safetensors_round_trip_of_scalar_step():
    buf = io.BytesIO(save({"step": torch.tensor(3, dtype=torch.int64)}))
    assert int(load(buf.getvalue())["step"]) == 3
