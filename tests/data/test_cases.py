"""Tests for case discovery, validation and loading on tiny NIfTI files."""

from __future__ import annotations

import re
from pathlib import Path

import nibabel as nib
import numpy as np
import numpy.typing as npt
import pytest

from lightning_fedseg.data.cases import Case, CaseNaming, CaseReference, discover_cases
from lightning_fedseg.data.conventions import MODALITIES, LabelConvention, Modality
from lightning_fedseg.data.validation import BadCaseError, check_dataset, load_case, validate_cases

SHAPE = (8, 8, 4)
AFFINE = np.diag([1.0, 1.0, 1.0, 1.0])


def _write(path: Path, data: npt.NDArray, affine: npt.NDArray = AFFINE) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(data, affine), path)
    return path


def _seg(value: int = 2) -> npt.NDArray[np.uint8]:
    seg = np.zeros(SHAPE, np.uint8)
    seg[2:5, 2:5, 1:3] = value
    seg[3, 3, 2] = 1
    return seg


def _make_case(
    root: Path,
    case_id: str,
    naming: CaseNaming = CaseNaming.BRATS,
    suffix: str = ".nii.gz",
    skip: tuple[str, ...] = (),
) -> Path:
    """Write a valid case: modality m holds the constant ``index(m) + 1``."""
    folder = root / case_id
    for index, modality in enumerate(MODALITIES):
        if modality.value in skip:
            continue
        data = np.full(SHAPE, index + 1.0, np.float32)
        _write(folder / (naming.image_stem(case_id, modality) + suffix), data)
    if "seg" not in skip:
        _write(folder / (naming.seg_stem(case_id) + suffix), _seg())
    return folder


def test_discover_all_namings_and_suffixes(tmp_path: Path) -> None:
    _make_case(tmp_path, "FeTS_002", CaseNaming.FETS, ".nii")
    _make_case(tmp_path, "BraTS_001", CaseNaming.BRATS, ".nii.gz")
    _make_case(tmp_path, "BraTS-GLI-00003-000", CaseNaming.BRATS2023, ".nii.gz")
    (tmp_path / ".hidden").mkdir()
    (tmp_path / "notes").mkdir()  # no NIfTI: not a case
    (tmp_path / "README.txt").write_text("not a case")

    cases = discover_cases(tmp_path)

    assert [c.case_id for c in cases] == ["BraTS-GLI-00003-000", "BraTS_001", "FeTS_002"]
    assert [c.naming for c in cases] == ["brats2023", "brats", "fets"]
    fets = cases[2]
    assert fets.images[Modality.T1CE] == tmp_path / "FeTS_002" / "FeTS_002_brain_t1ce.nii"
    assert fets.seg == tmp_path / "FeTS_002" / "FeTS_002_final_seg.nii"
    assert cases[0].images[Modality.FLAIR].name == "BraTS-GLI-00003-000-t2f.nii.gz"
    assert cases[1].seg == tmp_path / "BraTS_001" / "BraTS_001_seg.nii.gz"
    assert validate_cases(cases).ok
    assert {cases[0]: 1}[discover_cases(tmp_path)[0]] == 1  # equal and hashable


def test_discover_prefers_gz_and_keeps_missing_files_absent(tmp_path: Path) -> None:
    folder = _make_case(tmp_path, "A", skip=("t2", "seg"))
    _write(folder / "A_flair.nii", np.zeros(SHAPE, np.float32))

    (case,) = discover_cases(tmp_path, modalities=["flair", "t2"])

    assert case.images == {Modality.FLAIR: folder / "A_flair.nii.gz"}
    assert case.seg is None


def test_discover_raises_naming_root(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="does not exist"):
        discover_cases(tmp_path / "missing")
    (tmp_path / "empty_case").mkdir()
    message = re.escape(f"No case folder found under {tmp_path}")
    with pytest.raises(FileNotFoundError, match=message):
        discover_cases(tmp_path)


def test_validate_reports_every_problem_of_every_case(tmp_path: Path) -> None:
    _make_case(tmp_path, "good")
    _make_case(tmp_path, "missing_t1ce", skip=("t1ce",))
    bad_shape = _make_case(tmp_path, "bad_shape")
    _write(bad_shape / "bad_shape_t2.nii.gz", np.zeros((8, 8, 5), np.float32))
    bad_affine = _make_case(tmp_path, "bad_affine")
    shifted = AFFINE.copy()
    shifted[0, 3] = 0.5
    _write(bad_affine / "bad_affine_t1.nii.gz", np.zeros(SHAPE, np.float32), shifted)
    nan = _make_case(tmp_path, "nan_voxels")
    flair = np.ones(SHAPE, np.float32)
    flair[0, 0, 0] = np.nan
    flair[1, 0, 0] = np.inf
    _write(nan / "nan_voxels_flair.nii.gz", flair)
    label3 = _make_case(tmp_path, "label3")
    _write(label3 / "label3_seg.nii.gz", _seg(value=3))
    flat = _make_case(tmp_path, "flat")
    _write(flat / "flat_t1.nii.gz", np.zeros((8, 8), np.float32))

    report = check_dataset(tmp_path)

    assert report.num_cases == 7
    assert not report.ok
    assert report.bad_case_ids == [
        "bad_affine",
        "bad_shape",
        "flat",
        "label3",
        "missing_t1ce",
        "nan_voxels",
    ]
    by_case = {p.case_id: p for p in report.problems}
    assert len(report.problems) == 6
    assert by_case["bad_affine"].path.name == "bad_affine_t1.nii.gz"
    assert (
        "affine differs from the flair, t1ce, t2 and seg images', which agree with each other, by up to 0.5"
        in by_case["bad_affine"].message
    )
    assert by_case["bad_shape"].path.name == "bad_shape_t2.nii.gz"
    assert "(8, 8, 5) differs from the flair, t1, t1ce and seg images', which agree" in by_case["bad_shape"].message
    assert "expected a 3D volume, but its shape is (8, 8)" in by_case["flat"].message
    assert "labels [3] are not valid" in by_case["label3"].message
    assert "--label_convention brats2023" in by_case["label3"].message
    assert by_case["missing_t1ce"].path == tmp_path / "missing_t1ce"
    assert "missing_t1ce_t1ce.nii.gz or missing_t1ce_t1ce.nii" in by_case["missing_t1ce"].message
    assert "2 voxel(s) are NaN or infinite" in by_case["nan_voxels"].message

    text = report.format()
    assert text.startswith(f"Checked 7 cases under {tmp_path}: 6 problem(s) in 6 case(s).")
    for name in ("bad_affine_t1.nii.gz", "bad_shape_t2.nii.gz", "flat_t1.nii.gz"):
        assert name in text
    assert "label3/label3_seg.nii.gz" in text
    assert "good" not in text


