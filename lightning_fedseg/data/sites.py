"""The data module's site seam: one site's datasets, loaders and sizes, asked for by name.

The federation strategy trains sites one at a time and meets the data module here. The contract
any DataModule meets to be federated (:class:`~lightning_fedseg.federation.site_data.SiteDataModule`,
``docs/own-project.md``), and how this one meets it:

- ``site_names``: every institution of the federation, in a fixed order;
- ``site_train_dataloader(site)``: that site's training data only;
- ``train_dataloader()``: the pooled data, used by the ``cds`` mode only; ``val_dataloader()``:
  one loader per site, in ``site_names`` order (here named by ``val_loader_names``), empty for
  the sites of other processes;
- optional ``site_num_samples(site)``: the site's FedAvg weight (else the length of its loader's
  dataset);
- optional ``set_training_sites(sites)``: the sites that train in this fit (e.g. the one site of
  ``single``), told before any loader is asked for;
- for multi-process runs, ``restrict_sites(sites)`` (this process's sites, told after ``setup``
  and before any loader is asked for) and ``site_num_subjects(site)`` (a cheap size of any site,
  used to place sites on processes).

With ``sites=[...]`` or :meth:`SiteAccess.restrict_sites` a process materializes only those sites
(one rank per site under torch.distributed): other sites' volumes are never read, so
``site_num_samples`` and the site loaders are available for the process's own sites only
(``site_num_subjects`` for any site), and ``val_dataloader`` / ``val_loader_names`` /
``train_dataloader`` / ``test_dataloader`` cover those sites.

Decisions:

* **A mixin, not an object the data module holds.** The strategy calls the seam on the data module
  itself (:class:`~lightning_fedseg.data.datamodule.FederatedDataModule`), and the site methods
  share the module's settings, partition and cache; composition would only add forwarding methods.
* **Two sizes.** ``site_num_subjects`` comes from file names and answers for every site;
  ``site_num_samples`` counts slices (brain and tumour flags), so it reads the site's volumes,
  answers for local sites only and is counted once per site (it is every round's FedAvg weight).
"""

from __future__ import annotations

from abc import abstractmethod
from collections.abc import Iterable, Sequence
from typing import Literal

from torch.utils.data import DataLoader

from lightning_fedseg.data.cache import CachedCase
from lightning_fedseg.data.cases import Case
from lightning_fedseg.data.partition import Partition
from lightning_fedseg.data.partition_policy import partition_table
from lightning_fedseg.data.patient_sampling import EmptyBatchCollate, PatientPoissonSampler
from lightning_fedseg.data.preprocess import SlicePolicy
from lightning_fedseg.data.slice_loaders import Batch, patient_sampler
from lightning_fedseg.data.slices import SliceDataset

__all__ = ["SiteAccess"]


class SiteAccess:
    """The per-site methods the federation strategy calls on the data module.

    The data module provides the settings and state annotated here (set in its ``__init__``),
    its ``partition`` and how cases become cached entries, datasets and loaders
    (``_cache_cases``, ``_dataset``, ``_loader``).
    """

    sites: list[str] | None
    leave_out: list[str] | None
    slice_policy: SlicePolicy
    seed: int
    num_workers: int
    patient_sample_rate: float | None
    slices_per_patient: int
    patient_slice_draw: Literal["tumour", "uniform"]
    sampling_seed: int | None
    _cases: dict[str, Case]
    _num_samples: dict[str, int]  # site_num_samples, counted once per site
    _fit_training_sites: list[str] | None

    @property
    @abstractmethod
    def partition(self) -> Partition:
        """The sites, validation and held-out subjects."""

    @abstractmethod
    def _cache_cases(self, cases: Sequence[Case], group: str = "train") -> list[CachedCase]:
        """The cache entries of ``cases``, validated and preprocessed if needed."""

    @abstractmethod
    def _dataset(self, cases: Sequence[Case], group: str, training: bool, with_target: bool = True) -> SliceDataset:
        """The slices of ``cases``: training slices per ``slice_policy``, else every slice."""

    @abstractmethod
    def _loader(self, dataset: SliceDataset, shuffle: bool, persistent: bool) -> DataLoader[Batch]:
        """Batches of ``dataset``."""

    # ------------------------------------------------------------------ names
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

    def set_training_sites(self, sites: Sequence[str]) -> None:
        """The sites that train in the current fit (e.g. the one site of the ``single`` mode).

        The federation strategy calls this once it has placed the sites, before Lightning asks
        for any loader, so that the fit's start checks and caches only those sites' training
        cases (see :meth:`train_dataloader`). Without the call, every site of this process
        counts as training. It holds until the fit ends (:meth:`teardown`).
        """
        self._fit_training_sites = [str(s) for s in sites]

    def _training_sites(self) -> list[str]:
        """The local sites that train in this fit (:meth:`set_training_sites`), else all local sites."""
        local = self.local_site_names
        if self._fit_training_sites is None:
            return local
        # A process that trains none of its sites checks them all at the fit's start, as it always has.
        return [s for s in local if s in self._fit_training_sites] or local

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

    def _require_local(self, site: str) -> None:
        if site not in self.site_names:
            raise KeyError(f"Unknown site {site!r}; the sites are {self.site_names}.")
        if site not in self.local_site_names:
            raise ValueError(
                f"Site {site!r} is not materialized in this process (`sites`={self.sites}). "
                "HINT: each process only reads and counts its own sites' cases."
            )

    # ------------------------------------------------------------------ datasets and loaders
    def site_train_dataset(self, site: str) -> SliceDataset:
        """The training slices of ``site`` (per ``slice_policy``)."""
        self._require_local(site)
        return self._dataset(self._site_subjects([site], "train"), "train", training=True)

    def site_val_dataset(self, site: str) -> SliceDataset:
        """Every slice of ``site``'s validation cases, ordered."""
        self._require_local(site)
        return self._dataset(self._site_subjects([site], "val"), "train", training=False)

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
        return patient_sampler(
            dataset,
            self.patient_sample_rate,
            self.slices_per_patient,
            self.patient_slice_draw,
            self.sampling_seed,
            stream=self.site_names.index(site),
        )

    def site_val_dataloader(self, site: str) -> DataLoader[Batch]:
        """Every slice of ``site``'s validation cases, case by case, z ascending."""
        return self._loader(self.site_val_dataset(site), shuffle=False, persistent=False)

    # ------------------------------------------------------------------ sizes
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

    def describe(self) -> str:
        """A markdown table: subjects per site (train, val, held-out) and training slices.

        Training slices are counted for this process's sites (preprocessing them if needed);
        other sites show ``-``.
        """
        slices = {site: self.site_num_samples(site) for site in self.local_site_names}
        return partition_table(self.partition, slices)
