"""The partition policy of the data module: which split its settings choose, checked against the disk.

:class:`PartitionPolicy` turns the settings of
:class:`~lightning_fedseg.data.datamodule.FederatedDataModule` (``partition``, ``partition_csv``,
``num_sites``, ``num_heldout``, ...) and the cases found on disk into a
:class:`~lightning_fedseg.data.partition.Partition`; the splits themselves are the pure functions
of :mod:`lightning_fedseg.data.partition`.

Decisions:
    * ``auto`` prefers a FeTS CSV, then the dataset's own ``partition.csv`` (the synthetic
      institutions), then the paper split, so the default run on synthetic data is federated by
      institution without any setting.
    * Every subject of the split must have a case folder with every chosen modality and a
      segmentation; the message names the subjects (at most ten) and the ``data check`` command,
      instead of failing later while a loader reads one of them.
    * ``partition='paper'`` warns that it is a random split with the paper's site sizes, not the
      paper's per-institution split, which is not published per subject.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path

from lightning_fedseg.data.cases import Case
from lightning_fedseg.data.conventions import Modality
from lightning_fedseg.data.partition import (
    PAPER_HELDOUT_FRACTION,
    PAPER_SIMULATED_HELDOUT,
    DuplicateSubjectsError,
    Partition,
    dirichlet_split,
    paper_split,
    paper_split_by_site,
    read_fets_csv,
    read_site_assignment,
    simulated_split,
)
from lightning_fedseg.data.synthetic import PARTITION_NAME

__all__ = ["PartitionMode", "PartitionPolicy", "all_subjects", "partition_table"]

# Records keep the logger name they had before this policy moved out of the data module.
log = logging.getLogger("lightning_fedseg.data.datamodule")


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


@dataclass(frozen=True)
class PartitionPolicy:
    """The partition settings of a data module (see its arguments of the same names).

    Example:
        >>> PartitionPolicy(PartitionMode.SIMULATED, num_sites=4).heldout(0.25)
        0.25
    """

    mode: PartitionMode
    partition_csv: str | None = None
    num_sites: int = 10
    num_heldout: int | float | None = None
    val_fraction: float = 0.2
    dirichlet_alpha: float = 0.5
    seed: int = 0

    def heldout(self, default: float) -> int | float:
        """``num_heldout``, or ``default`` when it is unset."""
        return default if self.num_heldout is None else self.num_heldout

    def split(
        self,
        root: Path,
        cases: Mapping[str, Case],
        modalities: Sequence[Modality],
        tumour_volume: Callable[[Case], float],
    ) -> Partition:
        """Split the ``cases`` found under ``root`` (by subject) into sites, validation and held-out.

        Args:
            root: the dataset folder (its ``partition.csv`` is read by ``auto``).
            cases: every case of the dataset, by subject.
            modalities: the modalities every case of the split must have.
            tumour_volume: a case's tumour voxels (``dirichlet`` only).

        Raises:
            ValueError: a subject of a CSV has no case folder, or a case lacks files.
        """
        subjects = sorted(cases)
        mode = self.mode
        dataset_csv = root / PARTITION_NAME
        if mode is PartitionMode.AUTO:
            if self.partition_csv is not None:
                mode = PartitionMode.FETS
            elif dataset_csv.is_file():
                assignment = read_site_assignment(dataset_csv)
                _check_known(assignment, cases, dataset_csv, root)
                fraction = _fraction(self.heldout(PAPER_HELDOUT_FRACTION), len(assignment))
                partition = paper_split_by_site(assignment, self.seed, fraction, self.val_fraction)
                return _checked(partition, cases, modalities, root)
            else:
                mode = PartitionMode.PAPER
        if mode is PartitionMode.PAPER:
            _warn_paper_split(root)
        if mode is PartitionMode.FETS:
            assert self.partition_csv is not None
            csv_path = Path(self.partition_csv).expanduser()
            try:
                partition = read_fets_csv(csv_path, self.val_fraction, self.seed, self.heldout(0))
            except DuplicateSubjectsError as err:  # name the subjects missing on disk in the same message
                missing = [s for s in err.subjects if s not in cases]
                if not missing:
                    raise
                raise ValueError(f"{err} {_missing_message(missing, csv_path, root)}") from None
            _check_known({s: "" for s in all_subjects(partition)}, cases, csv_path, root)
        elif mode is PartitionMode.PAPER:
            fraction = _fraction(self.heldout(PAPER_HELDOUT_FRACTION), len(subjects))
            partition = paper_split(subjects, self.seed, heldout_fraction=fraction, val_fraction=self.val_fraction)
        elif mode is PartitionMode.SIMULATED:
            partition = simulated_split(
                subjects,
                self.num_sites,
                self.seed,
                self.heldout(PAPER_SIMULATED_HELDOUT / 210),
                self.val_fraction,
            )
        else:
            sizes = {s: float(tumour_volume(cases[s])) for s in subjects}
            partition = dirichlet_split(
                subjects,
                sizes,
                self.num_sites,
                self.dirichlet_alpha,
                self.seed,
                self.heldout(PAPER_SIMULATED_HELDOUT / 210),
                self.val_fraction,
            )
        return _checked(partition, cases, modalities, root)


def all_subjects(partition: Partition) -> list[str]:
    """Every subject of ``partition``: the sites' (training, then validation) and the held-out."""
    return [s for split in partition.sites.values() for s in split.subjects] + list(partition.heldout)


