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

Discovery only looks at file names and never fails on a missing file; :func:`validate_cases`
opens every file and reports every problem of every case at once, so a user fixes a dataset in
one pass instead of one error per run.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import numpy.typing as npt

from lightning_fedseg.data.conventions import MODALITIES, LabelConvention, Modality

__all__ = [
    "NIFTI_SUFFIXES",
    "Case",
    "CaseNaming",
    "CaseReference",
    "CheckReport",
    "LoadedCase",
    "Problem",
    "check_dataset",
    "discover_cases",
    "load_case",
    "validate_cases",
]

NIFTI_SUFFIXES: tuple[str, ...] = (".nii.gz", ".nii")
"""File endings tried for every expected file, in order of preference."""


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
    """What is needed to write a prediction back into a case's original image space.

    Attributes:
        reference_path: a modality NIfTI of the case; its affine and header are copied.
        full_shape: ``(X, Y, Z)`` of the original volume.
        crop: the X and Y slices the centre crop took from the original volume.
    """

    reference_path: Path
    full_shape: tuple[int, int, int]
    crop: tuple[slice, slice]

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
        affine: the 4x4 voxel-to-world matrix of the first modality (float64).
        header: the NIfTI header of the first modality.
    """

    case_id: str
    image: npt.NDArray[np.float32]
    seg: npt.NDArray[np.integer] | None
    affine: npt.NDArray[np.float64]
    header: nib.nifti1.Nifti1Header


@dataclass(frozen=True)
class Problem:
    """One thing wrong with a case: which case, which file (or folder), and what."""

    case_id: str
    path: Path
    message: str


@dataclass
class CheckReport:
    """Every problem found in a set of cases.

    Attributes:
        problems: all problems, case by case, in the order found.
        num_cases: how many cases were checked.
        root: the dataset folder, used to print paths relative to it.
    """

    problems: list[Problem] = field(default_factory=list)
    num_cases: int = 0
    root: Path | None = None

    @property
    def ok(self) -> bool:
        """Whether no problem was found (an empty dataset is not ok)."""
        return not self.problems and self.num_cases > 0

    @property
    def bad_case_ids(self) -> list[str]:
        """The ids of cases with at least one problem, in order of first appearance."""
        return list(dict.fromkeys(p.case_id for p in self.problems if p.case_id))

    def format(self) -> str:
        """A human-readable report, one line per problem, grouped by case."""
        where = f" under {self.root}" if self.root is not None else ""
        if self.ok:
            return f"Checked {self.num_cases} cases{where}: all OK."
        lines = [
            f"Checked {self.num_cases} cases{where}: {len(self.problems)} problem(s) in "
            f"{len(self.bad_case_ids)} case(s)."
        ]
        current: str | None = None
        for problem in self.problems:
            if problem.case_id != current:
                current = problem.case_id
                lines.append(f"{current or '(dataset)'}:")
            lines.append(f"  {self._display(problem.path)}: {problem.message}")
        return "\n".join(lines)

    def _display(self, path: Path) -> str:
        shown = str(path)
        if self.root is not None and path != self.root and path.is_relative_to(self.root):
            shown = str(path.relative_to(self.root))
        return shown + "/" if path.is_dir() else shown


def _find(folder_files: set[str], folder: Path, stem: str) -> Path | None:
    for suffix in NIFTI_SUFFIXES:
        if stem + suffix in folder_files:
            return folder / (stem + suffix)
    return None


def _is_nifti(name: str) -> bool:
    return name.endswith(NIFTI_SUFFIXES)


def _discover_case(folder: Path, modalities: Sequence[Modality]) -> Case | None:
    files = {entry.name for entry in os.scandir(folder) if entry.is_file()}
    if not any(_is_nifti(name) for name in files):
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


def _label_values(seg: npt.NDArray[Any]) -> tuple[list[int], bool]:
    """Distinct values of a label map and whether they were all integers."""
    if np.issubdtype(seg.dtype, np.floating):
        rounded = np.rint(seg)
        integral = bool(np.array_equal(rounded, seg))
        seg = rounded
    else:
        integral = True
    if seg.size and seg.min() >= 0 and seg.max() < 1024:
        counts = np.bincount(seg.astype(np.intp, copy=False).ravel())
        return np.flatnonzero(counts).tolist(), integral
    return [int(v) for v in np.unique(seg)], integral


def _check_case(
    case: Case,
    modalities: Sequence[Modality],
    convention: LabelConvention,
    require_seg: bool,
    affine_atol: float,
) -> list[Problem]:
    problems: list[Problem] = []

    def report(path: Path, message: str) -> None:
        problems.append(Problem(case.case_id, path, message))

    present = []
    if case.folder.is_dir():
        present = sorted(n for n in os.listdir(case.folder) if _is_nifti(n))
    files: list[tuple[str, Path]] = []
    for modality in modalities:
        path = case.images.get(modality)
        if path is None:
            expected = " or ".join(case.expected_image_names(modality))
            report(
                case.folder,
                f"missing {modality.value} image: expected {expected}; NIfTI files present: "
                f"{', '.join(present) or 'none'}.",
            )
        else:
            files.append((modality.value, path))
    if case.seg is not None:
        files.append(("seg", case.seg))
    elif require_seg:
        expected = " or ".join(case.expected_seg_names())
        report(case.folder, f"missing segmentation: expected {expected}.")

    reference: tuple[str, tuple[int, ...], npt.NDArray[np.float64]] | None = None
    for name, path in files:
        try:
            img = _load_nifti(path)
        except (OSError, ValueError) as err:
            report(path, str(err))
            continue
        shape = tuple(int(s) for s in img.shape)
        if len(shape) != 3:
            report(path, f"expected a 3D volume, but its shape is {shape}.")
            continue
        affine = np.asarray(img.affine, dtype=np.float64)
        if reference is None:
            reference = (name, shape, affine)
        else:
            ref_name, ref_shape, ref_affine = reference
            if shape != ref_shape:
                report(path, f"shape {shape} differs from the {ref_name} image's {ref_shape}.")
            if not np.allclose(affine, ref_affine, atol=affine_atol, rtol=0):
                delta = float(np.abs(affine - ref_affine).max())
                report(
                    path,
                    f"affine differs from the {ref_name} image's by up to {delta:.4g} "
                    f"(tolerance {affine_atol:g}); the volumes are not co-registered.",
                )
        try:
            data = np.asanyarray(img.dataobj)
        except Exception as err:
            report(path, f"voxel data cannot be read: {err}")
            continue
        if np.issubdtype(data.dtype, np.floating):
            bad = int(data.size - np.count_nonzero(np.isfinite(data)))
            if bad:
                report(path, f"{bad} voxel(s) are NaN or infinite.")
                if name == "seg":
                    continue
        if name == "seg":
            labels, integral = _label_values(data)
            if not integral:
                report(path, "segmentation holds non-integer values.")
            invalid = sorted(set(labels) - convention.valid_labels)
            if invalid:
                message = (
                    f"labels {invalid} are not valid under --label_convention {convention.value} "
                    f"(valid: {sorted(convention.valid_labels)}; found {labels})."
                )
                if convention is LabelConvention.BRATS and set(labels) <= {0, 1, 2, 3}:
                    message += (
                        " HINT: label 3 marks enhancing tumor from BraTS 2023 on; pass `--label_convention brats2023`."
                    )
                report(path, message)
    return problems


def validate_cases(
    cases: Iterable[Case],
    modalities: Sequence[Modality | str] = MODALITIES,
    convention: LabelConvention | str = LabelConvention.BRATS,
    require_seg: bool = True,
    affine_atol: float = 1e-3,
) -> CheckReport:
    """Open every file of every case and report everything that is wrong.

    Checks that each requested modality (and the segmentation when ``require_seg``) exists, can
    be read, is 3D, has the same shape and affine (within ``affine_atol``) as the case's other
    files, holds only finite values, and that segmentation labels are valid under ``convention``.
    Never stops at the first problem.

    Args:
        cases: cases from :func:`discover_cases`.
        modalities: the sequences that must be present.
        convention: the label convention segmentations must follow.
        require_seg: whether a missing segmentation is a problem.
        affine_atol: largest absolute difference allowed between affine entries.

    Returns:
        The report; ``report.ok`` is true when nothing was found.
    """
    wanted = [Modality(m) for m in modalities]
    convention = LabelConvention(convention)
    if affine_atol < 0:
        raise ValueError(f"Expected `affine_atol` to be non-negative, but got {affine_atol}.")
    report = CheckReport()
    for case in cases:
        report.num_cases += 1
        report.problems.extend(_check_case(case, wanted, convention, require_seg, affine_atol))
    return report


def check_dataset(
    root: Path | str,
    modalities: Sequence[Modality | str] = MODALITIES,
    convention: LabelConvention | str = LabelConvention.BRATS,
    require_seg: bool = True,
) -> CheckReport:
    """Discover and validate a dataset folder; problems are reported, never raised.

    Backs ``lightning-fedseg data check ROOT``. A missing ``root`` or one without case folders is
    itself reported as a problem.

    Args:
        root: the dataset folder.
        modalities: the sequences that must be present.
        convention: the label convention segmentations must follow.
        require_seg: whether a missing segmentation is a problem.

    Returns:
        The report, with ``root`` set so paths print relative to it.
    """
    root = Path(root)
    convention = LabelConvention(convention)
    try:
        cases = discover_cases(root, modalities, require_seg=require_seg)
    except FileNotFoundError as err:
        return CheckReport([Problem("", root, str(err))], num_cases=0, root=root)
    report = validate_cases(cases, modalities, convention, require_seg)
    report.root = root
    return report


def _load_nifti(path: Path) -> nib.Nifti1Image:
    """Open a NIfTI header (voxel data stays on disk); errors name the file."""
    try:
        img = nib.load(path)
    except Exception as err:
        raise OSError(f"cannot be read as NIfTI: {err}") from err
    if not isinstance(img, nib.Nifti1Image):
        raise ValueError(f"is a {type(img).__name__}, not a NIfTI-1/2 image.")
    return img


def _read_volume(path: Path, dtype: type[np.generic] | None) -> tuple[nib.Nifti1Image, npt.NDArray[Any]]:
    try:
        img = _load_nifti(path)
        data = np.asanyarray(img.dataobj)
    except Exception as err:
        raise OSError(f"Cannot read {path}: {err}") from err
    if data.ndim != 3:
        raise ValueError(f"Expected a 3D volume in {path}, but its shape is {data.shape}.")
    return img, data if dtype is None else data.astype(dtype, copy=False)


def load_case(case: Case, modalities: Sequence[Modality | str] = MODALITIES) -> LoadedCase:
    """Read the images (and segmentation, when present) of one case.

    Args:
        case: a case from :func:`discover_cases`.
        modalities: the channels to read, in order.

    Returns:
        The arrays, with the affine and header of the first modality.

    Raises:
        FileNotFoundError: a requested modality is missing.
        ValueError: a file is not 3D or its shape differs from the first modality's.
        OSError: a file cannot be read.
    """
    wanted = [Modality(m) for m in modalities]
    if not wanted:
        raise ValueError("Expected `modalities` to name at least one modality, but got none.")
    paths: list[Path] = []
    for modality in wanted:
        path = case.images.get(modality)
        if path is None:
            expected = " or ".join(case.expected_image_names(modality))
            raise FileNotFoundError(
                f"Case {case.case_id} has no {modality.value} image: expected {expected} in {case.folder}."
            )
        paths.append(path)
    first, first_data = _read_volume(paths[0], np.float32)
    channels = [first_data]
    for path in paths[1:]:
        _, data = _read_volume(path, np.float32)
        if data.shape != first_data.shape:
            raise ValueError(f"Shape {data.shape} of {path} differs from {first_data.shape} of {paths[0]}.")
        channels.append(data)
    seg: npt.NDArray[np.integer] | None = None
    if case.seg is not None:
        _, raw = _read_volume(case.seg, None)
        if raw.shape != channels[0].shape:
            raise ValueError(f"Shape {raw.shape} of {case.seg} differs from {first_data.shape} of {paths[0]}.")
        labels = np.rint(raw) if np.issubdtype(raw.dtype, np.floating) else raw
        fits_uint8 = labels.size == 0 or (labels.min() >= 0 and labels.max() <= 255)
        seg = labels.astype(np.uint8 if fits_uint8 else np.int16)
    return LoadedCase(
        case_id=case.case_id,
        image=np.stack(channels),
        seg=seg,
        affine=np.asarray(first.affine, dtype=np.float64),
        header=first.header,
    )
