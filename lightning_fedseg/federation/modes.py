"""Collaboration modes: which sites train in a round, for how long, and how results combine.

A mode is a small, stateful policy object with no Lightning in it. Each Trainer epoch is one
collaboration round; the strategy asks the mode for the round's :class:`RoundPlan` (a sequence of
site tasks and how to combine them) and, once the round has been validated, tells the mode the
round's metrics through :meth:`CollaborationMode.end_round`. Everything a mode needs to continue
after an interruption is in :meth:`state_dict`.

The modes are those of Sheller et al. (2018):

=========  ===============================================================================
``cds``    centralized data sharing: one epoch over the pooled data per round (the baseline)
``fedavg`` every site (or a seeded fraction) trains ``local_epochs`` from the global weights;
           the global weights become the sample-weighted mean (FedAvg)
``ciil``   cyclic institutional incremental learning: one cycle through the sites per round,
           ``epochs_per_site`` each, passing the weights on
``iil``    institutional incremental learning: one pass through the sites; each trains until its
           own validation metric has not improved for ``patience`` epochs and passes on its best
           weights; one round is one epoch at the current site
``single`` one named site alone (the institution-only baseline)
=========  ===============================================================================
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
from torch import Tensor

from lightning_fedseg._validation import check_int
from lightning_fedseg.federation.round_plan import (
    POOLED,
    Aggregation,
    CollaborationMode,
    RoundDecision,
    RoundPlan,
    SiteTask,
)
from lightning_fedseg.federation.seeding import derive_seed, seed_torch

__all__ = [
    "CDS",
    "CIIL",
    "IIL",
    "POOLED",
    "Aggregation",
    "CollaborationMode",
    "FedAvg",
    "RoundDecision",
    "RoundPlan",
    "SingleSite",
    "SiteTask",
    "derive_seed",
    "mode_from_name",
    "seed_torch",
]


def check_order(order: Sequence[str] | None, sites: Sequence[str]) -> tuple[str, ...]:
    """The site order of a cycle or pass: ``order`` must name every site once.

    Example:
        >>> check_order(["b", "a"], ["a", "b"])
        ('b', 'a')
    """
    if order is None:
        return tuple(sites)
    order = tuple(str(s) for s in order)
    unknown = sorted(set(order) - set(sites))
    missing = [s for s in sites if s not in order]
    repeated = sorted({s for s in order if order.count(s) > 1})
    if unknown or missing or repeated:
        raise ValueError(
            f"Expected `order` to name every site of {list(sites)} exactly once, but got {list(order)}"
            f" (unknown: {unknown or 'none'}; missing: {missing or 'none'}; repeated: {repeated or 'none'})."
            " HINT: a site left out of the order would be left out of the collaboration; give the DataModule"
            " only the sites that take part."
        )
    return order


class CDS(CollaborationMode):
    """Centralized data sharing: ordinary training on the pooled data, one epoch per round."""

    name = "cds"

    def setup(self, sites: Sequence[str]) -> None:
        self.sites = tuple(sites)

    def plan(self, round_idx: int) -> RoundPlan:
        return RoundPlan((SiteTask(POOLED, 1),), Aggregation.CHAIN)


class SingleSite(CollaborationMode):
    """One institution alone (the institution-only baseline); never reads another site's data."""

    name = "single"

    def __init__(self, site: str | int = 0) -> None:
        super().__init__()
        self.site = site

    def setup(self, sites: Sequence[str]) -> None:
        super().setup(sites)
        if isinstance(self.site, int):
            if not 0 <= self.site < len(self.sites):
                raise ValueError(f"Expected `site` to index one of {len(self.sites)} sites, but got {self.site}.")
            self.site = self.sites[self.site]
        elif self.site not in self.sites:
            raise ValueError(f"Expected `site` to be one of {list(self.sites)}, but got {self.site!r}.")

    def plan(self, round_idx: int) -> RoundPlan:
        return RoundPlan((SiteTask(str(self.site), 1),), Aggregation.CHAIN)

    @property
    def training_sites(self) -> tuple[str, ...]:
        return (str(self.site),)

    def __repr__(self) -> str:
        return f"SingleSite(site={self.site!r})"


