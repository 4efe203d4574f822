"""How a server step collects a round's site results: the one aggregation protocol the engine calls.

Each :class:`~lightning_fedseg.federation.server.ServerStep` makes one :class:`Aggregator` per fit
(:meth:`~lightning_fedseg.federation.server.ServerStep.aggregator`). Every round the engine calls
:meth:`Aggregator.start` with the round's global state, :meth:`Aggregator.add` once for each site
this process trained (as the site finishes, so that memory grows with the model, not the number of
sites), and :meth:`Aggregator.combine` once, with the transport: the aggregator moves what it
collected across processes and returns the next global state. The engine never asks which kind of
step it runs, so a new rule needs no engine edit; it picks (or writes) an aggregator.

The aggregators here:

* :class:`MeanAggregator`: a running sample-weighted sum (float64), one all-reduce (pairwise masked
  where masking is on), then ``ServerStep.step(global, mean)``: FedAvg and the FedOpt family.
* :class:`SiteStatesAggregator`: every site's own state, gathered in site order, then
  ``ServerStep.step_from_sites``: the robust rules. Over a hub (NVIDIA FLARE) the states go to the
  hub only, which runs the step (:class:`~lightning_fedseg.deploy.controller.FederatedController`).

DP-FedAvg's clipped and noised sum is :class:`~lightning_fedseg.federation.privacy.ClippedSumAggregator`.

Decisions:

* **Fewer than ``min_sites``.** :meth:`Aggregator.combine` applies no server step (so a stateful
  step's moments do not move) and returns ``None``; the engine then stops the run.
* **Finiteness.** :meth:`Aggregator.add` raises
  :class:`~lightning_fedseg.federation.aggregate.NonFiniteStateError` for NaN/Inf weights; the
  engine drops that site from the round.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping
from typing import TYPE_CHECKING

from torch import Tensor

from lightning_fedseg.federation.aggregate import (
    IntegerPolicy,
    WeightedMean,
    check_finite,
    finalize_mean,
    state_clone,
)

if TYPE_CHECKING:
    from lightning_fedseg.federation.server import ServerStep
    from lightning_fedseg.federation.transport import CommStats, Transport

__all__ = ["Aggregator", "MeanAggregator", "SiteStatesAggregator"]

State = Mapping[str, Tensor]


class Aggregator(ABC):
    """One fit's collection of site results, round by round, on one process."""

    def __init__(self) -> None:
        self.global_state: dict[str, Tensor] = {}
        self.count = 0

    def start(self, global_state: dict[str, Tensor]) -> None:
        """A round begins from ``global_state`` (not modified; kept until :meth:`combine`)."""
        self.global_state = global_state
        self.count = 0

    @abstractmethod
    def add(self, site: str, index: int, state: State, weight: float) -> None:
        """File the trained state of ``site`` (``index``: its place in the federation's site order)."""

    @abstractmethod
    def combine(
        self, transport: Transport, stats: CommStats, round_idx: int, min_sites: int
    ) -> tuple[dict[str, Tensor] | None, int]:
        """``(next global state, or None with fewer than min_sites sites; sites that contributed
        over all processes)``."""


class MeanAggregator(Aggregator):
    """The sample-weighted mean of the sites' states, then ``server.step(global, mean, round)``.

    Args:
        server: the server step.
        integer_policy: how integer buffers combine.
        masked: pairwise-mask each process's sum before the all-reduce.
    """

    def __init__(self, server: ServerStep, integer_policy: IntegerPolicy | str, masked: bool = False) -> None:
        super().__init__()
        self.server = server
        self.integer_policy = IntegerPolicy(integer_policy)
        self.masked = masked
        self.accumulator = WeightedMean(self.integer_policy)  # its buffers are reused from round to round

    def start(self, global_state: dict[str, Tensor]) -> None:
        super().start(global_state)
        self.accumulator.reset()

    def add(self, site: str, index: int, state: State, weight: float) -> None:
        self.accumulator.add(state, weight, site)  # checks finiteness
        self.count += 1

    def combine(
        self, transport: Transport, stats: CommStats, round_idx: int, min_sites: int
    ) -> tuple[dict[str, Tensor] | None, int]:
        sums, total = self.accumulator.sums()
        sums, total, succeeded = transport.all_reduce_sums(
            sums, total, self.count, self.global_state, stats, round_idx, masked=self.masked
        )
        if succeeded < min_sites or total <= 0:
            return None, succeeded
        mean = finalize_mean(sums, total, self.global_state, self.integer_policy)
        return self.server.step(self.global_state, mean, round_idx), succeeded


class SiteStatesAggregator(Aggregator):
    """Every site's own state, in site order on every process, then ``server.step_from_sites``."""

    def __init__(self, server: ServerStep, site_names: tuple[str, ...]) -> None:
        super().__init__()
        self.server = server
        self.site_names = site_names
        self.rows: list[tuple[int, float, dict[str, Tensor]]] = []

    def start(self, global_state: dict[str, Tensor]) -> None:
        super().start(global_state)
        self.rows = []

    def add(self, site: str, index: int, state: State, weight: float) -> None:
        check_finite(state, site)
        self.rows.append((index, weight, state_clone(state)))
        self.count += 1

    def combine(
        self, transport: Transport, stats: CommStats, round_idx: int, min_sites: int
    ) -> tuple[dict[str, Tensor] | None, int]:
        if transport.hub_runs_site_steps:  # over a hub (FLARE): the states go to the hub only, which runs the step
            keys = sorted(self.server.param_keys or ())
            new, count = transport.step_at_hub(self.rows, self.global_state, keys, stats, round_idx, min_sites)
            self.rows = []
            return new, count
        gathered = transport.gather_states(self.rows, self.global_state, stats, round_idx)
        self.rows = []
        if len(gathered) < min_sites:
            return None, len(gathered)
        states, weights = [g[2] for g in gathered], [g[1] for g in gathered]
        names = [self.site_names[g[0]] for g in gathered]
        new = self.server.step_from_sites(self.global_state, states, weights, round_idx, sites=names)
        return new, len(gathered)
