"""Rules on updates against values computed by hand (Sun et al. 2019; Karimireddy et al. 2021, 2022;
Pillutla et al. 2022; Allouah et al. 2023)."""

from __future__ import annotations

import math

import pytest
import torch

from lightning_fedseg.federation.modes import derive_seed
from lightning_fedseg.federation.preaggregation import Bucketing, NearestNeighborMixing, nearest_neighbor_mix
from lightning_fedseg.federation.robust import CoordinateMedian, Krum
from lightning_fedseg.federation.robust_updates import (
    CenteredClipping,
    GeometricMedian,
    NormBounding,
    centered_clip,
    geometric_median,
    stack_updates,
    states_from_updates,
)
from lightning_fedseg.federation.server import FedAvgStep

GLOBAL = {"w": torch.tensor([1.0, -1.0]), "bn.running_mean": torch.tensor([0.5]), "bn.n": torch.tensor(10)}


def _site(dw: tuple[float, float], dm: float, n: int) -> dict[str, torch.Tensor]:
    return {
        "w": GLOBAL["w"] + torch.tensor(dw),
        "bn.running_mean": GLOBAL["bn.running_mean"] + dm,
        "bn.n": torch.tensor(n),
    }


SITES = [
    _site((1.0, 0.0), 0.0, 12),
    _site((0.0, 2.0), 1.0, 14),
    _site((2.0, 2.0), -1.0, 11),
    _site((3.0, 4.0), 0.0, 20),
]
UPDATES = torch.tensor([[1.0, 0.0, 0.0], [0.0, 2.0, 1.0], [2.0, 2.0, -1.0], [3.0, 4.0, 0.0]], dtype=torch.float64)


def _mean_state():
    return states_from_updates(GLOBAL, UPDATES.mean(0, keepdim=True), [SITES])[0]


def test_updates_round_trip_and_integer_buffers():
    torch.testing.assert_close(stack_updates(GLOBAL, SITES), UPDATES)
    (back,) = states_from_updates(GLOBAL, UPDATES[1:2], [[SITES[1]]])
    assert all(torch.equal(back[k], SITES[1][k]) for k in GLOBAL)
    (median,) = states_from_updates(GLOBAL, UPDATES[:1], [SITES])
    assert median["bn.n"].item() == 12 and median["bn.n"].dtype == torch.int64  # lower median of 11, 12, 14, 20


def test_norm_bounding_by_hand():
    step = NormBounding(max_norm=2.0)
    out = step.step_from_sites(GLOBAL, SITES, [1, 1, 1, 100], round_idx=0)  # unweighted
    # norms 1, sqrt(5), 3, 5: factors 1, 2/sqrt(5), 2/3, 2/5
    factors = torch.tensor([1.0, 2 / math.sqrt(5), 2 / 3, 2 / 5], dtype=torch.float64)
    expected = states_from_updates(GLOBAL, (UPDATES * factors[:, None]).mean(0, keepdim=True), [SITES])[0]
    assert all(torch.allclose(out[k], expected[k]) for k in GLOBAL)
    metrics = step.metrics()  # the lower median of the norms
    assert metrics == {"norm_bounding/clipped_fraction": 0.75, "norm_bounding/median_norm": pytest.approx(math.sqrt(5))}
    unbounded = NormBounding(max_norm=math.inf).step_from_sites(GLOBAL, SITES, [1] * 4, round_idx=0)
    assert all(torch.allclose(unbounded[k], _mean_state()[k]) for k in GLOBAL)


def test_centered_clipping_with_an_infinite_radius_is_the_mean_and_keeps_its_centre():
    step = CenteredClipping(radius=math.inf)
    for round_idx in range(2):  # the second round starts from the first round's centre
        out = step.step_from_sites(GLOBAL, SITES, [1, 2, 3, 4], round_idx=round_idx)
        assert all(torch.allclose(out[k], _mean_state()[k]) for k in GLOBAL)
    torch.testing.assert_close(step.state_dict()["center"], UPDATES.mean(0))


def test_centered_clipping_by_hand_across_rounds():
    updates = torch.tensor([[1.0], [2.0], [100.0]], dtype=torch.float64)
    assert centered_clip(updates, torch.tensor([0.0]), radius=1.0).item() == pytest.approx(1.0)  # (1 + 1 + 1) / 3
    # two iterations: from 1, clip(0), clip(1), clip(99) to 1: 1 + 2 / 3
    assert centered_clip(updates, torch.tensor([0.0]), radius=1.0, iterations=2).item() == pytest.approx(5 / 3)
    step = CenteredClipping(radius=1.0)
    sites = [{"w": torch.tensor([v])} for v in (1.0, 2.0, 100.0)]
    step.step_from_sites({"w": torch.zeros(1)}, sites, [1, 1, 1], round_idx=0)  # centre 1
    out = step.step_from_sites({"w": torch.zeros(1)}, sites, [1, 1, 1], round_idx=1)  # 1 + (0 + 1 + 1) / 3
    assert out["w"].item() == pytest.approx(5 / 3)
    assert step.metrics()["centered_clipping/clipped_fraction"] == pytest.approx(1 / 3)
    resumed = CenteredClipping(radius=1.0)
    resumed.load_state_dict(step.state_dict())
    torch.testing.assert_close(resumed.center, step.center)
    assert CenteredClipping(radius=1.0).state_dict() == {}


