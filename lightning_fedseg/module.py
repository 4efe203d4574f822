"""The segmentation LightningModule: an smp network, the paper's log-Dice loss, BraTS metrics.

The network comes from smp's registry (:mod:`lightning_fedseg.networks`), the loss is the paper's
log Dice, per batch, slice or patient (:mod:`lightning_fedseg.losses`), and validation and test
score each patient's reassembled volume with the BraTS metrics (:mod:`lightning_fedseg.metrics`).
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Sequence
from enum import StrEnum
from typing import Any, TypeVar, cast

import segmentation_models_pytorch as smp
import torch
from lightning.pytorch import LightningModule
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor, nn
from torch.optim import Optimizer
from torchmetrics import MeanMetric, Metric
from torchmetrics.classification import BinaryF1Score
from typing_extensions import override

from lightning_fedseg._hparams import built_by_lightning_cli, is_plain
from lightning_fedseg._validation import check_int
from lightning_fedseg.data.conventions import Target, nest_regions
from lightning_fedseg.losses import LossName, LossUnit, dice_loss, loss_units
from lightning_fedseg.metrics import AssembledVolume, HausdorffReduction, SliceAssembler, VolumeMetrics
from lightning_fedseg.networks import build_network
from lightning_fedseg.normalization import Normalization, replace_batch_norm
from lightning_fedseg.validation_examples import ExampleSlices

__all__ = ["BrainTumorSegmentation", "LossName", "LossUnit", "build_network", "paper_adam"]

_E = TypeVar("_E", bound=StrEnum)


def paper_adam(params: Iterable[Any]) -> Optimizer:
    """Adam with the paper's learning rate 5e-4 (the default ``optimizer``)."""
    return torch.optim.Adam(params, lr=5e-4)


def _parse_enum(enum_type: type[_E], value: _E | str, name: str) -> _E:
    try:
        return enum_type(value.lower() if isinstance(value, str) else value)
    except ValueError:
        choices = [member.value for member in enum_type]
        raise ValueError(f"Expected `{name}` to be one of {choices}, but got {value!r}.") from None


