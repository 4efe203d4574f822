"""Write predicted segmentations as BraTS label maps in each case's original NIfTI space."""

from __future__ import annotations

import os
import uuid
from enum import StrEnum
from pathlib import Path
from typing import Any, Protocol

import nibabel as nib
import numpy as np
import numpy.typing as npt
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import BasePredictionWriter
from lightning.pytorch.utilities import rank_zero_warn
from typing_extensions import override

from lightning_fedseg.data.conventions import LabelConvention, regions_to_labels
from lightning_fedseg.data.orientation import from_canonical
from lightning_fedseg.metrics import AssembledVolume, SliceAssembler

__all__ = ["NiftiPredictionWriter", "PredictionNaming", "uncrop_labels"]


class PredictionNaming(StrEnum):
    """Output file names: ``<case_id>.nii.gz`` (BraTS submissions) or ``<case_id>_seg.nii.gz``."""

    CASE = "case"
    SEG = "seg"

    def filename(self, case_id: str) -> str:
        return f"{case_id}.nii.gz" if self is PredictionNaming.CASE else f"{case_id}_seg.nii.gz"


class _CaseReference(Protocol):
    """What ``datamodule.case_reference(case_id)`` returns (``data.cases.CaseReference``)."""

    reference_path: Path
    full_shape: tuple[int, int, int]
    crop: tuple[slice, slice]


def uncrop_labels(
    labels: npt.NDArray[np.uint8],
    slice_index: npt.NDArray[np.integer] | list[int],
    full_shape: tuple[int, int, int],
    crop: tuple[slice, slice],
) -> npt.NDArray[np.uint8]:
    """Place cropped label slices ``[x, y, Z']`` at their z indices of a zero ``full_shape`` grid.

    Example:
        >>> labels = np.full((2, 2, 1), 4, np.uint8)
        >>> uncrop_labels(labels, [1], (3, 3, 2), (slice(1, 3), slice(0, 2)))[..., 1].tolist()
        [[0, 0, 0], [4, 4, 0], [4, 4, 0]]
    """
    out = np.zeros(full_shape, dtype=np.uint8)
    region = out[crop[0], crop[1]]
    z = np.asarray(slice_index, dtype=np.int64)
    if region.shape[:2] != labels.shape[:2] or len(z) != labels.shape[2]:
        raise ValueError(
            f"Expected predicted slices of shape {region.shape[:2]} (the crop) and one z index "
            f"per slice, but got {labels.shape} with {len(z)} z indices."
        )
    if len(z) and (z.min() < 0 or z.max() >= full_shape[2]):
        raise ValueError(f"Slice indices {z.min()}..{z.max()} fall outside the volume's Z {full_shape[2]}.")
    region[:, :, z] = labels
    return out


