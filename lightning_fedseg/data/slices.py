"""Axial slices of cached volumes as a torch Dataset, and the lazy pooled loader's pieces.

:class:`SliceDataset` serves slices case by case, reading each on demand
(:class:`~lightning_fedseg.data.cache.AxialSlices`), so no file stays open between reads
whatever the number of cases. :class:`LazySliceDataset` and the two deferred samplers let a
DataLoader exist without reading any case until its length or first batch is asked for.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np
import numpy.typing as npt
import torch
from torch.utils.data import Dataset, DistributedSampler, RandomSampler

from lightning_fedseg.data.cache import AxialSlices, CachedCase
from lightning_fedseg.data.conventions import LabelConvention, Target, labels_to_regions

__all__ = ["DeferredDistributedSampler", "DeferredRandomSampler", "LazySliceDataset", "SliceDataset"]

Batch = dict[str, Any]


class SliceDataset(Dataset[Batch]):
    """Axial slices of cached volumes, case by case in the given order, z as given.

    Slices are read on demand (:class:`~lightning_fedseg.data.cache.AxialSlices`: open, one
    ``pread`` of the contiguous slice, close), so no file stays open between reads whatever the
    number of cases; each case's ``.npy`` headers are parsed once per process.

    Args:
        cases: the cached cases.
        slices: the z indices to serve of each case.
        target: whole tumour (1 channel) or the three regions.
        convention: which label marks enhancing tumour.
        with_target: whether samples carry a ``target`` (every case then needs labels).
    """

    def __init__(
        self,
        cases: Sequence[CachedCase],
        slices: Sequence[npt.NDArray[np.int64]],
        target: Target | str = Target.WT,
        convention: LabelConvention | str = LabelConvention.BRATS,
        with_target: bool = True,
    ) -> None:
        if len(cases) != len(slices):
            raise ValueError(f"Expected one slice list per case, got {len(slices)} for {len(cases)}.")
        unlabeled = [c.case_id for c in cases if not c.has_labels]
        if with_target and unlabeled:
            raise ValueError(f"Cases without a segmentation cannot give targets: {unlabeled}.")
        self.cases = list(cases)
        self.target = Target(target)
        self.convention = LabelConvention(convention)
        self.with_target = with_target
        counts = [len(s) for s in slices]
        self.case_index = np.repeat(np.arange(len(self.cases)), counts)
        self.z_index = np.concatenate([np.asarray(s, np.int64) for s in slices]) if slices else np.zeros(0, np.int64)
        self._counts = counts
        # Region masks of every possible uint8 label, so a slice's target is one table lookup.
        self._regions = labels_to_regions(np.arange(256), self.target, self.convention)
        self._readers: dict[int, tuple[AxialSlices, AxialSlices | None]] = {}

    def __len__(self) -> int:
        return len(self.z_index)

    @property
    def num_slices(self) -> dict[str, int]:
        """Slices served of each case."""
        return {c.case_id: n for c, n in zip(self.cases, self._counts, strict=True)}

    def _reader(self, i: int) -> tuple[AxialSlices, AxialSlices | None]:
        readers = self._readers.get(i)
        if readers is None:
            case = self.cases[i]
            readers = (case.image_slices(), case.label_slices() if self.with_target else None)
            self._readers[i] = readers
        return readers

    def __getitem__(self, index: int) -> Batch:
        i, z = int(self.case_index[index]), int(self.z_index[index])
        image, labels = self._reader(i)
        sample: Batch = {
            "image": torch.from_numpy(np.ascontiguousarray(image.read(z), dtype=np.float32)),
            "case_id": self.cases[i].case_id,
            "slice_index": z,
            "num_slices": self._counts[i],
        }
        if labels is not None:
            regions = self._regions[:, labels.read(z)]
            sample["target"] = torch.from_numpy(regions.astype(np.float32))
        return sample

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_readers"] = {}
        return state


class LazySliceDataset(Dataset[Batch]):
    """A :class:`SliceDataset` built on first use (length or item), so a loader costs nothing
    until it is iterated."""

    def __init__(self, build: Callable[[], SliceDataset]) -> None:
        self._build = build
        self._dataset: SliceDataset | None = None

    @property
    def dataset(self) -> SliceDataset:
        """The dataset, built now if it was not yet."""
        if self._dataset is None:
            self._dataset = self._build()
        return self._dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> Batch:
        return self.dataset[index]

    def __getstate__(self) -> dict[str, Any]:  # workers get the built dataset, not the builder
        return {"_build": None, "_dataset": self.dataset}


class DeferredRandomSampler(RandomSampler):
    """``RandomSampler`` (the same draws) that does not ask its dataset's length when created."""

    def __init__(self, data_source: LazySliceDataset) -> None:  # skips the eager length check
        self.data_source = data_source
        self.replacement = False
        self._num_samples = None
        self.generator = None

    def __iter__(self) -> Iterator[int]:
        yield from super().__iter__()


class DeferredDistributedSampler(DistributedSampler[int]):
    """The ``DistributedSampler`` Lightning would inject (shuffled, seeded by ``PL_GLOBAL_SEED``),
    with its length asked only when iterated. Lightning keeps a sampler that already is one."""

    def __init__(self, dataset: LazySliceDataset, num_replicas: int, rank: int, **_: Any) -> None:
        self.dataset = dataset
        self.num_replicas = num_replicas
        self.rank = rank
        self.epoch = 0
        self.drop_last = False
        self.shuffle = True
        self.seed = int(os.getenv("PL_GLOBAL_SEED", 0))

    def _size(self) -> None:
        self.num_samples = math.ceil(len(self.dataset) / self.num_replicas)  # type: ignore[arg-type]
        self.total_size = self.num_samples * self.num_replicas

    def __iter__(self) -> Iterator[int]:
        self._size()
        yield from super().__iter__()

    def __len__(self) -> int:
        self._size()
        return self.num_samples
