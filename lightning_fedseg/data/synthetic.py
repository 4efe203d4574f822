"""Synthetic datasets: write a multi-institution BraTS-layout NIfTI dataset, or find it cached.

The institutions are drawn in :mod:`~lightning_fedseg.data.synthetic_sites` (each site's scanner
and patient population) and each subject is imaged by the phantom in
:mod:`~lightning_fedseg.data.synthetic_phantom`; this module writes them as NIfTI files with a
FeTS-2021-style ``partition.csv`` and a ``dataset.json`` manifest, atomically, and caches them by
their parameters. Every name of those two modules is also importable from here.
``docs/SYNTHETIC.md`` explains what is simulated and why.

Example:
    >>> import tempfile
    >>> out = Path(tempfile.mkdtemp()) / "synthetic"
    >>> data = write_synthetic_dataset(out, num_subjects=4, shape=(16, 16, 8), num_sites=2)
    >>> data.site_sizes, sorted(p.name for p in out.iterdir())[:2]
    ((2, 2), ['BraTS_SYN_0001', 'BraTS_SYN_0002'])
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
import shutil
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import numpy.typing as npt

from lightning_fedseg.data.cases import CaseNaming
from lightning_fedseg.data.conventions import MODALITIES, LabelConvention
from lightning_fedseg.data.partition import PAPER_SITE_SIZES
from lightning_fedseg.data.synthetic_phantom import (
    DEFAULT_SHAPE,
    FIELD_OF_VIEW_MM,
    FULL_SHAPE,
    SyntheticSubject,
    generate_subject,
    grid_axes,
    voxel_affine,
)

# MIN_SITE_SUBJECTS and Tissue are importable from here too, but not in __all__ (the data package
# re-exports __all__ whole and does not name them).
from lightning_fedseg.data.synthetic_sites import MIN_SITE_SUBJECTS as MIN_SITE_SUBJECTS
from lightning_fedseg.data.synthetic_sites import (
    TISSUE_CLASSES,
    SiteProfile,
    make_site_profiles,
    scale_site_sizes,
)
from lightning_fedseg.data.synthetic_sites import Tissue as Tissue

__all__ = [
    "DEFAULT_NUM_SUBJECTS",
    "DEFAULT_SHAPE",
    "FIELD_OF_VIEW_MM",
    "FULL_SHAPE",
    "GENERATOR_VERSION",
    "TISSUE_CLASSES",
    "SiteProfile",
    "SyntheticDataset",
    "SyntheticSubject",
    "default_synthetic_root",
    "ensure_synthetic_dataset",
    "generate_subject",
    "grid_axes",
    "make_site_profiles",
    "scale_site_sizes",
    "voxel_affine",
    "write_synthetic_dataset",
]

DEFAULT_NUM_SUBJECTS = 120
GENERATOR_VERSION = 1
MANIFEST_NAME = "dataset.json"
PARTITION_NAME = "partition.csv"
ENV_DATA_ROOT = "LIGHTNING_FEDSEG_DATA"


@dataclass(frozen=True)
class SyntheticDataset:
    """A written dataset.

    Attributes:
        root: the dataset folder (one ``<ID>/`` folder per subject).
        subject_sites: subject id -> FeTS partition id (1-based institution index).
        site_sizes: subjects per institution, in partition-id order.
        manifest: the contents of ``dataset.json``.
    """

    root: Path
    subject_sites: dict[str, int] = field(repr=False)
    site_sizes: tuple[int, ...]
    manifest: dict[str, Any] = field(repr=False)

    def __str__(self) -> str:
        shape = "x".join(str(s) for s in self.manifest["parameters"]["shape"])
        return (
            f"synthetic dataset at {self.root}: {len(self.subject_sites)} subjects of {shape} "
            f"voxels in {len(self.site_sizes)} sites {self.site_sizes}"
        )

    @property
    def partition_csv(self) -> Path:
        """The FeTS-2021-style ``Subject_ID,Partition_ID`` file."""
        return self.root / PARTITION_NAME

    @property
    def subject_ids(self) -> list[str]:
        """All subject ids, sorted."""
        return sorted(self.subject_sites)


def _parameters(
    num_subjects: int | None,
    shape: Sequence[int] | None,
    num_sites: int | None,
    seed: int,
    site_sizes: Sequence[int] | None,
    naming: CaseNaming | str,
    full_size: bool,
) -> dict[str, Any]:
    """Validate and complete the generation parameters (the manifest's ``parameters``)."""
    naming = CaseNaming(naming)
    if full_size and shape is not None and tuple(shape) != FULL_SHAPE:
        raise ValueError(f"Got both `full_size=True` and `shape={tuple(shape)}`; pass only one.")
    resolved_shape = FULL_SHAPE if full_size else DEFAULT_SHAPE if shape is None else shape
    resolved_shape = tuple(int(s) for s in resolved_shape)
    if len(resolved_shape) != 3 or min(resolved_shape) < 8:
        raise ValueError(f"Expected `shape` to be 3 sizes of at least 8 voxels, but got {resolved_shape}.")
    if not isinstance(seed, int | np.integer) or seed < 0:
        raise ValueError(f"Expected `seed` to be a non-negative integer, but got {seed}.")
    if site_sizes is not None:
        sizes = tuple(int(s) for s in site_sizes)
        if not sizes or min(sizes) < 1:
            raise ValueError(f"Expected `site_sizes` to be positive subject counts, but got {sizes}.")
        if num_sites is not None and num_sites != len(sizes):
            raise ValueError(f"Expected `num_sites` ({num_sites}) to match len(site_sizes) ({len(sizes)}).")
        if num_subjects is not None and num_subjects != sum(sizes):
            raise ValueError(f"Expected `num_subjects` ({num_subjects}) to equal sum(site_sizes) ({sum(sizes)}).")
    else:
        num_sites = len(PAPER_SITE_SIZES) if num_sites is None else num_sites
        num_subjects = DEFAULT_NUM_SUBJECTS if num_subjects is None else num_subjects
        if num_sites < 1:
            raise ValueError(f"Expected `num_sites` to be a positive integer, but got {num_sites}.")
        if num_subjects < num_sites:
            raise ValueError(
                f"Expected `num_subjects` to be at least `num_sites` ({num_sites}), but got {num_subjects}."
            )
        sizes = scale_site_sizes(num_subjects, num_sites)
    return {
        "generator_version": GENERATOR_VERSION,
        "num_subjects": sum(sizes),
        "shape": list(resolved_shape),
        "num_sites": len(sizes),
        "seed": int(seed),
        "site_sizes": list(sizes),
        "naming": naming.value,
    }


def _parameter_key(parameters: dict[str, Any]) -> str:
    text = json.dumps(parameters, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:10]


def _subject_ids(num_subjects: int) -> list[str]:
    width = max(4, len(str(num_subjects)))
    return [f"BraTS_SYN_{k:0{width}d}" for k in range(1, num_subjects + 1)]


def _site_assignment(parameters: dict[str, Any]) -> list[int]:
    """0-based site of each subject, interleaved (ids do not reveal the institution)."""
    sizes = parameters["site_sizes"]
    labels = np.repeat(np.arange(len(sizes)), sizes)
    return [int(s) for s in np.random.default_rng([parameters["seed"], 0xA551]).permutation(labels)]


def _save(path: Path, data: npt.NDArray[Any], affine: npt.NDArray[np.float64]) -> None:
    image = nib.Nifti1Image(data, affine)
    image.header.set_xyzt_units("mm", "sec")
    image.set_qform(affine, code=1)
    image.set_sform(affine, code=1)
    nib.save(image, path)


def _write_subject(job: tuple[Path, str, SiteProfile, dict[str, Any], int]) -> None:
    folder, subject_id, site, parameters, number = job
    naming = CaseNaming(parameters["naming"])
    convention = LabelConvention.BRATS2023 if naming is CaseNaming.BRATS2023 else "brats"
    rng = np.random.default_rng([parameters["seed"], 0x5B1, number])
    subject = generate_subject(site, parameters["shape"], rng, convention)
    affine = voxel_affine(parameters["shape"])
    folder.mkdir()
    for modality, image in subject.images.items():
        stored = np.clip(np.rint(image), 0, np.iinfo(np.int16).max).astype(np.int16)
        _save(folder / f"{naming.image_stem(subject_id, modality)}.nii.gz", stored, affine)
    _save(folder / f"{naming.seg_stem(subject_id)}.nii.gz", subject.seg, affine)


def _read_complete(out: Path) -> SyntheticDataset | None:
    """The dataset in ``out`` if it is a complete synthetic dataset, else ``None``."""
    try:
        manifest = json.loads((out / MANIFEST_NAME).read_text())
        with (out / PARTITION_NAME).open(newline="") as f:
            subject_sites = {row["Subject_ID"]: int(row["Partition_ID"]) for row in csv.DictReader(f)}
        parameters = manifest["parameters"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if len(subject_sites) != parameters.get("num_subjects"):
        return None
    if not all((out / subject_id).is_dir() for subject_id in subject_sites):
        return None
    return SyntheticDataset(out, subject_sites, tuple(parameters["site_sizes"]), manifest)


def write_synthetic_dataset(
    out: Path | str,
    num_subjects: int | None = None,
    shape: Sequence[int] | None = None,
    num_sites: int | None = None,
    seed: int = 0,
    site_sizes: Sequence[int] | None = None,
    naming: CaseNaming | str = CaseNaming.BRATS,
    overwrite: bool = False,
    full_size: bool = False,
    num_workers: int = 1,
) -> SyntheticDataset:
    """Write a synthetic multi-institution dataset in BraTS layout.

    Writes ``<out>/<ID>/<ID>_{flair,t1,t1ce,t2,seg}.nii.gz`` (or FeTS / BraTS 2023 names), a
    FeTS-2021-style ``partition.csv`` (``Subject_ID,Partition_ID``, institutions numbered from
    1) and ``dataset.json`` (parameters and each site's scanner and population). Everything is
    written into ``<out>.tmp-<pid>`` and renamed into place at the end, so an interrupted run
    never leaves a dataset that looks complete. The same parameters give the same bytes.

    Args:
        out: the dataset folder to create.
        num_subjects: subjects in all (default 120, or ``sum(site_sizes)``).
        shape: voxel grid over the BraTS 240 x 240 x 155 mm field of view (default 48 x 48 x 32).
        num_sites: institutions (default 10, or ``len(site_sizes)``).
        seed: the random seed; sites and subjects follow from it.
        site_sizes: subjects per institution; default: the paper's proportions (70, 27, 17, 12,
            11, 9, 6, 6, 4, 3) scaled to ``num_subjects`` with at least 3 per site, or an even
            split when ``num_sites`` is not 10.
        naming: ``"brats"``, ``"fets"`` or ``"brats2023"`` file names (the last also writes
            enhancing tumour as label 3).
        overwrite: replace an existing, different dataset in ``out``.
        full_size: write 240 x 240 x 155 volumes (1 mm voxels), as BraTS.
        num_workers: processes generating subjects in parallel.

    Returns:
        The dataset. If ``out`` already holds a complete dataset written with the same
        parameters, it is returned without rewriting anything.

    Raises:
        FileExistsError: ``out`` is not empty, holds something else and ``overwrite`` is false.
    """
    out = Path(out)
    parameters = _parameters(num_subjects, shape, num_sites, seed, site_sizes, naming, full_size)
    if num_workers < 1:
        raise ValueError(f"Expected `num_workers` to be a positive integer, but got {num_workers}.")
    existing = _read_complete(out)
    if existing is not None and existing.manifest["parameters"] == parameters:
        return existing
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not overwrite:
        raise FileExistsError(
            f"{out} already exists and does not hold a synthetic dataset with these parameters. "
            "HINT: pass `overwrite=True` (`--overwrite`) or choose another folder."
        )
    sites = make_site_profiles(parameters["num_sites"], parameters["seed"])
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f"{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        ids = _subject_ids(parameters["num_subjects"])
        assignment = _site_assignment(parameters)
        jobs = [
            (tmp / subject_id, subject_id, sites[site], parameters, number)
            for number, (subject_id, site) in enumerate(zip(ids, assignment, strict=True), 1)
        ]
        if num_workers == 1:
            for job in jobs:
                _write_subject(job)
        else:
            with ProcessPoolExecutor(max_workers=num_workers) as pool:
                list(pool.map(_write_subject, jobs, chunksize=4))
        subject_sites = {i: site + 1 for i, site in zip(ids, assignment, strict=True)}
        with (tmp / PARTITION_NAME).open("w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["Subject_ID", "Partition_ID"])
            writer.writerows(sorted(subject_sites.items()))
        manifest = {
            "generator": "lightning_fedseg.data.synthetic",
            "parameters": parameters,
            "spacing_mm": (np.asarray(FIELD_OF_VIEW_MM) / parameters["shape"]).tolist(),
            "modalities": [m.value for m in MODALITIES],
            "label_convention": "brats2023" if parameters["naming"] == "brats2023" else "brats",
            "sites": [
                {"partition_id": i + 1, "num_subjects": n, **site.to_dict()}
                for i, (site, n) in enumerate(zip(sites, parameters["site_sizes"], strict=True))
            ],
        }
        (tmp / MANIFEST_NAME).write_text(json.dumps(manifest, indent=2) + "\n")
        _move_into_place(tmp, out, parameters, overwrite)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    result = _read_complete(out)
    if result is None:  # pragma: no cover - only if another process broke `out` meanwhile
        raise RuntimeError(f"Writing the synthetic dataset to {out} did not complete.")
    return result


def _move_into_place(tmp: Path, out: Path, parameters: dict[str, Any], overwrite: bool) -> None:
    """Rename the finished ``tmp`` to ``out``; a replaced ``out`` is moved aside, then removed."""
    current = _read_complete(out)
    if current is not None and current.manifest["parameters"] == parameters:
        return  # another process (e.g. another rank) finished the same dataset first
    old = out.parent / f"{out.name}.old-{os.getpid()}"
    if out.is_dir() and not any(out.iterdir()):
        out.rmdir()
    elif out.exists():
        if not overwrite:
            raise FileExistsError(f"{out} was filled by another process while writing.")
        out.rename(old)
    try:
        tmp.rename(out)
    except OSError:
        other = _read_complete(out)
        if other is None or other.manifest["parameters"] != parameters:
            if old.exists() and not out.exists():
                old.rename(out)
            raise
    if old.is_dir():
        shutil.rmtree(old, ignore_errors=True)
    else:
        old.unlink(missing_ok=True)


def default_synthetic_root() -> Path:
    """Where generated datasets are cached: ``$LIGHTNING_FEDSEG_DATA`` or
    ``~/.cache/lightning_fedseg/synthetic``."""
    env = os.environ.get(ENV_DATA_ROOT)
    if env:
        return Path(env).expanduser()
    return Path.home() / ".cache" / "lightning_fedseg" / "synthetic"


def ensure_synthetic_dataset(
    root: Path | str | None = None,
    *,
    num_subjects: int | None = None,
    shape: Sequence[int] | None = None,
    num_sites: int | None = None,
    seed: int = 0,
    site_sizes: Sequence[int] | None = None,
    naming: CaseNaming | str = CaseNaming.BRATS,
    full_size: bool = False,
    num_workers: int = 1,
) -> Path:
    """Return the folder of the synthetic dataset for these parameters, writing it if missing.

    The folder is ``<root>/<N>subj-<X>x<Y>x<Z>-<S>sites-seed<seed>-<hash of all parameters>``,
    so different parameters (or generator versions) never collide, and a second call costs a
    few file checks. The keyword arguments are those of :func:`write_synthetic_dataset`.

    Args:
        root: parent folder; default :func:`default_synthetic_root`.
    """
    parameters = _parameters(num_subjects, shape, num_sites, seed, site_sizes, naming, full_size)
    x, y, z = parameters["shape"]
    name = (
        f"{parameters['num_subjects']}subj-{x}x{y}x{z}-{parameters['num_sites']}sites-"
        f"seed{parameters['seed']}-{_parameter_key(parameters)}"
    )
    folder = (Path(root) if root is not None else default_synthetic_root()) / name
    write_synthetic_dataset(
        folder,
        shape=parameters["shape"],
        seed=parameters["seed"],
        site_sizes=parameters["site_sizes"],
        naming=parameters["naming"],
        num_workers=num_workers,
    )
    return folder
