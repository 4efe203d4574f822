"""The math of patient-level DP-SGD: which slice is whose, per-patient clipping, the noised mean.

With patients sampled by Poisson sampling at rate ``q`` from ``N`` (see
:mod:`lightning_fedseg.data.patient_sampling`), one step of DP-SGD where the record is the patient:

    g = (sum_j clip_C(sum_{s in slices of j} g_s) + N(0, sigma^2 C^2 I)) / (q N)

where ``g_s`` is the gradient of the loss through slice ``s`` and ``clip_C(v) = v min(1, C/||v||)``
over every parameter together. One patient changes the sum by at most ``C`` (clipping), and the
denominator is fixed (not the batch's own patient count), so the Gaussian mechanism's sensitivity
is ``C`` whatever the batch holds.

Everything here is a pure function of tensors; :mod:`.patient_dp` runs it inside a site's training.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

__all__ = ["clip_and_sum", "noised_mean", "patient_index"]


def patient_index(case_ids: Sequence[str], device: torch.device | str | None = None) -> tuple[Tensor, int]:
    """The index of each slice's patient (in order of first appearance) and the number of patients.

    Example:
        >>> patient_index(["b", "a", "b"])
        (tensor([0, 1, 0]), 2)
    """
    order: dict[str, int] = {}
    index = [order.setdefault(str(case), len(order)) for case in case_ids]
    return torch.tensor(index, dtype=torch.int64, device=device), len(order)


def clip_and_sum(per_patient: Sequence[Tensor], max_norm: float) -> tuple[list[Tensor], Tensor]:
    """Clip each patient's gradient (over all tensors together) to L2 norm ``max_norm`` and sum over patients.

    The factor is ``min(1, C / (||v|| + 1e-6))`` as in opacus, so a clipped norm never exceeds ``C``.

    Returns:
        The clipped sum (one tensor per parameter) and each patient's norm before clipping.

    Example:
        >>> clipped, norms = clip_and_sum([torch.tensor([[3.0, 4.0], [0.3, 0.4]])], max_norm=1.0)
        >>> [round(v, 4) for v in clipped[0].tolist()], [round(n, 4) for n in norms.tolist()]
        ([0.9, 1.2], [5.0, 0.5])
    """
    if not per_patient:
        return [], torch.zeros(0)
    squares = torch.stack([g.flatten(1).double().square().sum(1) for g in per_patient]).sum(0)
    norms = squares.sqrt()
    factors = (max_norm / (norms + 1e-6)).clamp(max=1.0)
    clipped = [torch.einsum("p,p...->...", factors.to(g.dtype), g) for g in per_patient]
    return clipped, norms


def noised_mean(
    clipped_sum: Sequence[Tensor], noise_std: float, denominator: float, generator: torch.Generator
) -> list[Tensor]:
    """``(sum + N(0, noise_std^2)) / denominator``, the noise drawn on the CPU from ``generator``
    (one draw per tensor, in order), so the same seed gives the same noise on any device.

    Example:
        >>> noised_mean([torch.ones(2)], 0.0, 4.0, torch.Generator().manual_seed(0))
        [tensor([0.2500, 0.2500])]
    """
    out = []
    for value in clipped_sum:
        noise = torch.randn(value.shape, generator=generator, dtype=torch.float64)
        out.append(((value.double() + noise_std * noise.to(value.device)) / denominator).to(value.dtype))
    return out
