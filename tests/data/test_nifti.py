"""Tests for the one NIfTI opener."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from lightning_fedseg.data.nifti import is_nifti, open_nifti
from tests.data.conftest import write_nifti


def test_open_nifti_reads_the_header_only(tmp_path: Path) -> None:
    path = write_nifti(tmp_path / "a.nii.gz", np.zeros((4, 5, 6), np.int16))
    image = open_nifti(path)
    assert isinstance(image, nib.Nifti1Image) and image.shape == (4, 5, 6)
    assert is_nifti(path.name) and is_nifti("b.nii") and not is_nifti("a.nii.gz.tmp")


def test_open_nifti_says_why_a_file_cannot_be_opened(tmp_path: Path) -> None:
    broken = tmp_path / "broken.nii.gz"
    broken.write_bytes(b"not a nifti file")
    with pytest.raises(OSError, match="cannot be read as NIfTI"):
        open_nifti(broken)
    analyze = tmp_path / "a.img"
    nib.save(nib.AnalyzeImage(np.zeros((2, 2, 2), np.int16), np.eye(4)), analyze)
    with pytest.raises(ValueError, match="AnalyzeImage, not a NIfTI-1/2 image"):
        open_nifti(analyze)
