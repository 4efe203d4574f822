import math

import numpy as np
import pytest
import torch
from scipy import ndimage
from scipy.spatial.distance import cdist

from lightning_fedseg.metrics import (
    BRATS_HD95_PENALTY,
    SliceAssembler,
    VolumeMetrics,
    dice_score,
    hd95,
    volume_scores,
)


def _cube(shape, corner, size):
    mask = torch.zeros(shape, dtype=torch.bool)
    mask[tuple(slice(c, c + s) for c, s in zip(corner, size, strict=True))] = True
    return mask


# ---------------------------------------------------------------- Dice


def test_dice_of_overlapping_cubes():
    pred = _cube((8, 8, 8), (1, 1, 1), (3, 3, 3))  # 27 voxels
    target = _cube((8, 8, 8), (1, 1, 2), (3, 3, 3))  # shifted by one: overlap 3*3*2 = 18
    assert dice_score(pred, target).item() == pytest.approx(2 * 18 / 54)


def test_dice_empty_conventions():
    empty = torch.zeros(4, 4, 4, dtype=torch.bool)
    full = torch.ones(4, 4, 4, dtype=torch.bool)
    assert dice_score(empty, empty).item() == 1.0
    assert dice_score(full, empty).item() == 0.0
    assert dice_score(empty, full).item() == 0.0


