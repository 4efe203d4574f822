"""FederatedDataModule: institutions (sites) of 2D axial slices over cached, memory-mapped volumes.

The data module finds the cases of a BraTS/FeTS-layout folder (or writes the synthetic default
dataset), splits subjects into sites, validation and held-out sets (see
:mod:`lightning_fedseg.data.partition`), preprocesses each case once into the
:class:`~lightning_fedseg.data.cache.VolumeCache` and serves slices from memory maps.

It hands the federation strategy one site's loaders by name (``site_train_dataloader``,
``site_val_dataloader``, ``site_num_samples``) and Lightning the usual pooled loaders. Batches are
dicts ``image`` ``[B, C, H, W]`` float32, ``target`` ``[B, K, H, W]`` float32 in {0, 1},
``case_id`` list of str, ``slice_index`` and ``num_slices`` int64 ``[B]``. Validation, test and
predict loaders yield every slice of each case, case by case, z ascending.

``setup`` only splits subjects (from file names); a case is validated and preprocessed into the
cache the first time one of its loaders or counts is asked for (for ``fit``, before the first
training step: Lightning asks for every loader of the round up front). A case that fails
validation stops the run with every problem of every bad case of that request named, unless
``skip_bad_cases`` leaves them out with a warning. The pooled ``train_dataloader`` is lazy: the
federated modes replace it with their own site loaders, so only ``cds`` ever materializes it. With ``sites=[...]`` or
:meth:`FederatedDataModule.restrict_sites` a process materializes only those sites (one rank
per site under torch.distributed): other sites' volumes are never read, so ``site_num_samples``
and the site loaders are available for the process's own sites only (``site_num_subjects``
for any site), and ``val_dataloader`` / ``val_loader_names`` / ``train_dataloader`` /
``test_dataloader`` cover those sites.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from enum import StrEnum
from pathlib import Path
from typing import Any, Literal

import numpy as np
import numpy.typing as npt
from lightning.pytorch import LightningDataModule
from lightning.pytorch.utilities import rank_zero_info
from torch.utils.data import DataLoader
from typing_extensions import override

from lightning_fedseg._validation import check_int
from lightning_fedseg.data.cache import CachedCase, VolumeCache
from lightning_fedseg.data.cases import Case, CaseReference, discover_cases
from lightning_fedseg.data.conventions import (
    MODALITIES,
    LabelConvention,
    Modality,
    Target,
    labels_to_regions,
)
from lightning_fedseg.data.partition import (
    PAPER_HELDOUT_FRACTION,
    PAPER_SIMULATED_HELDOUT,
    DuplicateSubjectsError,
    Partition,
    dirichlet_split,
    leave_out_sites,
    paper_split,
    paper_split_by_site,
    read_fets_csv,
    read_site_assignment,
    simulated_split,
)
from lightning_fedseg.data.patient_sampling import EmptyBatchCollate, PatientPoissonSampler
from lightning_fedseg.data.preprocess import SlicePolicy
from lightning_fedseg.data.slices import (
    DeferredDistributedSampler,
    DeferredRandomSampler,
    LazySliceDataset,
    SliceDataset,
)
from lightning_fedseg.data.synthetic import DEFAULT_SHAPE, PARTITION_NAME, ensure_synthetic_dataset
from lightning_fedseg.data.validation import BadCaseError, CheckReport

__all__ = ["FederatedDataModule", "PartitionMode", "SliceDataset"]

log = logging.getLogger(__name__)

Batch = dict[str, Any]


class PartitionMode(StrEnum):
    """How subjects become sites.

    ``auto``: the FeTS CSV when ``partition_csv`` is given, else the institutions of the
    dataset's own ``partition.csv`` (synthetic data), else the paper split. ``paper``: the
    paper's 10-institution split. ``simulated``: ``num_sites`` equal sites. ``fets``: a FeTS
    partition CSV. ``dirichlet``: a tumour-size-skewed non-IID split.
    """

    AUTO = "auto"
    PAPER = "paper"
    SIMULATED = "simulated"
    FETS = "fets"
    DIRICHLET = "dirichlet"


def _choice(enum: type[StrEnum], value: Any, name: str) -> Any:
    try:
        return enum(value)
    except ValueError:
        choices = ", ".join(repr(m.value) for m in enum)
        raise ValueError(f"Expected `{name}` to be one of {choices}, but got {value!r}.") from None


class FederatedDataModule(LightningDataModule):
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
        mode: PartitionMode = _choice(PartitionMode, partition, "partition")
        target_: Target = _choice(Target, target, "target")
        convention: LabelConvention = _choice(LabelConvention, label_convention, "label_convention")
        policy: SlicePolicy = _choice(SlicePolicy, slice_policy, "slice_policy")
        if partition_csv is not None and mode not in (PartitionMode.AUTO, PartitionMode.FETS):
            raise ValueError(
                f"Expected no `partition_csv` with `partition` {mode.value!r}, but got "
                f"{partition_csv!r}. HINT: use partition='fets' to split by the CSV."
            )
        if mode is PartitionMode.FETS and partition_csv is None:
            raise ValueError("Expected a `partition_csv` with partition='fets', but got None.")
        check_int("num_sites", num_sites)
        if num_heldout is not None and (
            isinstance(num_heldout, bool)
            or (isinstance(num_heldout, int) and num_heldout < 0)
            or (isinstance(num_heldout, float) and not 0.0 <= num_heldout < 1.0)
        ):
            raise ValueError(
                f"Expected `num_heldout` to be a non-negative count or a fraction in [0, 1), but got {num_heldout!r}."
            )
        if not 0.0 <= val_fraction < 1.0:
            raise ValueError(f"Expected `val_fraction` to be in [0, 1), but got {val_fraction}.")
        if not dirichlet_alpha > 0:
            raise ValueError(f"Expected `dirichlet_alpha` to be positive, but got {dirichlet_alpha}.")
        if isinstance(modalities, str) or not modalities:
            raise ValueError(f"Expected `modalities` to be a non-empty list, but got {modalities!r}.")
        chosen = [_choice(Modality, m, "modalities") for m in modalities]
        if len(set(chosen)) != len(chosen):
            raise ValueError(f"Expected distinct `modalities`, but got {list(modalities)}.")
        if crop_size is not None:
            check_int("crop_size", crop_size)
        check_int("batch_size", batch_size)
        check_int("num_workers", num_workers, minimum=0)
        if synthetic_subjects is not None:
            check_int("synthetic_subjects", synthetic_subjects)
        if len(synthetic_shape) != 3 or any(
            isinstance(s, bool) or not isinstance(s, int) or s < 1 for s in synthetic_shape
        ):
            raise ValueError(f"Expected `synthetic_shape` to be 3 positive integers, but got {synthetic_shape}.")
        if sites is not None and (not sites or len(set(sites)) != len(sites)):
            raise ValueError(f"Expected `sites` to name distinct sites, but got {sites!r}.")
        if leave_out is not None and (
            isinstance(leave_out, str) or not leave_out or len(set(leave_out)) != len(leave_out)
        ):
            raise ValueError(f"Expected `leave_out` to be a list of distinct sites, but got {leave_out!r}.")
        if patient_sample_rate is not None and not 0.0 < patient_sample_rate <= 1.0:
            raise ValueError(f"Expected `patient_sample_rate` in (0, 1], but got {patient_sample_rate!r}.")
        check_int("slices_per_patient", slices_per_patient)
        if patient_slice_draw not in ("tumour", "uniform"):
            raise ValueError(
                f"Expected `patient_slice_draw` to be 'tumour' or 'uniform', but got {patient_slice_draw!r}."
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

    @property
    def site_names(self) -> list[str]:
        """All institutions of the federation, in a fixed order."""
        return self.partition.site_names

    @property
    def local_site_names(self) -> list[str]:
        """The sites this process materializes (``sites``, else all), in site order."""
        names = self.site_names
        if self.sites is None:
            return names
        unknown = [s for s in self.sites if s not in names]
        if unknown:
            raise ValueError(f"Expected `sites` among {names}, but got unknown sites {unknown}.")
        return [s for s in names if s in self.sites]

    @property
    def val_loader_names(self) -> list[str]:
        """The site of each loader of :meth:`val_dataloader`: every site, on every process."""
        return self.site_names

    def _heldout(self, default: float) -> int | float:
        return default if self.num_heldout is None else self.num_heldout

    def _make_partition(self) -> Partition:
        root = self.root
        cases = discover_cases(root, self._discovered_modalities, require_seg=True)
        self._cases = {c.case_id: c for c in cases}
        subjects = sorted(self._cases)
        mode = self.partition_mode
        dataset_csv = root / PARTITION_NAME
        if mode is PartitionMode.AUTO:
            if self.partition_csv is not None:
                mode = PartitionMode.FETS
            elif dataset_csv.is_file():
                assignment = read_site_assignment(dataset_csv)
                self._check_known(assignment, dataset_csv)
                fraction = self._fraction(self._heldout(PAPER_HELDOUT_FRACTION), len(assignment))
                partition = paper_split_by_site(assignment, self.seed, fraction, self.val_fraction)
                return self._checked(partition)
            else:
                mode = PartitionMode.PAPER
        if mode is PartitionMode.PAPER:
            self._warn_paper_split(root)
        if mode is PartitionMode.FETS:
            assert self.partition_csv is not None
            csv_path = Path(self.partition_csv).expanduser()
            try:
                partition = read_fets_csv(csv_path, self.val_fraction, self.seed, self._heldout(0))
            except DuplicateSubjectsError as err:  # name the subjects missing on disk in the same message
                missing = [s for s in err.subjects if s not in self._cases]
                if not missing:
                    raise
                raise ValueError(f"{err} {self._missing_message(missing, csv_path)}") from None
            self._check_known({s: "" for s in _all_subjects(partition)}, csv_path)
        elif mode is PartitionMode.PAPER:
            fraction = self._fraction(self._heldout(PAPER_HELDOUT_FRACTION), len(subjects))
            partition = paper_split(subjects, self.seed, heldout_fraction=fraction, val_fraction=self.val_fraction)
        elif mode is PartitionMode.SIMULATED:
            partition = simulated_split(
                subjects,
                self.num_sites,
                self.seed,
                self._heldout(PAPER_SIMULATED_HELDOUT / 210),
                self.val_fraction,
            )
        else:
            sizes = {s: float(self.cache.tumour_volume(self._cases[s])) for s in subjects}
            partition = dirichlet_split(
                subjects,
                sizes,
                self.num_sites,
                self.dirichlet_alpha,
                self.seed,
                self._heldout(PAPER_SIMULATED_HELDOUT / 210),
                self.val_fraction,
            )
        return self._checked(partition)

    def _warn_paper_split(self, root: Path) -> None:
        message = (
            f"partition='paper' on {root}: subjects are split at random into 10 sites with the paper's relative "
            "sizes (70, 27, 17, 12, 11, 9, 6, 6, 4, 3); this is not the paper's split by institution, which is "
            "not published per subject. HINT: pass a FeTS partition CSV (`partition_csv`) to split by institution."
        )
        warnings.warn(message, UserWarning, stacklevel=3)

    @staticmethod
    def _fraction(value: int | float, total: int) -> float:
        return value if isinstance(value, float) else min(value / max(total, 1), 0.999999)

    def _check_known(self, assignment: dict[str, str], csv_path: Path) -> None:
        missing = sorted(s for s in assignment if s not in self._cases)
        if missing:
            raise ValueError(self._missing_message(missing, csv_path))
        extra = len(self._cases) - len(assignment)
        if extra > 0:
            log.warning("%d case(s) under %s are not in %s; ignored.", extra, self.root, csv_path)

    def _missing_message(self, missing: Sequence[str], csv_path: Path) -> str:
        shown = ", ".join(sorted(missing)[:10]) + (" ..." if len(missing) > 10 else "")
        return f"{csv_path}: {len(missing)} subject(s) have no case folder under {self.root}: {shown}."

    def _checked(self, partition: Partition) -> Partition:
        incomplete = []
        for subject in _all_subjects(partition):
            case = self._cases[subject]
            lacking = [m.value for m in self.modalities if m not in case.images]
            if case.seg is None:
                lacking.append("seg")
            if lacking:
                incomplete.append(f"{subject} (no {', '.join(lacking)})")
        if incomplete:
            raise ValueError(
                f"Cases under {self.root} lack files: {'; '.join(incomplete[:10])}. "
                f"HINT: run `lightning-fedseg data check {self.root}`."
            )
        return partition

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

    def restrict_sites(self, sites: Sequence[str]) -> None:
        """Materialize only ``sites`` in this process from now on (one rank per site).

        Raises:
            ValueError: a site is unknown, or none is given.
        """
        sites = [str(s) for s in sites]
        if not sites or len(set(sites)) != len(sites):
            raise ValueError(f"Expected `sites` to name distinct sites, but got {sites!r}.")
        unknown = [s for s in sites if s not in self.site_names]
        if unknown:
            raise ValueError(f"Expected `sites` among {self.site_names}, but got unknown sites {unknown}.")
        self.sites = sites

    def _site_subjects(self, sites: Iterable[str], split: str) -> list[Case]:
        chosen = [getattr(self.partition.sites[s], split) for s in sites]
        return [self._cases[subject] for subjects in chosen for subject in subjects]

    def _heldout_subjects(self) -> list[Case]:
        if self.leave_out is not None and self.sites is not None:
            raise ValueError(
                f"`leave_out` holds out every subject of {self.leave_out}, which no process restricted to "
                f"`sites` {self.sites} owns. HINT: test in one process without `sites`."
            )
        subjects = self.partition.heldout if self.sites is None else self.partition.heldout_of(self.sites)
        return [self._cases[s] for s in subjects]

    def _predict_case_map(self) -> dict[str, Case]:
        if self._predict_cases is None:
            if self.predict_root is None:
                self._predict_cases = {c.case_id: c for c in self._heldout_subjects()}
            else:
                found = discover_cases(self.predict_root, self._discovered_modalities, require_seg=False)
                self._predict_cases = {c.case_id: c for c in found}
        return self._predict_cases

    def _cache_cases(self, cases: Sequence[Case], group: str = "train") -> list[CachedCase]:
        """The cache entries of ``cases`` (validating and building the missing ones).

        Raises:
            BadCaseError: some cases fail validation and ``skip_bad_cases`` is off; the report
                names every problem of every such case.
        """
        todo = [c for c in cases if (group, c.case_id) not in self._cached and c.case_id not in self.skipped_cases]
        found: dict[str, CachedCase | BadCaseError | None] = {c.case_id: self.cache.lookup(c) for c in todo}
        missing = [c for c in todo if found[c.case_id] is None]
        if missing:
            rank_zero_info(
                f"Checking and preprocessing {len(missing)} case(s) into {self.cache.cache_dir} "
                "(NIfTI is decoded once; later epochs and runs read the cache)."
            )
            threads = min(len(missing), max(1, self.num_workers))
            with ThreadPoolExecutor(threads) as pool:
                built = pool.map(self._build_or_report, missing)
                found.update({c.case_id: e for c, e in zip(missing, built, strict=True)})
        bad = [entry for entry in found.values() if isinstance(entry, BadCaseError)]
        if bad:
            report = CheckReport([p for err in bad for p in err.report.problems], len(bad), self.root)
            if not self.skip_bad_cases:
                raise BadCaseError(
                    report,
                    f"fix these files (`lightning-fedseg data check {self.root}` lists every bad case), "
                    "or set `skip_bad_cases: true` to leave them out.",
                )
            for case_id in report.bad_case_ids:
                self.skipped_cases[case_id] = CheckReport(
                    [p for p in report.problems if p.case_id == case_id], 1, self.root
                )
            warnings.warn(
                f"skip_bad_cases: leaving out {len(report.bad_case_ids)} case(s) that fail validation: "
                f"{', '.join(report.bad_case_ids)}.\n{report.format()}",
                UserWarning,
                stacklevel=2,
            )
        for case in todo:
            entry = found[case.case_id]
            if isinstance(entry, CachedCase):
                if entry.has_labels:
                    entry.check_labels(self.label_convention)
                self._cached[(group, case.case_id)] = entry
        return [self._cached[(group, c.case_id)] for c in cases if c.case_id not in self.skipped_cases]

    def _build_or_report(self, case: Case) -> CachedCase | BadCaseError:
        try:
            return self.cache.build(case)
        except BadCaseError as err:
            return err

    # ------------------------------------------------------------------ datasets
    def _require_local(self, site: str) -> None:
        if site not in self.site_names:
            raise KeyError(f"Unknown site {site!r}; the sites are {self.site_names}.")
        if site not in self.local_site_names:
            raise ValueError(
                f"Site {site!r} is not materialized in this process (`sites`={self.sites}). "
                "HINT: each process only reads and counts its own sites' cases."
            )

    def _dataset(self, cases: Sequence[Case], group: str, training: bool, with_target: bool = True) -> SliceDataset:
        cached = self._cache_cases(cases, group)
        if training:
            slices = [c.slices(self.slice_policy, self.seed) for c in cached]
        else:
            slices = [np.arange(c.num_slices, dtype=np.int64) for c in cached]
        return SliceDataset(cached, slices, self.target, self.label_convention, with_target)

    def site_train_dataset(self, site: str) -> SliceDataset:
        """The training slices of ``site`` (per ``slice_policy``)."""
        self._require_local(site)
        return self._dataset(self._site_subjects([site], "train"), "train", training=True)

    def site_val_dataset(self, site: str) -> SliceDataset:
        """Every slice of ``site``'s validation cases, ordered."""
        self._require_local(site)
        return self._dataset(self._site_subjects([site], "val"), "train", training=False)

    def _loader(self, dataset: SliceDataset, shuffle: bool, persistent: bool) -> DataLoader[Batch]:
        return DataLoader(
            dataset,
            batch_size=self.batch_size,
            shuffle=shuffle,
            num_workers=self.num_workers,
            persistent_workers=persistent and self.num_workers > 0,
        )

    def site_train_dataloader(self, site: str) -> DataLoader[Batch]:
        """Shuffled training slices of ``site`` (a ``RandomSampler`` with no generator set), or with
        ``patient_sample_rate``, Poisson-sampled patients (:meth:`site_patient_sampler`)."""
        if self.patient_sample_rate is None:
            return self._loader(self.site_train_dataset(site), shuffle=True, persistent=False)
        dataset = self.site_train_dataset(site)
        return DataLoader(
            dataset,
            batch_sampler=self.site_patient_sampler(site, dataset),
            collate_fn=EmptyBatchCollate(dataset[0]),
            num_workers=self.num_workers,
        )

    def site_patient_sampler(self, site: str, dataset: SliceDataset | None = None) -> PatientPoissonSampler:
        """The patient-level Poisson sampler of ``site``'s training slices (needs ``patient_sample_rate``);
        its ``sample_rate`` and ``num_patients`` are the ``q`` and ``N`` of patient-level DP-SGD."""
        if self.patient_sample_rate is None:
            raise ValueError(
                "Expected a `patient_sample_rate` for patient-level sampling, but got None."
                " HINT: set `data.init_args.patient_sample_rate` (e.g. 0.1)."
            )
        dataset = self.site_train_dataset(site) if dataset is None else dataset
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
            self.patient_sample_rate,
            self.slices_per_patient,
            self.patient_slice_draw,
            seed=self.sampling_seed,
            stream=self.site_names.index(site),
        )

    def site_val_dataloader(self, site: str) -> DataLoader[Batch]:
        """Every slice of ``site``'s validation cases, case by case, z ascending."""
        return self._loader(self.site_val_dataset(site), shuffle=False, persistent=False)

    def site_num_subjects(self, site: str) -> int:
        """Training subjects of ``site``, known for every site without reading any volume.

        A cheap, deterministic size (e.g. to place sites on ranks before restricting them).
        """
        if site not in self.site_names:
            raise KeyError(f"Unknown site {site!r}; the sites are {self.site_names}.")
        return len(self.partition.sites[site].train)

    def site_num_samples(self, site: str) -> int:
        """Training slices of ``site``: its FedAvg weight.

        Counting needs the site's volumes (brain and tumour flags), so it is available for this
        process's sites only and preprocesses them into the cache if needed; use
        :meth:`site_num_subjects` for a size of any site.
        """
        self._require_local(site)
        if site not in self._num_samples:  # the FedAvg weight of every round: counted once
            cached = self._cache_cases(self._site_subjects([site], "train"))
            self._num_samples[site] = int(sum(len(c.slices(self.slice_policy, self.seed)) for c in cached))
        return self._num_samples[site]

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
        dataset = LazySliceDataset(lambda: self._dataset(cases, "train", True))
        kwargs = self._distributed_sampler_kwargs()
        sampler = DeferredRandomSampler(dataset) if kwargs is None else DeferredDistributedSampler(dataset, **kwargs)
        return DataLoader(
            dataset,
            batch_size=self.batch_size,
            sampler=sampler,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
        )

    def _trainer_fitting(self) -> bool:
        trainer = self.trainer
        return trainer is not None and bool(getattr(getattr(trainer, "state", None), "fn", None) == "fit")

    def _training_sites(self) -> list[str]:
        """The local sites that train in this fit: one for a ``single`` strategy mode, else all."""
        mode = getattr(getattr(self.trainer, "strategy", None), "mode", None)
        site = getattr(mode, "site", None)
        if getattr(mode, "name", None) == "single" and site in self.local_site_names:
            return [str(site)]
        return self.local_site_names

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

    def case_reference(self, case_id: str) -> CaseReference:
        """Where a prediction of ``case_id`` goes back to: reference NIfTI, full shape, crop."""
        for group, cases in (("predict", self._predict_cases or {}), ("train", self._cases)):
            if case_id in cases:
                cached = self._cached.get((group, case_id))
                return cached.reference() if cached else self.cache.reference(cases[case_id])
        raise KeyError(f"Unknown case {case_id!r}.")

    def full_target(self, case_id: str) -> npt.NDArray[np.bool_]:
        """Ground-truth region masks ``[K, X, Y, Z]`` of a loaded case on its full, uncropped grid.

        Tumour outside the crop is included, so metrics on it equal an evaluation of the written
        prediction files against the segmentation files.

        Raises:
            KeyError: the case has not been loaded by any loader of this data module.
            ValueError: the case has no segmentation.
        """
        entry = next((e for (_, cid), e in self._cached.items() if cid == case_id), None)
        if entry is None:
            raise KeyError(f"Case {case_id!r} has not been loaded by this data module.")
        labels = entry.full_labels()
        if labels is None:
            raise ValueError(f"Case {case_id!r} has no segmentation.")
        return labels_to_regions(labels, self.target, self.label_convention)

    def describe(self) -> str:
        """A markdown table: subjects per site (train, val, held-out) and training slices.

        Training slices are counted for this process's sites (preprocessing them if needed);
        other sites show ``-``.
        """
        partition = self.partition
        local = set(self.local_site_names)
        by_site = partition.heldout_by_site or {}
        lines = [
            "| site | train | val | held-out | training slices |",
            "|---|---:|---:|---:|---:|",
        ]
        totals = [0, 0, 0, 0]
        for name, split in partition.sites.items():
            held = len(by_site.get(name, ()))
            slices = self.site_num_samples(name) if name in local else None
            totals = [
                totals[0] + len(split.train),
                totals[1] + len(split.val),
                totals[2] + held,
                totals[3] + (slices or 0),
            ]
            shown = "-" if slices is None else str(slices)
            lines.append(f"| {name} | {len(split.train)} | {len(split.val)} | {held} | {shown} |")
        unassigned = len(partition.heldout) - totals[2]
        if unassigned:
            lines.append(f"| (no site) | 0 | 0 | {unassigned} | - |")
        lines.append(f"| total | {totals[0]} | {totals[1]} | {len(partition.heldout)} | {totals[3]} |")
        return "\n".join(lines)


def _all_subjects(partition: Partition) -> list[str]:
    return [s for split in partition.sites.values() for s in split.subjects] + list(partition.heldout)
