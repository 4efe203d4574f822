"""What a collaboration mode is: the plan it makes for a round and the decision it takes after it.

:class:`CollaborationMode` is the base class of every mode (:mod:`lightning_fedseg.federation.modes`
holds the paper's five). Each Trainer epoch is one round: the strategy asks the mode for the
round's :class:`RoundPlan` (site tasks and how their results combine) and, once the round has been
validated, hands the mode the round's metrics (:meth:`CollaborationMode.end_round`), which answers
with a :class:`RoundDecision`. Nothing here imports Lightning.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import Any, ClassVar

from torch import Tensor

__all__ = ["POOLED", "Aggregation", "CollaborationMode", "RoundDecision", "RoundPlan", "SiteTask"]

POOLED = "pooled"
"""The pseudo-site name of the pooled (centralized) data."""


class Aggregation(StrEnum):
    """How the site tasks of one round are combined."""

    MEAN = "mean"
    """Every task starts from the round's global weights; the result is their weighted mean."""
    CHAIN = "chain"
    """Each task starts from the previous task's result; the result is the last task's."""


@dataclass(frozen=True)
class SiteTask:
    """Local training of one site for ``epochs`` passes over its training data."""

    site: str
    epochs: int = 1


@dataclass(frozen=True)
class RoundPlan:
    """The site tasks of one round, in order, and how their results combine."""

    tasks: tuple[SiteTask, ...]
    aggregation: Aggregation

    @property
    def sites(self) -> tuple[str, ...]:
        return tuple(t.site for t in self.tasks)


@dataclass
class RoundDecision:
    """What a mode decides once a round has been validated."""

    weights: Mapping[str, Tensor] | None = None
    """Weights that replace the global model (IIL passing on its best weights)."""
    stop: bool = False
    """The collaboration is complete (IIL after its last site)."""


class CollaborationMode(ABC):
    """Base class: a policy that plans rounds over a fixed list of sites."""

    name: ClassVar[str]
    resets_each_round: ClassVar[bool] = False
    """Whether every round is a new visit of a site (FedAvg, CIIL), so that an optimizer state
    policy of ``reset`` restarts the site's optimizer each round."""
    decides_on_metrics: ClassVar[bool] = False
    """Whether :meth:`end_round` decides on the round's validation metrics (IIL), which then must
    exist every round."""

    def __init__(self) -> None:
        self.sites: tuple[str, ...] = ()

    def setup(self, sites: Sequence[str]) -> None:
        """Bind the mode to the sites of the data (called once the data is set up)."""
        if not sites:
            raise ValueError(f"The `{self.name}` mode needs at least one site, but the data has none.")
        self.sites = tuple(sites)

    @property
    def training_sites(self) -> tuple[str, ...]:
        """The sites that may train in some round of this collaboration (every site by default)."""
        return self.sites

    @abstractmethod
    def plan(self, round_idx: int) -> RoundPlan:
        """The site tasks of round ``round_idx`` (0-based)."""

    def end_round(
        self,
        round_idx: int,
        metrics: Mapping[str, float],
        weights: Callable[[], Mapping[str, Tensor]],
    ) -> RoundDecision:
        """Called after the round's validation with the logged metrics.

        ``weights()`` returns a CPU copy of the current global weights, for modes that keep some.
        """
        return RoundDecision()

    def metric_keys(self, round_idx: int) -> tuple[str, ...]:
        """The metrics :meth:`end_round` reads in round ``round_idx``: on several processes the
        strategy gathers exactly these (as tensors) from the process that logged them."""
        return ()

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:  # noqa: B027 (stateless by default)
        """Restore what :meth:`state_dict` returned."""

    def describe(self, round_idx: int) -> str:
        """One line for progress bars and logs."""
        return f"{self.name} round {round_idx}"

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"
