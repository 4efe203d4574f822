"""Robust aggregation against values computed by hand (Yin et al. 2018; Blanchard et al. 2017)."""

from __future__ import annotations

import pytest
import torch

from lightning_fedseg.federation.aggregate import IncompatibleStateError, NonFiniteStateError
from lightning_fedseg.federation.robust import (
    CoordinateMedian,
    Krum,
    TrimmedMean,
    coordinate_median,
    krum,
    krum_scores,
    krum_select,
    robust_memory_bytes,
    trimmed_mean,
)


def _site(w: list[float], tracked: int, mean: float = 0.0) -> dict[str, torch.Tensor]:
    return {
        "w": torch.tensor(w),
        "bn.running_mean": torch.tensor([mean]),
        "bn.num_batches_tracked": torch.tensor(tracked),
    }


def test_trimmed_mean_drops_an_outlier_site():
    sites = [
        _site([1.0, 10.0], 1),
        _site([2.0, 20.0], 2),
        _site([3.0, 30.0], 3),
        _site([4.0, 40.0], 4),
        _site([1000.0, -1000.0], 100),
    ]
    out = trimmed_mean(sites, beta=0.2)  # floor(0.2 * 5) = 1 dropped at each end
    assert out["w"].tolist() == [3.0, 20.0]  # (2 + 3 + 4) / 3 and (10 + 20 + 30) / 3; the plain mean is [202, -180]
    assert out["bn.num_batches_tracked"].item() == 3
    assert out["bn.num_batches_tracked"].dtype == torch.int64
    assert out["w"].dtype == torch.float32
    assert trimmed_mean(sites, beta=0.0)["w"].tolist() == pytest.approx([202.0, -180.0])
    assert trimmed_mean(sites, beta=0.4)["w"].tolist() == [3.0, 20.0]  # two dropped at each end: the median
    assert trimmed_mean(sites, beta=0.19)["w"].tolist() == pytest.approx([202.0, -180.0])  # floor(0.95) = 0


def test_median_with_an_even_number_of_sites():
    sites = [_site([1.0, -1.0], 1, mean=0.5), _site([5.0, 0.0], 4), _site([2.0, 7.0], 2), _site([100.0, 3.0], 8)]
    out = coordinate_median(sites)
    assert out["w"].tolist() == [3.5, 1.5]  # sorted [1, 2, 5, 100] and [-1, 0, 3, 7]
    assert out["bn.running_mean"].item() == 0.0  # [0, 0, 0, 0.5]
    assert out["bn.num_batches_tracked"].item() == 2  # lower median of [1, 2, 4, 8]
    odd = coordinate_median(sites[:3])
    assert odd["w"].tolist() == [2.0, 0.0]
    half = coordinate_median([{"w": torch.tensor([60000.0]).half()}, {"w": torch.tensor([65000.0]).half()}])
    assert half["w"].dtype == torch.float16 and torch.isfinite(half["w"]).all()  # no float16 overflow in (a + b) / 2


def _krum_sites() -> list[dict[str, torch.Tensor]]:
    # points (w, running_mean): a=(0, 0), b=(1, 0), c=(0, 2), d=(1, 1) and a far outlier e=(100, 100)
    points = [(0.0, 0.0), (1.0, 0.0), (0.0, 2.0), (1.0, 1.0), (100.0, 100.0)]
    return [_site([x], tracked=i, mean=y) for i, (x, y) in enumerate(points)]


def test_krum_picks_the_right_site_among_five():
    sites = _krum_sites()
    # f = 1: n - f - 2 = 2 nearest neighbours. Squared distances: ab 1, ac 4, ad 2, bc 5, bd 1, cd 2;
    # e's nearest are d (99^2 + 99^2 = 19602) and c (100^2 + 98^2 = 19604)
    assert krum_scores(sites, num_byzantine=1).tolist() == [1 + 2, 1 + 1, 2 + 4, 1 + 2, 19602 + 19604]
    assert krum_select(sites, num_byzantine=1) == [1]
    out = krum(sites, num_byzantine=1)
    assert out["w"].item() == 1.0 and out["bn.running_mean"].item() == 0.0
    assert out["bn.num_batches_tracked"].item() == 1  # the selected site's


