"""Datasets and loaders of the data module, built from cache entries (pure builders, no Lightning).

:class:`~lightning_fedseg.data.datamodule.FederatedDataModule` decides which cases a loader
holds; the functions here decide which of their slices it serves and how they are batched:

* :func:`slice_dataset`: training slices per the slice policy, or every slice in order;
* :func:`slice_loader`: batches of slices, shuffled or in order;
* :func:`patient_sampler`: Poisson-sampled patients of a site (patient-level DP-SGD);
* :func:`pooled_train_loader`: the lazy pooled loader of centralized training.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any, Literal

import numpy as np
import numpy.typing as npt
from torch.utils.data import DataLoader

from lightning_fedseg.data.cache import CachedCase
from lightning_fedseg.data.conventions import LabelConvention, Target
from lightning_fedseg.data.patient_sampling import PatientPoissonSampler
from lightning_fedseg.data.preprocess import SlicePolicy
from lightning_fedseg.data.slices import (
    DeferredDistributedSampler,
    DeferredRandomSampler,
    LazySliceDataset,
    SliceDataset,
)

__all__ = ["patient_sampler", "pooled_train_loader", "slice_dataset", "slice_loader"]

Batch = dict[str, Any]


def slice_dataset(
    cached: Sequence[CachedCase],
    target: Target,
    convention: LabelConvention,
    policy: SlicePolicy | None,
    seed: int = 0,
    with_target: bool = True,
) -> SliceDataset:
    """The slices of ``cached``: those of ``policy`` (training, drawn with ``seed``), or every slice
    of each case, z ascending, when ``policy`` is ``None`` (validation, test, predict)."""
    if policy is not None:
        slices = [c.slices(policy, seed) for c in cached]
    else:
        slices = [np.arange(c.num_slices, dtype=np.int64) for c in cached]
    return SliceDataset(cached, slices, target, convention, with_target)


def slice_loader(
    dataset: SliceDataset, batch_size: int, num_workers: int, shuffle: bool, persistent: bool
) -> DataLoader[Batch]:
    """Batches of ``dataset``; worker processes are kept between epochs only if ``persistent``."""
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=shuffle,
        num_workers=num_workers,
        persistent_workers=persistent and num_workers > 0,
    )


def patient_sampler(
    dataset: SliceDataset,
    sample_rate: float,
    slices_per_patient: int,
    slice_draw: Literal["tumour", "uniform"],
    seed: int | None,
    stream: int,
) -> PatientPoissonSampler:
    """The patient-level Poisson sampler of a site's training ``dataset`` (one patient per case).

    Tumour flags are passed on only when every case has them (cases with segmentations).
    """
    indices = np.arange(len(dataset))
    patients = [indices[dataset.case_index == i] for i in range(len(dataset.cases))]
    tumour: list[npt.NDArray[np.bool_]] | None = []
    for i, case in enumerate(dataset.cases):
        if case.tumour_slices is None or tumour is None:
            tumour = None
            continue
        flags = np.asarray(case.tumour_slices, dtype=bool)
        tumour.append(flags[dataset.z_index[dataset.case_index == i]])
    return PatientPoissonSampler(
        patients,
        tumour,
        sample_rate,
        slices_per_patient,
        slice_draw,
        seed=seed,
        stream=stream,
    )


def pooled_train_loader(
    build: Callable[[], SliceDataset],
    batch_size: int,
    num_workers: int,
    distributed: Mapping[str, Any] | None,
) -> DataLoader[Batch]:
    """A shuffled loader over the dataset ``build`` returns, built only when its length or a batch
    is first asked for; ``distributed`` are the keyword arguments of a ``DistributedSampler``, or
    ``None`` for one process."""
    dataset = LazySliceDataset(build)
    if distributed is None:
        sampler: DeferredRandomSampler | DeferredDistributedSampler = DeferredRandomSampler(dataset)
    else:
        sampler = DeferredDistributedSampler(dataset, **distributed)
    return DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        num_workers=num_workers,
        persistent_workers=num_workers > 0,
    )
