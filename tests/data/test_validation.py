"""Validation on realistic BraTS / FeTS files: the odd one out, NaN voxels, orientation, workers."""

from __future__ import annotations

import gzip
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from lightning_fedseg.data.cases import CaseNaming, discover_cases
from lightning_fedseg.data.conventions import MODALITIES
from lightning_fedseg.data.validation import BadCaseError, check_dataset, load_case, validate_cases
from tests.data.conftest import BRATS_LPS_AFFINE, realistic_volumes, save_nifti

SHAPE = (12, 10, 6)


def _brats_case(root: Path, case_id: str, naming: CaseNaming = CaseNaming.BRATS, seed: int = 0) -> Path:
    """A BraTS-like case: int16 images with a scale factor, LPS affine, uint8 labels."""
    image, seg = realistic_volumes(SHAPE, seed)
    folder = root / case_id
    for i, modality in enumerate(MODALITIES):
        save_nifti(folder / f"{naming.image_stem(case_id, modality)}.nii.gz", image + i, BRATS_LPS_AFFINE, np.int16)
    if naming is CaseNaming.BRATS2023:
        seg[seg == 4] = 3
    save_nifti(folder / f"{naming.seg_stem(case_id)}.nii.gz", seg, BRATS_LPS_AFFINE)
    return folder


def test_realistic_files_validate_and_load_with_their_scaling(tmp_path: Path) -> None:
    image, seg = realistic_volumes(SHAPE)
    _brats_case(tmp_path, "int16_scaled")
    float64 = tmp_path / "float64_float_labels"
    for modality in MODALITIES:  # float64 images, labels stored as float32, .nii beside .nii.gz
        suffix = ".nii" if modality.value == "t1" else ".nii.gz"
        save_nifti(float64 / f"float64_float_labels_{modality.value}{suffix}", image, BRATS_LPS_AFFINE)
    save_nifti(float64 / "float64_float_labels_seg.nii.gz", seg.astype(np.float32), BRATS_LPS_AFFINE)
    _brats_case(tmp_path, "BraTS-GLI-00001-000", CaseNaming.BRATS2023)

    stored = nib.load(tmp_path / "int16_scaled" / "int16_scaled_flair.nii.gz")
    assert stored.get_data_dtype() == np.int16 and stored.dataobj.slope != 1.0  # a real scale factor
    assert check_dataset(tmp_path, convention="brats").bad_case_ids == ["BraTS-GLI-00001-000"]  # label 3
    brats2023 = [c for c in discover_cases(tmp_path) if c.naming is CaseNaming.BRATS2023]
    assert validate_cases(brats2023, convention="brats2023").ok
    cases = {c.case_id: c for c in discover_cases(tmp_path)}
    assert validate_cases([cases["int16_scaled"], cases["float64_float_labels"]]).ok

    loaded = load_case(cases["int16_scaled"], ["flair", "t2"])
    np.testing.assert_allclose(loaded.image[0], stored.get_fdata(), rtol=1e-6)  # scl_slope applied
    np.testing.assert_allclose(loaded.image[0], image, atol=float(stored.dataobj.slope))  # quantized by it
    np.testing.assert_array_equal(loaded.seg, seg)
    assert loaded.spacing == (1.0, 1.0, 1.0) and not loaded.reoriented
    loaded = load_case(cases["float64_float_labels"], ["flair", "t1"])
    assert loaded.image.dtype == np.float32 and loaded.seg is not None and loaded.seg.dtype == np.uint8
    np.testing.assert_allclose(loaded.image[1], image.astype(np.float32))
    np.testing.assert_array_equal(loaded.seg, seg)
    assert cases["float64_float_labels"].images["t1"].name.endswith("_t1.nii")  # type: ignore[index]


def test_a_shifted_flair_is_named_not_the_four_files_that_agree(tmp_path: Path) -> None:
    folder = _brats_case(tmp_path, "shifted")
    image, _ = realistic_volumes(SHAPE)
    shifted = BRATS_LPS_AFFINE.copy()
    shifted[0, 3] += 25.0
    save_nifti(folder / "shifted_flair.nii.gz", image, shifted, np.int16)

    (problem,) = check_dataset(tmp_path).problems

    assert problem.path == folder / "shifted_flair.nii.gz"
    assert problem.message.startswith(
        "affine differs from the t1, t1ce, t2 and seg images', which agree with each other, by up to 25 "
    )


