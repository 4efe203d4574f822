"""FederatedDataModule at scale: bad cases stop the run, open descriptors stay bounded, lazy loaders."""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import nibabel as nib
import numpy as np
import pytest
from torch import nn

from lightning_fedseg import FedAvg, FederatedStrategy, SingleSite
from lightning_fedseg.data.datamodule import FederatedDataModule, SliceDataset
from lightning_fedseg.data.synthetic import SyntheticDataset
from lightning_fedseg.data.validation import BadCaseError
from lightning_fedseg.module import BrainTumorSegmentation


def _copy(tiny_dataset: SyntheticDataset, tmp_path: Path) -> Path:
    root = tmp_path / "data"
    shutil.copytree(tiny_dataset.root, root)
    return root


def _poison(root: Path, case_id: str) -> Path:
    """Store ``case_id``'s FLAIR as float32 with one NaN voxel."""
    path = root / case_id / f"{case_id}_flair.nii.gz"
    image = nib.load(path)
    data = np.asarray(image.get_fdata(), np.float32)
    data[3, 3, 3] = np.nan
    nib.save(nib.Nifti1Image(data, image.affine), path)
    return path


def _entries(cache: Path, case_id: str) -> list[Path]:
    return sorted(cache.glob(f"{case_id}-*")) if cache.is_dir() else []


class _CountBatches(pl.Callback):
    batches = 0

    def on_train_batch_start(self, *args: Any) -> None:
        self.batches += 1


def _fit(dm: FederatedDataModule, tmp_path: Path, mode: Any) -> _CountBatches:
    counter = _CountBatches()
    model = BrainTumorSegmentation(network=nn.Conv2d(1, 1, 1), compute_hd95=False, log_images=0)
    trainer = pl.Trainer(
        accelerator="cpu",
        max_epochs=1,
        limit_train_batches=2,
        limit_val_batches=0,
        default_root_dir=tmp_path,
        strategy=FederatedStrategy(mode=mode),
        callbacks=[counter],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(model, datamodule=dm)
    return counter


def _shift(root: Path, case_id: str) -> Path:
    """Move ``case_id``'s FLAIR by 25 mm (its header only)."""
    path = root / case_id / f"{case_id}_flair.nii.gz"
    image = nib.load(path)
    affine = image.affine.copy()
    affine[0, 3] += 25.0
    nib.save(nib.Nifti1Image(np.asanyarray(image.dataobj), affine, image.header), path)
    return path


@pytest.mark.parametrize("fault", ["nan", "shifted"])
def test_a_bad_file_stops_fit_before_training_naming_it(
    tiny_dataset: SyntheticDataset, tmp_path: Path, fault: str
) -> None:
    root = _copy(tiny_dataset, tmp_path)
    dm = FederatedDataModule(data_root=str(root), cache_dir=str(tmp_path / "cache"), val_fraction=0.0)
    dm.setup("fit")
    last_site = dm.site_names[-1]
    bad_ids = list(dm.partition.sites[last_site].train[:2])
    paths = [(_poison if fault == "nan" else _shift)(root, case_id) for case_id in bad_ids]
    dm = FederatedDataModule(data_root=str(root), cache_dir=str(tmp_path / "cache"), val_fraction=0.0)

    counter = _CountBatches()
    with pytest.raises(BadCaseError) as caught:
        counter = _fit(dm, tmp_path, FedAvg())

    message = str(caught.value)
    expected = (
        "1 voxel(s) are NaN or infinite."
        if fault == "nan"
        else "affine differs from the t1, t1ce, t2 and seg images', which agree with each other, by up to 25"
    )
    for path in paths:  # every bad case of the request, each at its file
        assert f"{path.relative_to(root)}: {expected}" in message
    assert "skip_bad_cases: true" in message
    assert counter.batches == 0
    for case_id in bad_ids:
        assert _entries(tmp_path / "cache", case_id) == []  # nothing half-written
    assert not list((tmp_path / "cache").glob("**/*.tmp"))


def test_skip_bad_cases_leaves_them_out_with_a_warning(tiny_dataset: SyntheticDataset, tmp_path: Path) -> None:
    root = _copy(tiny_dataset, tmp_path)
    dm = FederatedDataModule(data_root=str(root), cache_dir=str(tmp_path / "cache"), val_fraction=0.0)
    site = dm.site_names[0]
    bad = dm.partition.sites[site].train[0]
    _poison(root, bad)
    good = FederatedDataModule(data_root=str(root), cache_dir=str(tmp_path / "cache"), val_fraction=0.0)
    skip = FederatedDataModule(
        data_root=str(root), cache_dir=str(tmp_path / "cache"), val_fraction=0.0, skip_bad_cases=True
    )

    with pytest.warns(UserWarning, match=rf"leaving out 1 case\(s\) that fail validation: {bad}\."):
        dataset = skip.site_train_dataset(site)

    assert bad not in {c.case_id for c in dataset.cases}
    assert len(dataset.cases) == len(skip.partition.sites[site].train) - 1
    assert list(skip.skipped_cases) == [bad]
    assert skip.site_num_samples(site) == len(dataset)
    with pytest.raises(BadCaseError, match=f"{bad}_flair.nii.gz"):
        good.site_num_samples(site)


def _open_descriptors() -> int:
    return len(os.listdir("/proc/self/fd"))


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="counts /proc/self/fd")
def test_no_file_stays_open_between_reads(tiny_dataset: SyntheticDataset, tmp_path: Path) -> None:
    dm = FederatedDataModule(data_root=str(tiny_dataset.root), cache_dir=str(tmp_path / "cache"))
    dm.setup("fit")
    cases = dm._cache_cases(list(dm._cases.values()))
    dataset = SliceDataset(cases, [np.arange(c.num_slices, dtype=np.int64) for c in cases])
    order = np.random.default_rng(0).permutation(len(dataset))
    before, most = _open_descriptors(), 0
    for index in order:  # every slice of all 20 cases, shuffled
        dataset[int(index)]
        most = max(most, _open_descriptors() - before)
    assert most == 0
    for index in order[:50]:  # the slices are the cached arrays' own
        i, z = int(dataset.case_index[index]), int(dataset.z_index[index])
        sample = dataset[int(index)]
        np.testing.assert_array_equal(sample["image"].numpy(), cases[i].image()[..., z])
        labels = np.asarray(cases[i].labels()[..., z])  # type: ignore[index]
        np.testing.assert_array_equal(sample["target"][0].numpy(), np.isin(labels, (1, 2, 4)))


