"""Synthetic institutions that write BraTS-layout NIfTI datasets.

Each subject is a skull-stripped head with cerebrospinal fluid (sulci, midline, ventricles), grey
and white matter, one glioma with nested labels (1 necrotic core, 2 edema, 4 enhancing rim) and,
sometimes, small FLAIR-bright white-matter lesions that are *not* tumour. Each institution is a
scanner plus a patient population: its own tissue contrasts, bias field, noise, blur, gain and
offset, and its own tumour size and location distribution. Anatomy is defined in millimetres over
the BraTS field of view (240 x 240 x 155 mm), so any grid shape samples the same subjects.
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
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import numpy.typing as npt
from scipy import ndimage

from lightning_fedseg.data.cases import CaseNaming
from lightning_fedseg.data.conventions import MODALITIES, LabelConvention, Modality
from lightning_fedseg.data.partition import PAPER_SITE_SIZES

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
DEFAULT_SHAPE: tuple[int, int, int] = (48, 48, 32)
FULL_SHAPE: tuple[int, int, int] = (240, 240, 155)
FIELD_OF_VIEW_MM: tuple[float, float, float] = (240.0, 240.0, 155.0)
GENERATOR_VERSION = 1
MANIFEST_NAME = "dataset.json"
PARTITION_NAME = "partition.csv"
ENV_DATA_ROOT = "LIGHTNING_FEDSEG_DATA"
MIN_SITE_SUBJECTS = 3

TISSUE_CLASSES: tuple[str, ...] = (
    "background",
    "csf",
    "grey_matter",
    "white_matter",
    "edema",
    "necrosis",
    "enhancing",
    "wm_lesion",
)
"""The tissue classes of the anatomy, in the column order of :attr:`SiteProfile.contrast`."""
_BG, _CSF, _GM, _WM, _EDEMA, _NECROSIS, _ENHANCING, _WMH = range(len(TISSUE_CLASSES))
# Relative signal of each tissue (columns as above, background 0) per modality before a site's
# contrast changes. FLAIR's CSF, white matter and edema columns are set per site.
_BASE_CONTRAST: dict[Modality, tuple[float, ...]] = {
    Modality.FLAIR: (0.0, 0.15, 0.55, 0.45, 0.90, 0.60, 0.80, 0.65),
    Modality.T1: (0.0, 0.20, 0.50, 0.75, 0.42, 0.25, 0.45, 0.60),
    Modality.T1CE: (0.0, 0.20, 0.52, 0.75, 0.42, 0.25, 1.10, 0.60),
    Modality.T2: (0.0, 1.00, 0.62, 0.45, 0.85, 0.95, 0.70, 0.75),
}
_BRAIN_RADII_MM = np.array([68.0, 84.0, 60.0])
_NOISE_REFERENCE = 0.45  # white-matter FLAIR signal, the unit of `SiteProfile.noise`


@dataclass(frozen=True)
class SiteProfile:
    """One institution: a scanner (intensities) and a patient population (tumours, anatomy).

    Attributes:
        name: ``"site01"``, ``"site02"``, ...
        gain: per-modality multiplicative intensity scale of the scanner (raw units).
        offset: per-modality additive intensity offset inside the brain (raw units).
        contrast: per-modality relative signal of each tissue class, columns in
            :data:`TISSUE_CLASSES` order.
        bias_strength: amplitude of the smooth multiplicative bias field (log scale).
        bias_direction: the site's coil gradient direction (unit vector, x y z).
        noise: Rician noise standard deviation, as a fraction of ``gain`` times the
            white-matter FLAIR level (0.45): 0.02 is a clean 3D scan, 0.09 a noisy one.
        blur_voxels: Gaussian point-spread standard deviation in voxels of the written grid
            along x, y and z (large z blur: thick-slice 2D acquisitions).
        tumor_radius_mm: median radius of the whole tumour (edema included).
        tumor_left_fraction: probability that a tumour lies in the left hemisphere.
        tumor_center_y: mean anterior-posterior tumour position, in brain radii (+ anterior).
        no_enhancement_rate: fraction of tumours without an enhancing rim.
        lesion_rate: mean number of non-tumour FLAIR-bright white-matter lesions per subject.
        ventricle_scale: ventricle size relative to a young adult's (population age).
    """

    name: str
    gain: tuple[float, ...]
    offset: tuple[float, ...]
    contrast: tuple[tuple[float, ...], ...]
    bias_strength: float
    bias_direction: tuple[float, float, float]
    noise: float
    blur_voxels: tuple[float, float, float]
    tumor_radius_mm: float
    tumor_left_fraction: float
    tumor_center_y: float
    no_enhancement_rate: float
    lesion_rate: float
    ventricle_scale: float

    def to_dict(self) -> dict[str, Any]:
        """A JSON-friendly dict (contrast keyed by modality)."""
        out = asdict(self)
        out["gain"] = {m.value: g for m, g in zip(MODALITIES, self.gain, strict=True)}
        out["offset"] = {m.value: o for m, o in zip(MODALITIES, self.offset, strict=True)}
        out["contrast"] = {
            m.value: dict(zip(TISSUE_CLASSES, row, strict=True))
            for m, row in zip(MODALITIES, self.contrast, strict=True)
        }
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in out.items()}


@dataclass
class SyntheticSubject:
    """One generated subject: raw scanner intensities (float32, zero outside the brain) and
    its BraTS label map (uint8)."""

    images: dict[Modality, npt.NDArray[np.float32]]
    seg: npt.NDArray[np.uint8]
    brain: npt.NDArray[np.bool_]


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


def scale_site_sizes(
    num_subjects: int,
    num_sites: int,
    reference: Sequence[int] = PAPER_SITE_SIZES,
    minimum: int = MIN_SITE_SUBJECTS,
) -> tuple[int, ...]:
    """Split ``num_subjects`` over sites in proportion to ``reference`` (largest remainder).

    With ``num_sites`` equal to ``len(reference)`` the paper's proportions are kept; otherwise
    subjects are split evenly (the paper's simulated splits). Every site gets ``minimum``.

    Example:
        >>> scale_site_sizes(120, 10)
        (50, 20, 12, 9, 8, 7, 4, 4, 3, 3)
        >>> scale_site_sizes(165, 10) == PAPER_SITE_SIZES
        True
        >>> scale_site_sizes(10, 4)
        (3, 3, 2, 2)
    """
    if num_sites < 1:
        raise ValueError(f"Expected `num_sites` to be a positive integer, but got {num_sites}.")
    minimum = min(minimum, num_subjects // num_sites)
    if minimum < 1:
        raise ValueError(f"Expected `num_subjects` to be at least `num_sites` ({num_sites}), but got {num_subjects}.")
    weights = np.asarray(reference if len(reference) == num_sites else [1] * num_sites, float)
    spare = num_subjects - minimum * num_sites
    shares = weights / weights.sum() * num_subjects
    extra = np.maximum(shares - minimum, 0)
    extra = extra / extra.sum() * spare if extra.sum() > 0 else np.full(num_sites, spare / num_sites)
    sizes = np.floor(extra).astype(int)
    order = np.argsort(-(extra - sizes), kind="stable")
    sizes[order[: spare - sizes.sum()]] += 1
    return tuple(int(s) + minimum for s in sizes)


def _latin(rng: np.random.Generator, n: int, low: float, high: float) -> npt.NDArray[np.float64]:
    """``n`` values spread over ``[low, high]``: one per stratum, in random site order."""
    return low + (high - low) * (rng.permutation(n) + rng.uniform(size=n)) / n


def make_site_profiles(num_sites: int, seed: int = 0) -> list[SiteProfile]:
    """Draw ``num_sites`` institutions whose scanners and populations really differ.

    Each parameter is stratified over sites (one value per equal-width stratum, shuffled), so
    any two seeds give sites that span the same ranges in different combinations.
    """
    if num_sites < 1:
        raise ValueError(f"Expected `num_sites` to be a positive integer, but got {num_sites}.")
    rng = np.random.default_rng([seed, 0x5173])
    n = num_sites
    noise = _latin(rng, n, 0.02, 0.09)
    bias = _latin(rng, n, 0.05, 0.35)
    blur_xy = _latin(rng, n, 0.0, 0.8)
    blur_z = _latin(rng, n, 0.3, 1.6)
    radius = _latin(rng, n, 14.0, 34.0)
    csf_flair = _latin(rng, n, 0.08, 0.35)
    edema_ratio = _latin(rng, n, 1.35, 2.0)
    gm_wm_ratio = _latin(rng, n, 1.0, 1.3)
    lesion_rate = _latin(rng, n, 0.0, 4.0)
    ventricles = _latin(rng, n, 0.8, 1.5)
    # Most sites see both hemispheres; one in three is lateralised (a referral pattern).
    lateral = rng.permutation(n) % 3 == 0
    left = np.where(lateral, rng.choice([0.1, 0.9], size=n), 0.5)
    profiles = []
    for i in range(n):
        contrast = []
        for m in MODALITIES:
            row = np.asarray(_BASE_CONTRAST[m]) * np.exp(rng.normal(0, 0.08, len(_BASE_CONTRAST[m])))
            row[_BG] = 0.0
            if m is Modality.FLAIR:
                row[_WM] = 0.45
                row[_GM] = 0.45 * gm_wm_ratio[i]
                row[_CSF] = csf_flair[i]
                row[_EDEMA] = edema_ratio[i] * row[_GM]
                row[_ENHANCING] = row[_EDEMA] * rng.uniform(0.8, 1.0)
                row[_NECROSIS] = row[_EDEMA] * rng.uniform(0.55, 0.95)
                row[_WMH] = row[_WM] + rng.uniform(0.5, 0.8) * (row[_EDEMA] - row[_WM])
            contrast.append(tuple(float(v) for v in row))
        direction = rng.normal(size=3)
        unit = [float(v) for v in direction / np.linalg.norm(direction)]
        profiles.append(
            SiteProfile(
                name=f"site{i + 1:02d}",
                gain=tuple(float(g) for g in rng.uniform(400, 2500, len(MODALITIES))),
                offset=tuple(float(o) for o in rng.uniform(0, 60, len(MODALITIES))),
                contrast=tuple(contrast),
                bias_strength=float(bias[i]),
                bias_direction=(unit[0], unit[1], unit[2]),
                noise=float(noise[i]),
                blur_voxels=(float(blur_xy[i]), float(blur_xy[i]), float(blur_z[i])),
                tumor_radius_mm=float(radius[i]),
                tumor_left_fraction=float(left[i]),
                tumor_center_y=float(rng.uniform(-0.35, 0.35)),
                no_enhancement_rate=float(rng.uniform(0.0, 0.25)),
                lesion_rate=float(lesion_rate[i]),
                ventricle_scale=float(ventricles[i]),
            )
        )
    return profiles


Axes = Sequence[npt.NDArray[np.float32]]


def _smooth_noise(rng: np.random.Generator, axes: Axes, wavelength_mm: float) -> npt.NDArray[Any]:
    """A smooth random field of about unit standard deviation: a sum of random plane waves.

    Defined in millimetres, so every grid shape (or sub-box, given its axes) samples the same
    field. ``cos(a + b)`` factorises, so the sum over waves is one small matrix product.
    """
    waves = 12
    k = rng.normal(size=(waves, 3)) * (2 * np.pi / wavelength_mm) / np.sqrt(3)
    phase = rng.uniform(0, 2 * np.pi, size=waves)
    x, y, z = (np.ravel(a) for a in axes)
    in_plane = (x[:, None, None] * k[:, 0] + y[None, :, None] * k[:, 1]).reshape(-1, waves)
    along_z = z[:, None] * k[:, 2] + phase
    left = np.concatenate([np.cos(in_plane), -np.sin(in_plane)], axis=1).astype(np.float32)
    right = np.concatenate([np.cos(along_z), np.sin(along_z)], axis=1) * np.sqrt(2 / waves)
    return (left @ right.T.astype(np.float32)).reshape(x.size, y.size, z.size)


def _ellipsoid(q: Axes, center: Sequence[float], radii: Sequence[float]) -> npt.NDArray[np.bool_]:
    d2 = sum(((qi - ci) / ri) ** 2 for qi, ci, ri in zip(q, center, radii, strict=True))
    return np.asarray(d2 < 1.0)


def _random_rotation(rng: np.random.Generator) -> npt.NDArray[np.float64]:
    q, r = np.linalg.qr(rng.normal(size=(3, 3)))
    return q * np.sign(np.diag(r))


def grid_axes(shape: Sequence[int]) -> list[npt.NDArray[np.float32]]:
    """Voxel-centre coordinates in mm (origin at the volume centre), as broadcastable axes.

    Example:
        >>> [a.ravel().tolist() for a in grid_axes((2, 2, 5))][2]
        [-62.0, -31.0, 0.0, 31.0, 62.0]
    """
    axes = []
    for dim, (n, fov) in enumerate(zip(shape, FIELD_OF_VIEW_MM, strict=True)):
        a = ((np.arange(n) + 0.5) / n - 0.5) * fov
        axes.append(a.astype(np.float32).reshape([n if d == dim else 1 for d in range(3)]))
    return axes


def voxel_affine(shape: Sequence[int]) -> npt.NDArray[np.float64]:
    """The voxel-to-world matrix written: BraTS orientation, world origin at the volume centre.

    Example:
        >>> voxel_affine((48, 48, 31))[:3].tolist()
        [[-5.0, 0.0, 0.0, 117.5], [0.0, -5.0, 0.0, 117.5], [0.0, 0.0, 5.0, -75.0]]
    """
    spacing = np.asarray(FIELD_OF_VIEW_MM) / np.asarray(shape)
    affine = np.diag([-spacing[0], -spacing[1], spacing[2], 1.0])
    affine[:3, 3] = -affine[:3, :3] @ ((np.asarray(shape) - 1) / 2)
    return affine


@dataclass
class _Anatomy:
    tissue: npt.NDArray[np.uint8]  # tissue class per voxel (_BG outside the brain)
    depth: npt.NDArray[np.float32]  # 0 at the brain centre, 1 at its surface
    ventricles: npt.NDArray[np.bool_]
    center: npt.NDArray[np.float64]  # brain centre, mm
    radii: npt.NDArray[np.float64]  # brain semi-axes, mm
    yaw: float  # rotation about z, radians


def _anatomy(rng: np.random.Generator, axes: Axes, site: SiteProfile) -> _Anatomy:
    """A skull-stripped brain: perturbed ellipsoid, cortex, sulci, midline, nuclei, ventricles."""
    center = rng.normal(0, [2.0, 4.0, 3.0]) + np.array([0.0, 0.0, 4.0])
    radii = _BRAIN_RADII_MM * rng.uniform(0.9, 1.05) * rng.uniform(0.96, 1.04, 3)
    yaw = float(np.deg2rad(rng.normal(0, 4)))
    cos, sin = np.float32(np.cos(yaw)), np.float32(np.sin(yaw))
    dx, dy, dz = (a - np.float32(c) for a, c in zip(axes, center, strict=True))
    q = [
        (cos * dx + sin * dy) / np.float32(radii[0]),
        (sin * dx - cos * dy) / np.float32(radii[1]),  # + anterior: index y runs posterior
        dz / np.float32(radii[2]),
    ]
    depth = np.sqrt(q[0] ** 2 + q[1] ** 2 + q[2] ** 2) + 0.04 * _smooth_noise(rng, axes, 45.0)
    brain = depth < 1.0
    folds = 0.05 * _smooth_noise(rng, axes, 18.0) + 0.03 * _smooth_noise(rng, axes, 8.0)
    sulci = _smooth_noise(rng, axes, 10.0)
    tissue = np.where(brain, _WM, _BG).astype(np.uint8)
    vs = site.ventricle_scale * rng.uniform(0.85, 1.15)
    deep_grey = np.zeros_like(brain)
    for side in (-1.0, 1.0):
        deep_grey |= _ellipsoid(q, (side * 0.14, -0.12, -0.02), (0.09, 0.13, 0.10))
        deep_grey |= _ellipsoid(q, (side * 0.30, 0.10, 0.02), (0.07, 0.15, 0.12))
    tissue[brain & ((depth > 0.82 + folds) | deep_grey)] = _GM
    ventricles = _ellipsoid(q, (0.0, -0.05, -0.05), (0.02 * vs, 0.12, 0.10 * vs))
    for side in (-1.0, 1.0):
        ventricles |= _ellipsoid(q, (side * 0.11, 0.03, 0.12), (0.07 * vs, 0.32, 0.13 * vs))
    half_width = max(1.5, 0.55 * FIELD_OF_VIEW_MM[0] / q[0].shape[0]) / radii[0]
    midline = (np.abs(q[0]) < half_width) & ((q[2] > 0.15) | (np.abs(q[1]) > 0.6))
    surface_csf = (depth > 0.96) | ((depth > 0.86) & (sulci > 1.0))
    tissue[brain & (ventricles | midline | surface_csf)] = _CSF
    return _Anatomy(tissue, depth, ventricles & brain, center, radii, yaw)


@dataclass
class _Tumour:
    box: tuple[slice, slice, slice]  # the voxels the tumour may occupy
    whole: npt.NDArray[np.bool_]  # masks within the box
    core: npt.NDArray[np.bool_]
    necrosis: npt.NDArray[np.bool_]
    enhancing: bool
    edema_radius_mm: float


def _tumour(rng: np.random.Generator, axes: Axes, site: SiteProfile, anatomy: _Anatomy) -> _Tumour:
    """A glioma: nested whole tumour, core and necrosis masks inside a box around it.

    The core always holds at least the voxel nearest the tumour centre, the whole tumour is one
    connected component without holes, and necrosis never touches voxels outside the core.
    """
    side = 1.0 if rng.uniform() < site.tumor_left_fraction else -1.0
    for _ in range(50):
        tq = np.array(
            [
                side * rng.uniform(0.12, 0.55),
                np.clip(rng.normal(site.tumor_center_y, 0.25), -0.7, 0.7),
                np.clip(rng.normal(0.1, 0.25), -0.45, 0.6),
            ]
        )
        if np.linalg.norm(tq) < 0.75:
            break
    else:  # pragma: no cover - the loop accepts with probability > 0.99
        tq = np.array([side * 0.3, 0.0, 0.1])
    local = tq * anatomy.radii * np.array([1.0, -1.0, 1.0])  # back to index orientation
    cos, sin = np.cos(anatomy.yaw), np.sin(anatomy.yaw)
    offset = np.array([cos * local[0] - sin * local[1], sin * local[0] + cos * local[1], local[2]])
    t_mm = anatomy.center + offset
    r_edema = float(np.clip(site.tumor_radius_mm * np.exp(rng.normal(0, 0.3)), 9.0, 50.0))
    r_core = r_edema * rng.uniform(0.35, 0.65)
    necrosis_fraction = rng.uniform(0.3, 0.65) if r_core >= 10.0 else 0.0
    enhancing = bool(rng.uniform() >= site.no_enhancement_rate)
    rotation = _random_rotation(rng)
    stretch = rng.uniform(0.75, 1.3, 3)
    stretch /= np.prod(stretch) ** (1 / 3)

    # Edema reaches at most rho < 1.44 r_edema (noise clipped to +-2), i.e. 1.44 * max(stretch)
    # * r_edema in mm; nothing outside this box can be tumour.
    reach = 1.44 * float(stretch.max()) * r_edema
    centre_vox, box = [], []
    for a, t in zip(axes, t_mm, strict=True):
        flat = np.ravel(a)
        step = float(flat[1] - flat[0]) if flat.size > 1 else 1.0
        centre_vox.append(int(np.argmin(np.abs(flat - t))))
        lo = int(np.searchsorted(flat, t - reach - step))
        hi = int(np.searchsorted(flat, t + reach + step)) + 1
        box.append(slice(max(lo, 0), min(hi, flat.size)))
    sub_axes = [a[tuple(box[d] if d == i else slice(None) for d in range(3))] for i, a in enumerate(axes)]
    sub = (box[0], box[1], box[2])
    centre = tuple(c - s.start for c, s in zip(centre_vox, box, strict=True))

    delta = [a - np.float32(t) for a, t in zip(sub_axes, t_mm, strict=True)]
    rho2: Any = 0.0
    for k in range(3):
        component = sum(np.float32(rotation[j, k]) * delta[j] for j in range(3))
        rho2 = rho2 + (component / np.float32(stretch[k])) ** 2
    rho = np.sqrt(rho2)
    tissue = anatomy.tissue[sub]
    # Edema spreads along white matter more than through cortex and never into the ventricles;
    # sulci inside it are effaced (mass effect), so they become edema too.
    allowed = (tissue != _BG) & ~anatomy.ventricles[sub]
    edema_noise = np.clip(_smooth_noise(rng, sub_axes, max(0.8 * r_edema, 8.0)), -2.0, 2.0)
    edema_field = rho / r_edema * np.where(tissue == _GM, 1.2, 1.0) + 0.22 * edema_noise
    core_field = rho / r_core + 0.15 * _smooth_noise(rng, sub_axes, max(r_core, 6.0))
    core = allowed & (core_field < 1.0)
    core[centre] = True
    whole = ndimage.binary_fill_holes(core | (allowed & (edema_field < 1.0))) & allowed
    whole[centre] = True
    components, count = ndimage.label(whole)
    if count > 1:
        whole = components == components[centre]
    core &= whole
    necrosis = np.zeros_like(core)
    if enhancing and necrosis_fraction > 0:
        necrosis_noise = _smooth_noise(rng, sub_axes, max(0.5 * r_core, 5.0))
        necrosis = (core_field + 0.08 * necrosis_noise < necrosis_fraction) & ndimage.binary_erosion(core)
    return _Tumour(sub, whole, core, necrosis, enhancing, r_edema)


def _lesions(
    rng: np.random.Generator,
    site: SiteProfile,
    anatomy: _Anatomy,
    away_from: npt.NDArray[np.bool_],
    spacing: npt.NDArray[np.float64],
) -> npt.NDArray[np.bool_]:
    """Small FLAIR-bright white-matter lesions (label 0), mostly periventricular."""
    tissue = anatomy.tissue
    lesions = np.zeros(tissue.shape, bool)
    count = int(rng.poisson(site.lesion_rate))
    if count == 0:
        return lesions
    depth = anatomy.depth
    candidates = np.flatnonzero((tissue == _WM) & (depth > 0.2) & (depth < 0.65) & ~away_from)
    if candidates.size == 0:
        return lesions
    for index in rng.choice(candidates, size=count):
        centre = np.unravel_index(index, tissue.shape)
        radius_vox = rng.uniform(3.0, 7.0) / spacing
        lo = [max(0, int(c - r) - 1) for c, r in zip(centre, radius_vox, strict=True)]
        hi = [min(n, int(c + r) + 2) for c, r, n in zip(centre, radius_vox, tissue.shape, strict=True)]
        grids = np.ogrid[lo[0] : hi[0], lo[1] : hi[1], lo[2] : hi[2]]
        distance2 = sum(((g - c) / r) ** 2 for g, c, r in zip(grids, centre, radius_vox, strict=True))
        box = tuple(slice(a, b) for a, b in zip(lo, hi, strict=True))
        lesions[box] |= np.asarray(distance2 <= 1) & (tissue[box] == _WM)
    return lesions


def generate_subject(
    site: SiteProfile,
    shape: Sequence[int] = DEFAULT_SHAPE,
    rng: np.random.Generator | int = 0,
    convention: LabelConvention | str = LabelConvention.BRATS,
) -> SyntheticSubject:
    """Generate one subject of ``site``: four raw MR volumes and the BraTS label map.

    Args:
        site: the institution (scanner and population).
        shape: the voxel grid ``(X, Y, Z)`` over the 240 x 240 x 155 mm field of view.
        rng: a generator, or a seed for one.
        convention: which integer marks enhancing tumour (4, or 3 for BraTS 2023).

    Returns:
        The subject; images are zero outside the brain, as BraTS volumes are skull-stripped.

    Example:
        >>> subject = generate_subject(make_site_profiles(2)[0], (24, 24, 12), rng=0)
        >>> sorted(np.unique(subject.seg).tolist()), subject.images["flair"].shape
        ([0, 1, 2], (24, 24, 12))
    """
    shape = tuple(int(s) for s in shape)
    if len(shape) != 3 or min(shape) < 8:
        raise ValueError(f"Expected `shape` to be 3 sizes of at least 8 voxels, but got {shape}.")
    rng = np.random.default_rng(rng)
    axes = grid_axes(shape)
    spacing = np.asarray(FIELD_OF_VIEW_MM) / np.asarray(shape)
    anatomy = _anatomy(rng, axes, site)
    tumour = _tumour(rng, axes, site, anatomy)
    box = tumour.box
    whole = np.zeros(shape, bool)
    whole[box] = tumour.whole
    near_tumour = ndimage.binary_dilation(whole, iterations=2)
    lesions = _lesions(rng, site, anatomy, near_tumour, spacing)

    tissue = anatomy.tissue
    brain = tissue != _BG
    tissue[lesions] = _WMH
    tumour_tissue = tissue[box]
    tumour_tissue[tumour.whole] = _EDEMA
    tumour_tissue[tumour.core] = _ENHANCING if tumour.enhancing else _NECROSIS
    tumour_tissue[tumour.necrosis] = _NECROSIS
    seg = np.zeros(shape, np.uint8)
    tumour_seg = seg[box]
    tumour_seg[tumour.whole] = 2
    tumour_seg[tumour.core] = LabelConvention(convention).enhancing_label if tumour.enhancing else 1
    tumour_seg[tumour.necrosis] = 1

    sub_axes = [a[tuple(box[d] if d == i else slice(None) for d in range(3))] for i, a in enumerate(axes)]
    texture_noise = _smooth_noise(rng, sub_axes, max(0.4 * tumour.edema_radius_mm, 6.0))
    texture = np.ones(shape, np.float32)
    texture[box] += 0.08 * texture_noise * tumour.whole
    coil = sum(np.float32(c / 120.0) * a for c, a in zip(site.bias_direction, axes, strict=True))
    sigma_vox = np.asarray(site.blur_voxels)
    images: dict[Modality, npt.NDArray[np.float32]] = {}
    for j, modality in enumerate(MODALITIES):
        table = np.asarray(site.contrast[j]) * np.exp(rng.normal(0, 0.03, len(site.contrast[j])))
        signal = table.astype(np.float32)[tissue] * texture
        log_bias = 0.7 * coil + 0.7 * _smooth_noise(rng, axes, 260.0)
        signal *= np.exp(np.float32(site.bias_strength) * log_bias)
        if sigma_vox.max() > 0.05:
            signal = ndimage.gaussian_filter(signal, sigma=sigma_vox, mode="nearest", truncate=3.0)
        gain = np.float32(site.gain[j])
        signal = gain * signal + np.float32(site.offset[j])
        sd = np.float32(site.noise * site.gain[j] * _NOISE_REFERENCE)
        real = signal + sd * rng.standard_normal(shape, dtype=np.float32)
        imag = sd * rng.standard_normal(shape, dtype=np.float32)
        image = np.sqrt(real * real + imag * imag)
        image[~brain] = 0.0
        images[modality] = image
    return SyntheticSubject(images=images, seg=seg, brain=brain)


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