class FedAvg(CollaborationMode):
    """Federated averaging: sites train from the global weights; the global weights become their mean.

    Args:
        local_epochs: epochs each site trains per round (the paper's EpR; 1 on the real split).
        fraction: share of the sites that train each round, drawn with a seeded generator
            (1.0: every site every round, as in the paper).
        min_fraction_sites: lower bound on the number of sites drawn when ``fraction < 1``.
        seed: seed of the per-round site draw.
    """

    name = "fedavg"
    resets_each_round = True

    def __init__(
        self,
        local_epochs: int = 1,
        fraction: float = 1.0,
        min_fraction_sites: int = 1,
        seed: int = 0,
    ) -> None:
        super().__init__()
        self.local_epochs = check_int("local_epochs", local_epochs)
        if not 0.0 < fraction <= 1.0:
            raise ValueError(f"Expected `fraction` to be in (0, 1], but got {fraction}.")
        self.fraction = fraction
        self.min_fraction_sites = check_int("min_fraction_sites", min_fraction_sites)
        self.seed = seed

    def plan(self, round_idx: int) -> RoundPlan:
        sites = self.sites
        if self.fraction < 1.0:
            count = min(len(sites), max(self.min_fraction_sites, math.ceil(self.fraction * len(sites))))
            rng = np.random.default_rng(derive_seed(self.seed, round_idx))
            chosen = sorted(rng.choice(len(sites), size=count, replace=False).tolist())
            sites = tuple(sites[i] for i in chosen)
        return RoundPlan(tuple(SiteTask(s, self.local_epochs) for s in sites), Aggregation.MEAN)

    def __repr__(self) -> str:
        return f"FedAvg(local_epochs={self.local_epochs}, fraction={self.fraction})"


class CIIL(CollaborationMode):
    """Cyclic institutional incremental learning: each round is one cycle through the sites.

    Args:
        epochs_per_site: epochs each site trains per cycle (1 in the paper).
        order: the cycle's site order (default: the data's site order).
    """

    name = "ciil"
    resets_each_round = True

    def __init__(self, epochs_per_site: int = 1, order: Sequence[str] | None = None) -> None:
        super().__init__()
        self.epochs_per_site = check_int("epochs_per_site", epochs_per_site)
        self.order = tuple(order) if order is not None else None

    def setup(self, sites: Sequence[str]) -> None:
        super().setup(sites)
        self.sites = check_order(self.order, self.sites)

    def plan(self, round_idx: int) -> RoundPlan:
        return RoundPlan(tuple(SiteTask(s, self.epochs_per_site) for s in self.sites), Aggregation.CHAIN)

    def __repr__(self) -> str:
        return f"CIIL(epochs_per_site={self.epochs_per_site})"