def partition_table(partition: Partition, slices: Mapping[str, int]) -> str:
    """A markdown table: subjects per site (train, val, held-out) and training ``slices`` where known.

    Example:
        >>> from lightning_fedseg.data.partition import SiteSplit
        >>> table = partition_table(Partition({"a": SiteSplit(("s1",))}, heldout=("s2",)), {"a": 7})
        >>> print(table.splitlines()[-1])
        | total | 1 | 0 | 1 | 7 |
    """
    by_site = partition.heldout_by_site or {}
    lines = [
        "| site | train | val | held-out | training slices |",
        "|---|---:|---:|---:|---:|",
    ]
    totals = [0, 0, 0, 0]
    for name, split in partition.sites.items():
        held = len(by_site.get(name, ()))
        count = slices.get(name)
        totals = [
            totals[0] + len(split.train),
            totals[1] + len(split.val),
            totals[2] + held,
            totals[3] + (count or 0),
        ]
        shown = "-" if count is None else str(count)
        lines.append(f"| {name} | {len(split.train)} | {len(split.val)} | {held} | {shown} |")
    unassigned = len(partition.heldout) - totals[2]
    if unassigned:
        lines.append(f"| (no site) | 0 | 0 | {unassigned} | - |")
    lines.append(f"| total | {totals[0]} | {totals[1]} | {len(partition.heldout)} | {totals[3]} |")
    return "\n".join(lines)


def _warn_paper_split(root: Path) -> None:
    message = (
        f"partition='paper' on {root}: subjects are split at random into 10 sites with the paper's relative "
        "sizes (70, 27, 17, 12, 11, 9, 6, 6, 4, 3); this is not the paper's split by institution, which is "
        "not published per subject. HINT: pass a FeTS partition CSV (`partition_csv`) to split by institution."
    )
    # 4: the warning names the line that asked the data module for its partition.
    warnings.warn(message, UserWarning, stacklevel=4)


def _fraction(value: int | float, total: int) -> float:
    return value if isinstance(value, float) else min(value / max(total, 1), 0.999999)


def _check_known(assignment: Mapping[str, str], cases: Mapping[str, Case], csv_path: Path, root: Path) -> None:
    missing = sorted(s for s in assignment if s not in cases)
    if missing:
        raise ValueError(_missing_message(missing, csv_path, root))
    extra = len(cases) - len(assignment)
    if extra > 0:
        log.warning("%d case(s) under %s are not in %s; ignored.", extra, root, csv_path)


def _missing_message(missing: Sequence[str], csv_path: Path, root: Path) -> str:
    shown = ", ".join(sorted(missing)[:10]) + (" ..." if len(missing) > 10 else "")
    return f"{csv_path}: {len(missing)} subject(s) have no case folder under {root}: {shown}."


def _checked(partition: Partition, cases: Mapping[str, Case], modalities: Sequence[Modality], root: Path) -> Partition:
    incomplete = []
    for subject in all_subjects(partition):
        case = cases[subject]
        lacking = [m.value for m in modalities if m not in case.images]
        if case.seg is None:
            lacking.append("seg")
        if lacking:
            incomplete.append(f"{subject} (no {', '.join(lacking)})")
    if incomplete:
        raise ValueError(
            f"Cases under {root} lack files: {'; '.join(incomplete[:10])}. "
            f"HINT: run `lightning-fedseg data check {root}`."
        )
    return partition
