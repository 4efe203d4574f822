"""Robust aggregation over every site's state of a round: median, trimmed mean, (multi-)Krum. No Lightning.

* Coordinate-wise median and coordinate-wise beta-trimmed mean: Yin, Chen, Ramchandran and
  Bartlett, "Byzantine-Robust Distributed Learning: Towards Optimal Statistical Rates", ICML 2018.
* Krum and multi-Krum: Blanchard, El Mhamdi, Guerraoui and Stainer, "Machine Learning with
  Adversaries: Byzantine Tolerant Gradient Descent", NeurIPS 2017.

The papers aggregate updates ``y_i - x_t``; these functions aggregate the states ``y_i`` directly,
which gives the same new global state: the coordinate-wise median and trimmed mean commute with a
shift by ``x_t``, and Krum's distances do not change under it.

Decisions:

* **Sample weights are not used.** A faulty site can report any sample count, so the robust rules
  are unweighted, as in the papers; the weights are only checked (one positive finite weight per
  site) so that the engine can call every :class:`~lightning_fedseg.federation.server.ServerStep`
  alike.
* **Floating tensors** (parameters and float buffers such as BatchNorm running statistics) all go
  through the rule; for Krum they all count in the distances (as one flattened vector per site).
* **Integer and boolean buffers** (``num_batches_tracked``): for the median and the trimmed mean,
  the coordinate-wise *lower* median over the sites (always one site's actual value, so it stays an
  integer); for Krum and multi-Krum, the value of the best-scored site.
* Site states are checked like FedAvg's (same keys, shapes and dtypes as the global state, finite
  values); a site sending NaN or Inf stops the round with
  :class:`~lightning_fedseg.federation.aggregate.NonFiniteStateError`.

Memory: every site's state of the round is held at once; see :func:`robust_memory_bytes`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from enum import StrEnum
from typing import Any

import torch
from torch import Tensor

from lightning_fedseg._validation import check_int
from lightning_fedseg.federation.aggregate import check_compatible, check_finite
from lightning_fedseg.federation.server import ServerStep

__all__ = [
    "CoordinateMedian",
    "Krum",
    "RobustMethod",
    "TrimmedMean",
    "coordinate_median",
    "krum",
    "krum_scores",
    "krum_select",
    "robust_memory_bytes",
    "trimmed_mean",
]

State = Mapping[str, Tensor]


class RobustMethod(StrEnum):
    """The robust rules, for :func:`robust_memory_bytes`."""

    MEDIAN = "median"
    TRIMMED_MEAN = "trimmed_mean"
    KRUM = "krum"


def _check_states(site_states: Sequence[State], reference: State | None = None) -> State:
    if not site_states:
        raise ValueError("Cannot aggregate zero sites: no site state was given.")
    reference = site_states[0] if reference is None else reference
    for index, state in enumerate(site_states):
        check_compatible(reference, state, site=f"#{index}")
        check_finite(state, site=f"#{index}")
    return reference


def _stack(site_states: Sequence[State], key: str) -> Tensor:
    return torch.stack([state[key].detach() for state in site_states])


def _lower_median(stacked: Tensor) -> Tensor:
    dtype = stacked.dtype
    return stacked.to(torch.int64).median(dim=0).values.to(dtype)


def coordinate_median(site_states: Sequence[State]) -> dict[str, Tensor]:
    """Each coordinate's median over the sites; with an even count, the mean of the two middle values.

    Example:
        >>> sites = [{"w": torch.tensor([v, -v])} for v in (1.0, 5.0, 2.0, 100.0)]
        >>> coordinate_median(sites)["w"].tolist()  # (2 + 5) / 2 and (-2 - 5) / 2
        [3.5, -3.5]
    """
    reference = _check_states(site_states)
    n = len(site_states)
    out: dict[str, Tensor] = {}
    for key, ref in reference.items():
        stacked = _stack(site_states, key)
        if not ref.is_floating_point():
            out[key] = _lower_median(stacked)
            continue
        ordered = stacked.sort(dim=0).values
        low, high = ordered[(n - 1) // 2].to(torch.float64), ordered[n // 2].to(torch.float64)
        out[key] = ((low + high) / 2).to(ref.dtype)
    return out


def _check_beta(beta: float) -> float:
    if not (isinstance(beta, int | float) and 0.0 <= beta < 0.5):
        raise ValueError(f"Expected `beta` to be in [0, 0.5), but got {beta!r}.")
    return float(beta)


def trimmed_mean(site_states: Sequence[State], beta: float) -> dict[str, Tensor]:
    """Each coordinate's mean after dropping its ``floor(beta * n)`` largest and smallest values.

    Args:
        site_states: every site's state of the round.
        beta: the fraction trimmed at each end, in [0, 0.5); 0 is the plain (unweighted) mean.

    Example:
        >>> sites = [{"w": torch.tensor([v])} for v in (1.0, 2.0, 3.0, 4.0, 1000.0)]
        >>> trimmed_mean(sites, beta=0.2)["w"].tolist()  # drop 1 and 1000: (2 + 3 + 4) / 3
        [3.0]
    """
    beta = _check_beta(beta)
    reference = _check_states(site_states)
    n = len(site_states)
    trimmed = math.floor(beta * n + 1e-9)
    out: dict[str, Tensor] = {}
    for key, ref in reference.items():
        stacked = _stack(site_states, key)
        if not ref.is_floating_point():
            out[key] = _lower_median(stacked)
            continue
        kept = stacked.sort(dim=0).values[trimmed : n - trimmed]
        out[key] = kept.to(torch.float64).mean(dim=0).to(ref.dtype)
    return out


def _check_krum(num_sites: int, num_byzantine: int, multi: int) -> None:
    if num_sites <= 2 * num_byzantine + 2:
        raise ValueError(
            f"Krum with `num_byzantine`={num_byzantine} needs more than 2 * {num_byzantine} + 2 ="
            f" {2 * num_byzantine + 2} sites, but got {num_sites}."
        )
    if multi > num_sites - num_byzantine:
        raise ValueError(
            f"Expected `multi` to be at most the {num_sites} - {num_byzantine} sites assumed correct, but got {multi}."
        )


def krum_scores(site_states: Sequence[State], num_byzantine: int) -> Tensor:
    """Krum scores: each site's sum of squared distances to its ``n - f - 2`` nearest other sites.

    Distances are over all floating tensors of the states, as one flattened float64 vector per site
    (accumulated tensor by tensor, without building the vectors).

    Example:
        >>> sites = [{"w": torch.tensor([v])} for v in (0.0, 1.0, 2.0, 10.0)]
        >>> krum_scores(sites, num_byzantine=0).tolist()  # 2 nearest: 1 + 4, 1 + 1, 1 + 4, 64 + 81
        [5.0, 2.0, 5.0, 145.0]
    """
    reference = _check_states(site_states)
    n = len(site_states)
    num_byzantine = check_int("num_byzantine", num_byzantine, minimum=0)
    _check_krum(n, num_byzantine, 1)
    floating = [key for key, ref in reference.items() if ref.is_floating_point()]
    device = reference[floating[0]].device if floating else torch.device("cpu")
    distances = torch.zeros(n, n, dtype=torch.float64, device=device)
    for key in floating:
        flat = _stack(site_states, key).reshape(n, -1).to(device=device, dtype=torch.float64)
        for i in range(n):
            distances[i] += (flat - flat[i]).square().sum(dim=1)
    others = distances.masked_fill(torch.eye(n, dtype=torch.bool, device=device), math.inf)
    return others.sort(dim=1).values[:, : n - num_byzantine - 2].sum(dim=1).cpu()


def krum_select(site_states: Sequence[State], num_byzantine: int, multi: int = 1) -> list[int]:
    """Indices of the ``multi`` best-scored sites, best first (ties: the lower index first).

    Example:
        >>> sites = [{"w": torch.tensor([v])} for v in (0.0, 1.0, 2.0, 10.0)]
        >>> krum_select(sites, num_byzantine=0, multi=2)
        [1, 0]
    """
    multi = check_int("multi", multi)
    _check_krum(len(site_states), num_byzantine, multi)
    scores = krum_scores(site_states, num_byzantine)
    return torch.argsort(scores, stable=True)[:multi].tolist()


def krum(site_states: Sequence[State], num_byzantine: int, multi: int = 1) -> dict[str, Tensor]:
    """Krum (``multi=1``: the best-scored site's state) or multi-Krum (the mean of the ``multi`` best).

    Floating tensors are the unweighted mean over the selected sites; integer and boolean buffers
    are the best-scored site's.

    Args:
        site_states: every site's state of the round (``n > 2 * num_byzantine + 2`` of them).
        num_byzantine: ``f``, the number of faulty sites assumed.
        multi: ``m``, how many best-scored sites are averaged, at most ``n - f``.

    Example:
        >>> sites = [{"w": torch.tensor([v])} for v in (0.0, 1.0, 2.0, 10.0)]
        >>> krum(sites, num_byzantine=0)["w"].item(), krum(sites, num_byzantine=0, multi=3)["w"].item()
        (1.0, 1.0)
    """
    return _mean_of_selected(site_states, krum_select(site_states, num_byzantine, multi))


def _mean_of_selected(site_states: Sequence[State], selected: Sequence[int]) -> dict[str, Tensor]:
    best = site_states[selected[0]]
    out: dict[str, Tensor] = {}
    for key, ref in best.items():
        if ref.is_floating_point():
            out[key] = _stack([site_states[i] for i in selected], key).to(torch.float64).mean(dim=0).to(ref.dtype)
        else:
            out[key] = ref.detach().clone()
    return out


def robust_memory_bytes(state: State, num_sites: int, method: RobustMethod | str = RobustMethod.MEDIAN) -> int:
    """Estimated peak bytes of one robust aggregation of ``num_sites`` states shaped like ``state``.

    Every site's state of the round is held at once (``n * S`` bytes for a state of ``S`` bytes,
    against FedAvg's one float64 running sum) plus the output (``S``) plus a workspace for the
    largest tensor (``e`` elements of ``b`` bytes), which is processed one at a time:

    * median and trimmed mean: the stacked values, their sorted copy and sort's int64 indices,
      ``n * e * (2 * b + 8)``, plus an ``8 * e`` float64 mean;
    * Krum: the tensor stacked in float64 and one float64 difference, ``2 * 8 * n * e``, plus the
      ``n x n`` distance matrix.

    This is an estimate for planning (e.g. 32 sites of a 30 M-parameter float32 U-Net hold about
    3.8 GB); it is to be checked by measurement.

    Example:
        >>> robust_memory_bytes({"w": torch.zeros(1000)}, num_sites=4)  # 4 * 4000 + 4000 + 4 * 1000 * 16 + 8000
        92000
    """
    check_int("num_sites", num_sites)
    method = RobustMethod(method)
    n = num_sites
    sizes = [(t.numel(), t.element_size()) for t in state.values()]
    state_bytes = sum(e * b for e, b in sizes)
    held = n * state_bytes + state_bytes
    if not sizes:
        return held
    if method is RobustMethod.KRUM:
        largest = max(e for e, _ in sizes)
        return held + 2 * 8 * n * largest + 8 * n * n
    return held + max(n * e * (2 * b + 8) + 8 * e for e, b in sizes)


class _RobustStep(ServerStep):
    """A server step that needs every site's state: the engine calls :meth:`step_from_sites`."""

    needs_site_states = True

    def step(self, global_state: State, aggregate_state: State, round_idx: int) -> dict[str, Tensor]:
        raise TypeError(
            f"{type(self).__name__} needs every site's state, not their mean. HINT: call `step_from_sites`"
            " (its `needs_site_states` is True)."
        )

    def step_from_sites(
        self,
        global_state: State,
        site_states: Sequence[State],
        weights: Sequence[float],
        round_idx: int,
        sites: Sequence[str] = (),
    ) -> dict[str, Tensor]:
        self._check_sites(global_state, site_states, weights)
        return self._aggregate(site_states)

    @staticmethod
    def _check_sites(global_state: State, site_states: Sequence[State], weights: Sequence[float]) -> None:
        """One positive finite weight per state; states like the global state, finite."""
        if len(site_states) != len(weights):
            raise ValueError(f"Expected one weight per site state, but got {len(site_states)} and {len(weights)}.")
        for index, weight in enumerate(weights):
            if not (float(weight) > 0 and math.isfinite(float(weight))):
                raise ValueError(f"Expected the weight of site #{index} to be positive and finite, got {weight}.")
        _check_states(site_states, reference=global_state)

    def _aggregate(self, site_states: Sequence[State]) -> dict[str, Tensor]:
        raise NotImplementedError


class CoordinateMedian(_RobustStep):
    """The new global state is the coordinate-wise median of the sites' states (Yin et al., ICML 2018).

    Example:
        >>> sites = [{"w": torch.tensor([v])} for v in (1.0, 2.0, 50.0)]
        >>> CoordinateMedian().step_from_sites(sites[0], sites, [1, 1, 1], round_idx=0)
        {'w': tensor([2.])}
    """

    def _aggregate(self, site_states: Sequence[State]) -> dict[str, Tensor]:
        return coordinate_median(site_states)


class TrimmedMean(_RobustStep):
    """The new global state is the coordinate-wise beta-trimmed mean (Yin et al., ICML 2018).

    Args:
        beta: the fraction trimmed at each end of every coordinate, in [0, 0.5).

    Example:
        >>> sites = [{"w": torch.tensor([v])} for v in (1.0, 2.0, 3.0, 90.0)]
        >>> TrimmedMean(beta=0.25).step_from_sites(sites[0], sites, [1, 1, 1, 1], round_idx=0)
        {'w': tensor([2.5000])}
    """

    def __init__(self, beta: float = 0.1) -> None:
        super().__init__()
        self.beta = _check_beta(beta)

    def _aggregate(self, site_states: Sequence[State]) -> dict[str, Tensor]:
        return trimmed_mean(site_states, self.beta)

    def __repr__(self) -> str:
        return f"TrimmedMean(beta={self.beta})"


class Krum(_RobustStep):
    """The new global state is Krum's choice, or multi-Krum's mean (Blanchard et al., NeurIPS 2017).

    The indices of the last round's selected sites (best first) are kept in ``last_selected`` for
    logging; they are not needed to resume, so :meth:`state_dict` is empty.

    Args:
        num_byzantine: ``f``, the number of faulty sites assumed (each round needs more than ``2f + 2``).
        multi: ``m``, how many best-scored sites are averaged (1: Krum).

    Example:
        >>> sites = [{"w": torch.tensor([v])} for v in (0.0, 1.0, 2.0, 3.0, 40.0)]
        >>> step = Krum(num_byzantine=1)
        >>> step.step_from_sites(sites[0], sites, [1] * 5, round_idx=0), step.last_selected
        ({'w': tensor([1.])}, [1])
    """

    def __init__(self, num_byzantine: int = 1, multi: int = 1) -> None:
        super().__init__()
        self.num_byzantine = check_int("num_byzantine", num_byzantine, minimum=0)
        self.multi = check_int("multi", multi)
        self.last_selected: list[int] = []

    def setup_federation(
        self, num_sites: int, sample_rate: float, sites_per_round: int, sites: Sequence[str] = ()
    ) -> None:
        _check_krum(sites_per_round, self.num_byzantine, self.multi)

    def _aggregate(self, site_states: Sequence[State]) -> dict[str, Tensor]:
        self.last_selected = krum_select(site_states, self.num_byzantine, self.multi)
        return _mean_of_selected(site_states, self.last_selected)

    def state_dict(self) -> dict[str, Any]:
        return {}

    def __repr__(self) -> str:
        return f"Krum(num_byzantine={self.num_byzantine}, multi={self.multi})"
