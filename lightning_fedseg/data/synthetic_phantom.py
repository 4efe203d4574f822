"""The synthetic phantom: one subject's anatomy, tumour and lesions, imaged by one site's scanner.

Each subject is a skull-stripped head with cerebrospinal fluid (sulci, midline, ventricles), grey
and white matter, one glioma with nested labels (1 necrotic core, 2 edema, 4 enhancing rim) and,
sometimes, small FLAIR-bright white-matter lesions that are *not* tumour. Anatomy is defined in
millimetres over the BraTS field of view (240 x 240 x 155 mm), so any grid shape samples the same
subjects; the site's :class:`~lightning_fedseg.data.synthetic_sites.SiteProfile` then sets the
contrasts, bias field, blur, gain, offset and Rician noise. ``docs/SYNTHETIC.md`` explains what
is simulated and why.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt
from scipy import ndimage

from lightning_fedseg.data.conventions import MODALITIES, LabelConvention, Modality
from lightning_fedseg.data.synthetic_sites import SiteProfile, Tissue

__all__ = [
    "DEFAULT_SHAPE",
    "FIELD_OF_VIEW_MM",
    "FULL_SHAPE",
    "SyntheticSubject",
    "generate_subject",
    "grid_axes",
    "voxel_affine",
]

DEFAULT_SHAPE: tuple[int, int, int] = (48, 48, 32)
FULL_SHAPE: tuple[int, int, int] = (240, 240, 155)
FIELD_OF_VIEW_MM: tuple[float, float, float] = (240.0, 240.0, 155.0)
_BRAIN_RADII_MM = np.array([68.0, 84.0, 60.0])
_NOISE_REFERENCE = 0.45  # white-matter FLAIR signal, the unit of `SiteProfile.noise`


@dataclass
class SyntheticSubject:
    """One generated subject: raw scanner intensities (float32, zero outside the brain) and
    its BraTS label map (uint8)."""

    images: dict[Modality, npt.NDArray[np.float32]]
    seg: npt.NDArray[np.uint8]
    brain: npt.NDArray[np.bool_]


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
    tissue: npt.NDArray[np.uint8]  # tissue class per voxel (Tissue.BACKGROUND outside the brain)
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
    tissue = np.where(brain, Tissue.WHITE_MATTER, Tissue.BACKGROUND).astype(np.uint8)
    vs = site.ventricle_scale * rng.uniform(0.85, 1.15)
    deep_grey = np.zeros_like(brain)
    for side in (-1.0, 1.0):
        deep_grey |= _ellipsoid(q, (side * 0.14, -0.12, -0.02), (0.09, 0.13, 0.10))
        deep_grey |= _ellipsoid(q, (side * 0.30, 0.10, 0.02), (0.07, 0.15, 0.12))
    tissue[brain & ((depth > 0.82 + folds) | deep_grey)] = Tissue.GREY_MATTER
    ventricles = _ellipsoid(q, (0.0, -0.05, -0.05), (0.02 * vs, 0.12, 0.10 * vs))
    for side in (-1.0, 1.0):
        ventricles |= _ellipsoid(q, (side * 0.11, 0.03, 0.12), (0.07 * vs, 0.32, 0.13 * vs))
    half_width = max(1.5, 0.55 * FIELD_OF_VIEW_MM[0] / q[0].shape[0]) / radii[0]
    midline = (np.abs(q[0]) < half_width) & ((q[2] > 0.15) | (np.abs(q[1]) > 0.6))
    surface_csf = (depth > 0.96) | ((depth > 0.86) & (sulci > 1.0))
    tissue[brain & (ventricles | midline | surface_csf)] = Tissue.CSF
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
    allowed = (tissue != Tissue.BACKGROUND) & ~anatomy.ventricles[sub]
    edema_noise = np.clip(_smooth_noise(rng, sub_axes, max(0.8 * r_edema, 8.0)), -2.0, 2.0)
    edema_field = rho / r_edema * np.where(tissue == Tissue.GREY_MATTER, 1.2, 1.0) + 0.22 * edema_noise
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
    candidates = np.flatnonzero((tissue == Tissue.WHITE_MATTER) & (depth > 0.2) & (depth < 0.65) & ~away_from)
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
        lesions[box] |= np.asarray(distance2 <= 1) & (tissue[box] == Tissue.WHITE_MATTER)
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
        >>> from lightning_fedseg.data.synthetic_sites import make_site_profiles
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
    brain = tissue != Tissue.BACKGROUND
    tissue[lesions] = Tissue.WM_LESION
    tumour_tissue = tissue[box]
    tumour_tissue[tumour.whole] = Tissue.EDEMA
    tumour_tissue[tumour.core] = Tissue.ENHANCING if tumour.enhancing else Tissue.NECROSIS
    tumour_tissue[tumour.necrosis] = Tissue.NECROSIS
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