def test_one_nan_voxel_is_reported_at_its_file_by_check_and_load(tmp_path: Path) -> None:
    folder = _brats_case(tmp_path, "nan")
    image, _ = realistic_volumes(SHAPE)
    image[3, 4, 2] = np.nan
    save_nifti(folder / "nan_t1ce.nii.gz", image.astype(np.float32), BRATS_LPS_AFFINE)
    (case,) = discover_cases(tmp_path)

    (problem,) = check_dataset(tmp_path).problems
    assert problem.path == folder / "nan_t1ce.nii.gz" and problem.message == "1 voxel(s) are NaN or infinite."
    with pytest.raises(BadCaseError, match=r"nan_t1ce\.nii\.gz: 1 voxel\(s\) are NaN") as caught:
        load_case(case, MODALITIES)
    assert caught.value.report.problems == [problem]
    load_case(case, ["flair"])  # the other channels are fine


def test_permuted_axes_are_refused_unless_reoriented(tmp_path: Path) -> None:
    image, seg = realistic_volumes(SHAPE)
    # Stored as (P, S, L): the third voxel axis runs left-right, slices along it are sagittal.
    psl = np.array([[0, 0, -1.0, 5], [-1.0, 0, 0, 7], [0, 2.0, 0, 0], [0, 0, 0, 1]])
    folder = tmp_path / "sagittal"
    save_nifti(folder / "sagittal_flair.nii.gz", image.astype(np.float32), psl)
    save_nifti(folder / "sagittal_seg.nii.gz", seg, psl)
    (case,) = discover_cases(tmp_path, ["flair"])

    (problem,) = validate_cases([case], ["flair"]).problems
    assert problem.path == folder / "sagittal_flair.nii.gz"
    assert "oriented PSL: the third axis is not inferior-superior" in problem.message
    assert validate_cases([case], ["flair"], require_axial=False).ok

    loaded = load_case(case, ["flair"], reorient=True)
    # RAS: x (R) is stored axis 2 flipped, y (A) axis 0 flipped, z (S) axis 1.
    np.testing.assert_array_equal(loaded.seg, seg.transpose(2, 0, 1)[::-1, ::-1, :])
    np.testing.assert_allclose(loaded.image[0], image.transpose(2, 0, 1)[::-1, ::-1, :].astype(np.float32))
    assert loaded.spacing == (1.0, 1.0, 2.0)
    assert nib.aff2axcodes(loaded.affine) == ("R", "A", "S")
    np.testing.assert_allclose(loaded.affine @ [0, 0, 0, 1], psl @ [SHAPE[0] - 1, 0, SHAPE[2] - 1, 1])


def test_truncated_int16_file_is_found_from_its_gzip_trailer(tmp_path: Path) -> None:
    folder = _brats_case(tmp_path, "cut")
    path = folder / "cut_t2.nii.gz"
    raw = gzip.decompress(path.read_bytes())
    path.write_bytes(gzip.compress(raw[: len(raw) - 40]))  # a complete gzip stream of too few bytes
    nii = _brats_case(tmp_path, "cut_nii")
    image, _ = realistic_volumes(SHAPE)
    short = save_nifti(nii / "cut_nii_t1.nii", image, BRATS_LPS_AFFINE, np.int16)
    (nii / "cut_nii_t1.nii.gz").unlink()
    short.write_bytes(short.read_bytes()[:-10])

    report = check_dataset(tmp_path)

    by_case = {p.case_id: p for p in report.problems}
    assert sorted(by_case) == ["cut", "cut_nii"]
    assert by_case["cut"].path == path and "truncated" in by_case["cut"].message
    assert by_case["cut_nii"].path == short and by_case["cut_nii"].message.startswith("file is truncated")


def test_workers_give_the_same_report_in_the_same_order(tmp_path: Path) -> None:
    for i in range(6):
        _brats_case(tmp_path, f"case{i}", seed=i)
    for bad in ("case1", "case4"):
        save_nifti(tmp_path / bad / f"{bad}_seg.nii.gz", np.full(SHAPE, 5, np.uint8), BRATS_LPS_AFFINE)

    serial, parallel = check_dataset(tmp_path), check_dataset(tmp_path, workers=2)

    assert parallel.problems == serial.problems and parallel.num_cases == 6
    assert serial.bad_case_ids == ["case1", "case4"]
    with pytest.raises(ValueError, match="Expected `workers` to be a positive integer, but got 0"):
        validate_cases([], workers=0)