class IIL(CollaborationMode):
    """Institutional incremental learning: one pass through the sites, each trained to a plateau.

    Each round is one epoch at the current site. After the round's validation the site's own
    metric (``monitor`` formatted with ``site`` and ``index``) is compared with its best so far;
    after ``patience`` epochs without improvement the best weights (not the last) are passed on to
    the next site. After the last site the run stops.

    Args:
        patience: epochs without improvement before moving on (8 in the paper).
        monitor: metric key template; ``{site}`` and ``{index}`` are filled in.
        mode: ``"max"`` (Dice) or ``"min"`` (loss).
        order: site order (default: the data's site order).
        max_epochs_per_site: optional cap on the epochs at one site.
        min_delta: smallest change that counts as an improvement.
    """

    name = "iil"
    decides_on_metrics = True

    def __init__(
        self,
        patience: int = 8,
        monitor: str = "val/{site}/dice",
        mode: str = "max",
        order: Sequence[str] | None = None,
        max_epochs_per_site: int | None = None,
        min_delta: float = 0.0,
    ) -> None:
        super().__init__()
        self.patience = check_int("patience", patience)
        if mode not in ("max", "min"):
            raise ValueError(f"Expected `mode` to be 'max' or 'min', but got {mode!r}.")
        if max_epochs_per_site is not None:
            check_int("max_epochs_per_site", max_epochs_per_site)
        self.monitor = monitor
        self.mode = mode
        self.order = tuple(order) if order is not None else None
        self.max_epochs_per_site = max_epochs_per_site
        self.min_delta = min_delta
        self.position = 0
        self.epochs_at_site = 0
        self.wait = 0
        self.best: float | None = None
        self.best_weights: dict[str, Tensor] | None = None
        self.history: list[dict[str, Any]] = []

    def setup(self, sites: Sequence[str]) -> None:
        super().setup(sites)
        self.sites = check_order(self.order, self.sites)

    @property
    def current_site(self) -> str:
        return self.sites[min(self.position, len(self.sites) - 1)]

    def plan(self, round_idx: int) -> RoundPlan:
        return RoundPlan((SiteTask(self.current_site, 1),), Aggregation.CHAIN)

    def _improved(self, value: float) -> bool:
        if self.best is None:
            return True
        if self.mode == "max":
            return value > self.best + self.min_delta
        return value < self.best - self.min_delta

    def end_round(
        self,
        round_idx: int,
        metrics: Mapping[str, float],
        weights: Callable[[], Mapping[str, Tensor]],
    ) -> RoundDecision:
        site = self.current_site
        key = self.metric_keys(round_idx)[0]
        self.epochs_at_site += 1
        if key in metrics:
            value = float(metrics[key])
            if self._improved(value) and math.isfinite(value):
                self.best, self.wait = value, 0
                self.best_weights = {k: v.clone() for k, v in weights().items()}
            else:
                self.wait += 1
        elif self.max_epochs_per_site is not None:
            # No validation data at this site: it trains `max_epochs_per_site` and passes on its last weights.
            value, self.best_weights = float("nan"), None
        else:
            raise ValueError(
                f"IIL monitors `{key}` for site {site!r}, but round {round_idx} logged no such metric"
                f" (logged: {sorted(metrics)}). A site without validation data cannot tell when it has"
                " converged. HINT: give every site validation subjects, set `max_epochs_per_site` (such a site"
                " then trains that many epochs and passes on its last weights), or set `monitor` to a key your"
                " LightningModule logs."
            )
        self.history.append({"round": round_idx, "site": site, "value": value, "wait": self.wait})
        capped = self.max_epochs_per_site is not None and self.epochs_at_site >= self.max_epochs_per_site
        if self.wait < self.patience and not capped:
            return RoundDecision()
        decision = RoundDecision(weights=self.best_weights)
        self.position += 1
        self.epochs_at_site, self.wait, self.best, self.best_weights = 0, 0, None, None
        decision.stop = self.position >= len(self.sites)
        return decision

    def metric_keys(self, round_idx: int) -> tuple[str, ...]:
        site = self.current_site
        return (self.monitor.format(site=site, index=self.sites.index(site)),)

    def describe(self, round_idx: int) -> str:
        return f"iil site {self.current_site} epoch {self.epochs_at_site + 1}"

    def state_dict(self) -> dict[str, Any]:
        return {
            "position": self.position,
            "epochs_at_site": self.epochs_at_site,
            "wait": self.wait,
            "best": self.best,
            "best_weights": self.best_weights,
            "history": copy.deepcopy(self.history),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.position = int(state["position"])
        self.epochs_at_site = int(state["epochs_at_site"])
        self.wait = int(state["wait"])
        self.best = state["best"]
        self.best_weights = state["best_weights"]
        self.history = list(state["history"])

    def __repr__(self) -> str:
        return f"IIL(patience={self.patience}, monitor={self.monitor!r})"


_MODES: dict[str, type[CollaborationMode]] = {m.name: m for m in (CDS, FedAvg, CIIL, IIL, SingleSite)}


def mode_from_name(name: str, **kwargs: Any) -> CollaborationMode:
    """Build a mode from its short name (``cds``, ``fedavg``, ``ciil``, ``iil``, ``single``)."""
    try:
        cls = _MODES[name]
    except KeyError:
        raise KeyError(f"Unknown collaboration mode {name!r}; valid modes are {sorted(_MODES)}.") from None
    return cls(**kwargs)
