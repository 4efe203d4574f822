"""Patient-level Poisson sampling: the batches that patient-level DP-SGD needs.

Each step includes every patient of the site independently with probability ``q`` (the sample
rate) and takes ``m`` of each included patient's slices; the batch holds those slices with their
``case_id`` (the patient of each slice). The privacy accounting of DP-SGD (the subsampled Gaussian
mechanism) assumes exactly this: a record (a patient) is in a step's batch with probability ``q``,
independently of everything else, so batch sizes vary and a batch may be empty.

Decisions:
    * A "patient" is a training case (one case per subject in BraTS); ``case_id`` names it.
    * An epoch is ``round(1 / q)`` steps (as opacus's ``DPDataLoader``): each patient is then
      expected once per epoch, and the number of steps does not depend on the draws.
    * An empty draw is still a batch (every tensor with a leading dimension of 0), so the step
      happens and is counted: skipping it would make the number of steps depend on the data.
    * ``m`` slices per included patient, without replacement, from the slices the data module's
      ``slice_policy`` allows: ``"tumour"`` takes ``ceil(m / 2)`` slices with tumour and the rest
      without (the share of the ``balanced`` policy; a short stratum is filled from the other),
      ``"uniform"`` takes any ``m``. A patient with fewer than ``m`` slices gives all of them.
      Per-patient clipping bounds a patient's influence whatever ``m`` is; ``m`` trades
      computation for a less noisy per-patient gradient.
    * Randomness comes from the operating system (``secrets``) for every epoch unless a ``seed`` is
      given, which is for tests and reproductions only: whoever knows it knows who was sampled.
      With a seed, epoch ``e`` of stream ``stream`` (the site) draws from ``(seed, stream, e)``.
"""

from __future__ import annotations

import math
import secrets
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import numpy.typing as npt
import torch
from torch.utils.data import Sampler, default_collate

__all__ = ["EmptyBatchCollate", "PatientPoissonSampler", "steps_per_epoch"]


def steps_per_epoch(sample_rate: float) -> int:
    """``round(1 / q)`` steps: each patient is expected once per epoch.

    Example:
        >>> steps_per_epoch(0.08), steps_per_epoch(1.0)
        (12, 1)
    """
    return max(1, round(1.0 / sample_rate))


class PatientPoissonSampler(Sampler[list[int]]):
    """A batch sampler: each step, every patient with probability ``q``, ``m`` slices of each.

    Args:
        patient_slices: for each patient, the dataset indices of its candidate slices.
        tumour: for each patient, whether each candidate slice holds tumour (``None``: unknown,
            the draw is then uniform).
        sample_rate: ``q``, the inclusion probability of a patient in a step.
        slices_per_patient: ``m``.
        draw: ``"tumour"`` (stratified by tumour) or ``"uniform"``.
        seed: a test seed; ``None`` draws every epoch from the operating system's randomness.
        stream: told apart from other samplers of the same seed (the site's index).

    Example:
        >>> sampler = PatientPoissonSampler([[0, 1, 2], [3, 4]], None, 0.5, 2, seed=0)
        >>> len(sampler), all(len(batch) <= 4 for batch in sampler)
        (2, True)
    """

    def __init__(
        self,
        patient_slices: Sequence[Sequence[int] | npt.NDArray[np.int64]],
        tumour: Sequence[Sequence[bool] | npt.NDArray[np.bool_]] | None,
        sample_rate: float,
        slices_per_patient: int,
        draw: str = "tumour",
        seed: int | None = None,
        stream: int = 0,
    ) -> None:
        if not (isinstance(sample_rate, int | float) and 0.0 < sample_rate <= 1.0):
            raise ValueError(f"Expected `sample_rate` in (0, 1], but got {sample_rate!r}.")
        if isinstance(slices_per_patient, bool) or not isinstance(slices_per_patient, int) or slices_per_patient < 1:
            raise ValueError(f"Expected `slices_per_patient` to be a positive integer, but got {slices_per_patient!r}.")
        if draw not in ("tumour", "uniform"):
            raise ValueError(f"Expected `draw` to be 'tumour' or 'uniform', but got {draw!r}.")
        if tumour is not None and len(tumour) != len(patient_slices):
            raise ValueError(f"Expected tumour flags for {len(patient_slices)} patients, but got {len(tumour)}.")
        self.patient_slices = [np.asarray(s, dtype=np.int64) for s in patient_slices]
        self.tumour = None if tumour is None else [np.asarray(t, dtype=bool) for t in tumour]
        self.sample_rate = float(sample_rate)
        self.slices_per_patient = slices_per_patient
        self.draw = draw
        self.seed = seed
        self.stream = stream
        self.epoch = 0

    @property
    def num_patients(self) -> int:
        """``N``, the patients that can be sampled."""
        return len(self.patient_slices)

    def __len__(self) -> int:
        return steps_per_epoch(self.sample_rate)

    def _rng(self) -> np.random.Generator:
        if self.seed is None:
            return np.random.default_rng(secrets.randbits(128))
        return np.random.default_rng([self.seed, self.stream, self.epoch])

    def _slices_of(self, patient: int, rng: np.random.Generator) -> npt.NDArray[np.int64]:
        candidates = self.patient_slices[patient]
        m = self.slices_per_patient
        if len(candidates) <= m:
            return candidates
        if self.draw == "uniform" or self.tumour is None:
            return np.sort(rng.choice(candidates, size=m, replace=False))
        flags = self.tumour[patient]
        with_tumour, without = candidates[flags], candidates[~flags]
        take = min(len(with_tumour), max(math.ceil(m / 2), m - len(without)))
        chosen = [rng.choice(with_tumour, size=take, replace=False), rng.choice(without, size=m - take, replace=False)]
        return np.sort(np.concatenate(chosen))

    def __iter__(self) -> Iterator[list[int]]:
        rng = self._rng()
        self.epoch += 1
        for _ in range(len(self)):
            included = np.flatnonzero(rng.random(self.num_patients) < self.sample_rate)
            yield [int(i) for p in included for i in self._slices_of(int(p), rng)]


class EmptyBatchCollate:
    """``default_collate``, except that an empty list gives ``empty`` (tensors of leading size 0).

    Args:
        example: one sample of the dataset, whose shapes and dtypes the empty batch takes.
    """

    def __init__(self, example: dict[str, Any]) -> None:
        self.empty: dict[str, Any] = {}
        for key, value in example.items():
            if isinstance(value, torch.Tensor):
                self.empty[key] = value.new_zeros((0, *value.shape))
            elif isinstance(value, int | float):
                self.empty[key] = torch.zeros(0, dtype=torch.int64 if isinstance(value, int) else torch.float64)
            else:
                self.empty[key] = []

    def __call__(self, samples: list[Any]) -> Any:
        if not samples:
            return {k: (v.clone() if isinstance(v, torch.Tensor) else list(v)) for k, v in self.empty.items()}
        return default_collate(samples)
