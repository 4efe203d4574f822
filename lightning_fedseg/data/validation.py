"""Check BraTS / FeTS cases and read the checked arrays: one report for `data check` and training.

Every file of a case is checked in two passes. The header pass (cheap) finds missing and
unreadable files, volumes that are not 3D, truncated files (the size the header promises against
the file's size, or the length a ``.gz`` trailer records), shapes and affines that disagree and a
third voxel axis that is not inferior-superior. Disagreements name *the odd one out*: the files
that differ from the largest group of files that agree with each other, so a case whose FLAIR
alone was shifted is reported at its FLAIR file. The voxel pass reads only what can be wrong:
images stored as floats (NaN or infinite voxels) and segmentations (labels); an integer image
with an intact file is not decoded, since scaling finite integers gives finite values.

:func:`validate_cases` backs ``lightning-fedseg data check`` (optionally over worker processes);
:func:`load_case` reads a case for preprocessing, runs the same checks on the arrays it has
read anyway, and raises :class:`BadCaseError` carrying the same report, so training refuses
exactly the cases ``data check`` lists.
"""

from __future__ import annotations

import gzip
import os
from collections.abc import Iterable, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import numpy.typing as npt

from lightning_fedseg.data.cases import Case, LoadedCase, discover_cases
from lightning_fedseg.data.check_report import BadCaseError, CheckReport, Problem
from lightning_fedseg.data.conventions import MODALITIES, LabelConvention, Modality
from lightning_fedseg.data.nifti import is_nifti, open_nifti
from lightning_fedseg.data.orientation import axis_codes, is_axial, to_canonical, voxel_spacing

__all__ = ["BadCaseError", "CheckReport", "Problem", "check_dataset", "load_case", "validate_cases"]


@dataclass
class _File:
    name: str
    path: Path
    image: nib.Nifti1Image
    shape: tuple[int, ...]
    affine: npt.NDArray[np.float64]
    stored_as_float: bool


def _expected_bytes(image: nib.Nifti1Image) -> int:
    offset = int(getattr(image.dataobj, "offset", 0))
    return offset + int(np.prod(image.shape)) * image.header.get_data_dtype().itemsize


def _truncation(path: Path, image: nib.Nifti1Image) -> str | None:
    """A message when the file is shorter than its header says; reads 4 bytes for ``.gz``."""
    expected = _expected_bytes(image)
    if not path.name.endswith(".gz"):
        size = path.stat().st_size
        return None if size >= expected else f"file is truncated: {size} bytes, the header needs {expected}."
    with path.open("rb") as handle:  # the gzip trailer ends with the uncompressed length mod 2**32
        handle.seek(-4, os.SEEK_END)
        recorded = int.from_bytes(handle.read(4), "little")
    if recorded == expected % 2**32:
        return None
    length = 0
    try:  # multi-member gzip files record only their last member: decompress to be sure
        with gzip.open(path, "rb") as stream:
            while chunk := stream.read(1 << 24):
                length += len(chunk)
    except (OSError, EOFError) as err:
        return f"cannot be read as NIfTI: the compressed file is truncated or corrupt ({err})."
    return (
        None if length >= expected else f"file is truncated: {length} bytes uncompressed, the header needs {expected}."
    )


def _odd_ones_out(values: list[Any], same: Any) -> tuple[list[int], list[int]]:
    """Indices of the largest group of mutually agreeing values (ties: the earliest) and the rest."""
    groups: list[list[int]] = []
    for i, value in enumerate(values):
        for group in groups:
            if same(values[group[0]], value):
                group.append(i)
                break
        else:
            groups.append([i])
    majority = max(groups, key=len)  # max keeps the first of equal-sized groups
    return majority, [i for i in range(len(values)) if i not in majority]


def _owners(files: Sequence[_File]) -> str:
    """``the flair image's`` or ``the t1, t1ce, t2 and seg images', which agree with each other,``."""
    names = [f.name for f in files]
    if len(names) == 1:
        return f"the {names[0]} image's"
    return f"the {', '.join(names[:-1])} and {names[-1]} images', which agree with each other,"


