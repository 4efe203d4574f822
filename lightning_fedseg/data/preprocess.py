"""Volume preprocessing as pure numpy: z-score normalization, centre crop, slice selection.

Volumes follow the package convention: images are channel-first ``[C, X, Y, Z]``, label maps
``[X, Y, Z]``, and an axial slice is ``volume[..., z]``. The paper's code z-scores each
modality over the brain, crops 240x240 to the central 128x128 and keeps every slice.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

import numpy as np
import numpy.typing as npt

from lightning_fedseg._validation import check_int

__all__ = [
    "BRATS_CROP_SIZE",
    "BRATS_WIDTH",
    "PreprocessedVolume",
    "SlicePolicy",
    "brain_mask",
    "centre_crop",
    "centre_crop_slices",
    "preprocess_volume",
    "resolve_crop_size",
    "select_slices",
    "zscore_brain",
]

BRATS_WIDTH = 240
"""In-plane width of BraTS volumes (240x240x155)."""

BRATS_CROP_SIZE = 128
"""The paper's centre crop for 240x240 BraTS slices."""


class SlicePolicy(StrEnum):
    """Which axial slices of a case a training epoch visits.

    ``all`` keeps every slice (the paper's code); ``brain`` keeps slices holding any brain
    voxel; ``balanced`` keeps every tumour slice plus as many tumour-free brain slices, drawn
    at random (seeded per case).
    """

    ALL = "all"
    BRAIN = "brain"
    BALANCED = "balanced"


def brain_mask(image: npt.NDArray[np.floating]) -> npt.NDArray[np.bool_]:
    """Voxels where any modality is non-zero (BraTS images are skull-stripped, background 0).

    Args:
        image: ``[C, X, Y, Z]``.

    Returns:
        Boolean ``[X, Y, Z]``.

    Example:
        >>> brain_mask(np.array([[[[0.0, 1.0]]], [[[0.0, 0.0]]]])).tolist()
        [[[False, True]]]
    """
    return np.any(image != 0, axis=0)


def zscore_brain(image: npt.NDArray[np.floating]) -> npt.NDArray[np.float32]:
    """Z-score each modality over its brain (non-zero) voxels; background stays 0.

    Mean and (population) standard deviation are taken per channel over that channel's
    non-zero voxels, in float64. A channel whose brain is constant is only centred; a channel
    without brain voxels stays all zero.

    Args:
        image: ``[C, ...]`` any float or integer array.

    Returns:
        float32 array of the same shape.

    Example:
        >>> zscore_brain(np.array([[0.0, 1.0, 3.0]])).tolist()
        [[0.0, -1.0, 1.0]]
    """
    out = np.zeros(image.shape, dtype=np.float32)
    for c in range(image.shape[0]):
        channel = image[c]
        mask = channel != 0
        if not mask.any():
            continue
        values = channel[mask].astype(np.float64)
        mean = values.mean()
        std = values.std()
        out[c][mask] = ((values - mean) / (std if std > 0 else 1.0)).astype(np.float32)
    return out


def resolve_crop_size(crop_size: int | None, shape_xy: tuple[int, int]) -> int | None:
    """The crop to apply: ``None`` means the paper's 128 for 240-wide volumes, else no crop.

    Example:
        >>> resolve_crop_size(None, (240, 240)), resolve_crop_size(None, (48, 48))
        (128, None)
        >>> resolve_crop_size(32, (48, 48))
        32
    """
    if crop_size is not None:
        return crop_size
    return BRATS_CROP_SIZE if tuple(shape_xy) == (BRATS_WIDTH, BRATS_WIDTH) else None


def centre_crop_slices(shape_xy: tuple[int, int], crop_size: int | None) -> tuple[slice, slice]:
    """The X and Y slices of a centred ``crop_size`` square (the whole plane when ``None``).

    An odd margin leaves the extra voxel after the crop: 5 wide, crop 2 keeps ``1:3``.

    Raises:
        ValueError: ``crop_size`` is not positive or exceeds the plane.

    Example:
        >>> centre_crop_slices((240, 240), 128)
        (slice(56, 184, None), slice(56, 184, None))
        >>> centre_crop_slices((5, 4), 2)
        (slice(1, 3, None), slice(1, 3, None))
    """
    x, y = (int(s) for s in shape_xy)
    if crop_size is None:
        return slice(0, x), slice(0, y)
    check_int("crop_size", crop_size)
    if crop_size > x or crop_size > y:
        raise ValueError(
            f"Expected `crop_size` to fit in the {x}x{y} plane, but got {crop_size}. "
            "HINT: pass a smaller `crop_size`, or leave it unset to keep the whole plane."
        )
    sx, sy = (x - crop_size) // 2, (y - crop_size) // 2
    return slice(sx, sx + crop_size), slice(sy, sy + crop_size)


def centre_crop(volume: npt.NDArray[Any], crop_size: int | None) -> tuple[npt.NDArray[Any], tuple[slice, slice]]:
    """Crop the X and Y axes (the last three axes are X, Y, Z) around the centre.

    Returns:
        The cropped view and the X, Y slices taken.

    Example:
        >>> cropped, crop = centre_crop(np.arange(16).reshape(4, 4, 1), 2)
        >>> cropped[..., 0].tolist(), crop
        ([[5, 6], [9, 10]], (slice(1, 3, None), slice(1, 3, None)))
    """
    crop = centre_crop_slices((volume.shape[-3], volume.shape[-2]), crop_size)
    return volume[..., crop[0], crop[1], :], crop


