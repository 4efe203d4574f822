"""Byzantine attacks as pure functions on flat update vectors. No Lightning.

An update is ``Delta = y - x_t``, a site's state after local training minus the round's global
state, as one flat vector over the state's floating tensors (parameters and float buffers).
``honest`` is the ``(h, d)`` matrix of the round's honest updates, ``mu`` and ``sigma`` its
coordinate-wise mean and standard deviation. Each function returns the update a Byzantine site
sends instead of its own.

* Sign flip (Damaskinos et al. 2018; Allen-Zhu et al. 2021): ``-Delta_own``; omniscient: ``-mu``.
* Gaussian: a draw of ``N(0, std**2 I)`` in place of the update.
* Scaling / model replacement (Bagdasaryan et al., AISTATS 2020): ``gamma * Delta_own``, with
  ``gamma`` about ``n / server_lr`` to replace the global model.
* A Little Is Enough (Baruch, Baruch and Goldberg, NeurIPS 2019): ``mu + z * sigma``;
  :func:`alie_z` is the paper's ``z_max`` for ``n`` sites of which ``f`` are Byzantine.
* Inner-product manipulation (Xie, Koyejo and Gupta, UAI 2019): ``-epsilon * mu``.
* Min-max and min-sum (Shejwalkar and Houmansadr, NDSS 2021): ``mu + gamma * p`` for a
  perturbation ``p`` (``-sigma``, ``-mu / ||mu||`` or ``-sign(mu)``) with the largest ``gamma``
  (by binary search, to ``tol``) whose distance to the honest updates stays within theirs:
  min-max bounds the largest distance to any honest update by the largest pairwise distance;
  min-sum bounds the sum of squared distances by the largest such sum of an honest update.
* Mimic (Karimireddy, He and Jaggi, ICLR 2022): a copy of one honest update.
* Label flipping for segmentation (:func:`flip_labels`): the site trains honestly on erased or
  inverted tumour masks.

Decisions:

* ``sigma`` is the population standard deviation (``correction=0``): it is defined for a single
  honest site (zero) and is the statistic the papers' formulas describe.
* The binary search of min-max and min-sum returns ``gamma`` with the stated maximality: the
  returned ``gamma`` meets the bound and ``gamma + tol`` is past the last ``gamma`` that does (the
  feasible set is an interval ``[0, gamma*]``, since the distances are convex in ``gamma`` and
  ``gamma = 0``, the mean, always meets the bound).
* Everything is computed in float64; callers cast back to the model's dtypes.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from enum import StrEnum
from statistics import NormalDist

import torch
from torch import Tensor

__all__ = [
    "LabelFlip",
    "Perturbation",
    "alie",
    "alie_z",
    "flip_labels",
    "gaussian",
    "ipm",
    "largest_gamma",
    "mimic",
    "min_max",
    "min_sum",
    "perturbation",
    "scaling",
    "sign_flip",
]


class Perturbation(StrEnum):
    """The direction ``p`` of min-max and min-sum (Shejwalkar and Houmansadr 2021, Section 4)."""

    STD = "std"  # -sigma, the inverse standard deviation
    UNIT = "unit"  # -mu / ||mu||, the inverse unit vector
    SIGN = "sign"  # -sign(mu), the inverse sign


class LabelFlip(StrEnum):
    """How a Byzantine site's tumour masks are altered: erased (all background) or inverted."""

    ERASE = "erase"
    INVERT = "invert"


def _honest(honest: Tensor) -> Tensor:
    if honest.dim() != 2 or honest.shape[0] == 0:
        raise ValueError(f"Expected `honest` to be an (h, d) matrix with h >= 1, but got shape {tuple(honest.shape)}.")
    return honest.to(torch.float64)


def sign_flip(update: Tensor) -> Tensor:
    """``-update``: the own update reversed (``sign_flip(honest.mean(0))`` is the omniscient one).

    Example:
        >>> sign_flip(torch.tensor([1.0, -2.0])).tolist()
        [-1.0, 2.0]
    """
    return -update.to(torch.float64)


