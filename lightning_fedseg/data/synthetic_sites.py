"""Synthetic institutions: each site's scanner and patient population, and how many subjects it has.

A :class:`SiteProfile` is everything that makes one synthetic institution differ from another:
its tissue contrasts, bias field, noise, blur, gain and offset (the scanner) and its tumour size,
side and position, lesion rate and ventricle size (the population). :func:`make_site_profiles`
draws them; :func:`scale_site_sizes` says how many subjects each site gets. The phantom that
turns a profile into images is :mod:`lightning_fedseg.data.synthetic_phantom`.

Decisions:
    - Every parameter is stratified over the sites (one value per equal-width stratum,
      shuffled), so a federation of a few sites still spans the whole range of scanners.
    - Tissues are an ``IntEnum`` whose values index the columns of ``SiteProfile.contrast`` and
      the voxels of the phantom's tissue map.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from enum import IntEnum
from typing import Any

import numpy as np
import numpy.typing as npt

from lightning_fedseg.data.conventions import MODALITIES, Modality
from lightning_fedseg.data.partition import PAPER_SITE_SIZES

__all__ = ["MIN_SITE_SUBJECTS", "TISSUE_CLASSES", "SiteProfile", "Tissue", "make_site_profiles", "scale_site_sizes"]

MIN_SITE_SUBJECTS = 3


class Tissue(IntEnum):
    """The tissue classes of the phantom's anatomy; the value is the column in
    :attr:`SiteProfile.contrast` and the voxel value of the tissue map."""

    BACKGROUND = 0
    CSF = 1
    GREY_MATTER = 2
    WHITE_MATTER = 3
    EDEMA = 4
    NECROSIS = 5
    ENHANCING = 6
    WM_LESION = 7


TISSUE_CLASSES: tuple[str, ...] = tuple(t.name.lower() for t in Tissue)
"""The tissue classes of the anatomy, in the column order of :attr:`SiteProfile.contrast`."""

# Relative signal of each tissue (columns as above, background 0) per modality before a site's
# contrast changes. FLAIR's CSF, white matter and edema columns are set per site.
_BASE_CONTRAST: dict[Modality, tuple[float, ...]] = {
    Modality.FLAIR: (0.0, 0.15, 0.55, 0.45, 0.90, 0.60, 0.80, 0.65),
    Modality.T1: (0.0, 0.20, 0.50, 0.75, 0.42, 0.25, 0.45, 0.60),
    Modality.T1CE: (0.0, 0.20, 0.52, 0.75, 0.42, 0.25, 1.10, 0.60),
    Modality.T2: (0.0, 1.00, 0.62, 0.45, 0.85, 0.95, 0.70, 0.75),
}


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
            row[Tissue.BACKGROUND] = 0.0
            if m is Modality.FLAIR:
                row[Tissue.WHITE_MATTER] = 0.45
                row[Tissue.GREY_MATTER] = 0.45 * gm_wm_ratio[i]
                row[Tissue.CSF] = csf_flair[i]
                row[Tissue.EDEMA] = edema_ratio[i] * row[Tissue.GREY_MATTER]
                row[Tissue.ENHANCING] = row[Tissue.EDEMA] * rng.uniform(0.8, 1.0)
                row[Tissue.NECROSIS] = row[Tissue.EDEMA] * rng.uniform(0.55, 0.95)
                row[Tissue.WM_LESION] = row[Tissue.WHITE_MATTER] + rng.uniform(0.5, 0.8) * (
                    row[Tissue.EDEMA] - row[Tissue.WHITE_MATTER]
                )
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
