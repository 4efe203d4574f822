"""Each local site's training loader: requested once, seeded per (round, site, epoch), limited per local epoch."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sized
from typing import Any

import torch

from lightning_fedseg.federation.modes import SiteTask, derive_seed

__all__ = ["SiteLoaders", "site_batch_limit"]


def site_batch_limit(limit: int | float, loader: Any, site: str) -> int | None:
    """The number of batches ``limit_train_batches`` allows a site per local epoch (``None``: all).

    Example:
        >>> [site_batch_limit(limit, range(5), "a") for limit in (2, 0.5, 1.0)]
        [2, 2, None]
    """
    if isinstance(limit, int):
        return limit
    if limit >= 1.0:
        return None
    if not isinstance(loader, Sized):
        raise ValueError(
            f"`limit_train_batches={limit}` is a fraction, but site {site!r}'s loader has no length."
            " HINT: give an integer number of batches."
        )
    count = int(len(loader) * limit)
    if count == 0 and limit > 0 and len(loader) > 0:
        raise ValueError(
            f"`limit_train_batches={limit}` leaves site {site!r} no batch of its {len(loader)}."
            f" HINT: use at least {math.ceil(1 / len(loader) * 1000) / 1000}."
        )
    return count


class SiteLoaders:
    """The training loaders of this process's sites.

    Args:
        request: returns a site's training loader (the host's data module); called once per site
            until :meth:`clear`.
        seed: base of the shuffling seeds.
        batch_limit: Lightning's ``limit_train_batches``, per site and local epoch.
    """

    def __init__(self, request: Callable[[str], Any], seed: int = 0, batch_limit: int | float = 1.0) -> None:
        self._request = request
        self.seed_base = seed
        self.batch_limit = batch_limit
        self._loaders: dict[str, Any] = {}

    def get(self, site: str) -> Any:
        if site not in self._loaders:
            self._loaders[site] = self._request(site)
        return self._loaders[site]

    def clear(self) -> None:
        """Forget the loaders: each is requested again before its next use."""
        self._loaders.clear()

    def limit(self, loader: Any, site: str) -> int | None:
        """Batches per local epoch of ``site`` (``None``: all)."""
        return site_batch_limit(self.batch_limit, loader, site)

    def seed(self, loader: Any, round_idx: int, site_index: int, epoch: int) -> None:
        """Seed shuffling from (seed, round, site, epoch) instead of the global RNG."""
        from torch.utils.data import RandomSampler

        seed = derive_seed(self.seed_base, round_idx, site_index, epoch, 1)
        if hasattr(loader, "generator"):
            loader.generator = torch.Generator().manual_seed(seed)
        sampler = getattr(loader, "sampler", None)
        if isinstance(sampler, RandomSampler):
            sampler.generator = torch.Generator().manual_seed(seed + 1)

    def count_batches(self, tasks: Iterable[SiteTask]) -> int | None:
        """Training batches of ``tasks`` (``None`` where a loader has no length)."""
        total = 0
        for task in tasks:
            loader = self.get(task.site)
            try:
                count = len(loader)
            except TypeError:
                return None
            limit = self.limit(loader, task.site)
            total += (count if limit is None else min(count, limit)) * task.epochs
        return max(total, 1)