def scaling(update: Tensor, gamma: float) -> Tensor:
    """``gamma * update`` (model replacement: ``gamma`` about ``n / server_lr``).

    Example:
        >>> scaling(torch.tensor([1.0, -2.0]), 10.0).tolist()
        [10.0, -20.0]
    """
    return gamma * update.to(torch.float64)


def gaussian(like: Tensor, std: float, generator: torch.Generator) -> Tensor:
    """A draw of ``N(0, std**2 I)`` shaped like ``like``, from ``generator`` (seeded by the caller).

    Example:
        >>> noise = gaussian(torch.zeros(10000), 2.0, torch.Generator().manual_seed(0))
        >>> round(noise.std().item(), 1)
        2.0
    """
    noise = torch.randn(like.shape, generator=generator, dtype=torch.float64, device=like.device)
    return noise.mul_(std)


def alie_z(num_sites: int, num_byzantine: int) -> float:
    """The paper's ``z_max`` (Baruch et al. 2019, Algorithm 3): ``s = floor(n / 2 + 1) - f``,
    ``z = Phi^-1((n - s) / n)``.

    Example:
        >>> alie_z(10, 1), round(alie_z(10, 3), 4), round(alie_z(32, 8), 4)  # barely away from the mean
        (0.0, 0.5244, 0.5791)
    """
    s = math.floor(num_sites / 2 + 1) - num_byzantine
    p = (num_sites - s) / num_sites
    if not 0.0 < p < 1.0:
        raise ValueError(f"ALIE's z_max is undefined for n={num_sites}, f={num_byzantine} (quantile {p}).")
    return NormalDist().inv_cdf(p)


def alie(honest: Tensor, z: float) -> Tensor:
    """``mu + z * sigma`` of the honest updates (A Little Is Enough).

    Example:
        >>> alie(torch.tensor([[0.0, 1.0], [2.0, 1.0]]), z=-1.5).tolist()  # mu = (1, 1), sigma = (1, 0)
        [-0.5, 1.0]
    """
    honest = _honest(honest)
    return honest.mean(dim=0) + z * honest.std(dim=0, correction=0)


def ipm(honest: Tensor, epsilon: float) -> Tensor:
    """``-epsilon * mu`` (inner-product manipulation).

    Example:
        >>> ipm(torch.tensor([[0.0, 2.0], [2.0, 4.0]]), epsilon=0.5).tolist()
        [-0.5, -1.5]
    """
    return -epsilon * _honest(honest).mean(dim=0)


def mimic(honest: Tensor, target: int = 0) -> Tensor:
    """A copy of honest update ``target`` (Karimireddy et al. 2022).

    Example:
        >>> mimic(torch.tensor([[1.0], [2.0]]), target=1).tolist()
        [2.0]
    """
    return _honest(honest)[target].clone()


def perturbation(honest: Tensor, kind: Perturbation | str = Perturbation.STD) -> Tensor:
    """The direction ``p`` of min-max and min-sum.

    Example:
        >>> perturbation(torch.tensor([[3.0, 0.0], [1.0, -2.0]]), "sign").tolist()  # mu = (2, -1)
        [-1.0, 1.0]
    """
    honest = _honest(honest)
    kind = Perturbation(kind)
    mu = honest.mean(dim=0)
    if kind is Perturbation.STD:
        return -honest.std(dim=0, correction=0)
    if kind is Perturbation.SIGN:
        return -torch.sign(mu)
    norm = torch.linalg.vector_norm(mu)
    return -mu / norm if norm > 0 else torch.zeros_like(mu)


