"""Aggregation against averages computed by hand."""

from __future__ import annotations

import pytest
import torch

from lightning_fedseg.federation.aggregate import (
    IncompatibleStateError,
    NonFiniteStateError,
    WeightedMean,
    finalize_mean,
    weighted_average,
)


def test_unequal_weights_by_hand():
    a = {"w": torch.tensor([1.0, 2.0]), "b": torch.tensor(0.5)}
    b = {"w": torch.tensor([4.0, -1.0]), "b": torch.tensor(2.0)}
    c = {"w": torch.tensor([0.0, 0.0]), "b": torch.tensor(-1.0)}
    out = weighted_average([(a, 70), (b, 27), (c, 3)])
    assert out["w"].tolist() == pytest.approx([(1 * 70 + 4 * 27 + 0 * 3) / 100, (2 * 70 - 1 * 27) / 100])
    assert out["b"].item() == pytest.approx((0.5 * 70 + 2.0 * 27 - 1.0 * 3) / 100)
    assert out["w"].dtype == torch.float32


def test_integer_buffers_stay_integers():
    a = {"num_batches_tracked": torch.tensor(3), "running_mean": torch.tensor([0.0])}
    b = {"num_batches_tracked": torch.tensor(10), "running_mean": torch.tensor([1.0])}
    mean = weighted_average([(a, 1), (b, 2)])
    assert mean["num_batches_tracked"].dtype == torch.int64
    assert mean["num_batches_tracked"].item() == round((3 * 1 + 10 * 2) / 3)  # 7.67 -> 8
    assert mean["running_mean"].item() == pytest.approx(2 / 3)
    biggest = weighted_average([(a, 1), (b, 2)], integer_policy="max")
    assert biggest["num_batches_tracked"].item() == 10


def test_half_precision_is_accumulated_in_float64():
    a = {"w": torch.tensor([1000.0], dtype=torch.float16)}
    b = {"w": torch.tensor([1001.0], dtype=torch.float16)}
    out = weighted_average([(a, 1), (b, 1)])
    assert out["w"].dtype == torch.float16 and out["w"].item() == 1000.5


def test_identical_states_average_to_themselves_exactly():
    torch.manual_seed(0)
    s = {"w": torch.randn(100)}
    assert torch.equal(weighted_average([(s, 3), (s, 5), (s, 11)])["w"], s["w"])


def test_mismatched_keys_shapes_dtypes_are_refused_naming_the_site():
    acc = WeightedMean()
    acc.add({"w": torch.zeros(2)}, 1, "a")
    with pytest.raises(IncompatibleStateError, match=r"Site 'b'.*missing: \['w'\].*unexpected: \['v'\]"):
        acc.add({"v": torch.zeros(2)}, 1, "b")
    with pytest.raises(IncompatibleStateError, match=r"Site 'c': `w` has shape \(3,\)"):
        acc.add({"w": torch.zeros(3)}, 1, "c")
    with pytest.raises(IncompatibleStateError, match=r"Site 'd': `w` has dtype torch.float64"):
        acc.add({"w": torch.zeros(2, dtype=torch.float64)}, 1, "d")
    assert acc.sites == ["a"]


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_values_are_refused_naming_site_and_tensor(bad):
    with pytest.raises(NonFiniteStateError, match=r"Site 'x'.*`layer.weight`"):
        WeightedMean().add({"layer.weight": torch.tensor([0.0, bad])}, 1, "x")


@pytest.mark.parametrize("weight", [0, -1, float("nan"), float("inf")])
def test_weights_must_be_positive_and_finite(weight):
    with pytest.raises(ValueError, match="weight of site 'a'"):
        WeightedMean().add({"w": torch.zeros(1)}, weight, "a")


def test_memory_does_not_grow_with_sites():
    acc = WeightedMean()
    for i in range(50):
        acc.add({"w": torch.full((1000,), float(i))}, 1, f"s{i}")
    sums, total = acc.sums()
    assert len(sums) == 1 and sums["w"].numel() == 1000 and total == 50
    assert acc.compute()["w"][0].item() == pytest.approx(24.5)


def test_zero_sites_cannot_be_averaged():
    with pytest.raises(ValueError, match="zero sites"):
        WeightedMean().compute()


def test_finalize_mean_over_flat_views_equals_tensor_by_tensor():
    """The one-pass division over the accumulator's flat views gives, bit for bit, the per-tensor
    division of the same sums held apart; every dtype keeps its own group."""
    gen = torch.Generator().manual_seed(0)
    reference = {
        "conv.weight": torch.empty(4, 3, 3, 3),
        "bn.running_mean": torch.empty(4),
        "half": torch.empty(5, dtype=torch.float16),
        "bn.num_batches_tracked": torch.empty((), dtype=torch.int64),
        "fc.bias": torch.empty(2),
    }
    acc = WeightedMean()
    for weight in (3.0, 7.0, 1.0):
        state = {
            k: (torch.randn(v.shape, generator=gen) * 10).to(v.dtype) if v.is_floating_point() else torch.tensor(4)
            for k, v in reference.items()
        }
        acc.add(state, weight, site=str(weight))
    sums, total = acc.sums()
    from lightning_fedseg.federation.flat import flat_span

    assert flat_span([sums[k] for k in ("conv.weight", "bn.running_mean", "fc.bias")]) is not None  # one pass
    apart = {k: v.clone() for k, v in sums.items()}  # separate storages: the per-tensor path
    flat, each = finalize_mean(sums, total, reference), finalize_mean(apart, total, reference)
    assert list(flat) == list(reference)
    for key, ref in reference.items():
        assert flat[key].dtype == ref.dtype and flat[key].shape == ref.shape
        assert torch.equal(flat[key], each[key]), key
        if ref.is_floating_point():
            assert torch.equal(flat[key], (apart[key] / total).to(ref.dtype)), key
    assert flat["bn.num_batches_tracked"].item() == 4
