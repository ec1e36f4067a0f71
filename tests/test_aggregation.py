import pytest
import torch

from aggregation.server_opt import FedAvg
from aggregation.weighted_mean import AggregationError, ShardMean

SHAPES = {"w": (2, 3), "b": (3,)}


def delta(value):
    return {"w": torch.full((2, 3), float(value)), "b": torch.full((3,), float(value))}


def test_example_weighted_mean():
    acc = ShardMean("expert/L0/E0", ["a", "b", "c"], SHAPES)
    acc.add("a", delta(1.0), 10)
    acc.add("b", delta(4.0), 30)
    acc.add("c", delta(-2.0), 60)
    expected = (10 * 1 + 30 * 4 + 60 * -2) / 100
    mean = acc.mean()
    assert torch.allclose(mean["w"], torch.full((2, 3), expected))
    assert mean["w"].dtype == torch.float32
    assert acc.contributors == ["a", "b", "c"]


def test_only_cohort_members_contribute():
    acc = ShardMean("expert/L0/E0", ["a", "b", "c"], SHAPES)
    with pytest.raises(AggregationError, match="not in the cohort"):
        acc.add("intruder", delta(100.0), 1)
    acc.add("a", delta(1.0), 1)
    with pytest.raises(AggregationError, match="already contributed"):
        acc.add("a", delta(1.0), 1)
    assert torch.allclose(acc.mean()["w"], torch.ones(2, 3))


@pytest.mark.parametrize(
    "bad, match",
    [
        ({"w": torch.zeros(2, 3)}, "missing"),
        ({"w": torch.zeros(2, 3), "b": torch.zeros(3), "x": torch.zeros(1)}, "unexpected"),
        ({"w": torch.zeros(3, 2), "b": torch.zeros(3)}, "shape"),
    ],
)
def test_bad_contributions_refused_and_nothing_folded(bad, match):
    acc = ShardMean("s", ["a"], SHAPES)
    with pytest.raises(AggregationError, match=match):
        acc.add("a", bad, 1)
    assert acc.contributors == [] and acc.total_weight == 0


def test_non_finite_contribution_makes_the_mean_refused():
    """Finiteness is checked once, on the finished sum (NaN and inf propagate through it)."""
    acc = ShardMean("s", ["a", "b"], SHAPES)
    acc.add("a", delta(1.0), 1)
    acc.add("b", {"w": torch.full((2, 3), float("nan")), "b": torch.zeros(3)}, 1)
    with pytest.raises(AggregationError, match=r"non-finite values in \['w'\]"):
        acc.mean()


def test_zero_weight_refused():
    with pytest.raises(AggregationError, match="weight"):
        ShardMean("s", ["a"], SHAPES).add("a", delta(1), 0)


def test_empty_mean_is_an_error():
    with pytest.raises(AggregationError, match="no contributions"):
        ShardMean("s", ["a"], SHAPES).mean()


def test_fedavg_applies_mean_delta():
    params = {"w": torch.ones(2, 3), "b": torch.zeros(3), "untouched": torch.ones(1)}
    out = FedAvg(server_lr=0.5).apply(params, {"w": torch.full((2, 3), 2.0)})
    assert set(out) == {"w"}
    assert torch.allclose(out["w"], torch.full((2, 3), 2.0))
    with pytest.raises(ValueError):
        FedAvg(0)
