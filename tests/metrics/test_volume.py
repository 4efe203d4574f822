"""Tests for VolumeMetrics: sums, counts, a distributed-style merge and per-volume spacing."""

import math

import pytest
import torch

from lightning_fedseg.metrics import BRATS_HD95_PENALTY, VolumeMetrics


def _cube(shape, corner, size):
    mask = torch.zeros(shape, dtype=torch.bool)
    mask[tuple(slice(c, c + s) for c, s in zip(corner, size, strict=True))] = True
    return mask


def _volumes():
    """Two 3-region volumes with hand-known per-region Dice and HD95."""
    shape = (8, 8, 8)
    cube = _cube(shape, (2, 2, 2), (3, 3, 3))
    moved = _cube(shape, (2, 2, 4), (3, 3, 3))
    empty = torch.zeros(shape, dtype=torch.bool)
    # volume 1: WT offset (Dice 1/3, HD95 2), TC perfect (1, 0), ET both empty (1, 0)
    first = (torch.stack([cube, cube, empty]), torch.stack([moved, cube, empty]))
    # volume 2: WT perfect (1, 0), TC missed (0, penalty), ET perfect (1, 0)
    second = (torch.stack([cube, empty, cube]), torch.stack([cube, cube, cube]))
    return first, second


def test_volume_metrics_sum_and_count():
    metric = VolumeMetrics(["wt", "tc", "et"])
    for pred, target in _volumes():
        metric.update(pred, target)
    assert metric.volumes.item() == 2
    assert metric.dice_sum.tolist() == pytest.approx([1 / 3 + 1, 1 + 0, 1 + 1])
    assert metric.hd95_sum.tolist() == pytest.approx([2 + 0, 0 + BRATS_HD95_PENALTY, 0 + 0])
    values = metric.compute()
    assert values["dice_wt"].item() == pytest.approx(2 / 3)
    assert values["dice_tc"].item() == pytest.approx(0.5)
    assert values["dice_et"].item() == pytest.approx(1.0)
    assert values["dice"].item() == pytest.approx((2 / 3 + 0.5 + 1.0) / 3)
    assert values["hd95_wt"].item() == pytest.approx(1.0)
    assert values["hd95_tc"].item() == pytest.approx(BRATS_HD95_PENALTY / 2)
    assert values["volumes"].item() == 2
    metric.reset()
    assert metric.volumes.item() == 0


def test_volume_metrics_merge_sums_like_a_distributed_sync():
    # torchmetrics reduces each state with its dist_reduce_fx on sync and on merge_state.
    (pred1, target1), (pred2, target2) = _volumes()
    rank0, rank1, pooled = (VolumeMetrics(["wt", "tc", "et"]) for _ in range(3))
    rank0.update(pred1, target1)
    rank1.update(pred2, target2)
    pooled.update(pred1, target1)
    pooled.update(pred2, target2)
    rank0.merge_state(rank1)
    merged, expected = rank0.compute(), pooled.compute()
    assert merged.keys() == expected.keys()
    for key in expected:
        assert merged[key].item() == pytest.approx(expected[key].item())


def test_volume_metrics_without_hd95_and_before_update():
    metric = VolumeMetrics(["wt"], compute_hd95=False)
    with pytest.warns(UserWarning, match="before the ``update``"):
        values = metric.compute()
    assert set(values) == {"dice", "dice_wt", "volumes"}
    assert values["volumes"].item() == 0 and math.isnan(values["dice"].item())


def test_volume_metrics_checks_region_channels():
    metric = VolumeMetrics(["wt", "tc", "et"])
    with pytest.raises(ValueError, match="Expected 3 region channels"):
        metric.update(torch.zeros(1, 4, 4, 4, dtype=bool), torch.zeros(1, 4, 4, 4, dtype=bool))
    with pytest.raises(ValueError, match="regions"):
        VolumeMetrics([])


def test_volume_metrics_take_each_volumes_spacing_in_mm():
    pred = torch.zeros(1, 8, 8, 8, dtype=torch.bool)
    target = torch.zeros(1, 8, 8, 8, dtype=torch.bool)
    pred[0, 2:5, 2:5, 2:5] = True
    target[0, 2:5, 2:5, 4:7] = True  # moved by 2 voxels along z
    metric = VolumeMetrics(["wt"])
    metric.update(pred, target, spacing=(1.0, 1.0, 2.5))  # 5 mm
    metric.update(pred, target)  # the metric's default spacing, 1 mm: 2 mm
    metric.update(pred, torch.zeros_like(target), spacing=(0.5, 0.5, 0.5))  # the penalty is in mm already
    assert metric.compute()["hd95_wt"].item() == pytest.approx((5.0 + 2.0 + BRATS_HD95_PENALTY) / 3, abs=1e-4)