def test_multi_krum_averages_the_best():
    sites = _krum_sites()
    assert krum_select(sites, num_byzantine=1, multi=3) == [1, 0, 3]  # a and d tie at 3: lower index first
    step = Krum(num_byzantine=1, multi=3)
    out = step.step_from_sites(sites[0], sites, [1, 1, 1, 1, 1000], round_idx=0)  # weights are not trusted
    assert out["w"].item() == pytest.approx(2 / 3)  # (1 + 0 + 1) / 3
    assert out["bn.running_mean"].item() == pytest.approx(1 / 3)  # (0 + 0 + 1) / 3
    assert out["bn.num_batches_tracked"].item() == 1  # best-scored site's
    assert step.last_selected == [1, 0, 3]
    assert step.state_dict() == {}


def test_steps_need_site_states_and_leave_inputs_alone():
    sites = _krum_sites()
    copies = [{k: v.clone() for k, v in s.items()} for s in sites]
    for step in (CoordinateMedian(), TrimmedMean(0.2), Krum(1)):
        assert step.needs_site_states
        with pytest.raises(TypeError, match="step_from_sites"):
            step.step(sites[0], sites[0], round_idx=0)
        out = step.step_from_sites(sites[0], sites, [1] * 5, round_idx=0)
        assert set(out) == set(sites[0])
        assert out["w"].item() < 2.0  # the outlier at 100 has no pull
    for site, copy in zip(sites, copies, strict=True):
        assert all(torch.equal(site[k], copy[k]) for k in site)


def test_krum_needs_more_than_2f_plus_2_sites():
    sites = _krum_sites()
    with pytest.raises(ValueError, match=r"needs more than 2 \* 1 \+ 2 = 4 sites, but got 4\."):
        krum(sites[:4], num_byzantine=1)
    with pytest.raises(ValueError, match="but got 5"):
        Krum(num_byzantine=2).step_from_sites(sites[0], sites, [1] * 5, round_idx=0)
    with pytest.raises(ValueError, match="`multi` to be at most"):
        krum(sites, num_byzantine=1, multi=5)
    with pytest.raises(ValueError, match=r"Expected `num_byzantine` to be a non-negative integer, but got -1\."):
        Krum(num_byzantine=-1)
    with pytest.raises(ValueError, match=r"Expected `multi` to be a positive integer, but got 0\."):
        Krum(multi=0)


@pytest.mark.parametrize("beta", [0.5, -0.1, 0.7])
def test_trimmed_mean_beta_must_be_below_one_half(beta):
    with pytest.raises(ValueError, match=r"Expected `beta` to be in \[0, 0.5\)"):
        TrimmedMean(beta)
    with pytest.raises(ValueError, match="`beta`"):
        trimmed_mean([_site([1.0], 1)], beta)


def test_site_state_checks():
    sites = _krum_sites()
    with pytest.raises(ValueError, match="zero sites"):
        coordinate_median([])
    bad = dict(sites[2], w=torch.tensor([1.0, 2.0]))
    with pytest.raises(IncompatibleStateError, match="'#2'"):
        CoordinateMedian().step_from_sites(sites[0], [sites[0], sites[1], bad], [1, 1, 1], round_idx=0)
    with pytest.raises(NonFiniteStateError, match="`w`"):
        trimmed_mean([sites[0], dict(sites[1], w=torch.tensor([float("nan")]))], beta=0.0)
    with pytest.raises(ValueError, match="one weight per site"):
        TrimmedMean(0.1).step_from_sites(sites[0], sites, [1, 1], round_idx=0)
    with pytest.raises(ValueError, match="positive and finite"):
        TrimmedMean(0.1).step_from_sites(sites[0], sites, [1, 1, 0, 1, 1], round_idx=0)


def test_memory_estimate():
    state = {"w": torch.zeros(10, 10), "n": torch.tensor(1)}  # 400 + 8 bytes
    s = 408
    median = robust_memory_bytes(state, num_sites=3)
    assert median == 3 * s + s + 3 * 100 * (2 * 4 + 8) + 8 * 100
    assert robust_memory_bytes(state, num_sites=3, method="krum") == 4 * s + 2 * 8 * 3 * 100 + 8 * 9
    assert robust_memory_bytes(state, num_sites=6) - median == 3 * s + 3 * 100 * (2 * 4 + 8)
    with pytest.raises(ValueError):
        robust_memory_bytes(state, num_sites=2, method="mode")