def test_single_never_preprocesses_the_other_sites(tiny_dataset: SyntheticDataset, tmp_path: Path) -> None:
    dm = FederatedDataModule(data_root=str(tiny_dataset.root), cache_dir=str(tmp_path / "cache"), batch_size=4)
    dm.setup("fit")
    loader = dm.train_dataloader()
    assert not (tmp_path / "cache").exists()  # the pooled loader reads nothing until iterated
    site = dm.site_names[1]

    counter = _fit(dm, tmp_path, SingleSite(site=site))

    assert counter.batches == 2
    built = {p.name.rsplit("-", 1)[0] for p in (tmp_path / "cache").iterdir() if p.is_dir()}
    validation = {s for split in dm.partition.sites.values() for s in split.val}  # scored for every site
    assert built == set(dm.partition.sites[site].train) | validation
    assert len(loader) == -(-sum(dm.site_num_samples(s) for s in dm.site_names) // 4)  # built when asked


def test_paper_partition_warns_that_it_is_not_the_institution_split(
    tiny_dataset: SyntheticDataset, tmp_path: Path
) -> None:
    dm = FederatedDataModule(data_root=str(tiny_dataset.root), partition="paper", cache_dir=str(tmp_path / "c"))
    with pytest.warns(UserWarning, match="not the paper's split by institution"):
        dm.setup("fit")


def test_fets_2022_csv_with_missing_and_repeated_subjects_is_refused_naming_them(
    tiny_dataset: SyntheticDataset, tmp_path: Path
) -> None:
    subjects = sorted(tiny_dataset.subject_sites)
    rows = [f"{1 + i % 3},{s}" for i, s in enumerate(subjects)]
    rows += ["2,FeTS2022_09999", "3,FeTS2022_10000", f"1,{subjects[4]}"]  # two not on disk, one repeated
    csv_path = tmp_path / "partitioning_1.csv"
    csv_path.write_text("Partition_ID,Subject_ID\n" + "\n".join(rows) + "\n")
    dm = FederatedDataModule(
        data_root=str(tiny_dataset.root), partition="fets", partition_csv=str(csv_path), cache_dir=str(tmp_path / "c")
    )
    with pytest.raises(ValueError) as caught:
        dm.setup("fit")
    message = str(caught.value)
    assert f"1 subject(s) are listed more than once: {subjects[4]} on lines 6, {len(subjects) + 4}." in message
    assert "2 subject(s) have no case folder under" in message
    assert message.endswith(": FeTS2022_09999, FeTS2022_10000.")

    csv_path.write_text("Partition_ID,Subject_ID\n" + "\n".join(rows[:-1]) + "\n")  # the repetition fixed
    with pytest.raises(
        ValueError, match=r"2 subject\(s\) have no case folder under .*: FeTS2022_09999, FeTS2022_10000"
    ):
        FederatedDataModule(
            data_root=str(tiny_dataset.root), partition="fets", partition_csv=str(csv_path), cache_dir=str(tmp_path)
        ).setup("fit")
