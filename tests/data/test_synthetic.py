"""Tests for writing, reusing and caching synthetic BraTS-layout datasets."""

from __future__ import annotations

import csv
import hashlib
import json
import re
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import pytest

from lightning_fedseg.data import synthetic
from lightning_fedseg.data.cases import discover_cases
from lightning_fedseg.data.synthetic import (
    TISSUE_CLASSES,
    default_synthetic_root,
    ensure_synthetic_dataset,
    write_synthetic_dataset,
)
from lightning_fedseg.data.validation import validate_cases

TINY = (24, 24, 12)


def _load(path: Path) -> nib.Nifti1Image:
    image = nib.load(path)
    assert isinstance(image, nib.Nifti1Image)
    return image


def _tiny_dataset(out: Path, **kwargs: Any) -> synthetic.SyntheticDataset:
    params: dict[str, Any] = {"num_subjects": 6, "shape": TINY, "num_sites": 2, "seed": 0}
    params.update(kwargs)
    return write_synthetic_dataset(out, **params)


def _file_hashes(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def test_write_dataset_layout_partition_and_manifest(tmp_path: Path) -> None:
    out = tmp_path / "synth"
    data = _tiny_dataset(out, num_subjects=7)

    assert data.root == out
    assert data.site_sizes == (4, 3)
    assert str(data) == f"synthetic dataset at {out}: 7 subjects of 24x24x12 voxels in 2 sites (4, 3)"
    ids = [f"BraTS_SYN_{k:04d}" for k in range(1, 8)]
    assert data.subject_ids == ids
    assert sorted(p.name for p in out.iterdir()) == [*ids, "dataset.json", "partition.csv"]
    assert sorted(p.name for p in (out / ids[0]).iterdir()) == [
        f"{ids[0]}_{name}.nii.gz" for name in ("flair", "seg", "t1", "t1ce", "t2")
    ]
    with (out / "partition.csv").open(newline="") as f:
        rows = list(csv.reader(f))
    assert rows[0] == ["Subject_ID", "Partition_ID"]
    assert [r[0] for r in rows[1:]] == ids  # every subject exactly once
    assert sorted(int(r[1]) for r in rows[1:]) == [1, 1, 1, 1, 2, 2, 2]

    manifest = json.loads((out / "dataset.json").read_text())
    assert manifest["parameters"] == {
        "generator_version": synthetic.GENERATOR_VERSION,
        "num_subjects": 7,
        "shape": list(TINY),
        "num_sites": 2,
        "seed": 0,
        "site_sizes": [4, 3],
        "naming": "brats",
    }
    assert manifest["spacing_mm"] == [10.0, 10.0, pytest.approx(155 / 12)]
    assert [s["num_subjects"] for s in manifest["sites"]] == [4, 3]
    assert set(manifest["sites"][0]["contrast"]["flair"]) == set(TISSUE_CLASSES)

    image = _load(out / ids[0] / f"{ids[0]}_flair.nii.gz")
    assert image.get_data_dtype() == np.int16
    assert image.header.get_zooms() == pytest.approx((10.0, 10.0, 155 / 12))
    report = validate_cases(discover_cases(out))
    assert report.ok, report.format()


def test_fets_naming_is_discovered(tmp_path: Path) -> None:
    _tiny_dataset(tmp_path / "fets", naming="fets", num_subjects=2, num_sites=1)
    cases = discover_cases(tmp_path / "fets")
    assert [c.naming for c in cases] == ["fets", "fets"]
    assert cases[0].seg is not None and cases[0].seg.name == "BraTS_SYN_0001_final_seg.nii.gz"
    assert validate_cases(cases).ok


def test_same_parameters_same_bytes(tmp_path: Path) -> None:
    _tiny_dataset(tmp_path / "a")
    _tiny_dataset(tmp_path / "b")
    _tiny_dataset(tmp_path / "c", seed=1)
    assert _file_hashes(tmp_path / "a") == _file_hashes(tmp_path / "b")
    seg_a = _load(tmp_path / "a/BraTS_SYN_0001/BraTS_SYN_0001_seg.nii.gz").get_fdata()
    seg_c = _load(tmp_path / "c/BraTS_SYN_0001/BraTS_SYN_0001_seg.nii.gz").get_fdata()
    assert not np.array_equal(seg_a, seg_c)


def test_parallel_workers_write_the_same_bytes(tmp_path: Path) -> None:
    _tiny_dataset(tmp_path / "serial", num_subjects=4)
    _tiny_dataset(tmp_path / "parallel", num_subjects=4, num_workers=2)
    assert _file_hashes(tmp_path / "serial") == _file_hashes(tmp_path / "parallel")


def test_interrupted_write_leaves_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    written: list[tuple] = []
    original = synthetic._write_subject

    def fail_on_third(job: tuple) -> None:
        if len(written) == 2:
            raise RuntimeError("disk full")
        original(job)
        written.append(job)

    monkeypatch.setattr(synthetic, "_write_subject", fail_on_third)
    with pytest.raises(RuntimeError, match="disk full"):
        _tiny_dataset(tmp_path / "synth")
    assert len(written) == 2
    assert list(tmp_path.iterdir()) == []  # neither `synth` nor `synth.tmp-<pid>`


def test_existing_dataset_is_reused_and_never_silently_overwritten(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "synth"
    first = _tiny_dataset(out)
    before = _file_hashes(out)

    def must_not_write(job: tuple) -> None:
        raise AssertionError("rewrote an existing dataset")

    with monkeypatch.context() as patch:
        patch.setattr(synthetic, "_write_subject", must_not_write)
        again = _tiny_dataset(out)
    assert again.subject_sites == first.subject_sites

    with pytest.raises(FileExistsError, match="overwrite=True"):
        _tiny_dataset(out, seed=3)
    assert _file_hashes(out) == before

    replaced = _tiny_dataset(out, seed=3, overwrite=True)
    assert replaced.manifest["parameters"]["seed"] == 3
    assert sorted(p.name for p in tmp_path.iterdir()) == ["synth"]

    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match=re.escape(str(other))):
        _tiny_dataset(other)
    assert (other / "notes.txt").read_text() == "mine"


def test_concurrent_writers_of_the_same_dataset(tmp_path: Path) -> None:
    out = tmp_path / "synth"
    with ProcessPoolExecutor(max_workers=2) as pool:
        results = list(pool.map(_tiny_dataset, [out, out]))
    assert results[0].subject_sites == results[1].subject_sites
    assert sorted(p.name for p in tmp_path.iterdir()) == ["synth"]
    assert validate_cases(discover_cases(out)).ok

    # A writer that finishes after `out` is complete keeps the existing folder untouched.
    inode = (out / "partition.csv").stat().st_ino
    late = _tiny_dataset(tmp_path / "late")
    synthetic._move_into_place(tmp_path / "late", out, late.manifest["parameters"], False)
    assert (out / "partition.csv").stat().st_ino == inode


def test_parameter_validation(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"`num_sites` \(3\) to match len\(site_sizes\) \(2\)"):
        write_synthetic_dataset(tmp_path / "x", site_sizes=(3, 3), num_sites=3)
    with pytest.raises(ValueError, match="`full_size=True` and `shape="):
        write_synthetic_dataset(tmp_path / "x", shape=TINY, full_size=True)
    with pytest.raises(ValueError, match="`seed` to be a non-negative integer, but got -1"):
        write_synthetic_dataset(tmp_path / "x", seed=-1)
    with pytest.raises(ValueError, match="`shape` to be 3 sizes"):
        write_synthetic_dataset(tmp_path / "x", shape=(24, 24))
    assert not (tmp_path / "x").exists()
    data = write_synthetic_dataset(tmp_path / "sized", shape=TINY, site_sizes=(1, 2))
    assert data.site_sizes == (1, 2)
    assert sorted(data.subject_sites.values()) == [1, 2, 2]


def test_default_root(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("LIGHTNING_FEDSEG_DATA", str(tmp_path / "data"))
    assert default_synthetic_root() == tmp_path / "data"
    monkeypatch.delenv("LIGHTNING_FEDSEG_DATA")
    monkeypatch.setenv("HOME", str(tmp_path))
    assert default_synthetic_root() == tmp_path / ".cache" / "lightning_fedseg" / "synthetic"


def test_ensure_synthetic_dataset(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    params: dict[str, Any] = {"num_subjects": 3, "shape": TINY, "num_sites": 1}
    folder = ensure_synthetic_dataset(tmp_path, **params)
    assert folder.parent == tmp_path
    assert folder.name.startswith("3subj-24x24x12-1sites-seed0-")
    assert validate_cases(discover_cases(folder)).ok

    monkeypatch.setattr(synthetic, "_write_subject", None)  # any rewrite would fail
    assert ensure_synthetic_dataset(tmp_path, **params) == folder
    monkeypatch.undo()

    assert ensure_synthetic_dataset(tmp_path, seed=1, **params) != folder
    monkeypatch.setenv("LIGHTNING_FEDSEG_DATA", str(tmp_path / "env"))
    assert ensure_synthetic_dataset(**params).parent == tmp_path / "env"
