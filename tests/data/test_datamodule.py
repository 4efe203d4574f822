"""Tests for FederatedDataModule on a tiny synthetic federation (20 subjects, 24x24x12, 4 sites)."""

from __future__ import annotations

import re
import shutil
from collections import defaultdict
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import pytest
import torch
from torch.utils.data import RandomSampler, SequentialSampler

from lightning_fedseg.data import cache as cache_module
from lightning_fedseg.data.cases import Case, discover_cases
from lightning_fedseg.data.conventions import Target, labels_to_regions
from lightning_fedseg.data.datamodule import FederatedDataModule
from lightning_fedseg.data.preprocess import zscore_brain
from lightning_fedseg.data.synthetic import SyntheticDataset
from lightning_fedseg.data.validation import load_case
from tests.data.conftest import TINY_SHAPE

BATCH_KEYS = {"image", "target", "case_id", "slice_index", "num_slices"}


@pytest.fixture(scope="module")
def shared_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="module")
def dm(tiny_dataset: SyntheticDataset, shared_cache: Path) -> FederatedDataModule:
    module = FederatedDataModule(data_root=str(tiny_dataset.root), cache_dir=str(shared_cache), batch_size=8)
    module.setup("fit")
    return module


def _make(tiny_dataset: SyntheticDataset, cache: Path, **kwargs: Any) -> FederatedDataModule:
    return FederatedDataModule(data_root=str(tiny_dataset.root), cache_dir=str(cache), **kwargs)


def _subjects(dm: FederatedDataModule) -> list[str]:
    p = dm.partition
    return [s for sp in p.sites.values() for s in sp.subjects] + list(p.heldout)


