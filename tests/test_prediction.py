from dataclasses import dataclass
from pathlib import Path

import lightning.pytorch as pl
import nibabel as nib
import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader

from lightning_fedseg.module import BrainTumorSegmentation
from lightning_fedseg.prediction import NiftiPredictionWriter, uncrop_labels

FULL_SHAPE = (40, 44, 6)
CROP = (slice(4, 36), slice(6, 38))  # a 32 x 32 centre-ish crop
AFFINE = np.array([[-1.0, 0, 0, 90], [0, -1.0, 0, 126], [0, 0, 2.0, -72], [0, 0, 0, 1]])


@dataclass
class FakeCaseReference:
    reference_path: Path
    full_shape: tuple[int, int, int]
    crop: tuple[slice, slice]


class FakePredictDataModule(pl.LightningDataModule):
    """Two cases whose "images" are +/-10 logits of known region masks (an identity network)."""

    def __init__(self, root: Path, regions: int, drop_last_slice: bool = False):
        super().__init__()
        rng = np.random.default_rng(0)
        self.references, self.masks, self.items = {}, {}, []
        for case in ("BraTS_001", "BraTS_002"):
            path = root / f"{case}_flair.nii.gz"
            flair = nib.Nifti1Image(rng.random(FULL_SHAPE).astype(np.float32), AFFINE)
            flair.header["descrip"] = b"reference"
            nib.save(flair, path)
            self.references[case] = FakeCaseReference(path, FULL_SHAPE, CROP)
            wt = np.zeros((32, 32, FULL_SHAPE[2]), bool)
            wt[5:20, 8:25, 1:5] = True
            tc = wt.copy()
            tc[12:, :, :] = False
            et = tc.copy()
            et[:, 16:, :] = False
            self.masks[case] = np.stack([wt, tc, et])[:regions]
            num = FULL_SHAPE[2] - 1 if drop_last_slice else FULL_SHAPE[2]
            for z in range(FULL_SHAPE[2]):
                logits = 10.0 * (2.0 * self.masks[case][..., z] - 1.0)
                self.items.append(
                    {
                        "image": torch.from_numpy(logits.astype(np.float32)),
                        "case_id": case,
                        "slice_index": torch.tensor(z),
                        "num_slices": torch.tensor(num),
                    }
                )
        if drop_last_slice:  # the first case is incomplete: its announced count is too high
            self.items = [it for it in self.items if it["case_id"] == "BraTS_001"][:3] + [
                it for it in self.items if it["case_id"] == "BraTS_002"
            ][:num]

    def predict_dataloader(self):
        return DataLoader(self.items, batch_size=4)  # batches straddle the two cases

    def case_reference(self, case_id):
        return self.references[case_id]


def _predict(tmp_path, regions, **writer_kwargs):
    datamodule = FakePredictDataModule(tmp_path, regions)
    target = "wt" if regions == 1 else "regions"
    model = BrainTumorSegmentation(in_channels=regions, target=target, network=nn.Identity())
    writer = NiftiPredictionWriter(tmp_path / "out", **writer_kwargs)
    trainer = pl.Trainer(
        accelerator="cpu",
        callbacks=[writer],
        logger=False,
        enable_progress_bar=False,
        default_root_dir=tmp_path,
    )
    trainer.predict(model, datamodule=datamodule, return_predictions=False)
    return datamodule, writer


