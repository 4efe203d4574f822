import numpy as np
import pytest
import torch
from PIL import Image

from lightning_fedseg.plotting import REGION_COLORS, overlay_figure, save_overlay_png


def _slice_and_masks(regions=3):
    image = np.random.default_rng(0).normal(size=(32, 32)).astype(np.float32)
    target = np.zeros((regions, 32, 32), bool)
    target[:, 8:24, 10:20] = True
    pred = np.roll(target, 2, axis=1)
    return image, target, pred


def test_png_is_written_with_the_expected_size(tmp_path):
    image, target, pred = _slice_and_masks()
    path = save_overlay_png(tmp_path / "sub" / "case.png", image, target, pred, "case z=3", dpi=50)
    assert path == tmp_path / "sub" / "case.png"
    with Image.open(path) as png:
        assert png.format == "PNG"
        assert png.size == (200, 200)  # 4 inches at 50 dpi
        pixels = np.asarray(png.convert("RGB"))
    assert pixels.std() > 0  # something was drawn
    assert [p.name for p in path.parent.iterdir()] == ["case.png"]  # no temporary file left


def test_overlay_draws_prediction_fill_and_ground_truth_contours():
    image, target, pred = _slice_and_masks()
    figure = overlay_figure(image, torch.from_numpy(target), torch.from_numpy(pred), title="t")
    (axes,) = figure.axes
    assert len(axes.images) == 1 + 3  # the slice and one filled prediction per region
    labels = [text.get_text() for text in axes.get_legend().get_texts()]
    assert labels == [
        "WT predicted",
        "WT ground truth",
        "TC predicted",
        "TC ground truth",
        "ET predicted",
        "ET ground truth",
    ]
    assert figure.texts[0].get_text() == "t"
    assert set(REGION_COLORS) == {"wt", "tc", "et"}


def test_overlay_without_target_and_with_empty_prediction():
    image, _, _ = _slice_and_masks()
    figure = overlay_figure(image, None, np.zeros((32, 32)))  # probabilities, one WT channel
    (axes,) = figure.axes
    assert len(axes.images) == 1
    assert [t.get_text() for t in axes.get_legend().get_texts()] == ["WT predicted"]


def test_overlay_checks_shapes():
    image, target, pred = _slice_and_masks()
    with pytest.raises(ValueError, match=r"`pred` of shape \[K, 32, 32\]"):
        overlay_figure(image, target, pred[:, :16])
    with pytest.raises(ValueError, match="`image` of shape"):
        overlay_figure(image[None], target, pred)
    with pytest.raises(ValueError, match="one region per mask channel"):
        overlay_figure(image, None, pred, regions=["wt"])