def _check_headers(
    case: Case,
    modalities: Sequence[Modality],
    require_seg: bool,
    affine_atol: float,
    require_axial: bool,
    problems: list[Problem],
    also: Sequence[Modality] = (),
) -> list[_File]:
    """Header checks of ``modalities`` (required) and ``also`` (checked when present), then seg."""

    def report(path: Path, message: str) -> None:
        problems.append(Problem(case.case_id, path, message))

    present = sorted(n for n in os.listdir(case.folder) if is_nifti(n)) if case.folder.is_dir() else []
    paths: list[tuple[str, Path]] = []
    order = [m for m in MODALITIES if m in modalities or m in also] + [m for m in modalities if m not in MODALITIES]
    for modality in order:
        path = case.images.get(modality)
        if path is None and modality not in modalities:
            continue
        if path is None:
            expected = " or ".join(case.expected_image_names(modality))
            report(
                case.folder,
                f"missing {modality.value} image: expected {expected}; "
                f"NIfTI files present: {', '.join(present) or 'none'}.",
            )
        else:
            paths.append((modality.value, path))
    if case.seg is not None:
        paths.append(("seg", case.seg))
    elif require_seg:
        report(case.folder, f"missing segmentation: expected {' or '.join(case.expected_seg_names())}.")

    files: list[_File] = []
    for name, path in paths:
        try:
            image = open_nifti(path)
        except (OSError, ValueError) as err:
            report(path, str(err))
            continue
        shape = tuple(int(s) for s in image.shape)
        if len(shape) != 3:
            report(path, f"expected a 3D volume, but its shape is {shape}.")
            continue
        truncated = _truncation(path, image)
        if truncated:
            report(path, truncated)
            continue
        stored_as_float = bool(np.issubdtype(image.header.get_data_dtype(), np.floating))
        files.append(_File(name, path, image, shape, np.asarray(image.affine, np.float64), stored_as_float))
    if len(files) > 1:
        agree, odd = _odd_ones_out([f.shape for f in files], lambda a, b: a == b)
        for i in odd:
            others = [files[j] for j in agree]
            report(files[i].path, f"shape {files[i].shape} differs from {_owners(others)} {others[0].shape}.")
        close = partial(np.allclose, atol=affine_atol, rtol=0)
        agree, odd = _odd_ones_out([f.affine for f in files], close)
        for i in odd:
            delta = float(np.abs(files[i].affine - files[agree[0]].affine).max())
            report(
                files[i].path,
                f"affine differs from {_owners([files[j] for j in agree])} by up to {delta:.4g} "
                f"(tolerance {affine_atol:g}); the volumes are not co-registered.",
            )
    if files and require_axial and not is_axial(files[0].affine):
        codes = "".join(axis_codes(files[0].affine))
        report(
            files[0].path,
            f"voxel axes are oriented {codes}: the third axis is not inferior-superior, so slices along it would "
            "not be axial. HINT: set `reorient: true` to reorient every case to RAS before slicing.",
        )
    return files


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


def _check_voxels(
    case_id: str, file: _File, data: npt.NDArray[Any], convention: LabelConvention, problems: list[Problem]
) -> None:
    def report(message: str) -> None:
        problems.append(Problem(case_id, file.path, message))

    if np.issubdtype(data.dtype, np.floating):
        bad = int(data.size - np.count_nonzero(np.isfinite(data)))
        if bad:
            report(f"{bad} voxel(s) are NaN or infinite.")
            if file.name == "seg":
                return
    if file.name != "seg":
        return
    labels, integral = _label_values(data)
    if not integral:
        report("segmentation holds non-integer values.")
    invalid = sorted(set(labels) - convention.valid_labels)
    if invalid:
        message = (
            f"labels {invalid} are not valid under --label_convention {convention.value} "
            f"(valid: {sorted(convention.valid_labels)}; found {labels})."
        )
        if convention is LabelConvention.BRATS and set(labels) <= {0, 1, 2, 3}:
            message += " HINT: label 3 marks enhancing tumor from BraTS 2023 on; pass `--label_convention brats2023`."
        report(message)


def _read(case_id: str, file: _File, problems: list[Problem]) -> npt.NDArray[Any] | None:
    try:
        return np.asanyarray(file.image.dataobj)
    except Exception as err:
        problems.append(Problem(case_id, file.path, f"voxel data cannot be read: {err}"))
        return None


def _check_case(
    case: Case,
    modalities: Sequence[Modality],
    convention: LabelConvention,
    require_seg: bool,
    affine_atol: float,
    require_axial: bool = True,
) -> list[Problem]:
    problems: list[Problem] = []
    for file in _check_headers(case, modalities, require_seg, affine_atol, require_axial, problems):
        if file.stored_as_float or file.name == "seg":  # integer images cannot hold NaN
            data = _read(case.case_id, file, problems)
            if data is not None:
                _check_voxels(case.case_id, file, data, convention, problems)
    return problems