def test_dice_rejects_non_boolean_and_mismatched_masks():
    with pytest.raises(TypeError, match="boolean"):
        dice_score(torch.zeros(2, 2), torch.zeros(2, 2, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"same shape.*\(2, 2\).*\(2, 3\)"):
        dice_score(torch.zeros(2, 2, dtype=torch.bool), torch.zeros(2, 3, dtype=torch.bool))


# ---------------------------------------------------------------- HD95


@pytest.mark.parametrize("reduction", ["max", "union"])
def test_hd95_of_cubes_offset_by_two_voxels(reduction):
    # The layers of the 3x3x3 surface lie 2, 1 and 0 voxels from the other cube's surface:
    # 9 + 8 + 9 distances in each direction, so the 95th percentile is 2.
    pred = _cube((10, 10, 10), (2, 2, 2), (3, 3, 3))
    target = _cube((10, 10, 10), (2, 2, 4), (3, 3, 3))
    assert hd95(pred, target, reduction=reduction).item() == pytest.approx(2.0)
    assert hd95(target, pred, reduction=reduction).item() == pytest.approx(2.0)


def test_hd95_uses_voxel_spacing():
    pred = _cube((10, 10, 10), (2, 2, 2), (3, 3, 3))
    target = _cube((10, 10, 10), (2, 2, 4), (3, 3, 3))
    assert hd95(pred, target, spacing=(1.0, 1.0, 2.5)).item() == pytest.approx(5.0)


def test_hd95_max_and_union_differ_as_defined():
    # Target = the prediction's 9-cube plus a far 3-cube. Ground truth -> prediction has 386 zero
    # distances and 26 far ones (9 x 11 mm, 8 x 12, 9 x 13): 6.3% far, so its 95th percentile is
    # 11 (index 0.95 * 411 = 390.45 falls among the 11s). Pooled with the 386 zeros of the other
    # direction only 3.3% are far, so the union's 95th percentile is 0.
    pred = _cube((30, 12, 12), (0, 0, 0), (9, 9, 9))
    target = pred | _cube((30, 12, 12), (19, 3, 3), (3, 3, 3))
    assert hd95(pred, target, reduction="max").item() == pytest.approx(11.0)
    assert hd95(pred, target, reduction="union").item() == pytest.approx(0.0)


def _brute_force_hd95(pred, target, reduction):
    def surface_points(mask):
        eroded = ndimage.binary_erosion(mask, ndimage.generate_binary_structure(3, 1))
        return np.argwhere(mask & ~eroded)

    distances = cdist(surface_points(pred), surface_points(target))
    forward, backward = distances.min(axis=1), distances.min(axis=0)
    if reduction == "union":
        return np.percentile(np.concatenate([forward, backward]), 95)
    return max(np.percentile(forward, 95), np.percentile(backward, 95))


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("reduction", ["max", "union"])
def test_hd95_matches_brute_force_pairwise_surface_distances(seed, reduction):
    rng = np.random.default_rng(seed)
    pred = ndimage.binary_dilation(rng.random((12, 14, 10)) > 0.97, iterations=2)
    target = ndimage.binary_dilation(rng.random((12, 14, 10)) > 0.97, iterations=2)
    expected = _brute_force_hd95(pred, target, reduction)
    assert hd95(pred, target, reduction=reduction).item() == pytest.approx(expected, rel=1e-5)


def test_hd95_empty_conventions():
    empty = torch.zeros(5, 5, 5, dtype=torch.bool)
    blob = _cube((5, 5, 5), (1, 1, 1), (2, 2, 2))
    assert hd95(empty, empty).item() == 0.0
    assert hd95(blob, empty).item() == pytest.approx(373.1287, abs=1e-4)
    assert hd95(empty, blob).item() == pytest.approx(BRATS_HD95_PENALTY)
    assert pytest.approx(math.sqrt(240**2 + 240**2 + 155**2)) == BRATS_HD95_PENALTY
    assert hd95(empty, blob, empty_penalty=374.0).item() == 374.0


def test_hd95_rejects_bad_spacing_and_dtype():
    blob = _cube((5, 5, 5), (1, 1, 1), (2, 2, 2))
    with pytest.raises(ValueError, match="spacing"):
        hd95(blob, blob, spacing=(1.0, 1.0))
    with pytest.raises(TypeError, match="`pred` to be a boolean mask"):
        hd95(blob.float(), blob)


def test_volume_scores_per_region():
    pred = torch.stack([_cube((8, 8, 8), (2, 2, 2), (3, 3, 3)), torch.zeros(8, 8, 8, dtype=bool)])
    target = torch.stack([_cube((8, 8, 8), (2, 2, 4), (3, 3, 3)), _cube((8, 8, 8), (0, 0, 0), (1, 1, 1))])
    dice, distances = volume_scores(pred, target)
    assert dice.tolist() == pytest.approx([2 * 9 / 54, 0.0])
    assert distances.tolist() == pytest.approx([2.0, BRATS_HD95_PENALTY])
    assert volume_scores(pred, target, compute_hd95=False)[1] is None


# ---------------------------------------------------------------- VolumeMetrics


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


# ---------------------------------------------------------------- SliceAssembler


def _slice(case, z):
    """A [1, 2, 2] slice whose values encode its case and z."""
    return torch.full((1, 2, 2), float(case * 100 + z))


def test_assembler_with_interleaved_cases_and_odd_batch_boundaries():
    # Case 0 has 4 slices, case 1 has 5, case 2 has 1; slices arrive interleaved and out of
    # order, in batches of 3 that cut across cases.
    stream = [(1, 4), (0, 2), (1, 0), (0, 0), (2, 0), (1, 3), (0, 3), (1, 1), (0, 1), (1, 2)]
    num_slices = {0: 4, 1: 5, 2: 1}
    assembler = SliceAssembler()
    done = []
    for start in range(0, len(stream), 3):
        chunk = stream[start : start + 3]
        volumes = assembler.add(
            [f"case{c}" for c, _ in chunk],
            torch.tensor([z for _, z in chunk]),
            torch.tensor([num_slices[c] for c, _ in chunk]),
            pred=torch.stack([_slice(c, z) for c, z in chunk]),
            target=torch.stack([_slice(c, z) > 100 for c, z in chunk]),
        )
        done.extend((start, v) for v in volumes)
    assert [(start, v.case_id) for start, v in done] == [(3, "case2"), (6, "case0"), (9, "case1")]
    assert len(assembler) == 0 and assembler.pending == []
    for _, volume in done:
        case = int(volume.case_id[-1])
        z = list(range(num_slices[case]))
        assert volume.slice_index.tolist() == z
        assert volume.tensors["pred"].shape == (1, 2, 2, len(z))
        assert volume.tensors["pred"][0, 0, 0].tolist() == [case * 100 + i for i in z]
        assert volume.tensors["target"].dtype == torch.bool


def test_assembler_keeps_incomplete_cases_pending_and_resets():
    assembler = SliceAssembler()
    assert assembler.add(["a", "a"], [0, 2], [3, 3], pred=torch.zeros(2, 1, 2, 2)) == []
    assert assembler.pending == ["a"]
    assembler.reset()
    assert len(assembler) == 0


def test_assembler_rejects_inconsistent_input():
    assembler = SliceAssembler()
    assembler.add(["a"], [0], [2], pred=torch.zeros(1, 1, 2, 2))
    with pytest.raises(ValueError, match="Slice 0 of case 'a' arrived twice"):
        assembler.add(["a"], [0], [2], pred=torch.zeros(1, 1, 2, 2))
    with pytest.raises(ValueError, match="announced with 2 slices"):
        assembler.add(["a"], [1], [3], pred=torch.zeros(1, 1, 2, 2))
    with pytest.raises(ValueError, match=r"`pred` to have one entry per slice \(2\)"):
        assembler.add(["b", "b"], [0, 1], [2, 2], pred=torch.zeros(1, 1, 2, 2))
    with pytest.raises(ValueError, match="num_slices"):
        assembler.add(["c"], [0], [0], pred=torch.zeros(1, 1, 2, 2))


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
