"""Voxel-axis orientation: which voxel axis points where, and reorienting to one canonical order.

A 2D model slices the third voxel axis, so that axis must run inferior-superior for the slices
to be axial. BraTS headers carry LPS-style affines (``aff2axcodes`` gives ``('L', 'P', 'S')``);
a volume stored with permuted axes (e.g. ``('P', 'S', 'L')``) would be cut sagittally.
:func:`is_axial` tells them apart; :func:`to_canonical` reorients a volume to nibabel's
canonical RAS order (as :func:`nibabel.funcs.as_closest_canonical` does) and
:func:`from_canonical` puts an array on the canonical grid back onto the original one, so a
prediction is written in the file's own voxel order. Only axis flips and permutations are
applied (no resampling), so the round trip is exact.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import numpy.typing as npt
from nibabel.orientations import (
    aff2axcodes,
    apply_orientation,
    axcodes2ornt,
    inv_ornt_aff,
    io_orientation,
    ornt_transform,
)

__all__ = ["CANONICAL", "axis_codes", "from_canonical", "is_axial", "to_canonical", "voxel_spacing"]

CANONICAL: tuple[str, str, str] = ("R", "A", "S")
"""The orientation volumes are reoriented to (nibabel's canonical RAS+)."""


def axis_codes(affine: npt.NDArray[Any]) -> tuple[str, str, str]:
    """Where each voxel axis points, e.g. ``('L', 'P', 'S')`` (see :func:`nibabel.aff2axcodes`).

    Example:
        >>> axis_codes(np.diag([-1.0, -1.0, 1.0, 1.0]))
        ('L', 'P', 'S')
    """
    codes = aff2axcodes(np.asarray(affine, dtype=np.float64))
    return (str(codes[0]), str(codes[1]), str(codes[2]))


def is_axial(affine: npt.NDArray[Any]) -> bool:
    """Whether the third voxel axis runs inferior-superior, so slices along it are axial.

    Example:
        >>> is_axial(np.diag([-1.0, -1.0, 1.0, 1.0]))
        True
        >>> is_axial(np.array([[0, 0, 1, 0], [1, 0, 0, 0], [0, 1, 0, 0], [0, 0, 0, 1]], float))
        False
    """
    return axis_codes(affine)[2] in ("S", "I")


def voxel_spacing(affine: npt.NDArray[Any]) -> tuple[float, float, float]:
    """Voxel size in mm along each voxel axis (the norms of the affine's columns).

    Example:
        >>> voxel_spacing(np.diag([-1.0, -1.0, 2.5, 1.0]))
        (1.0, 1.0, 2.5)
    """
    sizes = np.sqrt((np.asarray(affine, dtype=np.float64)[:3, :3] ** 2).sum(axis=0))
    return (float(sizes[0]), float(sizes[1]), float(sizes[2]))


def _to_canonical_transform(affine: npt.NDArray[Any]) -> npt.NDArray[np.float64]:
    return np.asarray(ornt_transform(io_orientation(affine), axcodes2ornt(CANONICAL)), dtype=np.float64)


def to_canonical(array: npt.NDArray[Any], affine: npt.NDArray[Any]) -> tuple[npt.NDArray[Any], npt.NDArray[np.float64]]:
    """Flip and permute the first three axes of ``array`` to RAS order; returns the new affine.

    Example:
        >>> volume = np.arange(6).reshape(1, 2, 3)  # stored as (P, S, L): sagittal slices
        >>> affine = np.array([[0, 0, -1, 0], [-1, 0, 0, 0], [0, 1, 0, 0], [0, 0, 0, 1]], float)
        >>> canonical, new_affine = to_canonical(volume, affine)
        >>> canonical.shape, axis_codes(new_affine)
        ((3, 1, 2), ('R', 'A', 'S'))
    """
    affine = np.asarray(affine, dtype=np.float64)
    transform = _to_canonical_transform(affine)
    out = apply_orientation(array, transform)
    new_affine = affine @ inv_ornt_aff(transform, array.shape[:3])
    return out, np.asarray(new_affine, dtype=np.float64)


def from_canonical(array: npt.NDArray[Any], original_affine: npt.NDArray[Any]) -> npt.NDArray[Any]:
    """Put an array on the canonical (RAS) grid back onto the grid of ``original_affine``.

    The inverse of :func:`to_canonical`: ``from_canonical(to_canonical(a, A)[0], A)`` is ``a``.

    Example:
        >>> volume = np.arange(6).reshape(1, 2, 3)
        >>> affine = np.array([[0, 0, -1, 0], [-1, 0, 0, 0], [0, 1, 0, 0], [0, 0, 0, 1]], float)
        >>> bool((from_canonical(to_canonical(volume, affine)[0], affine) == volume).all())
        True
    """
    original = io_orientation(np.asarray(original_affine, dtype=np.float64))
    transform = ornt_transform(axcodes2ornt(CANONICAL), original)
    return np.asarray(apply_orientation(array, transform))
