"""BraTS / FeTS naming and label conventions, as enums and pure label arithmetic.

The BraTS label map (2017-2022): 0 background, 1 necrotic / non-enhancing tumor core, 2 peritumoral
edema, 4 enhancing tumor. BraTS 2023 and later write enhancing tumor as 3. The evaluated regions
are nested: whole tumor WT = {1, 2, 4} contains tumor core TC = {1, 4}, which contains enhancing
tumor ET = {4}.
"""

from __future__ import annotations

from enum import StrEnum

import numpy as np
import numpy.typing as npt

__all__ = [
    "MODALITIES",
    "REGIONS",
    "LabelConvention",
    "Modality",
    "Region",
    "Target",
    "labels_to_regions",
    "nest_regions",
    "regions_to_labels",
]


class Modality(StrEnum):
    """The four MR sequences of a BraTS case."""

    FLAIR = "flair"
    T1 = "t1"
    T1CE = "t1ce"
    T2 = "t2"


class Region(StrEnum):
    """The nested tumor regions the challenge evaluates."""

    WT = "wt"
    TC = "tc"
    ET = "et"


class Target(StrEnum):
    """What the network predicts: whole tumor only (the paper) or the three regions."""

    WT = "wt"
    REGIONS = "regions"

    @property
    def regions(self) -> tuple[Region, ...]:
        """The output channels, in order."""
        return (Region.WT,) if self is Target.WT else REGIONS


class LabelConvention(StrEnum):
    """Which integer marks enhancing tumor: 4 (BraTS 2017-2022, FeTS) or 3 (BraTS 2023+)."""

    BRATS = "brats"
    BRATS2023 = "brats2023"

    @property
    def enhancing_label(self) -> int:
        return 4 if self is LabelConvention.BRATS else 3

    @property
    def valid_labels(self) -> frozenset[int]:
        return frozenset({0, 1, 2, self.enhancing_label})


MODALITIES: tuple[Modality, ...] = (Modality.FLAIR, Modality.T1, Modality.T1CE, Modality.T2)
REGIONS: tuple[Region, ...] = (Region.WT, Region.TC, Region.ET)


def labels_to_regions(
    labels: npt.NDArray[np.integer],
    target: Target | str = Target.REGIONS,
    convention: LabelConvention | str = LabelConvention.BRATS,
) -> npt.NDArray[np.bool_]:
    """Turn a BraTS label map into stacked binary region masks (channel first).

    Args:
        labels: integer label map of any shape.
        target: ``"wt"`` for one whole-tumor channel, ``"regions"`` for WT, TC, ET.
        convention: which integer marks enhancing tumor.

    Returns:
        A boolean array of shape ``(len(target.regions), *labels.shape)``.

    Example:
        >>> labels_to_regions(np.array([0, 1, 2, 4])).astype(int).tolist()
        [[0, 1, 1, 1], [0, 1, 0, 1], [0, 0, 0, 1]]
    """
    et = LabelConvention(convention).enhancing_label
    masks = {
        Region.WT: np.isin(labels, (1, 2, et)),
        Region.TC: np.isin(labels, (1, et)),
        Region.ET: labels == et,
    }
    return np.stack([masks[r] for r in Target(target).regions])


def nest_regions(regions: npt.NDArray[np.bool_]) -> npt.NDArray[np.bool_]:
    """Enforce the nesting ET inside TC inside WT on stacked region masks ``[K, ...]``.

    The same masks as ``labels_to_regions(regions_to_labels(regions))``: what a written BraTS
    label map holds. A single WT channel is returned unchanged.

    Example:
        >>> nest_regions(np.array([[0, 1, 1], [1, 1, 0], [1, 1, 1]], bool)).astype(int).tolist()
        [[0, 1, 1], [0, 1, 0], [0, 1, 0]]
    """
    if regions.shape[0] == 1:
        return regions
    if regions.shape[0] != 3:
        raise ValueError(f"Expected 1 (WT) or 3 (WT, TC, ET) region channels, got {regions.shape[0]}.")
    wt = regions[0]
    tc = wt & regions[1]
    return np.stack([wt, tc, tc & regions[2]])


def regions_to_labels(
    regions: npt.NDArray[np.bool_],
    convention: LabelConvention | str = LabelConvention.BRATS,
) -> npt.NDArray[np.uint8]:
    """Turn stacked region masks (WT, or WT, TC, ET) back into a BraTS label map.

    Nesting is enforced the way BraTS post-processing does: TC counts only inside WT and ET only
    inside TC. A single WT channel gives a 0/1 map.

    Example:
        >>> regions_to_labels(np.array([[0, 1, 1, 1], [0, 1, 0, 1], [0, 0, 0, 1]], bool)).tolist()
        [0, 1, 2, 4]
    """
    if regions.shape[0] == 1:
        return regions[0].astype(np.uint8)
    if regions.shape[0] != 3:
        raise ValueError(f"Expected 1 (WT) or 3 (WT, TC, ET) region channels, got {regions.shape[0]}.")
    wt = regions[0].astype(bool)
    tc = wt & regions[1].astype(bool)
    et = tc & regions[2].astype(bool)
    out = np.zeros(wt.shape, dtype=np.uint8)
    out[wt] = 2
    out[tc] = 1
    out[et] = LabelConvention(convention).enhancing_label
    return out
