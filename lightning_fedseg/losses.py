"""The training loss: the paper's log Dice (optionally plus cross-entropy), per batch, slice or patient.

The paper trains on ``log(|P| + |T| + 1) - log(2|P∩T| + 1)``. smp's
``DiceLoss(log_loss=True, smooth=s)`` computes ``-log((I + s) / (I + (|P| - I)/2 + (|T| - I)/2 +
s)) = log(|P| + |T| + 2s) - log(2I + 2s)`` with ``I = (|P| + |T| - ||P - T||_1) / 2``, which is
``Σ p·t`` for a 0/1 target. So ``smooth=0.5`` (our default ``dice_smooth``) gives the paper's
formula exactly, and smp's ``smooth=1`` would give ``log(|P|+|T|+2) - log(2I+2)``. The sums run
over the whole batch and image per channel (one "batch Dice" per channel, then the channel mean).
The paper does not say over what it sums: the authors' group's Keras U-Net (IntelAI/unet,
``dice_coef_loss``) also flattens the batch, while OpenFL's ``tf_2dunet`` averages per-slice log
terms and trains with smoothing 32. One difference remains: smp sets a channel's loss to 0 when
the batch holds no foreground for it, where the paper's formula gives ``log(|P| + 1)`` and still
punishes false positives; with the paper's batches of 64 shuffled slices that practically never
happens.

The loss unit (``loss_unit``) says over what the log Dice is taken: ``batch`` (the above, the
default), ``slice`` (one log Dice per slice, averaged over the batch's slices) or ``patient`` (one
log Dice over each patient's slices of the batch, averaged over the batch's patients). Only the
last two decompose over patients, which differentially private training needs (see
:mod:`lightning_fedseg.federation.patient_dp`); ``normalization`` swaps the network's batch norm for
group or instance norm for the same reason (:mod:`lightning_fedseg.normalization`).
"""

from __future__ import annotations

from collections.abc import Sequence
from enum import StrEnum

import segmentation_models_pytorch as smp

__all__ = ["LossName", "LossUnit", "dice_loss", "loss_units"]


class LossName(StrEnum):
    """Training loss: the paper's log Dice, optionally plus binary cross-entropy."""

    DICE = "dice"
    DICE_BCE = "dice_bce"


class LossUnit(StrEnum):
    """Over what one log Dice is taken: the whole batch, each slice, or each patient's slices."""

    BATCH = "batch"
    SLICE = "slice"
    PATIENT = "patient"


def dice_loss(num_classes: int, smooth: float) -> smp.losses.DiceLoss:
    """smp's log Dice on logits with smoothing ``smooth``: binary for one channel, multilabel for more.

    Example:
        >>> dice_loss(1, 0.5).mode
        'binary'
    """
    mode = smp.losses.BINARY_MODE if num_classes == 1 else smp.losses.MULTILABEL_MODE
    return smp.losses.DiceLoss(mode, log_loss=True, from_logits=True, smooth=smooth)


def loss_units(unit: LossUnit, batch_size: int, case_id: Sequence[str] | None) -> list[list[int]] | None:
    """The slice indices of each unit over which one log Dice is taken; ``None``: the whole batch.

    ``case_id`` (one per slice) names each slice's patient; the ``patient`` unit needs it.

    Example:
        >>> loss_units(LossUnit.PATIENT, 3, ["a", "b", "a"])
        [[0, 2], [1]]
    """
    if unit is LossUnit.BATCH:
        return None
    if unit is LossUnit.SLICE:
        return [[i] for i in range(batch_size)]
    if case_id is None or len(case_id) != batch_size:
        raise ValueError("loss_unit='patient' needs the `case_id` of every slice of the batch.")
    groups: dict[str, list[int]] = {}
    for i, case in enumerate(case_id):
        groups.setdefault(str(case), []).append(i)
    return list(groups.values())
