"""BraTS metrics: pure functions and the accumulating ``Metric`` over them.

* :mod:`~lightning_fedseg.metrics.functional`: :func:`dice_score`, :func:`hd95` and
  :func:`volume_scores` of one volume, with the BraTS empty-mask conventions.
* :mod:`~lightning_fedseg.metrics.volume`: :class:`VolumeMetrics`, the mean per-volume scores
  over every process.

:class:`SliceAssembler` and :class:`AssembledVolume` put slices back into volumes; they are not
metrics and live in :mod:`lightning_fedseg.data.assembly`, and are importable from here as
before.
"""

from lightning_fedseg.data.assembly import AssembledVolume, SliceAssembler
from lightning_fedseg.metrics.functional import BRATS_HD95_PENALTY, HausdorffReduction, dice_score, hd95, volume_scores
from lightning_fedseg.metrics.volume import VolumeMetrics

__all__ = [
    "BRATS_HD95_PENALTY",
    "AssembledVolume",
    "HausdorffReduction",
    "SliceAssembler",
    "VolumeMetrics",
    "dice_score",
    "hd95",
    "volume_scores",
]