class NiftiPredictionWriter(BasePredictionWriter):
    """Assemble predicted slices per case and write each case as a BraTS label NIfTI.

    Each batch's ``predict_step`` output (``case_id``, ``slice_index``, ``num_slices``,
    ``probs [B, K, H, W]``) is thresholded and buffered; once a case has all its slices, its
    regions are turned into BraTS labels (WT, TC, ET to 1/2/4, or 3 for ET under the 2023
    convention; a WT-only model writes 0/1), put back into the uncropped grid given by
    ``trainer.datamodule.case_reference(case_id)`` (and, for a case reoriented to RAS, back into
    the reference file's own voxel order), and written as uint8 with the reference NIfTI's
    affine and header, via a temporary file and an atomic rename.

    Run ``trainer.predict(..., return_predictions=False)`` so the probabilities are not also
    kept in memory.

    Args:
        output_dir: where the ``.nii.gz`` files go (created if missing).
        naming: ``"case"`` for ``<case_id>.nii.gz`` (BraTS evaluation) or ``"seg"`` for
            ``<case_id>_seg.nii.gz``.
        threshold: probability above which a voxel belongs to a region.
        label_convention: ``"brats"`` (ET = 4) or ``"brats2023"`` (ET = 3).
    """

    def __init__(
        self,
        output_dir: str | os.PathLike[str],
        naming: PredictionNaming | str = PredictionNaming.CASE,
        threshold: float = 0.5,
        label_convention: LabelConvention | str = LabelConvention.BRATS,
    ) -> None:
        super().__init__(write_interval="batch")
        if not 0.0 < threshold < 1.0:
            raise ValueError(f"Expected `threshold` to be in (0, 1), but got {threshold!r}.")
        try:
            self.naming = PredictionNaming(naming)
        except ValueError:
            choices = [n.value for n in PredictionNaming]
            raise ValueError(f"Expected `naming` to be one of {choices}, but got {naming!r}.") from None
        try:
            self.label_convention = LabelConvention(label_convention)
        except ValueError:
            choices = [c.value for c in LabelConvention]
            raise ValueError(
                f"Expected `label_convention` to be one of {choices}, but got {label_convention!r}."
            ) from None
        self.output_dir = Path(output_dir)
        self.threshold = threshold
        self.written: list[Path] = []
        self._assembler = SliceAssembler()

    @override
    def on_predict_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._assembler.reset()
        self.written = []

    @override
    def write_on_batch_end(
        self,
        trainer: Trainer,
        pl_module: LightningModule,
        prediction: Any,
        batch_indices: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int,
    ) -> None:
        volumes = self._assembler.add(
            prediction["case_id"],
            prediction["slice_index"],
            prediction["num_slices"],
            mask=(prediction["probs"] > self.threshold).cpu(),
        )
        for volume in volumes:
            self.written.append(self._write(trainer, volume))

    @override
    def on_predict_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self._assembler.pending:
            rank_zero_warn(
                f"{len(self._assembler)} case(s) did not receive all their slices and were not "
                f"written (e.g. {self._assembler.pending[:3]})."
            )
        self._assembler.reset()

    def _case_reference(self, trainer: Trainer, case_id: str) -> _CaseReference:
        datamodule = getattr(trainer, "datamodule", None)
        if datamodule is None or not hasattr(datamodule, "case_reference"):
            raise RuntimeError(
                "NiftiPredictionWriter needs `trainer.datamodule.case_reference(case_id)` to place "
                "predictions in the original image space. HINT: predict with a FederatedDataModule."
            )
        reference: _CaseReference = datamodule.case_reference(case_id)
        return reference

    def _write(self, trainer: Trainer, volume: AssembledVolume) -> Path:
        reference = self._case_reference(trainer, volume.case_id)
        regions = volume.tensors["mask"].numpy()  # [K, x, y, Z']
        labels = regions_to_labels(regions, self.label_convention)
        try:
            full = uncrop_labels(labels, volume.slice_index.numpy(), reference.full_shape, reference.crop)
        except ValueError as error:
            raise ValueError(f"Case {volume.case_id!r}: {error}") from None
        source = nib.load(reference.reference_path)
        if not isinstance(source, nib.Nifti1Image):
            raise ValueError(
                f"Expected the reference of case {volume.case_id!r} to be a NIfTI image, but "
                f"{reference.reference_path} is a {type(source).__name__}."
            )
        if getattr(reference, "reoriented", False):  # back from RAS to the file's own voxel order
            full = from_canonical(full, source.affine)
        if tuple(source.shape[:3]) != full.shape:
            raise ValueError(
                f"Reference {reference.reference_path} has shape {source.shape}, but case "
                f"{volume.case_id!r} was announced with full shape {reference.full_shape}."
            )
        header = source.header.copy()
        image = nib.Nifti1Image(full, source.affine, header)
        image.set_data_dtype(np.uint8)
        image.header.set_slope_inter(1.0, 0.0)
        self.output_dir.mkdir(parents=True, exist_ok=True)
        path = self.output_dir / self.naming.filename(volume.case_id)
        tmp = self.output_dir / f".{volume.case_id}.{uuid.uuid4().hex}.tmp.nii.gz"
        try:
            nib.save(image, tmp)
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)
        return path