def validate_cases(
    cases: Iterable[Case],
    modalities: Sequence[Modality | str] = MODALITIES,
    convention: LabelConvention | str = LabelConvention.BRATS,
    require_seg: bool = True,
    affine_atol: float = 1e-3,
    require_axial: bool = True,
    workers: int = 1,
) -> CheckReport:
    """Check every file of every case and report everything that is wrong.

    Checks that each requested modality (and the segmentation when ``require_seg``) exists, can
    be read, is complete and 3D, has the same shape and affine (within ``affine_atol``) as the
    case's other files (naming the files that disagree with the rest), that the third voxel axis
    is inferior-superior (``require_axial``), that float images hold only finite values and that
    segmentation labels are valid under ``convention``. Never stops at the first problem.

    Args:
        cases: cases from :func:`~lightning_fedseg.data.cases.discover_cases`.
        modalities: the sequences that must be present.
        convention: the label convention segmentations must follow.
        require_seg: whether a missing segmentation is a problem.
        affine_atol: largest absolute difference allowed between affine entries.
        require_axial: whether non-axial slicing is a problem (not when training reorients).
        workers: processes checking cases in parallel (1: in this process).

    Returns:
        The report, problems in case order; ``report.ok`` is true when nothing was found.
    """
    wanted = [Modality(m) for m in modalities]
    convention = LabelConvention(convention)
    if affine_atol < 0:
        raise ValueError(f"Expected `affine_atol` to be non-negative, but got {affine_atol}.")
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
        raise ValueError(f"Expected `workers` to be a positive integer, but got {workers!r}.")
    cases = list(cases)
    check = partial(
        _check_case,
        modalities=wanted,
        convention=convention,
        require_seg=require_seg,
        affine_atol=affine_atol,
        require_axial=require_axial,
    )
    if workers == 1 or len(cases) < 2:
        results = [check(case) for case in cases]
    else:
        with ProcessPoolExecutor(min(workers, len(cases))) as pool:
            results = list(pool.map(check, cases, chunksize=max(1, min(16, len(cases) // (4 * workers)))))
    return CheckReport([p for problems in results for p in problems], num_cases=len(cases))


def check_dataset(
    root: Path | str,
    modalities: Sequence[Modality | str] = MODALITIES,
    convention: LabelConvention | str = LabelConvention.BRATS,
    require_seg: bool = True,
    require_axial: bool = True,
    workers: int = 1,
) -> CheckReport:
    """Discover and validate a dataset folder; problems are reported, never raised.

    Backs ``lightning-fedseg data check ROOT``. A missing ``root`` or one without case folders is
    itself reported as a problem. Arguments as in :func:`validate_cases`.

    Returns:
        The report, with ``root`` set so paths print relative to it.
    """
    root = Path(root)
    try:
        cases = discover_cases(root, modalities, require_seg=require_seg)
    except FileNotFoundError as err:
        return CheckReport([Problem("", root, str(err))], num_cases=0, root=root)
    report = validate_cases(cases, modalities, convention, require_seg, require_axial=require_axial, workers=workers)
    report.root = root
    return report


def load_case(
    case: Case,
    modalities: Sequence[Modality | str] = MODALITIES,
    convention: LabelConvention | str = LabelConvention.BRATS,
    reorient: bool = False,
    affine_atol: float = 1e-3,
) -> LoadedCase:
    """Check and read the images (and segmentation, when present) of one case.

    Runs the checks of :func:`validate_cases` on the files and on the arrays as read (each file
    is decoded once): the header checks on every image file of the case, so a file that
    disagrees with the others is named even when it is not read (as ``data check`` names it),
    and the voxel checks on the files read. Then it converts: images to float32 (NIfTI scaling applied), labels to uint8
    (float label maps rounded). With ``reorient`` the arrays are flipped and permuted to RAS
    (:func:`~lightning_fedseg.data.orientation.to_canonical`); otherwise the third voxel axis
    must already be inferior-superior.

    Args:
        case: a case from :func:`~lightning_fedseg.data.cases.discover_cases`.
        modalities: the channels to read, in order.
        convention: the label convention segmentations must follow.
        reorient: reorient to RAS instead of requiring axial third axes.
        affine_atol: largest absolute difference allowed between affine entries.

    Returns:
        The arrays, with the affine (reoriented when ``reorient``) and header of the first
        modality and the voxel spacing in mm.

    Raises:
        BadCaseError: anything :func:`validate_cases` would report; the message names every file.
    """
    wanted = [Modality(m) for m in modalities]
    if not wanted:
        raise ValueError("Expected `modalities` to name at least one modality, but got none.")
    convention = LabelConvention(convention)
    problems: list[Problem] = []
    others = [m for m in case.images if m not in wanted]
    files = _check_headers(case, wanted, False, affine_atol, not reorient, problems, also=others)
    files = [f for f in files if f.name == "seg" or Modality(f.name) in wanted]
    arrays: dict[str, npt.NDArray[Any]] = {}
    if not problems:
        for file in files:
            data = _read(case.case_id, file, problems)
            if data is not None:
                _check_voxels(case.case_id, file, data, convention, problems)
                arrays[file.name] = data
    if problems:
        raise BadCaseError(
            CheckReport(problems, num_cases=1), f"run `lightning-fedseg data check {case.folder.parent}`."
        )
    first = files[0]
    image = np.stack([np.asarray(arrays[m.value], dtype=np.float32) for m in wanted])
    seg: npt.NDArray[np.integer] | None = None
    if "seg" in arrays:
        raw = arrays["seg"]
        labels = np.rint(raw) if np.issubdtype(raw.dtype, np.floating) else raw
        fits_uint8 = labels.size == 0 or (labels.min() >= 0 and labels.max() <= 255)
        seg = labels.astype(np.uint8 if fits_uint8 else np.int16)
    affine = first.affine
    if reorient:
        canonical, new_affine = to_canonical(np.moveaxis(image, 0, -1), affine)
        image = np.ascontiguousarray(np.moveaxis(canonical, -1, 0))
        if seg is not None:
            seg = np.ascontiguousarray(to_canonical(seg, affine)[0])
        affine = new_affine
    return LoadedCase(
        case_id=case.case_id,
        image=image,
        seg=seg,
        affine=affine,
        header=first.image.header,
        spacing=voxel_spacing(affine),
        reoriented=reorient,
    )