def _record_loads(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    loaded: list[str] = []

    def recording_load_case(case: Case, *args: Any) -> Any:
        loaded.append(case.case_id)
        return load_case(case, *args)

    monkeypatch.setattr(cache_module, "load_case", recording_load_case)
    return loaded


def _forbid_nifti(monkeypatch: pytest.MonkeyPatch) -> None:
    def fail(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("a NIfTI file was read")

    monkeypatch.setattr(nib, "load", fail)
    monkeypatch.setattr(cache_module, "load_case", fail)


def _drain(loader: Any) -> list[dict[str, Any]]:
    return list(loader)


# --------------------------------------------------------------------------- partition
def test_auto_partition_keeps_the_synthetic_institutions(
    dm: FederatedDataModule, tiny_dataset: SyntheticDataset
) -> None:
    assert dm.site_names == ["1", "2", "3", "4"]
    assert dm.val_loader_names == dm.site_names
    p = dm.partition
    assert p.heldout_by_site is not None
    for name, split in p.sites.items():
        held = p.heldout_by_site[name]
        # 5 subjects per institution; round(20 * 45 / 210) = 4 held out, one per site; of the
        # 4 left round(0.2 * 4) = 1 validates.
        assert (len(split.train), len(split.val), len(held)) == (3, 1, 1)
        assert {tiny_dataset.subject_sites[s] for s in split.subjects + held} == {int(name)}


def test_sites_are_patient_disjoint(dm: FederatedDataModule, tiny_dataset: SyntheticDataset) -> None:
    subjects = _subjects(dm)
    assert sorted(subjects) == tiny_dataset.subject_ids
    seen: dict[str, set[str]] = {}
    for site in dm.site_names:
        train = set(dm.site_train_dataset(site).num_slices)
        val = set(dm.site_val_dataset(site).num_slices)
        assert not train & val
        seen[site] = train | val
    everything = [s for ids in seen.values() for s in ids]
    assert len(everything) == len(set(everything)) == 16
    assert not set(everything) & set(dm.partition.heldout)


def test_describe_table(dm: FederatedDataModule) -> None:
    table = dm.describe()
    assert table.splitlines()[0] == "| site | train | val | held-out | training slices |"
    n1 = dm.site_num_samples("1")
    assert f"| 1 | 3 | 1 | 1 | {n1} |" in table
    total = sum(dm.site_num_samples(s) for s in dm.site_names)
    assert table.splitlines()[-1] == f"| total | 12 | 4 | 4 | {total} |"


# --------------------------------------------------------------------------- batches
def test_training_batches_follow_the_contract(dm: FederatedDataModule) -> None:
    loader = dm.site_train_dataloader("1")
    assert isinstance(loader.sampler, RandomSampler)
    assert loader.sampler.generator is None
    batch = next(iter(loader))
    assert set(batch) == BATCH_KEYS
    assert batch["image"].shape == (8, 1, 24, 24) and batch["image"].dtype == torch.float32
    assert batch["target"].shape == (8, 1, 24, 24) and batch["target"].dtype == torch.float32
    assert set(batch["target"].unique().tolist()) <= {0.0, 1.0}
    assert batch["slice_index"].dtype == torch.int64 and batch["slice_index"].shape == (8,)
    assert batch["num_slices"].dtype == torch.int64
    assert isinstance(batch["case_id"], list) and isinstance(batch["case_id"][0], str)
    counts = dm.site_train_dataset("1").num_slices
    for case_id, n in zip(batch["case_id"], batch["num_slices"].tolist(), strict=True):
        assert counts[case_id] == n
    # "brain" policy: the FedAvg weight is the number of brain slices of the training cases.
    cached = dm.site_train_dataset("1").cases  # the cache entries of the training cases
    assert [c.case_id for c in cached] == list(dm.partition.sites["1"].train)
    assert dm.site_num_samples("1") == sum(sum(c.brain_slices) for c in cached)
    assert dm.site_num_samples("1") == len(loader.dataset)  # type: ignore[arg-type]


def test_pooled_loaders(dm: FederatedDataModule) -> None:
    train = dm.train_dataloader()
    assert isinstance(train.sampler, RandomSampler)
    assert len(train.dataset) == sum(dm.site_num_samples(s) for s in dm.site_names)  # type: ignore[arg-type]
    vals = dm.val_dataloader()
    assert len(vals) == 4
    assert all(isinstance(v.sampler, SequentialSampler) for v in vals)
    # One validation case per site, every slice.
    assert [len(v.dataset) for v in vals] == [TINY_SHAPE[2]] * 4  # type: ignore[arg-type]


def test_regions_target_and_several_modalities(tiny_dataset: SyntheticDataset, tmp_path: Path) -> None:
    dm = _make(
        tiny_dataset,
        tmp_path,
        target="regions",
        modalities=["flair", "t1ce"],
        sites=["3"],
        slice_policy="all",
        batch_size=64,
    )
    assert dm.in_channels == 2 and dm.target is Target.REGIONS
    dm.setup("fit")
    batch = next(iter(dm.site_train_dataloader("3")))
    assert batch["image"].shape == (36, 2, 24, 24)  # 3 cases x 12 slices ("all")
    target = batch["target"]
    assert target.shape == (36, 3, 24, 24)
    wt, tc, et = target[:, 0], target[:, 1], target[:, 2]
    assert bool((tc <= wt).all()) and bool((et <= tc).all())
    assert target[:, 0].sum() > target[:, 1].sum() > 0
    assert dm.site_num_samples("3") == 3 * TINY_SHAPE[2]


def test_ordered_val_loader_reassembles_volumes(tiny_dataset: SyntheticDataset, tmp_path: Path) -> None:
    dm = _make(tiny_dataset, tmp_path, crop_size=16, batch_size=5, sites=["4", "1"])
    dm.setup("fit")
    assert dm.local_site_names == ["1", "4"]  # site order, not the order given
    # one loader per site on every process (same indices on every rank); others' are empty
    assert dm.val_loader_names == ["1", "2", "3", "4"]
    assert [len(loader.dataset) > 0 for loader in dm.val_dataloader()] == [True, False, False, True]
    order: list[str] = []
    slices: dict[str, list[int]] = defaultdict(list)
    images: dict[str, list[np.ndarray]] = defaultdict(list)
    targets: dict[str, list[np.ndarray]] = defaultdict(list)
    for batch in _drain(dm.site_val_dataloader("1")) + _drain(dm.site_val_dataloader("4")):
        for i, case_id in enumerate(batch["case_id"]):
            if not order or order[-1] != case_id:
                assert case_id not in order  # case by case, never interleaved
                order.append(case_id)
            slices[case_id].append(int(batch["slice_index"][i]))
            assert int(batch["num_slices"][i]) == TINY_SHAPE[2]
            images[case_id].append(batch["image"][i].numpy())
            targets[case_id].append(batch["target"][i].numpy())
    assert order == list(dm.partition.sites["1"].val + dm.partition.sites["4"].val)
    cases = {c.case_id: c for c in discover_cases(tiny_dataset.root, ["flair"])}
    for case_id in order:
        assert slices[case_id] == list(range(TINY_SHAPE[2]))
        image = np.stack(images[case_id], axis=-1)  # [C, 16, 16, Z]
        target = np.stack(targets[case_id], axis=-1)
        ref = dm.case_reference(case_id)
        assert ref.full_shape == TINY_SHAPE
        assert ref.crop == (slice(4, 20), slice(4, 20))
        assert ref.reference_path == cases[case_id].images[next(iter(cases[case_id].images))]
        loaded = load_case(cases[case_id], ["flair"])
        assert loaded.seg is not None
        expected = zscore_brain(loaded.image)[:, 4:20, 4:20, :]
        np.testing.assert_allclose(image, expected, atol=1e-6)
        # The crop maps back: un-cropping the reassembled target gives the original mask
        # inside the crop and nothing outside.
        wt = labels_to_regions(loaded.seg, "wt")
        back = ref.uncrop(target.astype(bool))
        np.testing.assert_array_equal(back[:, 4:20, 4:20], wt[:, 4:20, 4:20])
        assert not back[:, :4].any() and not back[:, 20:].any()


# --------------------------------------------------------------------------- cache use
def test_second_epoch_reads_no_nifti(
    tiny_dataset: SyntheticDataset, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    loaded = _record_loads(monkeypatch)
    dm = _make(tiny_dataset, tmp_path, batch_size=16)
    dm.setup("fit")
    assert loaded == []  # setup splits subjects from file names only
    first = [b["image"].sum().item() for b in _drain(dm.site_val_dataloader("2"))]
    _drain(dm.train_dataloader())
    for loader in dm.val_dataloader():
        _drain(loader)
    assert sorted(loaded) == sorted(s for sp in dm.partition.sites.values() for s in sp.subjects)
    _forbid_nifti(monkeypatch)
    _drain(dm.train_dataloader())  # second epoch
    assert [b["image"].sum().item() for b in _drain(dm.site_val_dataloader("2"))] == first
    # A new run over the same cache reads no NIfTI either.
    again = _make(tiny_dataset, tmp_path, batch_size=16)
    again.setup("fit")
    _drain(again.site_train_dataloader("1"))


def test_site_restriction_never_loads_other_sites(
    tiny_dataset: SyntheticDataset, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    loaded = _record_loads(monkeypatch)
    dm = _make(tiny_dataset, tmp_path, sites=["2"])
    dm.setup("fit")
    _drain(dm.train_dataloader())
    _drain(dm.site_train_dataloader("2"))
    assert [len(v.dataset) for v in dm.val_dataloader()] == [0, TINY_SHAPE[2], 0, 0]  # type: ignore[arg-type]
    dm.setup("test")
    _drain(dm.test_dataloader())
    own = dm.partition.sites["2"].subjects
    assert dm.partition.heldout_by_site is not None
    assert sorted(loaded) == sorted(own + dm.partition.heldout_by_site["2"])
    assert dm.site_names == ["1", "2", "3", "4"]
    assert dm.val_loader_names == ["1", "2", "3", "4"]
    assert [len(loader.dataset) for loader in dm.val_dataloader()].count(0) == 3
    with pytest.raises(ValueError, match="Site '1' is not materialized in this process"):
        dm.site_train_dataloader("1")
    with pytest.raises(ValueError, match="not materialized"):
        dm.site_num_samples("3")
    with pytest.raises(KeyError, match="Unknown site '9'"):
        dm.site_val_dataloader("9")
    assert "| 1 | 3 | 1 | 1 | - |" in dm.describe()
    assert sorted(loaded) == sorted(own + dm.partition.heldout_by_site["2"])


def test_restrict_sites_after_setup(
    tiny_dataset: SyntheticDataset, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The federation strategy's order: setup on every rank, sizes of all sites, then restrict.
    loaded = _record_loads(monkeypatch)
    dm = _make(tiny_dataset, tmp_path)
    dm.setup("fit")
    assert [dm.site_num_subjects(s) for s in dm.site_names] == [3, 3, 3, 3]
    dm.restrict_sites(["4"])
    assert dm.local_site_names == ["4"]
    _drain(dm.train_dataloader())
    for loader in dm.val_dataloader():
        _drain(loader)
    assert sorted(loaded) == sorted(dm.partition.sites["4"].subjects)
    with pytest.raises(ValueError, match=r"Expected `sites` among .*unknown sites \['x'\]"):
        dm.restrict_sites(["x"])


def test_unknown_restricted_site(tiny_dataset: SyntheticDataset, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"Expected `sites` among .*unknown sites \['7'\]"):
        _make(tiny_dataset, tmp_path, sites=["7"]).setup("fit")


def test_leave_out_trains_the_others_and_tests_the_left_out_site(
    dm: FederatedDataModule, tiny_dataset: SyntheticDataset, shared_cache: Path
) -> None:
    left = dm.site_names[1]
    out = _make(tiny_dataset, shared_cache, batch_size=8, leave_out=[left])
    out.setup("fit")
    assert out.site_names == [s for s in dm.site_names if s != left]
    for site in out.site_names:
        assert out.partition.sites[site] == dm.partition.sites[site]
    expected = set(dm.partition.sites[left].subjects) | set(dm.partition.heldout_of([left]))
    tested = {case_id for batch in out.test_dataloader() for case_id in batch["case_id"]}
    assert tested == expected
    restricted = _make(tiny_dataset, shared_cache, leave_out=[left], sites=[out.site_names[0]])
    restricted.setup("fit")
    with pytest.raises(ValueError, match=r"`leave_out` holds out every subject of .*HINT: test in one process"):
        restricted.test_dataloader()
    with pytest.raises(ValueError, match=r"Expected `leave_out` to name distinct sites among"):
        _make(tiny_dataset, shared_cache, leave_out=["nowhere"]).setup("fit")


# --------------------------------------------------------------------------- FeTS CSV
def _write_csv(tiny_dataset: SyntheticDataset, path: Path) -> Path:
    ids = tiny_dataset.subject_ids
    rows = [f"{'12' if i < 12 else '7'},{s},{'val' if i % 4 == 3 else 'Train'}" for i, s in enumerate(ids)]
    path.write_text("Partition_ID,Subject_ID,TrainOrVal\n" + "\n".join(rows) + "\n")
    return path


def test_fets_csv_end_to_end(tiny_dataset: SyntheticDataset, tmp_path: Path) -> None:
    csv_path = _write_csv(tiny_dataset, tmp_path / "partitioning_2.csv")
    dm = _make(tiny_dataset, tmp_path / "cache", partition="fets", partition_csv=str(csv_path))
    dm.setup("fit")
    ids = tiny_dataset.subject_ids
    assert dm.site_names == ["7", "12"]
    assert dm.partition.sites["12"].val == (ids[3], ids[7], ids[11])
    assert len(dm.partition.sites["12"].train) == 9
    assert dm.partition.sites["7"].val == (ids[15], ids[19])
    batch = next(iter(dm.site_train_dataloader("7")))
    assert set(batch["case_id"]) <= set(ids[12:])
    with pytest.raises(ValueError, match=r"holds no subject out for testing\. HINT: set `num_heldout`"):
        dm.test_dataloader()
    # "auto" with a CSV is the FeTS split; num_heldout draws a test set per partition.
    held = _make(tiny_dataset, tmp_path / "cache", partition_csv=str(csv_path), num_heldout=2)
    held.setup("test")
    assert len(held.partition.heldout) == 2
    assert len(held.test_dataloader().dataset) == 2 * TINY_SHAPE[2]  # type: ignore[arg-type]


def test_bad_csv_errors_name_the_file(tiny_dataset: SyntheticDataset, tmp_path: Path) -> None:
    bad = tmp_path / "bad_partition.csv"
    bad.write_text("Subject,Site\nBraTS_SYN_0001,1\n")
    dm = _make(tiny_dataset, tmp_path, partition="fets", partition_csv=str(bad))
    with pytest.raises(ValueError, match=re.escape(f"{bad}:1: header Subject,Site lacks")):
        dm.setup("fit")
    unknown = tmp_path / "unknown.csv"
    unknown.write_text("Subject_ID,Partition_ID\nBraTS_SYN_0001,1\nNOT_A_CASE,1\n")
    dm = _make(tiny_dataset, tmp_path, partition="fets", partition_csv=str(unknown))
    with pytest.raises(ValueError, match=re.escape(f"{unknown}: 1 subject(s) have no case folder")):
        dm.setup("fit")


# --------------------------------------------------------------------------- other modes
def test_simulated_paper_and_dirichlet_modes(tiny_dataset: SyntheticDataset, tmp_path: Path) -> None:
    simulated = _make(tiny_dataset, tmp_path, partition="simulated", num_sites=3, num_heldout=2)
    assert simulated.site_names == ["site01", "site02", "site03"]
    assert [len(s.subjects) for s in simulated.partition.sites.values()] == [6, 6, 6]
    paper = _make(tiny_dataset, tmp_path, partition="paper")
    assert len(paper.site_names) == 10
    assert len(paper.partition.heldout) == 4  # round(20 * 45 / 210)
    dirichlet = _make(tiny_dataset, tmp_path, partition="dirichlet", num_sites=2, num_heldout=0)
    assert sum(len(s.subjects) for s in dirichlet.partition.sites.values()) == 20


def test_slice_policies_change_the_training_slices(
    tiny_dataset: SyntheticDataset, shared_cache: Path, dm: FederatedDataModule
) -> None:
    every = _make(tiny_dataset, shared_cache, slice_policy="all")
    balanced = _make(tiny_dataset, shared_cache, slice_policy="balanced")
    assert every.site_num_samples("1") == 3 * TINY_SHAPE[2]
    # Balanced: every tumour slice plus as many tumour-free brain slices (if there are enough).
    expected = 0
    for entry in dm.site_train_dataset("1").cases:
        assert entry.tumour_slices is not None
        tumour = sum(entry.tumour_slices)
        free = sum(b and not t for b, t in zip(entry.brain_slices, entry.tumour_slices, strict=True))
        expected += tumour + min(tumour, free)
    assert balanced.site_num_samples("1") == expected


def test_predict_root_without_segmentations(tiny_dataset: SyntheticDataset, tmp_path: Path) -> None:
    predict_root = tmp_path / "predict"
    for case_id in tiny_dataset.subject_ids[:2]:
        shutil.copytree(tiny_dataset.root / case_id, predict_root / case_id)
        (predict_root / case_id / f"{case_id}_seg.nii.gz").unlink()
    dm = _make(tiny_dataset, tmp_path / "cache", predict_root=str(predict_root), batch_size=7)
    dm.setup("predict")
    batches = _drain(dm.predict_dataloader())
    assert all("target" not in b for b in batches)
    assert sum(len(b["case_id"]) for b in batches) == 2 * TINY_SHAPE[2]
    ref = dm.case_reference(tiny_dataset.subject_ids[0])
    assert ref.reference_path.parent == predict_root / tiny_dataset.subject_ids[0]
    assert ref.full_shape == TINY_SHAPE
    # Without predict_root the held-out cases are predicted, with their targets.
    held = _make(tiny_dataset, tmp_path / "cache")
    held.setup("predict")
    batch = next(iter(held.predict_dataloader()))
    assert set(batch) == BATCH_KEYS


def test_worker_processes_read_memory_maps(dm: FederatedDataModule) -> None:
    dataset = dm.site_val_dataset("1")
    dataset[0]  # opens memory maps in this process; they must not travel to workers
    loader = torch.utils.data.DataLoader(dataset, batch_size=12, num_workers=1)
    (batch,) = list(loader)
    assert batch["slice_index"].tolist() == list(range(12))


def test_default_is_the_synthetic_dataset(tmp_path: Path) -> None:
    dm = FederatedDataModule(synthetic_subjects=30, synthetic_shape=(16, 16, 8), cache_dir=str(tmp_path / "cache"))
    dm.prepare_data()
    dm.setup("fit")
    assert dm.root.parent == tmp_path / "default_data"  # $LIGHTNING_FEDSEG_DATA (conftest)
    assert dm.site_names == [str(i) for i in range(1, 11)]
    assert next(iter(dm.train_dataloader()))["image"].shape == (16, 1, 16, 16)


def test_package_exports_every_data_module() -> None:
    import lightning_fedseg.data as package
    from lightning_fedseg.data import (
        cache,
        cases,
        conventions,
        datamodule,
        partition,
        preprocess,
        synthetic,
    )

    modules = (cache, cases, conventions, datamodule, partition, preprocess, synthetic)
    for module in modules:
        missing = sorted(set(module.__all__) - set(package.__all__))
        assert not missing, f"lightning_fedseg.data does not export {module.__name__}: {missing}"
        for name in module.__all__:
            assert getattr(package, name) == getattr(module, name)  # PAPER_SITE_SIZES: twice


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"crop_size": 0}, "Expected `crop_size` to be a positive integer, but got 0."),
        ({"batch_size": -1}, "Expected `batch_size` to be a positive integer, but got -1."),
        ({"partition": "random"}, "Expected `partition` to be one of 'auto', "),
        ({"partition": "fets"}, "Expected a `partition_csv` with partition='fets', but got None."),
        ({"partition": "paper", "partition_csv": "p.csv"}, "Expected no `partition_csv`"),
        ({"modalities": ["flair", "dwi"]}, "Expected `modalities` to be one of 'flair', "),
        ({"modalities": []}, "Expected `modalities` to be a non-empty list, but got []."),
        ({"modalities": ["t1", "t1"]}, "Expected distinct `modalities`"),
        ({"target": "tumour"}, "Expected `target` to be one of 'wt', 'regions', but got 'tumour'."),
        ({"slice_policy": "most"}, "Expected `slice_policy` to be one of 'all', 'brain', "),
        ({"val_fraction": 1.0}, "Expected `val_fraction` to be in [0, 1), but got 1.0."),
        ({"num_heldout": -3}, "Expected `num_heldout` to be a non-negative count or a fraction"),
        ({"num_workers": -1}, "Expected `num_workers` to be a non-negative integer, but got -1."),
        ({"num_sites": 0}, "Expected `num_sites` to be a positive integer, but got 0."),
        ({"sites": []}, "Expected `sites` to name distinct sites, but got []."),
        ({"leave_out": "site1"}, "Expected `leave_out` to be a list of distinct sites, but got 'site1'."),
        ({"synthetic_shape": (8, 8)}, "Expected `synthetic_shape` to be 3 positive integers"),
        ({"dirichlet_alpha": 0.0}, "Expected `dirichlet_alpha` to be positive, but got 0.0."),
    ],
)
def test_arguments_are_validated(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=re.escape(message)):
        FederatedDataModule(**kwargs)
