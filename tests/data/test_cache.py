"""Tests for the preprocessed-volume cache: content, keys, atomic writes, no NIfTI on a hit."""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import pytest

from lightning_fedseg.data import cache as cache_module
from lightning_fedseg.data.cache import VolumeCache, default_cache_dir
from lightning_fedseg.data.cases import Case, discover_cases
from lightning_fedseg.data.validation import BadCaseError
from tests.data.conftest import write_case, write_nifti


def _volumes() -> tuple[np.ndarray, np.ndarray]:
    flair = np.zeros((4, 4, 3), np.float32)
    flair[1:3, 1:3, 0] = [[1, 3], [1, 3]]  # brain values 1, 3, 1, 3 -> z-scores -1, 1, -1, 1
    flair[1:3, 1:3, 1] = [[1, 1], [3, 3]]
    seg = np.zeros((4, 4, 3), np.uint8)
    seg[1, 1, 1] = 4
    seg[2, 2, 1] = 2
    return flair, seg


def _case(root: Path, case_id: str = "BraTS_001") -> Case:
    flair, seg = _volumes()
    write_case(root, case_id, flair, seg)
    (case,) = [c for c in discover_cases(root, ["flair"]) if c.case_id == case_id]
    return case


def _forbid_nifti(monkeypatch: pytest.MonkeyPatch) -> None:
    def fail(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("a NIfTI file was read")

    monkeypatch.setattr(nib, "load", fail)
    monkeypatch.setattr(cache_module, "load_case", fail)


def test_build_writes_normalized_fortran_ordered_volumes(tmp_path: Path) -> None:
    case = _case(tmp_path / "data")
    cache = VolumeCache(tmp_path / "cache", ["flair"])
    entry = cache.get(case)
    image, labels = entry.image(), entry.labels()
    assert isinstance(image, np.memmap) and image.mode == "r"
    assert image.shape == (1, 4, 4, 3) and image.dtype == np.float32
    assert image.flags.f_contiguous  # an axial slice image[..., z] is one contiguous block
    # Brain values over all slices: 1, 3, 1, 3, 1, 1, 3, 3 -> mean 2, std 1.
    np.testing.assert_allclose(image[0, 1:3, 1:3, 0], [[-1, 1], [-1, 1]])
    np.testing.assert_allclose(image[0, 1:3, 1:3, 1], [[-1, -1], [1, 1]])
    assert labels is not None and labels.dtype == np.uint8
    assert labels[1, 1, 1] == 4 and labels[2, 2, 1] == 2 and labels.sum() == 6
    assert entry.brain_slices == (True, True, False)
    assert entry.tumour_slices == (False, True, False)
    assert entry.labels_present == (0, 2, 4)
    assert entry.full_shape == (4, 4, 3)
    assert entry.reference_path == case.images[next(iter(case.images))]
    assert entry.slices("brain").tolist() == [0, 1]


def test_hit_reads_no_nifti(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    case = _case(tmp_path / "data")
    first = VolumeCache(tmp_path / "cache", ["flair"]).get(case)
    _forbid_nifti(monkeypatch)
    again = VolumeCache(tmp_path / "cache", ["flair"]).get(case)
    assert again == first
    np.testing.assert_array_equal(again.image(), first.image())


def test_key_follows_files_and_settings(tmp_path: Path) -> None:
    case = _case(tmp_path / "data")
    cache = VolumeCache(tmp_path / "cache", ["flair"])
    entry = cache.get(case)
    assert VolumeCache(tmp_path / "cache", ["flair"], crop_size=2).lookup(case) is None
    assert VolumeCache(tmp_path / "cache", ["flair"], crop_size=2).get(case).image_shape == (
        1,
        2,
        2,
        3,
    )
    # Rewriting a source file (new size or mtime) gives a new key: the old entry is not reused.
    flair_path = case.images[next(iter(case.images))]
    stat = flair_path.stat()
    os.utime(flair_path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000))
    assert cache.lookup(case) is None
    assert cache.get(case).directory != entry.directory


def test_interrupted_build_is_never_trusted(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    case = _case(tmp_path / "data")
    cache = VolumeCache(tmp_path / "cache", ["flair"])
    real_write_json = cache_module._write_json

    def crash(path: Path, data: dict[str, Any]) -> None:
        raise KeyboardInterrupt  # killed after the arrays, before meta.json

    monkeypatch.setattr(cache_module, "_write_json", crash)
    with pytest.raises(KeyboardInterrupt):
        cache.build(case)
    directory = cache.entry_dir(case)
    assert not directory.exists()  # an interrupted build removes the folder it created
    # A hard kill cannot clean up: an entry without meta.json is never trusted, and rebuilt.
    directory.mkdir(parents=True)
    np.save(directory / "image.npy", np.zeros((1, 4, 4, 3), np.float32))
    assert cache.lookup(case) is None
    monkeypatch.setattr(cache_module, "_write_json", real_write_json)
    assert cache.get(case).image().shape == (1, 4, 4, 3)
    assert float(np.abs(cache.get(case).image()).max()) > 0


def test_interrupted_array_write_leaves_no_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    case = _case(tmp_path / "data")
    cache = VolumeCache(tmp_path / "cache", ["flair"])

    def half_save(handle: Any, array: np.ndarray, allow_pickle: bool = False) -> None:
        handle.write(b"\x93NUMPY partial")
        raise KeyboardInterrupt

    monkeypatch.setattr(cache_module.np, "save", half_save)
    with pytest.raises(KeyboardInterrupt):
        cache.build(case)
    assert not cache.entry_dir(case).exists()  # temporary file and folder removed, nothing moved


def test_label_convention_check_names_the_file(tmp_path: Path) -> None:
    flair, seg = _volumes()
    seg[seg == 4] = 3
    write_case(tmp_path / "data", "BraTS_002", flair, seg)
    (case,) = discover_cases(tmp_path / "data", ["flair"])
    with pytest.raises(BadCaseError, match=r"BraTS_002_seg\.nii\.gz: labels \[3\] are not valid.*brats2023"):
        VolumeCache(tmp_path / "cache", ["flair"]).get(case)
    assert not (tmp_path / "cache").exists()  # a refused case writes nothing
    entry = VolumeCache(tmp_path / "cache", ["flair"], label_convention="brats2023").get(case)
    with pytest.raises(ValueError, match=r"BraTS_002_seg\.nii\.gz: labels \[3\].*brats2023"):
        entry.check_labels("brats")
    entry.check_labels("brats2023")


def test_labels_outside_uint8_are_refused(tmp_path: Path) -> None:
    flair, _ = _volumes()
    write_case(tmp_path / "data", "BraTS_003", flair)
    seg_path = write_nifti(tmp_path / "data" / "BraTS_003" / "BraTS_003_seg.nii.gz", np.full((4, 4, 3), 300, np.int16))
    (case,) = discover_cases(tmp_path / "data", ["flair"])
    with pytest.raises(BadCaseError, match=re.escape(f"{seg_path}: labels [300] are not valid")):
        VolumeCache(tmp_path / "cache", ["flair"]).get(case)


def test_missing_modality_names_the_case(tmp_path: Path) -> None:
    case = _case(tmp_path / "data")
    with pytest.raises(FileNotFoundError, match=r"BraTS_001 in .* has no t1 image"):
        VolumeCache(tmp_path / "cache", ["flair", "t1"]).get(case)


def test_reference_without_cache_entry_reads_the_header_only(tmp_path: Path) -> None:
    case = _case(tmp_path / "data")
    cache = VolumeCache(tmp_path / "cache", ["flair"], crop_size=2)
    from_header = cache.reference(case)
    assert from_header.full_shape == (4, 4, 3)
    assert from_header.crop == (slice(1, 3), slice(1, 3))
    assert cache.get(case).reference() == from_header


def test_tumour_volume_is_remembered(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    case = _case(tmp_path / "data")
    cache = VolumeCache(tmp_path / "cache", ["flair"])
    assert cache.tumour_volume(case) == 2
    _forbid_nifti(monkeypatch)
    assert cache.tumour_volume(case) == 2


def test_default_cache_dir(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("LIGHTNING_FEDSEG_CACHE", str(tmp_path / "mine"))
    assert default_cache_dir() == tmp_path / "mine"
    monkeypatch.delenv("LIGHTNING_FEDSEG_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert default_cache_dir() == tmp_path / "xdg" / "lightning_fedseg" / "preprocessed"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert default_cache_dir() == Path.home() / ".cache" / "lightning_fedseg" / "preprocessed"
    assert VolumeCache(None).cache_dir == default_cache_dir()


def test_cache_arguments_are_validated() -> None:
    with pytest.raises(ValueError, match=r"Expected `crop_size` to be a positive integer, but got 0\."):
        VolumeCache("/tmp/x", ["flair"], crop_size=0)
    with pytest.raises(ValueError, match="at least one modality"):
        VolumeCache("/tmp/x", [])


def test_reorientation_and_label_convention_enter_the_key(tmp_path: Path) -> None:
    case = _case(tmp_path / "data")
    keys = {
        VolumeCache(tmp_path / "cache", ["flair"]).key(case),
        VolumeCache(tmp_path / "cache", ["flair"], reorient=True).key(case),
        VolumeCache(tmp_path / "cache", ["flair"], label_convention="brats2023").key(case),
    }
    assert len(keys) == 3
