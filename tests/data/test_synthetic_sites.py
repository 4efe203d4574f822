"""Tests for the synthetic institutions' profiles and subject counts."""

from __future__ import annotations

import pytest

from lightning_fedseg.data.partition import PAPER_SITE_SIZES
from lightning_fedseg.data.synthetic_sites import TISSUE_CLASSES, Tissue, make_site_profiles, scale_site_sizes


def test_scale_site_sizes() -> None:
    assert scale_site_sizes(165, 10) == PAPER_SITE_SIZES
    # 3 each (30), the other 90 split by (paper share - 3), largest remainders rounded up.
    assert scale_site_sizes(120, 10) == (50, 20, 12, 9, 8, 7, 4, 4, 3, 3)
    assert scale_site_sizes(10, 4) == (3, 3, 2, 2)
    assert scale_site_sizes(12, 3) == (4, 4, 4)
    with pytest.raises(ValueError, match="`num_subjects` to be at least `num_sites` \\(4\\)"):
        scale_site_sizes(3, 4)


def test_site_profiles_are_stratified_and_seeded() -> None:
    sites = make_site_profiles(10, seed=0)
    assert [s.name for s in sites] == [f"site{i:02d}" for i in range(1, 11)]
    noise = sorted(s.noise for s in sites)
    # One value per tenth of [0.02, 0.09].
    for i, value in enumerate(noise):
        assert 0.02 + 0.007 * i <= value <= 0.02 + 0.007 * (i + 1)
    assert make_site_profiles(10, seed=0) == sites
    assert make_site_profiles(10, seed=1) != sites


def test_tissue_classes_name_the_contrast_columns() -> None:
    assert TISSUE_CLASSES[Tissue.EDEMA] == "edema"
    assert len(make_site_profiles(1)[0].contrast[0]) == len(TISSUE_CLASSES) == len(Tissue)
