"""Pre-aggregators: mix a round's updates, then hand any rule the mixed ones. No Lightning.

* Bucketing (Karimireddy, He and Jaggi, "Byzantine-Robust Learning on Heterogeneous Datasets via
  Bucketing", ICLR 2022): the updates in a seeded random order, averaged in buckets of
  ``bucket_size``; the inner rule aggregates the bucket means.
* Nearest-neighbour mixing (Allouah et al., "Fixing by Mixing", AISTATS 2023): each update replaced
  by the mean of its ``n - f`` nearest updates (itself included); the inner rule aggregates those.

Decisions:

* The inner rule gets states (``x_t`` plus the mixed updates, see
  :mod:`~lightning_fedseg.federation.robust_updates`), so any server step can be inside (FedAvg,
  median, Krum, centered clipping); each with weight 1 (unweighted by sample count, as in the
  papers: a Byzantine site reports its own count). Bucket states carry no site names.
* Integer buffers (``num_batches_tracked``): each bucket gets the lower median of its members, each
  mixed update its own site's.
* Bucketing's order is a pure function of ``(seed, round)``, the same on every process.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from lightning_fedseg._validation import check_int
from lightning_fedseg.federation.modes import derive_seed
from lightning_fedseg.federation.robust import _RobustStep
from lightning_fedseg.federation.robust_updates import stack_updates, states_from_updates
from lightning_fedseg.federation.server import ServerStep

__all__ = ["Bucketing", "NearestNeighborMixing", "bucket_means", "nearest_neighbor_mix"]

State = Mapping[str, Tensor]


def bucket_means(updates: Tensor, bucket_size: int, generator: torch.Generator) -> tuple[Tensor, list[list[int]]]:
    """The means of buckets of ``bucket_size`` updates in a random order; the last may be smaller.

    Example:
        >>> means, buckets = bucket_means(torch.tensor([[1.0], [2.0], [3.0]]), 2, torch.Generator().manual_seed(0))
        >>> sorted(len(b) for b in buckets), means.sum().item() == sum(means[i].item() for i in range(2))
        ([1, 2], True)
    """
    order = torch.randperm(updates.shape[0], generator=generator).tolist()  # on the CPU: the same everywhere
    buckets = [order[i : i + bucket_size] for i in range(0, len(order), bucket_size)]
    return torch.stack([updates[b].mean(dim=0) for b in buckets]), buckets


def nearest_neighbor_mix(updates: Tensor, num_byzantine: int) -> Tensor:
    """Each update replaced by the mean of its ``n - f`` nearest updates, itself included (ties: lower index).

    Example:
        >>> nearest_neighbor_mix(torch.tensor([[0.0], [1.0], [10.0]]), num_byzantine=1).tolist()
        [[0.5], [0.5], [5.5]]
    """
    n = updates.shape[0]
    keep = n - num_byzantine
    distances = torch.cdist(updates.unsqueeze(0), updates.unsqueeze(0)).squeeze(0)
    nearest = torch.argsort(distances, dim=1, stable=True)[:, :keep]
    # one (n, n) mixing matrix: indexing updates[nearest] would hold n * (n - f) updates at once
    mixing = torch.zeros(n, n, dtype=updates.dtype, device=updates.device).scatter_(1, nearest, 1.0 / keep)
    return mixing @ updates


class _PreAggregator(_RobustStep):
    """Mixes the updates, then hands the inner rule states ``x_t + mixed update``."""

    def __init__(self, inner: ServerStep) -> None:
        super().__init__()
        if not isinstance(inner, ServerStep):
            raise TypeError(f"Expected `inner` to be a ServerStep, but got {type(inner).__name__}.")
        self.inner = inner

    def setup(self, param_keys: Iterable[str]) -> None:
        super().setup(param_keys)
        self.inner.setup(param_keys)

    def metrics(self) -> dict[str, float]:
        return self.inner.metrics()

    def state_dict(self) -> dict[str, Any]:
        return {"inner": self.inner.state_dict()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.inner.load_state_dict(state.get("inner", {}))


class Bucketing(_PreAggregator):
    """Bucketing (Karimireddy et al., ICLR 2022): bucket means of ``bucket_size`` updates, in a
    seeded random order, aggregated by ``inner``.

    Args:
        inner: the rule applied to the bucket means (e.g. :class:`CenteredClipping`, Krum).
        bucket_size: ``s``, updates per bucket (1: the inner rule alone, in a shuffled order).
        seed: the order of round ``t`` is drawn from ``(seed, t)``, the same on every process.

    Example:
        >>> from lightning_fedseg.federation.robust import CoordinateMedian
        >>> sites = [{"w": torch.tensor([v])} for v in (1.0, 1.0, 1.0, 1.0, 9.0, 9.0)]
        >>> out = Bucketing(CoordinateMedian(), bucket_size=2).step_from_sites(sites[0], sites, [1] * 6, round_idx=0)
        >>> 1.0 <= out["w"].item() <= 9.0
        True
    """

    def __init__(self, inner: ServerStep, bucket_size: int = 2, seed: int = 0) -> None:
        super().__init__(inner)
        self.bucket_size = check_int("bucket_size", bucket_size)
        self.seed = check_int("seed", seed, minimum=0)

    def setup_federation(
        self, num_sites: int, sample_rate: float, sites_per_round: int, sites: Sequence[str] = ()
    ) -> None:
        buckets = math.ceil(sites_per_round / self.bucket_size)
        self.inner.setup_federation(math.ceil(num_sites / self.bucket_size), sample_rate, buckets)

    def step_from_sites(
        self,
        global_state: State,
        site_states: Sequence[State],
        weights: Sequence[float],
        round_idx: int,
        sites: Sequence[str] = (),
    ) -> dict[str, Tensor]:
        self._check_sites(global_state, site_states, weights)
        generator = torch.Generator().manual_seed(derive_seed(self.seed, round_idx, 26))
        means, buckets = bucket_means(stack_updates(global_state, site_states), self.bucket_size, generator)
        states = states_from_updates(global_state, means, [[site_states[i] for i in b] for b in buckets])
        return self.inner.step_from_sites(global_state, states, [1.0] * len(states), round_idx)

    def __repr__(self) -> str:
        return f"Bucketing({self.inner!r}, bucket_size={self.bucket_size}, seed={self.seed})"


class NearestNeighborMixing(_PreAggregator):
    """Nearest-neighbour mixing (Allouah et al., AISTATS 2023): each update becomes the mean of its
    ``n - f`` nearest, then ``inner`` aggregates them (needs ``n > 2f``).

    Example:
        >>> from lightning_fedseg.federation.robust import CoordinateMedian
        >>> sites = [{"w": torch.tensor([v])} for v in (0.0, 1.0, 2.0, 30.0, 40.0)]
        >>> NearestNeighborMixing(CoordinateMedian(), 2).step_from_sites(sites[0], sites, [1] * 5, round_idx=0)
        {'w': tensor([1.])}
    """

    def __init__(self, inner: ServerStep, num_byzantine: int = 1) -> None:
        super().__init__(inner)
        self.num_byzantine = check_int("num_byzantine", num_byzantine, minimum=0)

    def _check(self, sites_per_round: int) -> None:
        if sites_per_round <= 2 * self.num_byzantine:
            raise ValueError(
                f"NearestNeighborMixing with `num_byzantine`={self.num_byzantine} needs more than"
                f" 2 * {self.num_byzantine} = {2 * self.num_byzantine} sites per round, but got {sites_per_round}."
            )

    def setup_federation(
        self, num_sites: int, sample_rate: float, sites_per_round: int, sites: Sequence[str] = ()
    ) -> None:
        self._check(sites_per_round)
        self.inner.setup_federation(num_sites, sample_rate, sites_per_round, sites=sites)

    def step_from_sites(
        self,
        global_state: State,
        site_states: Sequence[State],
        weights: Sequence[float],
        round_idx: int,
        sites: Sequence[str] = (),
    ) -> dict[str, Tensor]:
        self._check_sites(global_state, site_states, weights)
        self._check(len(site_states))
        mixed = nearest_neighbor_mix(stack_updates(global_state, site_states), self.num_byzantine)
        states = states_from_updates(global_state, mixed, [[s] for s in site_states])
        return self.inner.step_from_sites(global_state, states, [1.0] * len(states), round_idx, sites=sites)

    def __repr__(self) -> str:
        return f"NearestNeighborMixing({self.inner!r}, num_byzantine={self.num_byzantine})"
