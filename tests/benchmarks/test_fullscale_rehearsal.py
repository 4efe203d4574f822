"""The full-scale rehearsal's partition CSVs (the rehearsal itself is a slow benchmark, not CI)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from lightning_fedseg.data import FederatedDataModule, read_fets_csv, write_synthetic_dataset

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "fullscale_rehearsal.py"


def _script():
    spec = importlib.util.spec_from_file_location("fullscale_rehearsal", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_fets_2022_csvs_of_23_institutions_and_the_broken_copy_is_refused(tmp_path: Path) -> None:
    rehearsal = _script()
    data = write_synthetic_dataset(tmp_path / "data", num_subjects=69, shape=(8, 8, 8), num_sites=23, seed=0)
    good, bad = rehearsal.write_csvs(data.root, tmp_path)

    assert good.read_text().splitlines()[0] == "Partition_ID,Subject_ID"
    partition = read_fets_csv(good)
    assert len(partition.site_names) == 23
    assert sorted(s for split in partition.sites.values() for s in split.subjects) == sorted(data.subject_sites)
    dm = FederatedDataModule(
        data_root=str(data.root), partition="fets", partition_csv=str(bad), cache_dir=str(tmp_path)
    )
    with pytest.raises(ValueError) as caught:
        dm.setup("fit")
    message = str(caught.value)
    assert "1 subject(s) are listed more than once: BraTS_SYN_0008 on lines 9, 74." in message
    assert message.endswith(
        "3 subject(s) have no case folder under " + f"{data.root}: " + ", ".join(rehearsal.MISSING) + "."
    )
