"""Tests for the synthetic phantom: anatomy, tumours and each site's scanner."""

from __future__ import annotations

import dataclasses

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage

from lightning_fedseg.data.conventions import Modality
from lightning_fedseg.data.synthetic_phantom import generate_subject, voxel_affine
from lightning_fedseg.data.synthetic_sites import TISSUE_CLASSES, SiteProfile, make_site_profiles

TINY = (24, 24, 12)
SMALL = (32, 32, 16)
EDEMA = TISSUE_CLASSES.index("edema")
WHITE_MATTER = TISSUE_CLASSES.index("white_matter")


@pytest.mark.parametrize("site_index", range(10))
def test_subject_labels_nesting_and_skull_stripping(site_index: int) -> None:
    site = make_site_profiles(10, seed=0)[site_index]
    for k in range(3):
        subject = generate_subject(site, SMALL, rng=100 * site_index + k)
        seg, brain = subject.seg, subject.brain
        assert seg.dtype == np.uint8 and seg.shape == SMALL
        assert set(np.unique(seg).tolist()) <= {0, 1, 2, 4}
        whole, core = seg > 0, np.isin(seg, (1, 4))
        assert core.any(), "every tumour has a core"
        assert not (whole & ~brain).any()
        assert ndimage.label(whole)[1] == 1, "the whole tumour is one component"
        if (seg == 4).any():
            # Necrosis (1) is surrounded by enhancing rim (4): its 6-neighbours are all core.
            assert not (ndimage.binary_dilation(seg == 1) & ~core).any()
        for modality, image in subject.images.items():
            assert image.dtype == np.float32 and image.shape == SMALL
            assert np.isfinite(image).all()
            assert (image[~brain] == 0).all(), modality
            assert (image[brain] > 0).mean() > 0.99
        flair = subject.images[Modality.FLAIR]
        edema = flair[seg == 2].mean() if (seg == 2).any() else flair[whole].mean()
        assert edema > 1.2 * flair[brain & ~whole].mean(), "tumour must be visible in FLAIR"


def test_tumour_side_follows_the_site_population() -> None:
    site = make_site_profiles(2, seed=0)[0]
    affine = voxel_affine(SMALL)
    assert nib.aff2axcodes(affine) == ("L", "P", "S")  # as BraTS volumes
    for left_fraction, sign in ((1.0, -1), (0.0, 1)):  # RAS world: left is negative x
        lateral = dataclasses.replace(site, tumor_left_fraction=left_fraction)
        for k in range(4):
            seg = generate_subject(lateral, SMALL, rng=k).seg
            centroid = np.argwhere(seg > 0).mean(axis=0)
            world_x = (affine @ [*centroid, 1.0])[0]
            assert np.sign(world_x) == sign


def test_generation_is_deterministic() -> None:
    site = make_site_profiles(3, seed=0)[1]
    a = generate_subject(site, TINY, rng=7)
    b = generate_subject(site, TINY, rng=7)
    c = generate_subject(site, TINY, rng=8)
    np.testing.assert_array_equal(a.seg, b.seg)
    for modality in a.images:
        np.testing.assert_array_equal(a.images[modality], b.images[modality])
        assert not np.array_equal(a.images[modality], c.images[modality])


def test_brats2023_convention_writes_label_3() -> None:
    site = make_site_profiles(1, seed=0)[0]
    seeds = range(6)
    labels = set().union(*(np.unique(generate_subject(site, TINY, s, "brats2023").seg) for s in seeds))
    assert 3 in labels and 4 not in labels


def test_sites_differ_measurably() -> None:
    sites = make_site_profiles(10, seed=0)
    ratio = [s.contrast[0][EDEMA] / s.contrast[0][WHITE_MATTER] for s in sites]
    low, high = sites[int(np.argmin(ratio))], sites[int(np.argmax(ratio))]

    def edema_z(site: SiteProfile) -> float:
        """Mean z-scored FLAIR (over the brain, as the datamodule normalises) in edema."""
        values = []
        for k in range(4):
            subject = generate_subject(site, SMALL, rng=k)
            flair, brain = subject.images[Modality.FLAIR], subject.brain
            z = (flair - flair[brain].mean()) / flair[brain].std()
            values.append(z[subject.seg == 2].mean())
        return float(np.mean(values))

    # Contrast survives z-scoring (gain and offset do not): the same subjects' edema differs.
    assert edema_z(high) - edema_z(low) > 0.5
    # Raw intensities follow each scanner's gain.
    raw = [generate_subject(s, SMALL, rng=0).images[Modality.T1] for s in (low, high)]
    raw_ratio = raw[1][raw[1] > 0].mean() / raw[0][raw[0] > 0].mean()
    gain_ratio = high.gain[1] / low.gain[1]
    assert raw_ratio == pytest.approx(gain_ratio, rel=0.35)
