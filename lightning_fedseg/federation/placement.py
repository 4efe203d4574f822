"""Which process trains which site: a pure, deterministic placement of sites on ranks."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from lightning_fedseg._validation import check_int

__all__ = ["assign_sites"]


def assign_sites(sites: Sequence[str], sizes: Mapping[str, float], world_size: int) -> dict[str, int]:
    """Assign each site to a rank, balancing the ranks' training samples.

    With as many ranks as sites, site ``i`` goes to rank ``i``. With fewer ranks, sites are placed
    largest first on the least-loaded rank (ties: lowest rank), so every rank gets at least one
    site when there are enough; the sites of one rank then train one after another.

    Args:
        sites: the site names, in the data's order.
        sizes: training samples per site (missing sites count as 1).
        world_size: number of processes.

    Returns:
        ``{site: rank}``.

    Example:
        >>> assign_sites(["a", "b", "c"], {"a": 70, "b": 27, "c": 17}, 2)
        {'a': 0, 'b': 1, 'c': 1}
        >>> assign_sites(["a", "b"], {}, 2)
        {'a': 0, 'b': 1}
    """
    check_int("world_size", world_size)
    if world_size > len(sites) > 0:
        raise ValueError(
            f"{world_size} processes but only {len(sites)} sites: every process must own a site."
            " HINT: launch at most as many processes (`devices` x `num_nodes`) as there are sites."
        )
    if world_size == len(sites):
        return {site: rank for rank, site in enumerate(sites)}
    load = [0.0] * world_size
    placement: dict[str, int] = {}
    for site in sorted(sites, key=lambda s: (-float(sizes.get(s, 1.0)), sites.index(s))):
        rank = min(range(world_size), key=lambda r: (load[r], r))
        placement[site] = rank
        load[rank] += float(sizes.get(site, 1.0))
    return {site: placement[site] for site in sites}
