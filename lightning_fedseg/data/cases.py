"""Find, check and read BraTS / FeTS cases on disk.

A case is a folder ``<ID>/`` holding one NIfTI file per MR sequence and, for training data, a
segmentation. Three naming schemes are recognised (``.nii.gz`` or ``.nii``):

========== ====================================== ===========================
naming     images                                 segmentation
========== ====================================== ===========================
brats      ``<ID>_{flair,t1,t1ce,t2}``            ``<ID>_seg``
fets       ``<ID>_brain_{flair,t1,t1ce,t2}``      ``<ID>_final_seg``
brats2023  ``<ID>-{t2f,t1n,t1c,t2w}``             ``<ID>-seg``
========== ====================================== ===========================

Discovery only looks at file names and never fails on a missing file;
:mod:`lightning_fedseg.data.validation` opens the files, reports every problem of every case at
once and reads the checked arrays (:func:`~lightning_fedseg.data.validation.load_case`).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import numpy.typing as npt

from lightning_fedseg.data.conventions import MODALITIES, Modality
from lightning_fedseg.data.nifti import NIFTI_SUFFIXES, is_nifti

__all__ = [
    "NIFTI_SUFFIXES",
    "Case",
    "CaseNaming",
    "CaseReference",
    "LoadedCase",
    "discover_cases",
]


class CaseNaming(StrEnum):
    """How the files of a case folder are named."""

    BRATS = "brats"
    FETS = "fets"
    BRATS2023 = "brats2023"

    def image_stem(self, case_id: str, modality: Modality | str) -> str:
        """The file name of a modality without its NIfTI suffix.

        Example:
            >>> CaseNaming.FETS.image_stem("FeTS_001", "t1ce")
            'FeTS_001_brain_t1ce'
        """
        modality = Modality(modality)
        if self is CaseNaming.BRATS:
            return f"{case_id}_{modality.value}"
        if self is CaseNaming.FETS:
            return f"{case_id}_brain_{modality.value}"
        return f"{case_id}-{_BRATS2023_MODALITY[modality]}"

    def seg_stem(self, case_id: str) -> str:
        """The file name of the segmentation without its NIfTI suffix.

        Example:
            >>> CaseNaming.BRATS.seg_stem("BraTS20_Training_001")
            'BraTS20_Training_001_seg'
        """
        if self is CaseNaming.BRATS:
            return f"{case_id}_seg"
        if self is CaseNaming.FETS:
            return f"{case_id}_final_seg"
        return f"{case_id}-seg"


_BRATS2023_MODALITY: dict[Modality, str] = {
    Modality.FLAIR: "t2f",
    Modality.T1: "t1n",
    Modality.T1CE: "t1c",
    Modality.T2: "t2w",
}


@dataclass(frozen=True)
class Case:
    """One case folder as found on disk; files that were not found are absent.

    Attributes:
        case_id: the folder name, which prefixes every file name.
        folder: the case folder.
        images: the image file of each requested modality that exists.
        seg: the segmentation file, or ``None`` when the folder has none.
        naming: the naming scheme the files follow.
    """

    case_id: str
    folder: Path
    images: dict[Modality, Path] = field(hash=False)  # hashable: usable as a dict key
    seg: Path | None
    naming: CaseNaming = CaseNaming.BRATS

    def expected_image_names(self, modality: Modality | str) -> list[str]:
        """The file names that would be accepted for ``modality`` (for error messages)."""
        stem = self.naming.image_stem(self.case_id, modality)
        return [stem + suffix for suffix in NIFTI_SUFFIXES]

    def expected_seg_names(self) -> list[str]:
        """The file names that would be accepted for the segmentation."""
        stem = self.naming.seg_stem(self.case_id)
        return [stem + suffix for suffix in NIFTI_SUFFIXES]


@dataclass(frozen=True)
class CaseReference:
    """What is needed to score a prediction on, and write it back into, a case's original grid.

    Attributes:
        reference_path: a modality NIfTI of the case; its affine and header are copied.
        full_shape: ``(X, Y, Z)`` of the volume the model saw (after reorientation, if any).
        crop: the X and Y slices the centre crop took from that volume.
        spacing: voxel size in mm along X, Y, Z of that volume (HD95 is in mm).
        reoriented: whether the volume was reoriented to RAS (the writer restores the original).
    """

    reference_path: Path
    full_shape: tuple[int, int, int]
    crop: tuple[slice, slice]
    spacing: tuple[float, float, float] = (1.0, 1.0, 1.0)
    reoriented: bool = False

    def uncrop(self, volume: npt.NDArray[Any], fill: float = 0) -> npt.NDArray[Any]:
        """Place a cropped ``(..., x, y, Z)`` volume back into the full ``(..., X, Y, Z)`` grid.

        Example:
            >>> ref = CaseReference(Path("a.nii"), (4, 4, 1), (slice(1, 3), slice(1, 3)))
            >>> ref.uncrop(np.ones((2, 2, 1), np.uint8))[..., 0].tolist()
            [[0, 0, 0, 0], [0, 1, 1, 0], [0, 1, 1, 0], [0, 0, 0, 0]]
        """
        out = np.full((*volume.shape[:-3], *self.full_shape), fill, dtype=volume.dtype)
        out[..., self.crop[0], self.crop[1], :] = volume
        return out


@dataclass
class LoadedCase:
    """The arrays of one case.

    Attributes:
        case_id: the case's identifier.
        image: float32 array ``[C, X, Y, Z]``, channels in the requested modality order.
        seg: integer label map ``[X, Y, Z]`` (uint8, or int16 for labels outside 0..255), or
            ``None`` when the case has no segmentation.
        affine: the 4x4 voxel-to-world matrix of the arrays (float64): the first modality's,
            or its reoriented version when ``reoriented``.
        header: the NIfTI header of the first modality (as stored).
        spacing: voxel size in mm along the arrays' X, Y, Z.
        reoriented: whether the arrays were reoriented to RAS.
    """

    case_id: str
    image: npt.NDArray[np.float32]
    seg: npt.NDArray[np.integer] | None
    affine: npt.NDArray[np.float64]
    header: nib.nifti1.Nifti1Header
    spacing: tuple[float, float, float] = (1.0, 1.0, 1.0)
    reoriented: bool = False


def _find(folder_files: set[str], folder: Path, stem: str) -> Path | None:
    for suffix in NIFTI_SUFFIXES:
        if stem + suffix in folder_files:
            return folder / (stem + suffix)
    return None


def _discover_case(folder: Path, modalities: Sequence[Modality]) -> Case | None:
    files = {entry.name for entry in os.scandir(folder) if entry.is_file()}
    if not any(is_nifti(name) for name in files):
        return None
    case_id = folder.name
    best: Case | None = None
    for naming in CaseNaming:
        images: dict[Modality, Path] = {}
        for modality in modalities:
            found = _find(files, folder, naming.image_stem(case_id, modality))
            if found is not None:
                images[modality] = found
        seg = _find(files, folder, naming.seg_stem(case_id))
        candidate = Case(case_id, folder, images, seg, naming)
        score = len(images) + (seg is not None)
        if best is None or score > len(best.images) + (best.seg is not None):
            best = candidate
    return best


def discover_cases(
    root: Path | str,
    modalities: Sequence[Modality | str] = MODALITIES,
    require_seg: bool = True,
) -> list[Case]:
    """Find the case folders directly under ``root``.

    A case folder is a non-hidden sub-folder holding at least one NIfTI file; its name is the
    case id. For each folder the naming scheme matching the most files is chosen. Files that are
    missing are simply absent from the returned :class:`Case` (``seg`` is ``None``):
    :func:`validate_cases` reports them.

    Args:
        root: the dataset folder.
        modalities: the MR sequences to look up.
        require_seg: whether the caller needs segmentations. Discovery records the segmentation
            whenever one exists either way; with ``True``, a folder holding a segmentation but
            no image of ``modalities`` still counts as a case (so validation can report it).

    Returns:
        The cases, sorted by case id.

    Raises:
        FileNotFoundError: ``root`` does not exist or holds no case folder.
    """
    root = Path(root)
    wanted = [Modality(m) for m in modalities]
    if not root.is_dir():
        raise FileNotFoundError(f"Dataset folder {root} does not exist or is not a folder.")
    cases: list[Case] = []
    for entry in os.scandir(root):
        if not entry.is_dir() or entry.name.startswith("."):
            continue
        case = _discover_case(Path(entry.path), wanted)
        if case is None:
            continue
        if not require_seg and not case.images and case.seg is not None:
            continue
        cases.append(case)
    if not cases:
        raise FileNotFoundError(
            f"No case folder found under {root}. Expected one folder per case, e.g. "
            f"{root / 'BraTS20_Training_001' / 'BraTS20_Training_001_flair.nii.gz'} "
            f"(BraTS) or <ID>/<ID>_brain_flair.nii.gz (FeTS)."
        )
    return sorted(cases, key=lambda c: c.case_id)