def test_writer_writes_brats_labels_in_the_original_grid(tmp_path):
    datamodule, writer = _predict(tmp_path, regions=3)
    out = tmp_path / "out"
    assert sorted(p.name for p in out.iterdir()) == ["BraTS_001.nii.gz", "BraTS_002.nii.gz"]
    assert writer.written == [out / "BraTS_001.nii.gz", out / "BraTS_002.nii.gz"]
    for case, reference in datamodule.references.items():
        written = nib.load(out / f"{case}.nii.gz")
        assert written.shape == FULL_SHAPE
        np.testing.assert_array_equal(written.affine, nib.load(reference.reference_path).affine)
        assert written.get_data_dtype() == np.uint8
        assert written.header["descrip"].item() == b"reference"
        labels = np.asanyarray(written.dataobj)
        assert set(np.unique(labels)) == {0, 1, 2, 4}
        wt, tc, et = datamodule.masks[case]
        expected = np.zeros((32, 32, FULL_SHAPE[2]), np.uint8)
        expected[wt] = 2  # edema: WT outside TC
        expected[tc] = 1  # necrosis: TC outside ET
        expected[et] = 4
        np.testing.assert_array_equal(labels[CROP[0], CROP[1]], expected)
        outside = labels.copy()
        outside[CROP[0], CROP[1]] = 0
        assert not outside.any()
        # A hand-picked voxel: crop origin (4, 6) + (5, 8) at z = 1 is WT, TC and ET.
        assert labels[9, 14, 1] == 4 and labels[9, 14, 0] == 0
    assert not list(out.glob(".*"))  # no temporary files left behind


def test_writer_whole_tumor_gives_binary_labels_and_seg_naming(tmp_path):
    datamodule, _ = _predict(tmp_path, regions=1, naming="seg")
    labels = np.asanyarray(nib.load(tmp_path / "out" / "BraTS_001_seg.nii.gz").dataobj)
    assert set(np.unique(labels)) == {0, 1}
    np.testing.assert_array_equal(labels[CROP[0], CROP[1]], datamodule.masks["BraTS_001"][0])


def test_writer_brats2023_convention_writes_et_as_3(tmp_path):
    _predict(tmp_path, regions=3, label_convention="brats2023")
    labels = np.asanyarray(nib.load(tmp_path / "out" / "BraTS_002.nii.gz").dataobj)
    assert set(np.unique(labels)) == {0, 1, 2, 3}


def test_writer_warns_about_incomplete_cases(tmp_path):
    datamodule = FakePredictDataModule(tmp_path, 1, drop_last_slice=True)
    model = BrainTumorSegmentation(network=nn.Identity())
    writer = NiftiPredictionWriter(tmp_path / "out")
    trainer = pl.Trainer(accelerator="cpu", callbacks=[writer], logger=False, enable_progress_bar=False)
    with pytest.warns(UserWarning, match=r"1 case\(s\) did not receive all their slices"):
        trainer.predict(model, datamodule=datamodule, return_predictions=False)
    labels = np.asanyarray(nib.load(tmp_path / "out" / "BraTS_002.nii.gz").dataobj)
    assert not labels[..., -1].any()  # the missing last slice stays background
    assert not (tmp_path / "out" / "BraTS_001.nii.gz").exists()


def test_writer_needs_case_reference(tmp_path):
    datamodule = FakePredictDataModule(tmp_path, 1)
    model = BrainTumorSegmentation(network=nn.Identity())
    writer = NiftiPredictionWriter(tmp_path / "out")
    trainer = pl.Trainer(accelerator="cpu", callbacks=[writer], logger=False, enable_progress_bar=False)
    with pytest.raises(RuntimeError, match="case_reference"):
        trainer.predict(model, dataloaders=datamodule.predict_dataloader(), return_predictions=False)


def test_writer_validates_arguments(tmp_path):
    with pytest.raises(ValueError, match="`naming` to be one of"):
        NiftiPredictionWriter(tmp_path, naming="brats")
    with pytest.raises(ValueError, match="`threshold`"):
        NiftiPredictionWriter(tmp_path, threshold=0.0)
    with pytest.raises(ValueError, match="`label_convention`"):
        NiftiPredictionWriter(tmp_path, label_convention="x")


def test_uncrop_labels_checks_shapes():
    with pytest.raises(ValueError, match="the crop"):
        uncrop_labels(np.zeros((3, 3, 1), np.uint8), [0], (4, 4, 2), (slice(0, 2), slice(0, 2)))
    with pytest.raises(ValueError, match="outside the volume"):
        uncrop_labels(np.zeros((2, 2, 1), np.uint8), [5], (4, 4, 2), (slice(0, 2), slice(0, 2)))