def largest_gamma(feasible: Callable[[float], bool], tol: float = 1e-3, gamma_init: float = 10.0) -> float:
    """The largest ``gamma >= 0`` with ``feasible(gamma)``, to ``tol``, for a feasible set ``[0, gamma*]``.

    Doubles ``gamma_init`` until infeasible, then bisects until the bracket is at most ``tol`` wide;
    returns its feasible end (``gamma + tol`` is then at or past the first infeasible value seen).
    Unbounded sets stop after 60 doublings.

    Example:
        >>> round(largest_gamma(lambda g: g <= 3.3, tol=1e-3, gamma_init=1.0), 2)
        3.3
    """
    if not (tol > 0 and gamma_init > 0):
        raise ValueError(f"Expected `tol` and `gamma_init` to be positive, but got {tol} and {gamma_init}.")
    low, high = 0.0, gamma_init
    for _ in range(60):
        if not feasible(high):
            break
        low, high = high, 2.0 * high
    else:
        return low
    while high - low > tol:
        middle = (low + high) / 2
        if feasible(middle):
            low = middle
        else:
            high = middle
    return low


def _pairwise_sq(a: Tensor, b: Tensor) -> Tensor:
    return torch.cdist(a.unsqueeze(0), b.unsqueeze(0)).squeeze(0).square()


def min_max(
    honest: Tensor, kind: Perturbation | str = Perturbation.STD, tol: float = 1e-3, gamma_init: float = 10.0
) -> tuple[Tensor, float]:
    """``(mu + gamma p, gamma)`` with the largest ``gamma`` for which the largest squared distance to
    an honest update is at most the largest squared distance between two honest updates.

    Example:
        >>> honest = torch.tensor([[0.0], [2.0]])  # mu = 1, p = -sigma = -1, bound 4
        >>> update, gamma = min_max(honest, tol=1e-4)
        >>> round(gamma, 3), round(update.item(), 3)  # (1 - gamma - 2)^2 <= 4
        (1.0, 0.0)
    """
    honest = _honest(honest)
    mu, p = honest.mean(dim=0), perturbation(honest, kind)
    bound = _pairwise_sq(honest, honest).max()

    def feasible(gamma: float) -> bool:
        return bool(_pairwise_sq((mu + gamma * p).unsqueeze(0), honest).max() <= bound)

    gamma = largest_gamma(feasible, tol, gamma_init)
    return mu + gamma * p, gamma


def min_sum(
    honest: Tensor, kind: Perturbation | str = Perturbation.STD, tol: float = 1e-3, gamma_init: float = 10.0
) -> tuple[Tensor, float]:
    """``(mu + gamma p, gamma)`` with the largest ``gamma`` for which the sum of squared distances to
    the honest updates is at most the largest such sum of an honest update.

    Example:
        >>> honest = torch.tensor([[0.0], [2.0]])  # sums: 4 for each honest; (1 - g)^2 + (1 + g)^2 <= 4
        >>> update, gamma = min_sum(honest, tol=1e-4)
        >>> round(gamma, 3), round(update.item(), 3)
        (1.0, 0.0)
    """
    honest = _honest(honest)
    mu, p = honest.mean(dim=0), perturbation(honest, kind)
    bound = _pairwise_sq(honest, honest).sum(dim=1).max()

    def feasible(gamma: float) -> bool:
        return bool(_pairwise_sq((mu + gamma * p).unsqueeze(0), honest).sum() <= bound)

    gamma = largest_gamma(feasible, tol, gamma_init)
    return mu + gamma * p, gamma


def flip_labels(target: Tensor, how: LabelFlip | str = LabelFlip.ERASE) -> Tensor:
    """Alter a batch of tumour masks (or class labels in {0, 1}) in place: erase or invert them.

    Example:
        >>> mask = torch.tensor([[0.0, 1.0], [1.0, 0.0]])
        >>> flip_labels(mask, "invert").tolist()
        [[1.0, 0.0], [0.0, 1.0]]
        >>> flip_labels(mask, "erase").tolist()
        [[0.0, 0.0], [0.0, 0.0]]
    """
    how = LabelFlip(how)
    if how is LabelFlip.ERASE:
        return target.zero_()
    if target.dtype == torch.bool:
        return target.logical_not_()
    return torch.sub(1, target, out=target)
