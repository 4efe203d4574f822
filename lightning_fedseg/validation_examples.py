"""The validation slices drawn to TensorBoard: those with the largest ground-truth area of the epoch."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from lightning.pytorch.loggers import TensorBoardLogger
from torch import Tensor

from lightning_fedseg.data.conventions import Region
from lightning_fedseg.plotting import overlay_figure

__all__ = ["ExampleSlices"]


class ExampleSlices:
    """The validation slices with the largest ground-truth area seen so far, largest first."""

    def __init__(self) -> None:
        self.items: list[tuple[float, str, dict[str, Any]]] = []

    def add(self, batch: dict[str, Any], probs: Tensor, site: str, threshold: float, limit: int) -> None:
        """Keep the ``limit`` slices with the largest ground-truth area of those seen and ``batch``'s."""
        areas = batch["target"].flatten(1).sum(1).tolist()
        for b, area in enumerate(areas):
            if area <= 0:
                continue
            if len(self.items) == limit and area <= self.items[-1][0]:
                continue
            title = f"{site} {batch['case_id'][b]} z={int(batch['slice_index'][b])}"
            example = {
                "image": batch["image"][b, 0].float().cpu().numpy(),
                "target": batch["target"][b].cpu().numpy() > 0.5,
                "pred": probs[b].cpu().numpy() > threshold,
            }
            self.items.append((area, title, example))
            self.items.sort(key=lambda item: -item[0])
            del self.items[limit:]

    def clear(self) -> None:
        """Forget every slice (at the start and end of a validation epoch)."""
        self.items.clear()

    def draw(self, loggers: Sequence[TensorBoardLogger], regions: Sequence[Region], global_step: int) -> None:
        """Add one overlay figure per kept slice to every logger, as ``val/examples/<i>``."""
        for i, (_, title, example) in enumerate(self.items):
            figure = overlay_figure(example["image"], example["target"], example["pred"], title, regions)
            for logger in loggers:
                logger.experiment.add_figure(f"val/examples/{i}", figure, global_step=global_step, close=False)
