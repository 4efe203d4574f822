"""`test/*` equals an independent BraTS evaluation of the written prediction files.

A fixed thresholding network predicts three overlapping region channels (TC deliberately larger
than WT, so the nesting matters) on anisotropic volumes whose tumour partly lies outside the
centre crop. The written label maps are scored against the segmentation files with a brute-force
reference (surface voxels by 6-neighbourhood, all pairwise distances in mm, the larger directed
95th percentile, as MONAI's ``compute_hausdorff_distance(percentile=95)``), which shares no code
with the package.
"""

from __future__ import annotations

import math
from pathlib import Path

import lightning.pytorch as pl
import nibabel as nib
import numpy as np
import numpy.typing as npt
import pytest
import torch
from scipy.spatial.distance import cdist
from torch import nn

from lightning_fedseg.data import FederatedDataModule, from_canonical
from lightning_fedseg.module import BrainTumorSegmentation
from lightning_fedseg.prediction import NiftiPredictionWriter

CANONICAL_SHAPE = (20, 18, 7)  # X (R), Y (A), Z (S)
CROP = 12  # centre crop 12 x 12: x 4..16, y 3..15
SPACING = (1.2, 0.9, 2.5)
PENALTY = math.sqrt(240**2 + 240**2 + 155**2)
LPS = np.array([[-1.2, 0, 0, 30], [0, -0.9, 0, 20], [0, 0, 2.5, -5], [0, 0, 0, 1]])
# Stored as (P, S, L): stored axis 0 runs posterior (canonical Y reversed), 1 superior (Z), 2 left (X reversed).
PSL = np.array([[0, 0, -1.2, 30], [-0.9, 0, 0, 20], [0, 2.5, 0, -5], [0, 0, 0, 1]])
TUMOURS = {  # centre (canonical voxels) and radius: inside, straddling and outside the crop
    "case_a": ((10, 9, 3), 3.0),
    "case_b": ((4, 9, 3), 3.5),
    "case_c": ((1, 1, 3), 1.5),
    "case_d": ((11, 8, 4), 2.5),
}


def _canonical_case(centre: tuple[int, int, int], radius: float) -> tuple[npt.NDArray, npt.NDArray]:
    grid = np.stack(np.meshgrid(*[np.arange(n) for n in CANONICAL_SHAPE], indexing="ij")).astype(float)
    distance = np.sqrt(((grid - np.reshape(centre, (3, 1, 1, 1))) ** 2).sum(0))
    seg = np.zeros(CANONICAL_SHAPE, np.uint8)
    seg[distance <= radius] = 2
    seg[distance <= 0.7 * radius] = 1
    seg[distance <= 0.4 * radius] = 4
    rng = np.random.default_rng(int(radius * 10))
    flair = 100.0 + 5 * rng.random(CANONICAL_SHAPE) + 60.0 * (seg > 0) + 40.0 * (distance <= 0.5 * radius)
    return flair.astype(np.float32), seg


def _write_dataset(root: Path, affine: npt.NDArray) -> None:
    for case_id, (centre, radius) in TUMOURS.items():
        flair, seg = _canonical_case(centre, radius)
        if affine is PSL:
            flair, seg = from_canonical(flair, affine), from_canonical(seg, affine)
        (root / case_id).mkdir(parents=True)
        nib.save(nib.Nifti1Image(flair, affine), root / case_id / f"{case_id}_flair.nii.gz")
        nib.save(nib.Nifti1Image(seg.astype(np.float32), affine), root / case_id / f"{case_id}_seg.nii.gz")


def _threshold_network() -> nn.Module:
    """Logits 10 * (z - t) per channel: WT above z 0.8, TC above 0.3 (wider than WT), ET above 1.5."""
    conv = nn.Conv2d(1, 3, 1)
    with torch.no_grad():
        conv.weight.fill_(10.0)
        conv.bias.copy_(torch.tensor([-8.0, -3.0, -15.0]))
    return conv


