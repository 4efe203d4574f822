"""Opening NIfTI files: the one place a file of a case is opened as a NIfTI image.

Discovery (:mod:`~lightning_fedseg.data.cases`) only looks at file names; validation and the
cache open headers here, so every file is opened the same way and a file that is not a NIfTI
image fails with the same message wherever it is first read.
"""

from __future__ import annotations

from pathlib import Path

import nibabel as nib

__all__ = ["NIFTI_SUFFIXES", "is_nifti", "open_nifti"]

NIFTI_SUFFIXES: tuple[str, ...] = (".nii.gz", ".nii")
"""File endings tried for every expected file, in order of preference."""


def is_nifti(name: str) -> bool:
    """Whether a file name ends like a NIfTI file.

    Example:
        >>> is_nifti("BraTS_001_flair.nii.gz"), is_nifti("partition.csv")
        (True, False)
    """
    return name.endswith(NIFTI_SUFFIXES)


def open_nifti(path: Path) -> nib.Nifti1Image:
    """Open a NIfTI header (voxel data stays on disk until read).

    Raises:
        OSError: the file cannot be read as NIfTI (the message says why, not which file: the
            caller names it).
        ValueError: the file is an image of another format.
    """
    try:
        img = nib.load(path)
    except Exception as err:
        raise OSError(f"cannot be read as NIfTI: {err}") from err
    if not isinstance(img, nib.Nifti1Image):
        raise ValueError(f"is a {type(img).__name__}, not a NIfTI-1/2 image.")
    return img
