"""The accumulating ``torchmetrics.Metric`` over the functional BraTS metrics.

:class:`VolumeMetrics` keeps sums and a volume count as states reduced by ``"sum"``, so the mean
per-volume Dice and HD95 are exact over all processes; the scores of one volume come from
:func:`~lightning_fedseg.metrics.functional.volume_scores`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor
from torchmetrics import Metric

from lightning_fedseg.data.conventions import Region
from lightning_fedseg.metrics.functional import HausdorffReduction, volume_scores

__all__ = ["VolumeMetrics"]


class VolumeMetrics(Metric):
    """Mean per-volume Dice (and HD95) per region, accumulated as sums and a volume count.

    The states are sums with ``dist_reduce_fx="sum"``, so :meth:`compute` gives the mean over all
    volumes seen by all processes, and every process must call it (it synchronizes).

    Args:
        regions: the region of each channel, e.g. ``Target.REGIONS.regions``.
        compute_hd95: also accumulate HD95 (costly; off saves time on CPU).
        spacing: voxel size in mm along X, Y, Z.
        hd95_reduction: see :func:`hd95`.
        kwargs: passed to :class:`torchmetrics.Metric`.

    Example:
        >>> metric = VolumeMetrics(["wt"], compute_hd95=False)
        >>> volume = torch.zeros(1, 4, 4, 2, dtype=torch.bool)
        >>> volume[0, :2] = True
        >>> metric.update(volume, volume)
        >>> metric.update(volume, torch.zeros_like(volume))
        >>> {key: round(value.item(), 4) for key, value in metric.compute().items()}
        {'dice': 0.5, 'dice_wt': 0.5, 'volumes': 2.0}
    """

    full_state_update = False
    higher_is_better = True
    is_differentiable = False

    dice_sum: Tensor
    hd95_sum: Tensor
    volumes: Tensor

    def __init__(
        self,
        regions: Sequence[Region | str],
        compute_hd95: bool = True,
        spacing: Sequence[float] = (1.0, 1.0, 1.0),
        hd95_reduction: HausdorffReduction | str = HausdorffReduction.MAX,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        if len(regions) == 0:
            raise ValueError("Expected `regions` to name at least one region, but got none.")
        self.regions = tuple(Region(r) for r in regions)
        self.compute_hd95 = compute_hd95
        self.spacing = tuple(float(s) for s in spacing)
        self.hd95_reduction = HausdorffReduction(hd95_reduction)
        num_regions = len(self.regions)
        self.add_state("dice_sum", torch.zeros(num_regions, dtype=torch.float64), "sum")
        self.add_state("hd95_sum", torch.zeros(num_regions, dtype=torch.float64), "sum")
        self.add_state("volumes", torch.zeros((), dtype=torch.float64), "sum")

    def update(self, pred_volume: Tensor, target_volume: Tensor, spacing: Sequence[float] | None = None) -> None:
        """Score one volume: bool ``[K, X, Y, Z]`` prediction and ground truth.

        Args:
            pred_volume: predicted region masks.
            target_volume: ground-truth region masks, same shape.
            spacing: this volume's voxel size in mm along X, Y, Z (default: the metric's
                ``spacing``); HD95 is in mm, like its empty-mask penalty.
        """
        if pred_volume.shape[0] != len(self.regions):
            raise ValueError(
                f"Expected {len(self.regions)} region channels ({', '.join(self.regions)}), "
                f"but got a volume of shape {tuple(pred_volume.shape)}."
            )
        volume_spacing = self.spacing if spacing is None else tuple(float(s) for s in spacing)
        dice, distances = volume_scores(
            pred_volume, target_volume, self.compute_hd95, volume_spacing, self.hd95_reduction
        )
        self.dice_sum += dice.to(self.dice_sum)
        if distances is not None:
            self.hd95_sum += distances.to(self.hd95_sum)
        self.volumes += 1

    def compute(self) -> dict[str, Tensor]:
        """Means over volumes: ``dice`` (over regions too), ``dice_<region>``, ``hd95_<region>``.

        ``volumes`` is the number of volumes scored; the means are NaN when it is 0.
        """
        dice = (self.dice_sum / self.volumes).float()
        out = {"dice": dice.mean()}
        out.update({f"dice_{r}": dice[i] for i, r in enumerate(self.regions)})
        if self.compute_hd95:
            distances = (self.hd95_sum / self.volumes).float()
            out.update({f"hd95_{r}": distances[i] for i, r in enumerate(self.regions)})
        out["volumes"] = self.volumes.float()
        return out
