"""Slice overlays: an MR slice with the ground truth outlined and the prediction filled in.

Figures are built on matplotlib's object API with the Agg canvas (no pyplot, no display, no
global figure registry), so they are safe in training processes and worker threads. Slices are
``array[:, :, z]`` of shape ``(X, Y)`` (see the project's volume conventions); they are drawn with
X to the right and Y upwards.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import ListedColormap
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Patch

from lightning_fedseg.data.conventions import REGIONS, Region

__all__ = ["REGION_COLORS", "overlay_figure", "save_overlay_png"]

REGION_COLORS: dict[Region, str] = {
    Region.WT: "#2ca02c",  # green
    Region.TC: "#ffbf00",  # amber
    Region.ET: "#d62728",  # red
}


def _as_masks(masks: Any, name: str, shape: tuple[int, ...]) -> npt.NDArray[np.bool_]:
    array = np.asarray(masks)
    if array.ndim == 2:
        array = array[None]
    if array.ndim != 3 or array.shape[1:] != shape:
        raise ValueError(f"Expected `{name}` of shape [K, {shape[0]}, {shape[1]}], but got {array.shape}.")
    return array > 0.5 if array.dtype != np.bool_ else array


def overlay_figure(
    image: Any,
    target: Any | None,
    pred: Any,
    title: str | None = None,
    regions: Sequence[Region | str] | None = None,
    size_inches: float = 4.0,
    dpi: int = 100,
) -> Figure:
    """Draw one slice with ground-truth contours (solid) and the prediction (filled, dashed edge).

    Args:
        image: the slice, ``[X, Y]`` (array or tensor).
        target: ground-truth masks ``[K, X, Y]`` (or ``[X, Y]``), or ``None`` when there is none.
        pred: predicted masks ``[K, X, Y]`` (or ``[X, Y]``), boolean or probabilities.
        title: figure title.
        regions: the region of each channel; defaults to WT (K = 1) or WT, TC, ET (K = 3).
        size_inches: width and height of the square figure.
        dpi: resolution; the saved image is ``size_inches * dpi`` pixels square.

    Returns:
        A matplotlib figure on an Agg canvas.

    Example:
        >>> image = np.random.default_rng(0).normal(size=(32, 32))
        >>> mask = np.zeros((1, 32, 32), bool)
        >>> mask[0, 8:20, 8:20] = True
        >>> overlay_figure(image, mask, mask, title="case z=3").get_size_inches().tolist()
        [4.0, 4.0]
    """
    image = np.asarray(image, dtype=np.float32)
    if image.ndim != 2:
        raise ValueError(f"Expected `image` of shape [X, Y], but got {image.shape}.")
    pred_masks = _as_masks(pred, "pred", image.shape)
    target_masks = None if target is None else _as_masks(target, "target", image.shape)
    if regions is None:
        regions = REGIONS[: len(pred_masks)] if len(pred_masks) in (1, 3) else ()
    channel_regions = [Region(r) for r in regions]
    if len(channel_regions) != len(pred_masks):
        raise ValueError(f"Expected one region per mask channel ({len(pred_masks)}), but got {list(regions)}.")

    figure = Figure(figsize=(size_inches, size_inches), dpi=dpi)
    FigureCanvasAgg(figure)
    axes = figure.add_axes((0.0, 0.0, 1.0, 0.92 if title else 1.0))
    axes.imshow(image.T, cmap="gray", origin="lower", interpolation="nearest")
    handles: list[Any] = []
    for channel, region in enumerate(channel_regions):
        color = REGION_COLORS[region]
        if pred_masks[channel].any():
            fill = ListedColormap([color])
            shown = np.ma.masked_where(~pred_masks[channel].T, pred_masks[channel].T)
            axes.imshow(shown, cmap=fill, alpha=0.35, origin="lower", interpolation="nearest")
            axes.contour(
                pred_masks[channel].T,
                levels=[0.5],
                colors=[color],
                linewidths=0.8,
                linestyles="dashed",
            )
        if target_masks is not None and target_masks[channel].any():
            axes.contour(target_masks[channel].T, levels=[0.5], colors=[color], linewidths=1.5)
        handles.append(Patch(facecolor=color, alpha=0.35, label=f"{region.upper()} predicted"))
        if target_masks is not None:
            handles.append(Line2D([], [], color=color, label=f"{region.upper()} ground truth"))
    axes.set_axis_off()
    if handles:
        axes.legend(handles=handles, loc="lower right", fontsize=6, framealpha=0.6)
    if title:
        figure.suptitle(title, fontsize=8, y=0.98)
    return figure


def save_overlay_png(
    path: str | os.PathLike[str],
    image: Any,
    target: Any | None,
    pred: Any,
    title: str | None = None,
    regions: Sequence[Region | str] | None = None,
    size_inches: float = 4.0,
    dpi: int = 100,
) -> Path:
    """Write :func:`overlay_figure` to a PNG (created atomically) and return its path.

    Example:
        >>> import tempfile
        >>> mask = np.zeros((32, 32), bool)
        >>> with tempfile.TemporaryDirectory() as tmp:
        ...     save_overlay_png(Path(tmp) / "a.png", np.zeros((32, 32)), None, mask).name
        'a.png'
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure = overlay_figure(image, target, pred, title, regions, size_inches, dpi)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        figure.savefig(tmp, format="png", dpi=dpi)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path