def _case_rng(seed: int, case_id: str) -> np.random.Generator:
    return np.random.default_rng([seed, zlib.crc32(case_id.encode())])


def select_slices(
    policy: SlicePolicy | str,
    brain_slices: npt.NDArray[np.bool_],
    tumour_slices: npt.NDArray[np.bool_] | None = None,
    seed: int = 0,
    case_id: str = "",
) -> npt.NDArray[np.int64]:
    """The z indices a training epoch visits, ascending.

    Args:
        policy: ``all``, ``brain`` or ``balanced`` (see :class:`SlicePolicy`).
        brain_slices: per z, whether the slice holds brain voxels.
        tumour_slices: per z, whether the slice holds tumour (needed for ``balanced``).
        seed: the random seed of ``balanced``.
        case_id: mixed into the seed, so cases draw different tumour-free slices.

    Returns:
        int64 z indices. ``balanced`` gives nothing for a case without tumour.

    Example:
        >>> brain = np.array([0, 1, 1, 1, 1, 0], bool)
        >>> tumour = np.array([0, 0, 1, 0, 0, 0], bool)
        >>> select_slices("all", brain).tolist(), select_slices("brain", brain).tolist()
        ([0, 1, 2, 3, 4, 5], [1, 2, 3, 4])
        >>> len(select_slices("balanced", brain, tumour))
        2
    """
    policy = SlicePolicy(policy)
    brain_slices = np.asarray(brain_slices, dtype=bool)
    if policy is SlicePolicy.ALL:
        return np.arange(brain_slices.shape[0], dtype=np.int64)
    if policy is SlicePolicy.BRAIN:
        return np.flatnonzero(brain_slices).astype(np.int64)
    if tumour_slices is None:
        raise ValueError("The `balanced` slice policy needs a segmentation, but got none.")
    tumour = np.asarray(tumour_slices, dtype=bool)
    if tumour.shape != brain_slices.shape:
        raise ValueError(
            f"Expected per-slice flags of equal length, but got {brain_slices.shape[0]} brain "
            f"and {tumour.shape[0]} tumour flags."
        )
    with_tumour = np.flatnonzero(tumour)
    without = np.flatnonzero(brain_slices & ~tumour)
    count = min(len(with_tumour), len(without))
    drawn = _case_rng(seed, case_id).choice(without, size=count, replace=False)
    return np.sort(np.concatenate([with_tumour, drawn])).astype(np.int64)


@dataclass
class PreprocessedVolume:
    """One case after preprocessing.

    Attributes:
        image: float32 ``[C, x, y, Z]``, z-scored over the brain and centre-cropped.
        labels: uint8 label map ``[x, y, Z]`` cropped the same way, or ``None``.
        crop: the X and Y slices taken from the original plane.
        full_shape: ``(X, Y, Z)`` before cropping.
        brain_slices: per z, whether the cropped slice holds brain voxels.
        tumour_slices: per z, whether the cropped slice holds a non-zero label.
    """

    image: npt.NDArray[np.float32]
    labels: npt.NDArray[np.uint8] | None
    crop: tuple[slice, slice]
    full_shape: tuple[int, int, int]
    brain_slices: npt.NDArray[np.bool_]
    tumour_slices: npt.NDArray[np.bool_] | None


def preprocess_volume(
    image: npt.NDArray[np.floating],
    labels: npt.NDArray[np.integer] | None = None,
    crop_size: int | None = None,
) -> PreprocessedVolume:
    """Normalize over the whole brain, then centre-crop image and labels.

    Args:
        image: ``[C, X, Y, Z]``.
        labels: ``[X, Y, Z]`` integer label map with values in 0..255, or ``None``.
        crop_size: the square crop, resolved with :func:`resolve_crop_size`.

    Returns:
        The preprocessed arrays and per-slice flags.

    Example:
        >>> image = np.zeros((1, 4, 4, 2)); image[0, 1:3, 1:3, 0] = [[1, 3], [1, 3]]
        >>> out = preprocess_volume(image, np.zeros((4, 4, 2), np.uint8), 2)
        >>> out.image[0, ..., 0].tolist(), out.brain_slices.tolist()
        ([[-1.0, 1.0], [-1.0, 1.0]], [True, False])
    """
    if image.ndim != 4:
        raise ValueError(f"Expected an image of shape [C, X, Y, Z], but got {image.shape}.")
    full_shape = (int(image.shape[1]), int(image.shape[2]), int(image.shape[3]))
    if labels is not None and tuple(labels.shape) != full_shape:
        raise ValueError(f"Expected labels of shape {full_shape}, but got {labels.shape}.")
    size = resolve_crop_size(crop_size, (full_shape[0], full_shape[1]))
    normalized, crop = centre_crop(zscore_brain(image), size)
    cropped_image = np.ascontiguousarray(normalized)
    brain = np.asarray(centre_crop(brain_mask(image), size)[0].any(axis=(0, 1)))
    cropped_labels: npt.NDArray[np.uint8] | None = None
    tumour: npt.NDArray[np.bool_] | None = None
    if labels is not None:
        if labels.size and (labels.min() < 0 or labels.max() > 255):
            raise ValueError(f"Expected labels in 0..255, but got {labels.min()}..{labels.max()}.")
        cropped_labels = np.ascontiguousarray(centre_crop(labels, size)[0]).astype(np.uint8)
        tumour = np.asarray((cropped_labels != 0).any(axis=(0, 1)))
    return PreprocessedVolume(cropped_image, cropped_labels, crop, full_shape, brain, tumour)