def test_label_3_is_valid_under_brats2023_and_4_is_not(tmp_path: Path) -> None:
    folder = _make_case(tmp_path, "c")
    _write(folder / "c_seg.nii.gz", _seg(value=3))
    cases = discover_cases(tmp_path)
    assert validate_cases(cases, convention="brats2023").ok

    _write(folder / "c_seg.nii.gz", _seg(value=4))
    (problem,) = validate_cases(cases, convention=LabelConvention.BRATS2023).problems
    assert "labels [4] are not valid" in problem.message
    assert "HINT" not in problem.message


def test_validate_non_integer_labels_and_missing_seg(tmp_path: Path) -> None:
    folder = _make_case(tmp_path, "c")
    _write(folder / "c_seg.nii.gz", np.full(SHAPE, 0.5, np.float32))
    _make_case(tmp_path, "d", skip=("seg",))
    report = validate_cases(discover_cases(tmp_path))
    messages = [(p.case_id, p.message) for p in report.problems]
    assert messages[0] == ("c", "segmentation holds non-integer values.")
    assert messages[1][0] == "d"
    assert messages[1][1].startswith("missing segmentation: expected d_seg.nii.gz")
    assert len(messages) == 2

    no_seg = validate_cases(discover_cases(tmp_path), require_seg=False)
    assert [p.case_id for p in no_seg.problems] == ["c"]


def test_validate_unreadable_file(tmp_path: Path) -> None:
    folder = _make_case(tmp_path, "c")
    (folder / "c_t2.nii.gz").write_bytes(b"not a nifti")
    (problem,) = check_dataset(tmp_path).problems
    assert problem.path.name == "c_t2.nii.gz"
    assert "cannot be read" in problem.message


def test_check_dataset_reports_missing_root(tmp_path: Path) -> None:
    report = check_dataset(tmp_path / "nope")
    assert not report.ok
    assert report.num_cases == 0
    assert "does not exist" in report.format()


def test_load_case(tmp_path: Path) -> None:
    _make_case(tmp_path, "c", CaseNaming.FETS, ".nii")
    (case,) = discover_cases(tmp_path)

    loaded = load_case(case, [Modality.T2, Modality.FLAIR])

    assert loaded.case_id == "c"
    assert loaded.image.dtype == np.float32
    assert loaded.image.shape == (2, *SHAPE)
    assert loaded.image[0].max() == 4.0  # t2 is the 4th modality
    assert loaded.image[1].min() == 1.0
    assert loaded.seg is not None
    assert loaded.seg.dtype == np.uint8
    np.testing.assert_array_equal(loaded.seg, _seg())
    np.testing.assert_array_equal(loaded.affine, AFFINE)
    assert loaded.affine.dtype == np.float64
    assert tuple(loaded.header.get_data_shape()) == SHAPE


def test_load_case_missing_modality_names_file(tmp_path: Path) -> None:
    case = Case("c", tmp_path / "c", {}, None)
    with pytest.raises(BadCaseError, match=r"c_flair\.nii\.gz or c_flair\.nii"):
        load_case(case, ["flair"])


def test_case_reference_uncrop() -> None:
    ref = CaseReference(Path("x.nii.gz"), (6, 5, 2), (slice(1, 4), slice(2, 4)))
    cropped = np.arange(2 * 3 * 2 * 2).reshape(2, 3, 2, 2)
    full = ref.uncrop(cropped, fill=-1)
    assert full.shape == (2, 6, 5, 2)
    np.testing.assert_array_equal(full[:, 1:4, 2:4], cropped)
    assert (full[:, 0] == -1).all() and (full[:, :, :2] == -1).all()


def test_truncated_gzip_and_label_5_are_reported_with_their_files(tmp_path: Path) -> None:
    truncated = _make_case(tmp_path, "truncated")
    path = truncated / "truncated_t1.nii.gz"
    _write(path, np.random.default_rng(0).normal(size=SHAPE).astype(np.float32))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])  # an interrupted download
    label5 = _make_case(tmp_path, "label5")
    _write(label5 / "label5_seg.nii.gz", _seg(value=5))

    report = check_dataset(tmp_path)

    by_case = {p.case_id: p for p in report.problems}
    assert sorted(by_case) == ["label5", "truncated"]
    assert by_case["truncated"].path == path and "cannot be read" in by_case["truncated"].message
    assert by_case["label5"].path.name == "label5_seg.nii.gz"
    assert "labels [5] are not valid" in by_case["label5"].message
    assert "HINT" not in by_case["label5"].message  # 5 is valid under no convention