def test_geometric_median_ignores_how_far_an_outlier_goes():
    # four corners of a square and an outlier on its diagonal: the median is (t, t) with t = 1 / sqrt(3)
    # (the unit vectors towards the five points sum to zero there), however far the outlier is
    corners = [[-1.0, -1.0], [-1.0, 1.0], [1.0, -1.0], [1.0, 1.0]]
    near, _ = geometric_median(torch.tensor([*corners, [3.0, 3.0]], dtype=torch.float64), tol=1e-10)
    far, iterations = geometric_median(torch.tensor([*corners, [1e6, 1e6]], dtype=torch.float64), tol=1e-10)
    t = 1 / math.sqrt(3)
    torch.testing.assert_close(near, torch.tensor([t, t], dtype=torch.float64), atol=1e-8, rtol=0)
    torch.testing.assert_close(far, near, atol=1e-8, rtol=0)  # the mean would move to 2e5
    assert 1 < iterations < 100
    square, _ = geometric_median(torch.tensor(corners, dtype=torch.float64))
    assert square.tolist() == [0.0, 0.0]


def test_geometric_median_step_weights_only_when_asked():
    sites = [{"w": torch.tensor([v])} for v in (0.0, 1.0, 10.0)]
    plain = GeometricMedian().step_from_sites({"w": torch.zeros(1)}, sites, [1, 1, 100], round_idx=0)
    weighted = GeometricMedian(weighted=True).step_from_sites({"w": torch.zeros(1)}, sites, [1, 1, 100], round_idx=0)
    assert plain["w"].item() == pytest.approx(1.0, abs=1e-4) and weighted["w"].item() == pytest.approx(10.0, abs=1e-4)


def test_bucketing_with_buckets_of_one_and_the_mean_inside_is_the_mean():
    out = Bucketing(FedAvgStep(), bucket_size=1, seed=3).step_from_sites(GLOBAL, SITES, [5, 1, 1, 1], round_idx=2)
    assert all(torch.allclose(out[k], _mean_state()[k]) for k in ("w", "bn.running_mean"))


def test_bucketing_by_hand():
    sites = [{"w": torch.tensor([v])} for v in (1.0, 2.0, 3.0, 4.0, 5.0, 6.0)]
    whole = Bucketing(CoordinateMedian(), bucket_size=6).step_from_sites(sites[0], sites, [1] * 6, round_idx=0)
    assert whole["w"].item() == pytest.approx(3.5)  # one bucket: its mean
    out = Bucketing(CoordinateMedian(), bucket_size=2, seed=1).step_from_sites(sites[0], sites, [1] * 6, round_idx=4)
    order = torch.randperm(6, generator=torch.Generator().manual_seed(derive_seed(1, 4, 26))).tolist()
    means = sorted((order[i] + order[i + 1]) / 2 + 1 for i in (0, 2, 4))
    assert out["w"].item() == pytest.approx(means[1])  # the median of the three bucket means
    again = Bucketing(CoordinateMedian(), bucket_size=2, seed=1).step_from_sites(sites[0], sites, [1] * 6, round_idx=4)
    assert torch.equal(again["w"], out["w"])  # the order is a function of (seed, round)
    with pytest.raises(ValueError, match=r"needs more than 2 \* 1 \+ 2 = 4 sites, but got 3"):
        Bucketing(Krum(num_byzantine=1), bucket_size=2).setup_federation(6, 1.0, 6)  # 3 buckets


def test_nearest_neighbor_mixing_by_hand():
    mixed = nearest_neighbor_mix(torch.tensor([[0.0], [1.0], [10.0], [11.0], [30.0]]), num_byzantine=2)
    assert mixed.squeeze(1).tolist() == pytest.approx([11 / 3, 11 / 3, 22 / 3, 22 / 3, 17.0])  # the 3 nearest of each
    sites = [{"w": torch.tensor([v])} for v in (0.0, 1.0, 10.0, 11.0, 30.0)]
    out = NearestNeighborMixing(CoordinateMedian(), 2).step_from_sites(sites[0], sites, [1] * 5, round_idx=0)
    assert out["w"].item() == pytest.approx(22 / 3)
    with pytest.raises(ValueError, match=r"`num_byzantine`=2 needs more than 2 \* 2 = 4 sites per round, but got 4"):
        NearestNeighborMixing(FedAvgStep(), 2).setup_federation(4, 1.0, 4)


def test_steps_need_site_states_check_them_and_leave_them_alone():
    copies = [{k: v.clone() for k, v in s.items()} for s in SITES]
    for step in (NormBounding(1.0), CenteredClipping(1.0), GeometricMedian(), Bucketing(FedAvgStep()),
                 NearestNeighborMixing(FedAvgStep(), 1)):  # fmt: skip
        assert step.needs_site_states
        with pytest.raises(TypeError, match="step_from_sites"):
            step.step(GLOBAL, GLOBAL, round_idx=0)
        with pytest.raises(ValueError, match="positive and finite"):
            step.step_from_sites(GLOBAL, SITES, [1, 0, 1, 1], round_idx=0)
        out = step.step_from_sites(GLOBAL, SITES, [1] * 4, round_idx=0)
        assert out.keys() == GLOBAL.keys() and out["bn.n"].dtype == torch.int64
    assert all(torch.equal(s[k], c[k]) for s, c in zip(SITES, copies, strict=True) for k in s)


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda: NormBounding(max_norm=0.0), "`max_norm`"),
        (lambda: CenteredClipping(radius=-1.0), "`radius`"),
        (lambda: CenteredClipping(radius=1.0, iterations=0), "`iterations`"),
        (lambda: GeometricMedian(max_iterations=0), "`max_iterations`"),
        (lambda: Bucketing(FedAvgStep(), bucket_size=0), "`bucket_size`"),
        (lambda: Bucketing("mean"), "`inner`"),
        (lambda: NearestNeighborMixing(FedAvgStep(), num_byzantine=-1), "`num_byzantine`"),
    ],
)
def test_arguments_are_checked(make, match):
    with pytest.raises((ValueError, TypeError), match=match):
        make()
