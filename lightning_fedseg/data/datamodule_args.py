"""The argument checks of :class:`~lightning_fedseg.data.datamodule.FederatedDataModule`.

Every argument is checked before anything is built, in the order of the data module's
signature, and a message names the argument and the value ("Expected `val_fraction` to be in
[0, 1), but got 1.0."). :func:`check_arguments` also turns the strings of the YAML into their
enums.
"""

from __future__ import annotations

from collections.abc import Sequence
from enum import StrEnum
from typing import Any, NamedTuple

from lightning_fedseg._validation import check_int
from lightning_fedseg.data.conventions import LabelConvention, Modality, Target
from lightning_fedseg.data.partition_policy import PartitionMode
from lightning_fedseg.data.preprocess import SlicePolicy

__all__ = ["CheckedChoices", "check_arguments"]


class CheckedChoices(NamedTuple):
    """The data module's string choices as their enums."""

    partition: PartitionMode
    target: Target
    label_convention: LabelConvention
    slice_policy: SlicePolicy
    modalities: list[Modality]


def check_arguments(
    *,
    partition: str,
    partition_csv: str | None,
    num_sites: int,
    num_heldout: int | float | None,
    val_fraction: float,
    dirichlet_alpha: float,
    modalities: Sequence[str],
    target: str,
    label_convention: str,
    crop_size: int | None,
    slice_policy: str,
    batch_size: int,
    num_workers: int,
    synthetic_subjects: int | None,
    synthetic_shape: Sequence[int],
    sites: Sequence[str] | None,
    leave_out: Sequence[str] | None,
    patient_sample_rate: float | None,
    slices_per_patient: int,
    patient_slice_draw: str,
) -> CheckedChoices:
    """Check the arguments of the data module (see its docstring) and return its choices as enums.

    Raises:
        ValueError: the first argument out of range, naming it and its value.

    Example:
        >>> check_arguments(
        ...     partition="simulated", partition_csv=None, num_sites=4, num_heldout=None, val_fraction=0.2,
        ...     dirichlet_alpha=0.5, modalities=["flair"], target="wt", label_convention="brats", crop_size=None,
        ...     slice_policy="brain", batch_size=8, num_workers=0, synthetic_subjects=None,
        ...     synthetic_shape=(16, 16, 8), sites=None, leave_out=None, patient_sample_rate=None,
        ...     slices_per_patient=4, patient_slice_draw="tumour",
        ... ).partition
        <PartitionMode.SIMULATED: 'simulated'>
    """
    mode: PartitionMode = choice(PartitionMode, partition, "partition")
    target_: Target = choice(Target, target, "target")
    convention: LabelConvention = choice(LabelConvention, label_convention, "label_convention")
    policy: SlicePolicy = choice(SlicePolicy, slice_policy, "slice_policy")
    if partition_csv is not None and mode not in (PartitionMode.AUTO, PartitionMode.FETS):
        raise ValueError(
            f"Expected no `partition_csv` with `partition` {mode.value!r}, but got "
            f"{partition_csv!r}. HINT: use partition='fets' to split by the CSV."
        )
    if mode is PartitionMode.FETS and partition_csv is None:
        raise ValueError("Expected a `partition_csv` with partition='fets', but got None.")
    check_int("num_sites", num_sites)
    if num_heldout is not None and (
        isinstance(num_heldout, bool)
        or (isinstance(num_heldout, int) and num_heldout < 0)
        or (isinstance(num_heldout, float) and not 0.0 <= num_heldout < 1.0)
    ):
        raise ValueError(
            f"Expected `num_heldout` to be a non-negative count or a fraction in [0, 1), but got {num_heldout!r}."
        )
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"Expected `val_fraction` to be in [0, 1), but got {val_fraction}.")
    if not dirichlet_alpha > 0:
        raise ValueError(f"Expected `dirichlet_alpha` to be positive, but got {dirichlet_alpha}.")
    if isinstance(modalities, str) or not modalities:
        raise ValueError(f"Expected `modalities` to be a non-empty list, but got {modalities!r}.")
    chosen = [choice(Modality, m, "modalities") for m in modalities]
    if len(set(chosen)) != len(chosen):
        raise ValueError(f"Expected distinct `modalities`, but got {list(modalities)}.")
    if crop_size is not None:
        check_int("crop_size", crop_size)
    check_int("batch_size", batch_size)
    check_int("num_workers", num_workers, minimum=0)
    if synthetic_subjects is not None:
        check_int("synthetic_subjects", synthetic_subjects)
    if len(synthetic_shape) != 3 or any(
        isinstance(s, bool) or not isinstance(s, int) or s < 1 for s in synthetic_shape
    ):
        raise ValueError(f"Expected `synthetic_shape` to be 3 positive integers, but got {synthetic_shape}.")
    if sites is not None and (not sites or len(set(sites)) != len(sites)):
        raise ValueError(f"Expected `sites` to name distinct sites, but got {sites!r}.")
    if leave_out is not None and (isinstance(leave_out, str) or not leave_out or len(set(leave_out)) != len(leave_out)):
        raise ValueError(f"Expected `leave_out` to be a list of distinct sites, but got {leave_out!r}.")
    if patient_sample_rate is not None and not 0.0 < patient_sample_rate <= 1.0:
        raise ValueError(f"Expected `patient_sample_rate` in (0, 1], but got {patient_sample_rate!r}.")
    check_int("slices_per_patient", slices_per_patient)
    if patient_slice_draw not in ("tumour", "uniform"):
        raise ValueError(f"Expected `patient_slice_draw` to be 'tumour' or 'uniform', but got {patient_slice_draw!r}.")

    return CheckedChoices(mode, target_, convention, policy, chosen)


def choice(enum: type[StrEnum], value: Any, name: str) -> Any:
    """``enum(value)``, or a ``ValueError`` naming the argument ``name`` and every valid value.

    Example:
        >>> choice(Target, "wt", "target")
        <Target.WT: 'wt'>
    """
    try:
        return enum(value)
    except ValueError:
        choices = ", ".join(repr(m.value) for m in enum)
        raise ValueError(f"Expected `{name}` to be one of {choices}, but got {value!r}.") from None