def _compute_quietly(metric: Metric) -> Any:
    """``metric.compute()`` (which synchronizes across processes) without the no-update warning."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r".*was called before the ``update`` method")
        return metric.compute()


class BrainTumorSegmentation(LightningModule):
    """2D brain-tumor segmentation of BraTS slices, scored per patient volume.

    Batches follow the project's batch contract (``image``, ``target``, ``case_id``,
    ``slice_index``, ``num_slices``). Validation reassembles each case's slices and logs, over all
    validation volumes, ``val/dice`` (mean over volumes and regions), ``val/dice_<region>`` and
    ``val/hd95_<region>``; per validation loader (site) ``val/<site>/dice`` and
    ``val/<site>/dice_<region>``; and ``val/loss``, ``val/slice_dice``. Testing logs the same
    global keys under ``test/``. Training logs ``train/loss`` and ``train/dice`` (pixel Dice over
    the epoch's slices).

    Args:
        in_channels: number of input modalities.
        target: ``"wt"`` (one whole-tumor channel, the paper) or ``"regions"`` (WT, TC, ET as
            three overlapping sigmoid channels).
        arch: smp architecture.
        encoder_name: smp encoder, or ``"tu-<timm model>"``. The default ``tu-resnet10t`` with
            depth 5 and the default decoder is an 8.1M-parameter U-Net, close to the paper's 7.8M.
        encoder_depth: encoder stages.
        decoder_channels: decoder widths (one per stage); ``None`` for archs without them.
        encoder_weights: pretrained encoder weights to download; ``None`` (default) for none.
        network: any module mapping ``[B, in_channels, H, W]`` to ``[B, K, H, W]`` logits; replaces
            the smp network built from the arguments above.
        model_kwargs: extra keyword arguments for the smp architecture.
        loss: ``"dice"`` (the paper's log Dice, see :mod:`lightning_fedseg.losses`) or ``"dice_bce"``.
        loss_unit: ``"batch"`` (one Dice over the batch, the default), ``"slice"`` or ``"patient"``
            (one per slice or per patient, averaged): see :mod:`lightning_fedseg.losses`.
        normalization: ``"batch"`` (the network as built), ``"group"`` or ``"instance"`` (its
            ``BatchNorm2d`` layers swapped when it is built; see :mod:`lightning_fedseg.normalization`).
        dice_smooth: smp's Dice smoothing; 0.5 reproduces the paper's Laplace smoothing of 1.
        optimizer: callable from parameters to an optimizer (LightningCLI ``class_path``).
        lr_scheduler: callable from the optimizer to a scheduler, or ``None``.
        threshold: probability above which a voxel is predicted as tumor.
        compute_hd95: compute HD95 in validation and test (costly on CPU).
        hd95_reduction: ``"max"`` of the directed 95th percentiles (MONAI, BraTS 2023) or their
            ``"union"`` (medpy).
        log_images: how many validation slices (largest ground-truth area) to draw to
            TensorBoard per validation epoch; 0 disables.
    """

    def __init__(
        self,
        in_channels: int = 1,
        target: Target | str = "wt",
        arch: str = "unet",
        encoder_name: str = "tu-resnet10t",
        encoder_depth: int = 5,
        decoder_channels: Sequence[int] | None = (256, 128, 64, 32, 16),
        encoder_weights: str | None = None,
        network: nn.Module | None = None,
        model_kwargs: dict[str, Any] | None = None,
        loss: LossName | str = "dice",
        dice_smooth: float = 0.5,
        optimizer: OptimizerCallable = paper_adam,
        lr_scheduler: LRSchedulerCallable | None = None,
        threshold: float = 0.5,
        compute_hd95: bool = True,
        hd95_reduction: HausdorffReduction | str = "max",
        log_images: int = 4,
        loss_unit: LossUnit | str = "batch",
        normalization: Normalization | str = "batch",
    ) -> None:
        super().__init__()
        check_int("in_channels", in_channels)
        if not 0.0 < threshold < 1.0:
            raise ValueError(f"Expected `threshold` to be in (0, 1), but got {threshold!r}.")
        if dice_smooth < 0:
            raise ValueError(f"Expected `dice_smooth` to be >= 0, but got {dice_smooth!r}.")
        check_int("log_images", log_images, minimum=0)
        if network is not None and not isinstance(network, nn.Module):
            raise TypeError(f"Expected `network` to be a torch.nn.Module, but got {type(network).__name__}.")
        # Plain strings in the hyperparameters keep checkpoints loadable with weights_only=True.
        target = _parse_enum(Target, target, "target").value
        loss = _parse_enum(LossName, loss, "loss").value
        loss_unit = _parse_enum(LossUnit, loss_unit, "loss_unit").value
        normalization = _parse_enum(Normalization, normalization, "normalization").value
        hd95_reduction = _parse_enum(HausdorffReduction, hd95_reduction, "hd95_reduction").value
        from_cli = built_by_lightning_cli()
        # Under LightningCLI the hyperparameters are the config as given (class_path dicts), which
        # rebuild everything, a custom network included. Built in Python, an nn.Module network or
        # a function optimizer cannot be stored: pass them again to `load_from_checkpoint`.
        self.save_hyperparameters(ignore=None if from_cli else ["network"])
        if not from_cli:
            for key in [key for key, value in self.hparams.items() if not is_plain(value)]:
                self.hparams.pop(key)

        self.target = Target(target)
        self.regions = self.target.regions
        num_classes = len(self.regions)
        if network is None:
            network = build_network(
                arch,
                encoder_name,
                in_channels,
                num_classes,
                encoder_depth=encoder_depth,
                decoder_channels=decoder_channels,
                encoder_weights=encoder_weights,
                **(model_kwargs or {}),
            )
        self.network = replace_batch_norm(network, normalization)
        self.loss_unit = LossUnit(loss_unit)
        self.dice_loss = dice_loss(num_classes, dice_smooth)
        self.bce_loss = smp.losses.SoftBCEWithLogitsLoss() if loss == LossName.DICE_BCE else None
        self.optimizer = optimizer
        self.lr_scheduler = lr_scheduler
        self.threshold = threshold
        self.compute_hd95 = compute_hd95
        self.log_images = log_images

        self.train_dice = BinaryF1Score(threshold=threshold, validate_args=False)
        self.val_slice_dice = BinaryF1Score(threshold=threshold, validate_args=False)
        self.val_loss = MeanMetric()
        self.val_metrics = VolumeMetrics(self.regions, compute_hd95, hd95_reduction=hd95_reduction)
        self.val_site_metrics = nn.ModuleList()  # filled in setup(), one per validation loader
        self.val_site_names: list[str] = []
        self.test_loss = MeanMetric()
        self.test_metrics = VolumeMetrics(self.regions, compute_hd95, hd95_reduction=hd95_reduction)
        self._assemblers: dict[int, SliceAssembler] = {}
        self._examples = ExampleSlices()

    # ------------------------------------------------------------------ network and loss

    @override
    def forward(self, image: Tensor) -> Tensor:
        """Logits ``[B, K, H, W]`` for images ``[B, C, H, W]``."""
        return self.network(image)

    def loss(self, logits: Tensor, target: Tensor, case_id: Sequence[str] | None = None) -> Tensor:
        """The training loss of logits against 0/1 targets, both ``[B, K, H, W]``, per ``loss_unit``.

        ``case_id`` (one per slice) names each slice's patient; the ``patient`` unit needs it.
        """
        if logits.shape != target.shape:
            raise ValueError(
                f"Expected the network output {tuple(logits.shape)} to match the target "
                f"{tuple(target.shape)} ({len(self.regions)} channels for target={self.target})."
            )
        units = loss_units(self.loss_unit, len(target), case_id)
        if units is None:
            return self._unit_loss(logits, target)
        if not units:  # an empty batch: nothing to learn, but a loss connected to the graph
            return logits.sum() * 0.0
        return torch.stack([self._unit_loss(logits[idx], target[idx]) for idx in units]).mean()

    def _unit_loss(self, logits: Tensor, target: Tensor) -> Tensor:
        value = self.dice_loss(logits, target)
        if self.bce_loss is not None:
            value = value + self.bce_loss(logits, target)
        return value

    @override
    def configure_optimizers(self) -> Any:
        optimizer = self.optimizer(self.parameters())
        if self.lr_scheduler is None:
            return optimizer
        scheduler = self.lr_scheduler(optimizer)
        config: dict[str, Any] = {"scheduler": scheduler}
        if isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
            config["monitor"] = "val/loss"
        return {"optimizer": optimizer, "lr_scheduler": config}

    # ------------------------------------------------------------------ training

    @override
    def training_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor:
        target = batch["target"]
        batch_size = len(target)
        if batch_size == 0:
            # Patient-level Poisson sampling can draw no patient: the step still happens (DP-SGD
            # then releases noise only), on a zero loss connected to every parameter.
            return torch.stack([p.sum() * 0.0 for p in self.parameters() if p.requires_grad]).sum()
        logits = self(batch["image"])
        loss = self.loss(logits, target, batch.get("case_id"))
        self.log("train/loss", loss, on_step=True, on_epoch=True, prog_bar=True, batch_size=batch_size)
        self.train_dice.update(logits.detach().sigmoid(), target.int())
        self.log("train/dice", self.train_dice, on_step=False, on_epoch=True, batch_size=batch_size)
        return loss

    # ------------------------------------------------------------------ validation

    @override
    def setup(self, stage: str) -> None:
        """Create one per-site metric for every validation loader the datamodule names.

        Creating them all up front (rather than when a loader first yields) keeps the same
        metrics, in the same order, on every process, so their synchronization lines up.
        """
        datamodule = getattr(self._trainer, "datamodule", None)
        names = getattr(datamodule, "val_loader_names", None)
        if names is not None and list(names) != self.val_site_names:
            self.val_site_names = []
            self.val_site_metrics = nn.ModuleList()
            for name in names:
                self._add_site(str(name))

    def _add_site(self, name: str) -> None:
        metric = VolumeMetrics(self.regions, compute_hd95=False)
        self.val_site_metrics.append(metric.to(self.device))
        self.val_site_names.append(name)

    @override
    def on_validation_epoch_start(self) -> None:
        self._assemblers.clear()
        self._examples.clear()

    @override
    def validation_step(self, batch: dict[str, Any], batch_idx: int, dataloader_idx: int = 0) -> None:
        logits = self(batch["image"])
        target = batch["target"]
        self.val_loss.update(self.loss(logits, target, batch.get("case_id")), weight=len(target))
        probs = logits.sigmoid()
        self.val_slice_dice.update(probs, target.int())
        while len(self.val_site_names) <= dataloader_idx:
            self._add_site(f"loader{len(self.val_site_names)}")
        site_metric = cast(VolumeMetrics, self.val_site_metrics[dataloader_idx])
        for volume in self._add_slices(batch, probs, dataloader_idx):
            pred, truth, spacing = self._scored_volume(volume)
            self.val_metrics.update(pred, truth, spacing)
            site_metric.update(pred, truth, spacing)
        if self._should_log_images():
            self._examples.add(batch, probs, self.val_site_names[dataloader_idx], self.threshold, self.log_images)

    @override
    def on_validation_epoch_end(self) -> None:
        self._warn_incomplete("validation")
        self._log_loss("val", self.val_loss)
        slice_dice = _compute_quietly(self.val_slice_dice)
        self.val_slice_dice.reset()
        self.log("val/slice_dice", slice_dice, sync_dist=False)
        self._log_volume_metrics("val", self.val_metrics)
        for name, metric in zip(self.val_site_names, self.val_site_metrics, strict=True):
            self._log_volume_metrics(f"val/{name}", cast(VolumeMetrics, metric))
        if self._should_log_images():
            loggers = [logger for logger in self.loggers if isinstance(logger, TensorBoardLogger)]
            self._examples.draw(loggers, self.regions, self.global_step)
        self._examples.clear()

    # ------------------------------------------------------------------ test and predict

    @override
    def on_test_epoch_start(self) -> None:
        self._assemblers.clear()

    @override
    def test_step(self, batch: dict[str, Any], batch_idx: int, dataloader_idx: int = 0) -> None:
        logits = self(batch["image"])
        target = batch["target"]
        self.test_loss.update(self.loss(logits, target, batch.get("case_id")), weight=len(target))
        for volume in self._add_slices(batch, logits.sigmoid(), dataloader_idx):
            self.test_metrics.update(*self._scored_volume(volume))

    @override
    def on_test_epoch_end(self) -> None:
        self._warn_incomplete("test")
        self._log_loss("test", self.test_loss)
        self._log_volume_metrics("test", self.test_metrics)

    @override
    def predict_step(self, batch: dict[str, Any], batch_idx: int, dataloader_idx: int = 0) -> dict[str, Any]:
        """Sigmoid probabilities ``[B, K, H, W]`` with the slices' case bookkeeping."""
        return {
            "case_id": batch["case_id"],
            "slice_index": batch["slice_index"],
            "num_slices": batch["num_slices"],
            "probs": self(batch["image"]).sigmoid(),
        }

    # ------------------------------------------------------------------ helpers

    def _add_slices(self, batch: dict[str, Any], probs: Tensor, dataloader_idx: int) -> list[Any]:
        assembler = self._assemblers.setdefault(dataloader_idx, SliceAssembler())
        return assembler.add(
            batch["case_id"],
            batch["slice_index"],
            batch["num_slices"],
            pred=(probs > self.threshold).cpu(),
            target=(batch["target"] > 0.5).cpu(),
        )

    def _scored_volume(self, volume: AssembledVolume) -> tuple[Tensor, Tensor, tuple[float, float, float]]:
        """Prediction, ground truth and spacing of one volume, as the BraTS evaluation sees them.

        The predicted regions are nested (ET inside TC inside WT) as in the written label maps.
        When the datamodule knows the case (``case_reference`` and ``full_target``, as
        :class:`~lightning_fedseg.data.FederatedDataModule`), both masks are on the full,
        uncropped grid (tumour outside the crop counts) and the spacing is the volume's own;
        otherwise the masks are scored as given, at 1 mm.
        """
        pred = nest_regions(volume.tensors["pred"].numpy())
        target = volume.tensors["target"]
        spacing = (1.0, 1.0, 1.0)
        datamodule = getattr(self._trainer, "datamodule", None) if self._trainer is not None else None
        if hasattr(datamodule, "case_reference"):
            reference = datamodule.case_reference(volume.case_id)  # type: ignore[union-attr]
            spacing = tuple(getattr(reference, "spacing", spacing))
            whole = volume.slice_index.tolist() == list(range(reference.full_shape[2]))
            if hasattr(datamodule, "full_target") and whole:
                pred = reference.uncrop(pred)
                target = torch.from_numpy(datamodule.full_target(volume.case_id))  # type: ignore[union-attr]
        return torch.from_numpy(pred), target, spacing

    def _warn_incomplete(self, stage: str) -> None:
        pending = [case for assembler in self._assemblers.values() for case in assembler.pending]
        self._assemblers.clear()
        if pending and not self.trainer.sanity_checking:
            rank_zero_warn(
                f"{len(pending)} {stage} case(s) did not receive all their slices and were not "
                f"scored (e.g. {pending[:3]}). HINT: per-volume metrics need every slice of a case"
                " in one process; do not limit the batches or shard a case across processes."
            )

    def _log_loss(self, prefix: str, metric: MeanMetric) -> None:
        value = _compute_quietly(metric)
        metric.reset()
        if not torch.isnan(value):
            self.log(f"{prefix}/loss", value, sync_dist=False)

    def _log_volume_metrics(self, prefix: str, metric: VolumeMetrics) -> None:
        values = _compute_quietly(metric)  # synchronizes: called in the same order everywhere
        metric.reset()
        if values["volumes"] > 0:
            for key, value in values.items():
                if key != "volumes":
                    self.log(f"{prefix}/{key}", value, sync_dist=False)

    def _should_log_images(self) -> bool:
        if self.log_images == 0 or self._trainer is None or self.trainer.sanity_checking:
            return False
        return self.global_rank == 0 and any(isinstance(logger, TensorBoardLogger) for logger in self.loggers)
