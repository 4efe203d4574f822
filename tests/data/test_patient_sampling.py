"""Patient-level Poisson sampling: inclusion rate, steps per epoch, slices per patient, empty batches."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from lightning_fedseg.data import FederatedDataModule
from lightning_fedseg.data.patient_sampling import EmptyBatchCollate, PatientPoissonSampler, steps_per_epoch
from lightning_fedseg.data.synthetic import SyntheticDataset

# 40 patients with 3 to 12 candidate slices; patient p's slices are p*100 + z, tumour at even z.
SLICES = [np.arange(3 + p % 10) + 100 * p for p in range(40)]
TUMOUR = [(s % 2 == 0) for s in SLICES]


def patient_of(index: int) -> int:
    return index // 100


def test_each_patient_is_included_at_rate_q_independently():
    q, epochs = 0.2, 100
    sampler = PatientPoissonSampler(SLICES, TUMOUR, q, slices_per_patient=4, seed=0)
    assert len(sampler) == steps_per_epoch(q) == 5
    counts = np.zeros(40)
    steps = 0
    sizes = []
    for _ in range(epochs):
        for batch in sampler:
            steps += 1
            patients = {patient_of(i) for i in batch}
            sizes.append(len(patients))
            counts[list(patients)] += 1
    assert steps == epochs * 5  # the number of steps never depends on the draws
    # Each patient's inclusion count is Binomial(500, 0.2): mean 100, sd 8.9.
    assert np.abs(counts - steps * q).max() < 5 * np.sqrt(steps * q * (1 - q))
    assert np.mean(sizes) == pytest.approx(q * 40, rel=0.05)
    assert np.var(sizes) == pytest.approx(40 * q * (1 - q), rel=0.2)  # Poisson-binomial, not a fixed size


@pytest.mark.parametrize("draw", ["tumour", "uniform"])
def test_m_slices_of_each_sampled_patient_half_with_tumour_when_stratified(draw):
    m = 4
    sampler = PatientPoissonSampler(SLICES, TUMOUR, 0.5, slices_per_patient=m, draw=draw, seed=1)
    with_tumour = []
    for _ in range(20):
        for batch in sampler:
            for p in {patient_of(i) for i in batch}:
                taken = [i for i in batch if patient_of(i) == p]
                assert len(taken) == min(m, len(SLICES[p])) and len(set(taken)) == len(taken)
                assert set(taken) <= set(SLICES[p].tolist())
                if len(SLICES[p]) > m:
                    with_tumour.append(sum(i % 2 == 0 for i in taken))
    if draw == "tumour":
        assert set(with_tumour) == {m // 2}
    else:
        assert len(set(with_tumour)) > 1


def test_empty_draws_are_batches_of_size_zero_and_the_seed_is_secure_by_default():
    sampler = PatientPoissonSampler(SLICES[:3], None, 0.05, slices_per_patient=2, seed=0)
    batches = [b for _ in range(10) for b in sampler]
    assert len(batches) == 10 * 20 and batches.count([]) > 100
    collate = EmptyBatchCollate({"image": torch.zeros(1, 8, 8), "case_id": "x", "slice_index": 3})
    empty = collate([])
    assert empty["image"].shape == (0, 1, 8, 8) and empty["case_id"] == [] and empty["slice_index"].shape == (0,)
    full = collate([{"image": torch.ones(1, 8, 8), "case_id": "x", "slice_index": 3}])
    assert full["image"].shape == (1, 1, 8, 8) and full["case_id"] == ["x"]
    seeded = [list(PatientPoissonSampler(SLICES, None, 0.3, 2, seed=5)) for _ in range(2)]
    assert seeded[0] == seeded[1]
    fresh = [list(PatientPoissonSampler(SLICES, None, 0.3, 2)) for _ in range(2)]
    assert fresh[0] != fresh[1]  # operating-system randomness: 2^-40-ish to collide
    with pytest.raises(ValueError, match="`sample_rate`"):
        PatientPoissonSampler(SLICES, None, 0.0, 2)


def test_the_data_module_serves_patient_batches(tiny_dataset: SyntheticDataset, tmp_path: Path) -> None:
    dm = FederatedDataModule(
        data_root=str(tiny_dataset.root),
        cache_dir=str(tmp_path / "cache"),
        patient_sample_rate=0.5,
        slices_per_patient=3,
        sampling_seed=0,
    )
    site = dm.site_names[0]
    loader = dm.site_train_dataloader(site)
    sampler = dm.site_patient_sampler(site)
    assert len(loader) == 2 and sampler.sample_rate == 0.5
    assert sampler.num_patients == len(dm.partition.sites[site].train)
    seen = 0
    for _ in range(5):
        for batch in loader:
            assert batch["image"].shape[0] == len(batch["case_id"]) == batch["target"].shape[0]
            for case in set(batch["case_id"]):
                assert batch["case_id"].count(case) <= 3
            seen += len(batch["case_id"])
    assert seen > 0
    with pytest.raises(ValueError, match="patient_sample_rate"):
        FederatedDataModule(data_root=str(tiny_dataset.root), patient_sample_rate=1.5)
