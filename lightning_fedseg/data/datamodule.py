"""FederatedDataModule: institutions (sites) of 2D axial slices over cached, memory-mapped volumes.

The data module finds the cases of a BraTS/FeTS-layout folder (or writes the synthetic default
dataset), splits subjects into sites, validation and held-out sets (see
:mod:`lightning_fedseg.data.partition`), preprocesses each case once into the
:class:`~lightning_fedseg.data.cache.VolumeCache` and serves slices from memory maps.

It hands the federation strategy one site's loaders by name (the site seam,
:class:`~lightning_fedseg.data.sites.SiteAccess`) and Lightning the usual pooled loaders; a
prediction's case is looked up by id (:class:`~lightning_fedseg.data.case_lookup.CaseLookup`).
Batches are dicts ``image`` ``[B, C, H, W]`` float32, ``target`` ``[B, K, H, W]`` float32 in
{0, 1}, ``case_id`` list of str, ``slice_index`` and ``num_slices`` int64 ``[B]``. Validation,
test and predict loaders yield every slice of each case, case by case, z ascending.

``setup`` only splits subjects (from file names); a case is validated and preprocessed into the
cache the first time one of its loaders or counts is asked for (for ``fit``, before the first
training step: Lightning asks for every loader of the round up front). A case that fails
validation stops the run with every problem of every bad case of that request named, unless
``skip_bad_cases`` leaves them out with a warning. The pooled ``train_dataloader`` is lazy: the
federated modes replace it with their own site loaders, so only ``cds`` ever materializes it.
A process restricted to some sites (``sites=[...]`` or ``restrict_sites``) reads only their
volumes (see :mod:`lightning_fedseg.data.sites`).
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial
from pathlib import Path
from typing import Any, Literal

from lightning.pytorch import LightningDataModule
from torch.utils.data import DataLoader
from typing_extensions import override

from lightning_fedseg.data.cache import CachedCase, VolumeCache
from lightning_fedseg.data.case_loading import cache_cases
from lightning_fedseg.data.case_lookup import CaseLookup
from lightning_fedseg.data.cases import Case, discover_cases
from lightning_fedseg.data.conventions import MODALITIES, Modality
from lightning_fedseg.data.datamodule_args import check_arguments
from lightning_fedseg.data.partition import Partition, leave_out_sites
from lightning_fedseg.data.partition_policy import PartitionMode, PartitionPolicy
from lightning_fedseg.data.sites import SiteAccess
from lightning_fedseg.data.slice_loaders import Batch, pooled_train_loader, slice_dataset, slice_loader
from lightning_fedseg.data.slices import SliceDataset
from lightning_fedseg.data.synthetic import DEFAULT_SHAPE, ensure_synthetic_dataset
from lightning_fedseg.data.validation import CheckReport

__all__ = ["FederatedDataModule", "PartitionMode", "SliceDataset"]


class FederatedDataModule(SiteAccess, CaseLookup, LightningDataModule):
    """Sites of 2D slices for federated (and centralized) brain-tumour segmentation.

    Args:
        data_root: a BraTS/FeTS-layout dataset folder; ``None`` writes (once) and uses the
            synthetic dataset of ``synthetic_*``.
        partition: ``auto``, ``paper``, ``simulated``, ``fets`` or ``dirichlet`` (see
            :class:`PartitionMode`). ``dirichlet`` reads every subject's segmentation (once,
            remembered in the cache) to know its tumour volume, also in a process restricted
            to some ``sites``; the other modes need file names only.
        partition_csv: a FeTS partition CSV (``fets``, or ``auto``).
        num_sites: number of sites of the ``simulated`` and ``dirichlet`` splits.
        num_heldout: held-out (test) subjects, as a count (int) or fraction (float). ``None``:
            45/210 for the paper splits, 32/210 for ``simulated``/``dirichlet`` (the paper's 32
            of 210), none for ``fets``.
        val_fraction: share of each site's subjects used for validation.
        dirichlet_alpha: Dirichlet concentration of ``dirichlet`` (smaller is more skewed).
        modalities: the input channels, e.g. ``["flair"]`` (the paper) or all four.
        target: ``wt`` (whole tumour, 1 channel) or ``regions`` (WT, TC, ET).
        label_convention: ``brats`` (enhancing tumour 4) or ``brats2023`` (3).
        crop_size: in-plane centre crop; ``None`` crops 240-wide volumes to 128, others not.
        slice_policy: training slices: ``all``, ``brain`` or ``balanced``. Validation, test
            and predict loaders always use every slice.
        batch_size: slices per batch.
        num_workers: DataLoader workers (also threads preprocessing cases into the cache).
        cache_dir: the preprocessed-volume cache (default ``~/.cache/lightning_fedseg/...``).
        seed: seed of the partition and the balanced slice draw.
        synthetic_subjects: subjects of the synthetic default (``None``: its default).
        synthetic_shape: volume shape ``(X, Y, Z)`` of the synthetic default.
        synthetic_seed: seed of the synthetic default.
        predict_root: a folder of cases to predict (no segmentation needed); ``None`` predicts
            the held-out cases.
        sites: materialize only these sites in this process (one rank per site).
        leave_out: sites left out of the federation (out-of-federation generalization): the
            other sites train and validate on the subjects they had, and the held-out set is
            every subject of these sites (see :func:`~lightning_fedseg.data.partition.leave_out_sites`).
            Testing then needs one process that holds every site (no ``sites``).
        skip_bad_cases: leave out cases that fail validation, with a warning listing them,
            instead of stopping with their report.
        reorient: reorient every case to RAS before slicing (recorded in the cache key; the
            prediction writer restores each file's own orientation). Without it a case whose
            third voxel axis is not inferior-superior is refused.
        patient_sample_rate: ``q``: site training loaders sample patients (Poisson, each patient
            with probability ``q`` per step, ``round(1/q)`` steps per epoch) instead of shuffling
            slices, as patient-level DP-SGD needs (see :mod:`~lightning_fedseg.data.patient_sampling`).
            ``None`` (default): shuffled batches of ``batch_size`` slices.
        slices_per_patient: ``m``, slices taken of each sampled patient.
        patient_slice_draw: ``"tumour"`` (half the ``m`` slices with tumour) or ``"uniform"``.
        sampling_seed: seed of the patient sampling, for tests only; ``None`` draws from the
            operating system's randomness.


    Example:
        >>> dm = FederatedDataModule(data_root="/data/brats", partition="simulated", num_sites=4)
        >>> dm.in_channels, dm.target
        (1, <Target.WT: 'wt'>)
    """

    def __init__(
        self,
        data_root: str | None = None,
        partition: Literal["auto", "paper", "simulated", "fets", "dirichlet"] = "auto",
        partition_csv: str | None = None,
        num_sites: int = 10,
        num_heldout: int | float | None = None,
        val_fraction: float = 0.2,
        dirichlet_alpha: float = 0.5,
        modalities: Sequence[str] = ("flair",),
        target: Literal["wt", "regions"] = "wt",
        label_convention: Literal["brats", "brats2023"] = "brats",
        crop_size: int | None = None,
        slice_policy: Literal["all", "brain", "balanced"] = "brain",
        batch_size: int = 16,
        num_workers: int = 0,
        cache_dir: str | None = None,
        seed: int = 0,
        synthetic_subjects: int | None = None,
        synthetic_shape: tuple[int, int, int] = DEFAULT_SHAPE,
        synthetic_seed: int = 0,
        predict_root: str | None = None,
        sites: list[str] | None = None,
        leave_out: list[str] | None = None,
        skip_bad_cases: bool = False,
        reorient: bool = False,
        patient_sample_rate: float | None = None,
        slices_per_patient: int = 4,
        patient_slice_draw: Literal["tumour", "uniform"] = "tumour",
        sampling_seed: int | None = None,
    ) -> None:
        mode, target_, convention, policy, chosen = check_arguments(
            partition=partition,
            partition_csv=partition_csv,
            num_sites=num_sites,
            num_heldout=num_heldout,
            val_fraction=val_fraction,
            dirichlet_alpha=dirichlet_alpha,
            modalities=modalities,
            target=target,
            label_convention=label_convention,
            crop_size=crop_size,
            slice_policy=slice_policy,
            batch_size=batch_size,
            num_workers=num_workers,
            synthetic_subjects=synthetic_subjects,
            synthetic_shape=synthetic_shape,
            sites=sites,
            leave_out=leave_out,
            patient_sample_rate=patient_sample_rate,
            slices_per_patient=slices_per_patient,
            patient_slice_draw=patient_slice_draw,
        )
        super().__init__()
        self.save_hyperparameters()
        self.patient_sample_rate = patient_sample_rate
        self.slices_per_patient = slices_per_patient
        self.patient_slice_draw = patient_slice_draw
        self.sampling_seed = sampling_seed
        self.data_root = data_root
        self.partition_mode = mode
        self.partition_csv = partition_csv
        self.num_sites = num_sites
        self.num_heldout = num_heldout
        self.val_fraction = val_fraction
        self.dirichlet_alpha = dirichlet_alpha
        self.modalities: tuple[Modality, ...] = tuple(chosen)
        self.target = target_
        self.label_convention = convention
        self.crop_size = crop_size
        self.slice_policy = policy
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.seed = seed
        self.synthetic_subjects = synthetic_subjects
        self.synthetic_shape = tuple(synthetic_shape)
        self.synthetic_seed = synthetic_seed
        self.predict_root = predict_root
        self.sites = None if sites is None else list(sites)
        self.leave_out = None if leave_out is None else [str(s) for s in leave_out]
        self.skip_bad_cases = bool(skip_bad_cases)
        self.reorient = bool(reorient)
        self.cache = VolumeCache(cache_dir, self.modalities, crop_size, convention, self.reorient)
        self.skipped_cases: dict[str, CheckReport] = {}
        self._root: Path | None = None
        self._cases: dict[str, Case] = {}
        self._partition: Partition | None = None
        self._predict_cases: dict[str, Case] | None = None
        self._cached: dict[tuple[str, str], CachedCase] = {}
        self._num_samples: dict[str, int] = {}  # site_num_samples, counted once per site
        self._fit_training_sites: list[str] | None = None

    # ------------------------------------------------------------------ partition
    @property
    def _discovered_modalities(self) -> list[Modality]:
        """Every sequence, so validation sees all files of a case (the odd one out among them)."""
        return list(dict.fromkeys([*self.modalities, *MODALITIES]))

    @property
    def in_channels(self) -> int:
        """Number of input channels (modalities)."""
        return len(self.modalities)

    @property
    def root(self) -> Path:
        """The dataset folder (the synthetic default is written on first use)."""
        if self._root is None:
            if self.data_root is None:
                self._root = self._ensure_synthetic()
            else:
                self._root = Path(self.data_root).expanduser()
        return self._root

    def _ensure_synthetic(self) -> Path:
        params: dict[str, Any] = {
            "shape": self.synthetic_shape,
            "seed": self.synthetic_seed,
            "num_workers": max(1, self.num_workers),
        }
        if self.synthetic_subjects is not None:
            params["num_subjects"] = self.synthetic_subjects
        return Path(ensure_synthetic_dataset(None, **params))

    @property
    def partition(self) -> Partition:
        """The sites, validation and held-out subjects (computed from file names only)."""
        if self._partition is None:
            partition = self._make_partition()
            self._partition = partition if self.leave_out is None else leave_out_sites(partition, self.leave_out)
        return self._partition

    def _make_partition(self) -> Partition:
        root = self.root
        cases = discover_cases(root, self._discovered_modalities, require_seg=True)
        self._cases = {c.case_id: c for c in cases}
        policy = PartitionPolicy(
            self.partition_mode,
            self.partition_csv,
            self.num_sites,
            self.num_heldout,
            self.val_fraction,
            self.dirichlet_alpha,
            self.seed,
        )
        return policy.split(root, self._cases, self.modalities, self.cache.tumour_volume)

    # ------------------------------------------------------------------ cache
    @override
    def prepare_data(self) -> None:
        """Write the synthetic default dataset if needed (once, before any ``setup``)."""
        if self.data_root is None:
            self._ensure_synthetic()

    @override
    def setup(self, stage: str | None = None) -> None:
        """Split the subjects into sites; reads file names (and CSVs) only.

        Nothing is preprocessed here: a case is decoded into the cache the first time a loader
        or count of its own site needs it, so a process restricted to some sites (by ``sites``
        or :meth:`restrict_sites`, which the federation strategy calls after ``setup``) never
        reads another site's volumes.
        """
        _ = self.local_site_names  # computes the partition and checks `sites`

    @override
    def teardown(self, stage: str) -> None:
        """Forget the fit's :meth:`set_training_sites`; a later fit is told its own."""
        if stage == "fit":
            self._fit_training_sites = None

    def _predict_case_map(self) -> dict[str, Case]:
        if self._predict_cases is None:
            if self.predict_root is None:
                self._predict_cases = {c.case_id: c for c in self._heldout_subjects()}
            else:
                found = discover_cases(self.predict_root, self._discovered_modalities, require_seg=False)
                self._predict_cases = {c.case_id: c for c in found}
        return self._predict_cases

    def _cache_cases(self, cases: Sequence[Case], group: str = "train") -> list[CachedCase]:
        """The cache entries of ``cases`` (see :func:`~lightning_fedseg.data.case_loading.cache_cases`).

        Raises:
            BadCaseError: some cases fail validation and ``skip_bad_cases`` is off; the report
                names every problem of every such case.
        """
        return cache_cases(
            self.cache,
            cases,
            group,
            self._cached,
            self.skipped_cases,
            root=self.root,
            num_workers=self.num_workers,
            skip_bad_cases=self.skip_bad_cases,
            label_convention=self.label_convention,
        )

    # ------------------------------------------------------------------ datasets
    def _dataset(self, cases: Sequence[Case], group: str, training: bool, with_target: bool = True) -> SliceDataset:
        policy = self.slice_policy if training else None
        return slice_dataset(
            self._cache_cases(cases, group), self.target, self.label_convention, policy, self.seed, with_target
        )

    def _loader(self, dataset: SliceDataset, shuffle: bool, persistent: bool) -> DataLoader[Batch]:
        return slice_loader(dataset, self.batch_size, self.num_workers, shuffle, persistent)

    @override
    def train_dataloader(self) -> DataLoader[Batch]:
        """Shuffled training slices pooled over this process's sites (centralized training).

        Lightning calls this once at the start of ``fit`` in every mode, after the strategy has
        restricted the sites, so this is where the fit's cases are checked: the training cases of
        the sites that will train here and the validation cases of this process's sites are
        validated and cached now, and a bad case stops the run before the first step (see
        :meth:`_cache_cases`). The loader itself is lazy (nothing is read until its length or a
        batch is asked for): the federated modes replace it with their sites' own loaders, so
        ``single`` never preprocesses the other sites' training cases.
        """
        if self._trainer_fitting():
            self._cache_cases(
                self._site_subjects(self._training_sites(), "train") + self._site_subjects(self.local_site_names, "val")
            )
        cases = self._site_subjects(self.local_site_names, "train")
        build = partial(self._dataset, cases, "train", True)
        return pooled_train_loader(build, self.batch_size, self.num_workers, self._distributed_sampler_kwargs())

    def _trainer_fitting(self) -> bool:
        trainer = self.trainer
        return trainer is not None and bool(getattr(getattr(trainer, "state", None), "fn", None) == "fit")

    def _distributed_sampler_kwargs(self) -> dict[str, Any] | None:
        """What Lightning would give the ``DistributedSampler`` it injects, or ``None`` if it would not."""
        from lightning_fedseg.federation.lightning_compat import distributed_sampler_in_use

        trainer = self.trainer
        if trainer is None or trainer.distributed_sampler_kwargs is None:
            return None
        if not distributed_sampler_in_use(trainer):
            return None
        return dict(trainer.distributed_sampler_kwargs)

    @override
    def val_dataloader(self) -> list[DataLoader[Batch]]:
        """One ordered loader per site of :attr:`val_loader_names`.

        Every process returns one loader per site, so that loader indices name the same site on
        every rank; the loaders of sites another process owns are empty here.
        """
        local = set(self.local_site_names)
        return [
            self.site_val_dataloader(site)
            if site in local
            else self._loader(SliceDataset([], [], self.target, self.label_convention), shuffle=False, persistent=False)
            for site in self.val_loader_names
        ]

    @override
    def test_dataloader(self) -> DataLoader[Batch]:
        """Every slice of the held-out cases, ordered.

        Raises:
            ValueError: the partition holds nothing out (e.g. ``fets`` with ``num_heldout``
                unset).
        """
        cases = self._heldout_subjects()
        if not cases:
            raise ValueError(
                f"The {self.partition_mode.value} partition holds no subject out for testing. "
                "HINT: set `num_heldout` (a count or a fraction)."
            )
        return self._loader(self._dataset(cases, "train", False), shuffle=False, persistent=True)

    @override
    def predict_dataloader(self) -> DataLoader[Batch]:
        """Every slice of the ``predict_root`` cases (else the held-out cases), ordered.

        Batches carry ``target`` only when every case has a segmentation.
        """
        cases = list(self._predict_case_map().values())
        if not cases:
            raise ValueError("There are no cases to predict. HINT: set `predict_root`.")
        with_target = all(c.seg is not None for c in cases)
        dataset = self._dataset(cases, "predict", False, with_target)
        return self._loader(dataset, shuffle=False, persistent=False)