def _regions(labels: npt.NDArray) -> list[npt.NDArray[np.bool_]]:
    return [np.isin(labels, (1, 2, 4)), np.isin(labels, (1, 4)), labels == 4]


def _surface(mask: npt.NDArray[np.bool_]) -> npt.NDArray[np.bool_]:
    padded = np.pad(mask, 1)
    interior = mask.copy()
    for axis in range(3):
        for shift in (-1, 1):
            interior &= np.roll(padded, shift, axis)[1:-1, 1:-1, 1:-1]
    return mask & ~interior


def _reference(pred: npt.NDArray[np.bool_], truth: npt.NDArray[np.bool_], spacing: tuple) -> tuple[float, float]:
    if not pred.any() and not truth.any():
        return 1.0, 0.0
    if not pred.any() or not truth.any():
        return 0.0, PENALTY
    dice = 2 * (pred & truth).sum() / (pred.sum() + truth.sum())
    a, b = np.argwhere(_surface(pred)) * spacing, np.argwhere(_surface(truth)) * spacing
    distances = cdist(a, b)
    return float(dice), float(max(np.percentile(distances.min(1), 95), np.percentile(distances.min(0), 95)))


@pytest.mark.parametrize("stored", ["lps", "psl_reoriented"])
def test_test_metrics_equal_an_independent_evaluation_of_the_written_files(tmp_path: Path, stored: str) -> None:
    affine = LPS if stored == "lps" else PSL
    _write_dataset(tmp_path / "data", affine)
    dm = FederatedDataModule(
        data_root=str(tmp_path / "data"),
        partition="simulated",
        num_sites=1,
        num_heldout=3,
        val_fraction=0.0,
        target="regions",
        crop_size=CROP,
        slice_policy="all",
        batch_size=5,
        cache_dir=str(tmp_path / "cache"),
        reorient=stored != "lps",
    )
    model = BrainTumorSegmentation(in_channels=1, target="regions", network=_threshold_network(), log_images=0)
    writer = NiftiPredictionWriter(tmp_path / "pred")
    trainer = pl.Trainer(accelerator="cpu", logger=False, callbacks=[writer], enable_progress_bar=False)

    (logged,) = trainer.test(model, datamodule=dm, verbose=False)
    trainer.predict(model, datamodule=dm, return_predictions=False)

    heldout = dm.partition.heldout
    assert sorted(p.name for p in writer.written) == sorted(f"{c}.nii.gz" for c in heldout)
    scores = []
    for case_id in heldout:
        truth_file = nib.load(tmp_path / "data" / case_id / f"{case_id}_seg.nii.gz")
        written = nib.load(tmp_path / "pred" / f"{case_id}.nii.gz")
        np.testing.assert_allclose(written.affine, truth_file.affine)
        spacing = tuple(float(z) for z in truth_file.header.get_zooms()[:3])
        truth, pred = np.asarray(truth_file.dataobj), np.asarray(written.dataobj)
        scores.append([_reference(p, t, spacing) for p, t in zip(_regions(pred), _regions(truth), strict=True)])
    mean = np.mean(np.array(scores), axis=0)  # [region, (dice, hd95)]
    for i, region in enumerate(("wt", "tc", "et")):
        assert logged[f"test/dice_{region}"] == pytest.approx(mean[i, 0], abs=1e-4)
        assert logged[f"test/hd95_{region}"] == pytest.approx(mean[i, 1], abs=1e-4)
    assert logged["test/dice"] == pytest.approx(mean[:, 0].mean(), abs=1e-4)
    # The fixture exercises what a crop-only, unnested or voxel-unit evaluation gets wrong (each
    # of those, patched into the module, fails the comparisons above).
    assert 0.0 < mean[0, 0] < 1.0 and 0.0 < mean[0, 1] < PENALTY
    assert {"case_b", "case_c"} & set(heldout)  # tumour outside the crop is among the scored cases
