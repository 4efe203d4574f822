"""Slices back into volumes: a 2D model's slice outputs, buffered per case until it is whole.

BraTS scores each patient volume, and prediction writes one NIfTI file per case, but a 2D model
sees batches of axial slices that may interleave cases and straddle batch boundaries.
:class:`SliceAssembler` buffers them and hands back each :class:`AssembledVolume` once all of its
slices arrived. It is the inverse of :mod:`~lightning_fedseg.data.slices`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

__all__ = ["AssembledVolume", "SliceAssembler"]


@dataclass
class AssembledVolume:
    """One case put back together from its slices.

    Attributes:
        case_id: the case.
        slice_index: the z index of each assembled slice, ascending, shape ``[Z]``.
        tensors: each named input stacked along a new last axis: ``[..., Z]``.
    """

    case_id: str
    slice_index: Tensor
    tensors: dict[str, Tensor]


@dataclass
class _PendingCase:
    num_slices: int
    slices: dict[int, dict[str, Tensor]] = field(default_factory=dict)


class SliceAssembler:
    """Collects 2D slices per case and hands back each volume once all its slices arrived.

    Slices may come in any order and cases may interleave or straddle batch boundaries; a case
    is complete when ``num_slices`` distinct slice indices have been seen, and is then removed
    from the buffer. Tensors are stored as given (move them to the CPU first to spare device
    memory).

    Example:
        >>> assembler = SliceAssembler()
        >>> assembler.add(["a", "b"], [1, 0], [2, 1], pred=torch.ones(2, 1, 2, 2))[0].case_id
        'b'
        >>> assembler.pending
        ['a']
        >>> volume = assembler.add(["a"], [0], [2], pred=torch.zeros(1, 1, 2, 2))[0]
        >>> volume.tensors["pred"].shape, volume.slice_index.tolist(), len(assembler)
        (torch.Size([1, 2, 2, 2]), [0, 1], 0)
    """

    def __init__(self) -> None:
        self._pending: dict[str, _PendingCase] = {}

    def __len__(self) -> int:
        return len(self._pending)

    @property
    def pending(self) -> list[str]:
        """The cases that have some but not all of their slices."""
        return list(self._pending)

    def reset(self) -> None:
        """Drop all buffered slices."""
        self._pending.clear()

    def add(
        self,
        case_id: Sequence[str],
        slice_index: Tensor | Sequence[int],
        num_slices: Tensor | Sequence[int],
        **tensors: Tensor,
    ) -> list[AssembledVolume]:
        """Buffer a batch of slices and return the volumes this batch completed.

        Args:
            case_id: the case of each slice, length ``B``.
            slice_index: the z index of each slice, length ``B``.
            num_slices: how many slices each slice's case has in this stream, length ``B``.
            tensors: named batch tensors ``[B, ...]``, e.g. ``pred=..., target=...``.

        Returns:
            The completed volumes, in the order their last slice arrived.

        Raises:
            ValueError: on mismatched lengths, a slice seen twice, or a case whose
                ``num_slices`` changes.
        """
        indices = [int(i) for i in slice_index]
        counts = [int(n) for n in num_slices]
        batch_size = len(case_id)
        lengths = {"slice_index": len(indices), "num_slices": len(counts)}
        lengths.update({name: len(t) for name, t in tensors.items()})
        for name, length in lengths.items():
            if length != batch_size:
                raise ValueError(f"Expected `{name}` to have one entry per slice ({batch_size}), but got {length}.")
        completed = []
        for b, (case, z, count) in enumerate(zip(case_id, indices, counts, strict=True)):
            if count < 1:
                raise ValueError(f"Expected `num_slices` >= 1 for case {case!r}, but got {count}.")
            pending = self._pending.setdefault(case, _PendingCase(count))
            if pending.num_slices != count:
                raise ValueError(
                    f"Case {case!r} was announced with {pending.num_slices} slices, but slice {z} says {count}."
                )
            if z in pending.slices:
                raise ValueError(f"Slice {z} of case {case!r} arrived twice.")
            pending.slices[z] = {name: t[b].detach() for name, t in tensors.items()}
            if len(pending.slices) == pending.num_slices:
                del self._pending[case]
                completed.append(_stack(case, pending.slices))
        return completed


def _stack(case_id: str, slices: dict[int, dict[str, Tensor]]) -> AssembledVolume:
    order = sorted(slices)
    names = slices[order[0]].keys()
    tensors = {name: torch.stack([slices[z][name] for z in order], dim=-1) for name in names}
    return AssembledVolume(case_id, torch.tensor(order, dtype=torch.long), tensors)
