"""Robust aggregation of a round's updates: norm bounding, centered clipping, geometric median. No Lightning.

The pre-aggregators that wrap any rule (bucketing, nearest-neighbour mixing) are in
:mod:`~lightning_fedseg.federation.preaggregation`.

* Norm bounding (Sun, Kairouz, Suresh and McMahan, "Can You Really Backdoor Federated Learning?",
  2019): each update clipped to norm ``max_norm``, then averaged.
* Centered clipping (Karimireddy, He and Jaggi, "Learning from History for Byzantine Robust
  Optimization", ICML 2021): ``v <- v + mean_i clip_tau(Delta_i - v)``, ``iterations`` times,
  from the last round's aggregate update ``v`` (kept across rounds, and in the checkpoint).
* Geometric median by smoothed Weiszfeld (Pillutla, Kakade and Harchaoui, "Robust Aggregation for
  Federated Learning", IEEE TSP 2022, RFA): ``v <- sum_i b_i Delta_i / sum_i b_i`` with
  ``b_i = a_i / max(nu, ||v - Delta_i||)``, from the mean.

An update is ``Delta_i = y_i - x_t`` (a site's state minus the round's global state) over every
floating tensor of the state (parameters and float buffers such as BatchNorm statistics, as in
:mod:`~lightning_fedseg.federation.robust`), as one flat float64 vector; the new global state is
``x_t`` plus the aggregate update.

Decisions:

* **Unweighted by sample count**, as in the papers of norm bounding and centered clipping: a
  Byzantine site reports its own count. RFA weights the geometric median by sample share
  (``weighted=True``), but off by default for the same reason.
* **Integer buffers** (``num_batches_tracked``) take the sites' coordinate-wise lower median, as the
  coordinate median does.
* Memory: every site's update is held at once as float64, ``8 n d`` bytes for ``d`` floating values.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from lightning_fedseg._validation import check_int
from lightning_fedseg.federation.robust import _RobustStep

__all__ = [
    "CenteredClipping",
    "GeometricMedian",
    "NormBounding",
    "UpdateRule",
    "centered_clip",
    "geometric_median",
    "norm_bound",
    "stack_updates",
    "states_from_updates",
]

State = Mapping[str, Tensor]


# ---------------------------------------------------------------------- states <-> updates
def _floating(state: State) -> list[str]:
    return [key for key, value in state.items() if value.is_floating_point()]


def stack_updates(global_state: State, site_states: Sequence[State]) -> Tensor:
    """The ``(n, d)`` float64 matrix of the sites' updates over the floating tensors.

    Example:
        >>> g = {"w": torch.tensor([1.0, 1.0]), "n": torch.tensor(3)}
        >>> stack_updates(g, [{"w": torch.tensor([2.0, 0.0]), "n": torch.tensor(4)}]).tolist()
        [[1.0, -1.0]]
    """
    keys = _floating(global_state)
    rows = [
        torch.cat([(s[k].detach().double() - global_state[k].detach().double()).reshape(-1) for k in keys])
        if keys
        else torch.zeros(0, dtype=torch.float64)
        for s in site_states
    ]
    return torch.stack(rows)


def _lower_median(values: Sequence[Tensor]) -> Tensor:
    stacked = torch.stack([v.detach() for v in values])
    return stacked.to(torch.int64).median(dim=0).values.to(stacked.dtype)


def states_from_updates(
    global_state: State, updates: Tensor, integer_sources: Sequence[Sequence[State]]
) -> list[dict[str, Tensor]]:
    """States ``x_t + updates[j]`` (in each floating tensor's dtype); integer and boolean buffers are
    the lower median over ``integer_sources[j]``.

    Example:
        >>> g = {"w": torch.tensor([1.0]), "n": torch.tensor(3)}
        >>> states_from_updates(g, torch.tensor([[0.5]]), [[{"n": torch.tensor(5)}, {"n": torch.tensor(7)}]])
        [{'w': tensor([1.5000]), 'n': tensor(5)}]
    """
    out: list[dict[str, Tensor]] = []
    for update, sources in zip(updates, integer_sources, strict=True):
        state: dict[str, Tensor] = {}
        offset = 0
        for key, value in global_state.items():
            if value.is_floating_point():
                part = update[offset : offset + value.numel()].view(value.shape)
                offset += value.numel()
                state[key] = (value.detach().double() + part).to(value.dtype)
            else:
                state[key] = _lower_median([s[key] for s in sources])
        out.append(state)
    return out


# ---------------------------------------------------------------------- pure rules
def _norms(updates: Tensor) -> Tensor:
    return torch.linalg.vector_norm(updates, dim=1)


def _clip_factors(norms: Tensor, radius: float) -> Tensor:
    if math.isinf(radius):
        return torch.ones_like(norms)
    return torch.clamp(radius / norms.clamp_min(1e-300), max=1.0)


def norm_bound(updates: Tensor, max_norm: float) -> Tensor:
    """The mean of the updates, each clipped to ``max_norm`` (Sun et al. 2019).

    Example (clipped to (0.6, 0.8) and (0, 1)):
        >>> [round(v, 6) for v in norm_bound(torch.tensor([[3.0, 4.0], [0.0, 1.0]]), max_norm=1.0).tolist()]
        [0.3, 0.9]
    """
    return (updates * _clip_factors(_norms(updates), max_norm).unsqueeze(1)).mean(dim=0)


def centered_clip(updates: Tensor, center: Tensor, radius: float, iterations: int = 1) -> Tensor:
    """``v <- v + mean_i (Delta_i - v) min(1, radius / ||Delta_i - v||)`` from ``v = center``.

    Example:
        >>> updates = torch.tensor([[1.0], [2.0], [100.0]])
        >>> centered_clip(updates, torch.tensor([1.0]), radius=2.0).tolist()  # 1 + (0 + 1 + 2) / 3
        [2.0]
    """
    v = center.to(torch.float64)
    for _ in range(iterations):
        diff = updates - v
        v = v + (diff * _clip_factors(_norms(diff), radius).unsqueeze(1)).mean(dim=0)
    return v


def geometric_median(
    updates: Tensor,
    weights: Tensor | None = None,
    nu: float = 1e-6,
    max_iterations: int = 100,
    tol: float = 1e-6,
) -> tuple[Tensor, int]:
    """The (weighted) geometric median by smoothed Weiszfeld (RFA); returns it and the iterations run.

    Stops when an iteration moves ``v`` by at most ``tol`` times ``||v||`` (plus ``nu``). Not RFA's
    relative change of the objective: an outlier far away dominates the objective, which then stops
    improving in relative terms long before ``v`` has settled among the other updates.

    Example:
        >>> points = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
        >>> median, _ = geometric_median(points)
        >>> median.tolist()  # the square's centre
        [0.5, 0.5]
    """
    n = updates.shape[0]
    if weights is None:
        alpha = torch.full((n,), 1.0 / n, dtype=torch.float64, device=updates.device)
    else:
        alpha = weights.to(device=updates.device, dtype=torch.float64) / weights.sum()
    v = (alpha.unsqueeze(1) * updates).sum(dim=0)
    for iteration in range(1, max_iterations + 1):
        beta = alpha / _norms(updates - v).clamp_min(nu)
        previous, v = v, (beta.unsqueeze(1) * updates).sum(dim=0) / beta.sum()
        if float(torch.linalg.vector_norm(v - previous)) <= tol * (float(torch.linalg.vector_norm(v)) + nu):
            return v, iteration
    return v, max_iterations


# ---------------------------------------------------------------------- server steps
class UpdateRule(_RobustStep):
    """Base: a rule on the round's updates; the new global state is ``x_t`` plus their aggregate."""

    def step_from_sites(
        self,
        global_state: State,
        site_states: Sequence[State],
        weights: Sequence[float],
        round_idx: int,
        sites: Sequence[str] = (),
    ) -> dict[str, Tensor]:
        self._check_sites(global_state, site_states, weights)
        updates = stack_updates(global_state, site_states)
        aggregate = self.aggregate(updates, torch.tensor([float(w) for w in weights], dtype=torch.float64))
        return states_from_updates(global_state, aggregate.unsqueeze(0), [site_states])[0]

    def aggregate(self, updates: Tensor, weights: Tensor) -> Tensor:
        """The aggregate update from the ``(n, d)`` updates (and the reported sample counts)."""
        raise NotImplementedError


def _check_radius(name: str, value: float) -> float:
    if not (isinstance(value, int | float) and value > 0):
        raise ValueError(f"Expected `{name}` to be positive (inf allowed), but got {value!r}.")
    return float(value)


class NormBounding(UpdateRule):
    """Each update clipped to ``max_norm``, then the unweighted mean (Sun et al. 2019).

    Metrics: the fraction of sites clipped and the median update norm (to choose ``max_norm``).

    Example:
        >>> sites = [{"w": torch.tensor([v, 0.0])} for v in (1.0, 2.0, 40.0)]
        >>> NormBounding(max_norm=2.0).step_from_sites({"w": torch.zeros(2)}, sites, [1, 1, 1], round_idx=0)
        {'w': tensor([1.6667, 0.0000])}
    """

    def __init__(self, max_norm: float) -> None:
        super().__init__()
        self.max_norm = _check_radius("max_norm", max_norm)
        self.clipped = self.median_norm = 0.0

    def aggregate(self, updates: Tensor, weights: Tensor) -> Tensor:
        norms = _norms(updates)
        self.clipped = float((norms > self.max_norm).double().mean())
        self.median_norm = float(norms.median())
        return norm_bound(updates, self.max_norm)

    def metrics(self) -> dict[str, float]:
        return {"norm_bounding/clipped_fraction": self.clipped, "norm_bounding/median_norm": self.median_norm}

    def __repr__(self) -> str:
        return f"NormBounding(max_norm={self.max_norm})"


class CenteredClipping(UpdateRule):
    """Centered clipping around the last round's aggregate update (Karimireddy et al., ICML 2021).

    The centre starts at zero and is the aggregate update of the last round after that; it is in
    :meth:`state_dict`, so a resumed run continues exactly. Metrics: the fraction of sites clipped
    and the median distance of the updates to the centre (to choose ``radius``).

    Args:
        radius: ``tau``, the clipping radius (``inf``: the plain mean).
        iterations: ``L``, clipping iterations per round (the paper finds 1 enough).

    Example:
        >>> step = CenteredClipping(radius=1.0)
        >>> sites = [{"w": torch.tensor([v])} for v in (1.0, 2.0, 50.0)]
        >>> step.step_from_sites({"w": torch.zeros(1)}, sites, [1, 1, 1], round_idx=0)  # (1 + 1 + 1) / 3
        {'w': tensor([1.])}
    """

    def __init__(self, radius: float, iterations: int = 1) -> None:
        super().__init__()
        self.radius = _check_radius("radius", radius)
        self.iterations = check_int("iterations", iterations)
        self.center: Tensor | None = None
        self.clipped = self.median_norm = 0.0

    def aggregate(self, updates: Tensor, weights: Tensor) -> Tensor:
        if self.center is None:
            center = torch.zeros(updates.shape[1], dtype=torch.float64, device=updates.device)
        else:
            center = self.center.to(updates.device)
        if center.shape[0] != updates.shape[1]:
            raise ValueError(
                f"The stored centre has {center.shape[0]} values, but the updates have {updates.shape[1]}."
            )
        norms = _norms(updates - center)
        self.clipped = float((norms > self.radius).double().mean())
        self.median_norm = float(norms.median())
        self.center = centered_clip(updates, center, self.radius, self.iterations)
        return self.center

    def metrics(self) -> dict[str, float]:
        return {"centered_clipping/clipped_fraction": self.clipped, "centered_clipping/median_norm": self.median_norm}

    def state_dict(self) -> dict[str, Any]:
        return {} if self.center is None else {"center": self.center.clone()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        center = state.get("center")
        self.center = None if center is None else center.to(torch.float64).clone()

    def __repr__(self) -> str:
        return f"CenteredClipping(radius={self.radius}, iterations={self.iterations})"


class GeometricMedian(UpdateRule):
    """The geometric median of the updates by smoothed Weiszfeld (RFA, Pillutla et al. 2022).

    Args:
        nu: the smoothing ``nu`` (distances below it count as ``nu``).
        max_iterations: Weiszfeld iterations at most.
        tol: stop when an iteration moves the median by at most this fraction of its norm.
        weighted: weight by the reported sample counts, as RFA does (off: a Byzantine site reports
            its own count).

    Example:
        >>> sites = [{"w": torch.tensor([v])} for v in (1.0, 2.0, 3.0, 1000.0)]
        >>> out = GeometricMedian().step_from_sites({"w": torch.zeros(1)}, sites, [1] * 4, round_idx=0)
        >>> 2.0 <= out["w"].item() <= 3.0
        True
    """

    def __init__(self, nu: float = 1e-6, max_iterations: int = 100, tol: float = 1e-6, weighted: bool = False):
        super().__init__()
        self.nu = _check_radius("nu", nu)
        self.max_iterations = check_int("max_iterations", max_iterations)
        self.tol = _check_radius("tol", tol)
        self.weighted = bool(weighted)
        self.iterations = 0

    def aggregate(self, updates: Tensor, weights: Tensor) -> Tensor:
        median, self.iterations = geometric_median(
            updates, weights if self.weighted else None, self.nu, self.max_iterations, self.tol
        )
        return median

    def metrics(self) -> dict[str, float]:
        return {"geometric_median/iterations": float(self.iterations)}

    def __repr__(self) -> str:
        return f"GeometricMedian(nu={self.nu}, max_iterations={self.max_iterations}, weighted={self.weighted})"
