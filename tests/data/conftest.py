"""Shared fixtures of the data tests: a tiny synthetic federation and hand-made NIfTI cases."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import numpy.typing as npt
import pytest

from lightning_fedseg.data.synthetic import SyntheticDataset, write_synthetic_dataset

TINY_SHAPE = (24, 24, 12)
TINY_SUBJECTS = 20
TINY_SITES = 4


@pytest.fixture(scope="session")
def tiny_dataset(tmp_path_factory: pytest.TempPathFactory) -> SyntheticDataset:
    """20 synthetic subjects of 24x24x12 voxels in 4 institutions of 5 (written once)."""
    out = tmp_path_factory.mktemp("synthetic") / "tiny"
    return write_synthetic_dataset(out, num_subjects=TINY_SUBJECTS, shape=TINY_SHAPE, num_sites=TINY_SITES, seed=0)


@pytest.fixture(autouse=True)
def _no_home_cache(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Keep tests from writing into ``~/.cache`` whatever a test forgets to pass."""
    monkeypatch.setenv("LIGHTNING_FEDSEG_CACHE", str(tmp_path / "default_cache"))
    monkeypatch.setenv("LIGHTNING_FEDSEG_DATA", str(tmp_path / "default_data"))


def write_nifti(path: Path, data: npt.NDArray[np.generic]) -> Path:
    """Write ``data`` with an identity affine."""
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(data, np.eye(4)), path)
    return path


def write_case(
    root: Path,
    case_id: str,
    flair: npt.NDArray[np.floating],
    seg: npt.NDArray[np.integer] | None = None,
    t1: npt.NDArray[np.floating] | None = None,
) -> Path:
    """Write a BraTS-named case folder with the given volumes."""
    folder = root / case_id
    write_nifti(folder / f"{case_id}_flair.nii.gz", np.asarray(flair, np.float32))
    if t1 is not None:
        write_nifti(folder / f"{case_id}_t1.nii.gz", np.asarray(t1, np.float32))
    if seg is not None:
        write_nifti(folder / f"{case_id}_seg.nii.gz", np.asarray(seg, np.uint8))
    return folder


BRATS_LPS_AFFINE = np.array([[-1.0, 0, 0, 0], [0, -1.0, 0, 239.0], [0, 0, 1.0, 0], [0, 0, 0, 1]])
"""The voxel-to-world matrix BraTS headers carry (axis codes L, P, S)."""


def save_nifti(path: Path, data: npt.NDArray[np.generic], affine: npt.NDArray[np.float64], dtype: Any = None) -> Path:
    """Write ``data`` with ``affine``; ``dtype`` is the on-disk type (nibabel scales floats into ints)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    image = nib.Nifti1Image(data, affine)
    if dtype is not None:
        image.set_data_dtype(dtype)
    nib.save(image, path)
    return path


def realistic_volumes(
    shape: tuple[int, int, int], seed: int = 0
) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.uint8]]:
    """A brain-like float64 image (positive inside an ellipsoid) and a nested 1/2/4 label map."""
    rng = np.random.default_rng(seed)
    grid = np.stack(np.meshgrid(*[np.linspace(-1, 1, n) for n in shape], indexing="ij"))
    brain = (grid**2).sum(0) < 0.8
    image = np.where(brain, 400.0 + 100.0 * rng.random(shape), 0.0)
    seg = np.zeros(shape, np.uint8)
    seg[((grid - 0.2) ** 2).sum(0) < 0.15] = 2
    seg[((grid - 0.2) ** 2).sum(0) < 0.06] = 1
    seg[((grid - 0.2) ** 2).sum(0) < 0.02] = 4
    return image, seg
