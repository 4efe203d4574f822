"""Tests for z-scoring, centre cropping and slice policies, with hand-computed values."""

from __future__ import annotations

import numpy as np
import pytest

from lightning_fedseg.data.preprocess import (
    SlicePolicy,
    brain_mask,
    centre_crop,
    centre_crop_slices,
    preprocess_volume,
    resolve_crop_size,
    select_slices,
    zscore_brain,
)


def test_zscore_per_modality_over_brain_voxels() -> None:
    image = np.zeros((2, 2, 2, 1))
    # Channel 0 brain values 2, 4, 6 (mean 4, population std sqrt(8/3)); one background voxel.
    image[0, :, :, 0] = [[2, 4], [6, 0]]
    # Channel 1 brain values 10, 20 (mean 15, std 5).
    image[1, :, :, 0] = [[10, 0], [0, 20]]
    out = zscore_brain(image)
    assert out.dtype == np.float32
    s = np.sqrt(8 / 3)
    np.testing.assert_allclose(out[0, :, :, 0], [[-2 / s, 0], [2 / s, 0]], rtol=1e-6)
    np.testing.assert_allclose(out[1, :, :, 0], [[-1, 0], [0, 1]])


def test_zscore_constant_and_empty_channels() -> None:
    image = np.zeros((2, 3, 1, 1))
    image[0, :, 0, 0] = [5, 5, 0]  # constant brain: centred only
    out = zscore_brain(image)
    np.testing.assert_array_equal(out[0, :, 0, 0], [0, 0, 0])
    np.testing.assert_array_equal(out[1], 0)  # no brain at all


def test_brain_mask_is_any_modality() -> None:
    image = np.zeros((2, 1, 3, 1))
    image[0, 0, 0, 0] = 1
    image[1, 0, 2, 0] = -1
    assert brain_mask(image)[0, :, 0].tolist() == [True, False, True]


def test_centre_crop_slices() -> None:
    assert centre_crop_slices((240, 240), 128) == (slice(56, 184), slice(56, 184))
    assert centre_crop_slices((5, 6), 2) == (slice(1, 3), slice(2, 4))
    assert centre_crop_slices((7, 9), None) == (slice(0, 7), slice(0, 9))
    with pytest.raises(ValueError, match=r"Expected `crop_size` to be a positive integer, but got 0\."):
        centre_crop_slices((8, 8), 0)
    with pytest.raises(ValueError, match="`crop_size` to fit in the 8x6 plane, but got 7"):
        centre_crop_slices((8, 6), 7)


def test_resolve_crop_size() -> None:
    assert resolve_crop_size(None, (240, 240)) == 128
    assert resolve_crop_size(None, (48, 48)) is None
    assert resolve_crop_size(240, (240, 240)) == 240  # an explicit full-width crop keeps all


def test_centre_crop_keeps_leading_axes() -> None:
    volume = np.arange(2 * 4 * 4 * 3).reshape(2, 4, 4, 3)
    cropped, crop = centre_crop(volume, 2)
    assert crop == (slice(1, 3), slice(1, 3))
    np.testing.assert_array_equal(cropped, volume[:, 1:3, 1:3, :])


def test_select_slices_policies() -> None:
    brain = np.array([0, 1, 1, 1, 1, 1, 1, 0], bool)
    tumour = np.array([0, 0, 1, 1, 0, 0, 0, 0], bool)
    assert select_slices(SlicePolicy.ALL, brain).tolist() == list(range(8))
    assert select_slices("brain", brain).tolist() == [1, 2, 3, 4, 5, 6]
    balanced = select_slices("balanced", brain, tumour, seed=0, case_id="c").tolist()
    # Both tumour slices plus two of the four tumour-free brain slices 1, 4, 5, 6.
    assert len(balanced) == 4
    assert {2, 3} <= set(balanced)
    assert set(balanced) - {2, 3} <= {1, 4, 5, 6}
    assert balanced == sorted(balanced)
    assert balanced == select_slices("balanced", brain, tumour, seed=0, case_id="c").tolist()
    draws = {tuple(select_slices("balanced", brain, tumour, seed=s, case_id="c")) for s in range(20)}
    assert len(draws) > 1  # the seed matters


def test_select_slices_balanced_edge_cases() -> None:
    brain = np.array([1, 1, 1, 1], bool)
    # Three tumour slices but one tumour-free slice: 3 + 1.
    tumour = np.array([1, 1, 1, 0], bool)
    assert select_slices("balanced", brain, tumour).tolist() == [0, 1, 2, 3]
    assert select_slices("balanced", brain, np.zeros(4, bool)).tolist() == []
    with pytest.raises(ValueError, match="needs a segmentation"):
        select_slices("balanced", brain)
    with pytest.raises(ValueError, match="'sometimes' is not a valid SlicePolicy"):
        select_slices("sometimes", brain)


def test_preprocess_volume_normalizes_before_cropping() -> None:
    image = np.zeros((1, 4, 4, 2))
    image[0, 1:3, 1:3, 0] = 2.0  # inside the crop
    image[0, 0, 0, 1] = 6.0  # brain outside the crop (slice 1): it still counts in the mean
    labels = np.zeros((4, 4, 2), np.uint8)
    labels[1, 2, 0] = 4
    out = preprocess_volume(image, labels, crop_size=2)
    # Brain values 2, 2, 2, 2, 6: mean 2.8, std sqrt((4 * 0.64 + 10.24) / 5) = 1.6.
    np.testing.assert_allclose(out.image[0, :, :, 0], np.full((2, 2), -0.5))
    assert out.image.shape == (1, 2, 2, 2)
    assert out.crop == (slice(1, 3), slice(1, 3))
    assert out.full_shape == (4, 4, 2)
    assert out.brain_slices.tolist() == [True, False]  # slice 1's brain lies outside the crop
    assert out.labels is not None and out.labels.dtype == np.uint8
    assert out.labels[0, 1, 0] == 4
    assert out.tumour_slices is not None and out.tumour_slices.tolist() == [True, False]


def test_preprocess_volume_checks_shapes() -> None:
    with pytest.raises(ValueError, match=r"shape \[C, X, Y, Z\]"):
        preprocess_volume(np.zeros((4, 4, 2)))
    with pytest.raises(ValueError, match=r"labels of shape \(4, 4, 2\)"):
        preprocess_volume(np.zeros((1, 4, 4, 2)), np.zeros((4, 4, 3), np.uint8))
    assert preprocess_volume(np.ones((1, 4, 4, 2))).labels is None
