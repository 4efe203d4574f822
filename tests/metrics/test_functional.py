"""Tests for the functional BraTS metrics against hand-computed and brute-force values."""

import math

import numpy as np
import pytest
import torch
from scipy import ndimage
from scipy.spatial.distance import cdist

from lightning_fedseg.metrics.functional import BRATS_HD95_PENALTY, dice_score, hd95, volume_scores


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
