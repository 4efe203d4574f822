"""The split algorithms: patient-disjoint federations of subjects, pure and seeded.

Every function here is pure and seeded: the same subjects and seed give the same split on every
machine and in every process, which is what lets each rank of a distributed run compute the
federation on its own. Counts are apportioned with
:func:`~lightning_fedseg.data.partition.apportion.apportion` (largest remainder, exact
fractions, ties to the earlier site), so sizes can be checked by hand:

* :func:`paper_split` reproduces the BraTS 2018 "real" split of Sheller et al.: 10 institutions
  with 70, 27, 17, 12, 11, 9, 6, 6, 4, 3 training subjects and 45 held-out subjects taken per
  institution; :func:`paper_split_by_site` keeps institutions that are already known.
* :func:`simulated_split` draws the held-out subjects first and deals the rest into N
  institutions of (almost) equal size, the paper's 4/8/16/32-institution experiments.
* :func:`dirichlet_split` makes a skewed, non-IID federation over tumour-size quantile bins.

Within a site, training subjects are split into train and validation with
:func:`split_train_val`: ``round(val_fraction * n)`` validation subjects, at least one when the
site has two or more subjects and ``val_fraction > 0``, and always at least one train subject.
:func:`group_by_site` and :func:`hold_out_by_site` are the steps shared with the FeTS CSV split.
"""

from __future__ import annotations

import math
import re
import zlib
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence

import numpy as np

from lightning_fedseg._validation import check_int
from lightning_fedseg.data.partition.apportion import apportion, check_fraction, resolve_count
from lightning_fedseg.data.partition.model import (
    PAPER_HELDOUT_FRACTION,
    PAPER_SIMULATED_HELDOUT,
    PAPER_SITE_SIZES,
    Partition,
    SiteSplit,
)

__all__ = [
    "dirichlet_split",
    "group_by_site",
    "hold_out_by_site",
    "paper_split",
    "paper_split_by_site",
    "simulated_split",
    "split_train_val",
]


def _rng(seed: int, *keys: str) -> np.random.Generator:
    """A generator that depends on the seed and on string keys (e.g. a site name)."""
    return np.random.default_rng([seed, *(zlib.crc32(k.encode()) for k in keys)])


def _shuffled(subjects: Iterable[str], rng: np.random.Generator) -> list[str]:
    ordered = sorted(subjects)
    return [ordered[i] for i in rng.permutation(len(ordered))]


def _unique_subjects(subjects: Iterable[str]) -> list[str]:
    subjects = list(subjects)
    repeated = sorted(s for s, count in Counter(subjects).items() if count > 1)
    if repeated:
        raise ValueError(f"Subjects are listed more than once: {', '.join(repeated)}.")
    if any(not isinstance(s, str) or not s for s in subjects):
        raise ValueError("Expected subject ids to be non-empty strings.")
    return subjects


def split_train_val(subjects: Iterable[str], val_fraction: float = 0.2, seed: int = 0, key: str = "") -> SiteSplit:
    """Split one site's subjects into train and validation (seeded by ``seed`` and ``key``).

    ``round(val_fraction * n)`` subjects validate, at least one when ``n >= 2`` and
    ``val_fraction > 0``, and at least one subject always trains. Both tuples are sorted.

    Example:
        >>> split = split_train_val([f"s{i}" for i in range(10)], 0.2)
        >>> len(split.train), len(split.val)
        (8, 2)
        >>> split_train_val(["a", "b"], 0.2).val.__len__(), split_train_val(["a"], 0.5).val
        (1, ())
    """
    check_fraction(val_fraction, "val_fraction")
    ordered = _shuffled(subjects, _rng(seed, "val", key))
    n = len(ordered)
    num_val = round(val_fraction * n)
    if val_fraction > 0 and n >= 2:
        num_val = max(num_val, 1)
    num_val = min(num_val, max(n - 1, 0))
    return SiteSplit(train=tuple(sorted(ordered[num_val:])), val=tuple(sorted(ordered[:num_val])))


def _heldout_per_site(num_heldout: int, sizes: Sequence[int], val_fraction: float) -> list[int]:
    """Held-out subjects per site, proportional to size; a site keeps one train (and val)."""
    keep = [2 if val_fraction > 0 and size >= 2 else 1 for size in sizes]
    available = sum(size - k for size, k in zip(sizes, keep, strict=True))
    if num_heldout > available:
        raise ValueError(
            f"Cannot hold out {num_heldout} of {sum(sizes)} subjects while every one of the "
            f"{len(sizes)} sites keeps a training (and a validation) subject; at most "
            f"{available} can be held out. HINT: lower the held-out count or fraction."
        )
    return apportion(num_heldout, sizes, maximum=[s - k for s, k in zip(sizes, keep, strict=True)])


def _site_names(count: int) -> list[str]:
    width = max(2, len(str(count)))
    return [f"site{i:0{width}d}" for i in range(1, count + 1)]


def paper_split(
    subjects: Sequence[str],
    seed: int = 0,
    site_sizes: Sequence[float] = PAPER_SITE_SIZES,
    heldout_fraction: float = PAPER_HELDOUT_FRACTION,
    val_fraction: float = 0.2,
) -> Partition:
    """The paper's real split, scaled to the subjects given.

    ``round(heldout_fraction * n)`` subjects are held out; the remaining training subjects and
    the held-out ones are each apportioned over the institutions in proportion to
    ``site_sizes`` (every institution keeps at least one training subject, and two, so that
    it can validate, when there are enough subjects and ``val_fraction > 0``). Subjects are
    shuffled and dealt out in that order; each site's training subjects are then split
    train/val with :func:`split_train_val`. For 210 subjects this gives exactly 70, 27, 17, 12,
    11, 9, 6, 6, 4, 3 training subjects and 19, 7, 5, 3, 3, 2, 2, 2, 1, 1 held-out ones.

    Args:
        subjects: subject ids (order does not matter).
        seed: the random seed.
        site_sizes: relative size of each institution; sites are named ``site01``, ``site02``...
        heldout_fraction: share of all subjects held out for testing.
        val_fraction: share of each site's training subjects used for validation.

    Returns:
        The partition, with ``heldout_by_site``.

    Raises:
        ValueError: fewer training subjects than institutions, or an invalid argument.
    """
    subjects = _unique_subjects(subjects)
    check_fraction(heldout_fraction, "heldout_fraction")
    check_fraction(val_fraction, "val_fraction")
    if not site_sizes or any(s <= 0 for s in site_sizes):
        raise ValueError(f"Expected positive `site_sizes`, but got {list(site_sizes)}.")
    n = len(subjects)
    num_heldout = round(heldout_fraction * n)
    num_sites = len(site_sizes)
    if n - num_heldout < num_sites:
        raise ValueError(
            f"The paper split needs at least one training subject for each of its {num_sites} "
            f"institutions, but {n} subjects leave {n - num_heldout} after holding out "
            f"{num_heldout}. HINT: use more subjects or fewer `site_sizes`."
        )
    keep = 2 if val_fraction > 0 and n - num_heldout >= 2 * num_sites else 1
    train_sizes = apportion(n - num_heldout, site_sizes, minimum=keep)
    heldout_sizes = apportion(num_heldout, site_sizes)
    names = _site_names(num_sites)
    order = _shuffled(subjects, _rng(seed, "paper"))
    sites: dict[str, SiteSplit] = {}
    heldout_by_site: dict[str, tuple[str, ...]] = {}
    start = 0
    for name, num_train, num_held in zip(names, train_sizes, heldout_sizes, strict=True):
        chunk = order[start : start + num_train + num_held]
        start += num_train + num_held
        heldout_by_site[name] = tuple(sorted(chunk[:num_held]))
        sites[name] = split_train_val(chunk[num_held:], val_fraction, seed, name)
    heldout = tuple(sorted(s for ss in heldout_by_site.values() for s in ss))
    return Partition(sites, heldout, heldout_by_site)


def paper_split_by_site(
    subject_to_site: Mapping[str, str],
    seed: int = 0,
    heldout_fraction: float = PAPER_HELDOUT_FRACTION,
    val_fraction: float = 0.2,
) -> Partition:
    """The paper's split for subjects whose institution is known: hold out, then train/val.

    ``round(heldout_fraction * n)`` subjects are held out, apportioned over the institutions in
    proportion to their sizes while each keeps at least one training subject (and one
    validation subject when it has two or more and ``val_fraction > 0``); the held-out
    subjects of a site are drawn at random (seeded by ``seed`` and the site name).

    Args:
        subject_to_site: the institution of each subject. Sites are ordered naturally by
            name ("site2" before "site10").
        seed: the random seed.
        heldout_fraction: share of all subjects held out for testing.
        val_fraction: share of each site's training subjects used for validation.

    Returns:
        The partition, with ``heldout_by_site``.

    Example:
        >>> p = paper_split_by_site({f"s{i}": "b" if i < 6 else "a" for i in range(10)}, 0, 0.2)
        >>> {name: len(split.subjects) for name, split in p.sites.items()}, len(p.heldout)
        ({'a': 3, 'b': 5}, 2)
    """
    check_fraction(heldout_fraction, "heldout_fraction")
    by_site = group_by_site(subject_to_site)
    num_heldout = round(heldout_fraction * sum(len(s) for s in by_site.values()))
    heldout_by_site, kept = hold_out_by_site(by_site, num_heldout, seed, val_fraction)
    sites = {name: split_train_val(members, val_fraction, seed, name) for name, members in kept.items()}
    heldout = tuple(sorted(s for ss in heldout_by_site.values() for s in ss))
    return Partition(sites, heldout, heldout_by_site)


def _heldout_leaving_sites(num_heldout: int | float, n: int, num_sites: int) -> int:
    """The held-out count, refused when it leaves fewer training subjects than sites."""
    held = resolve_count(num_heldout, n)
    if n - held < num_sites:
        raise ValueError(
            f"Cannot give each of {num_sites} sites a training subject: {n} subjects leave "
            f"{n - held} after holding out {held}. HINT: lower `num_sites` or `num_heldout`."
        )
    return held


def simulated_split(
    subjects: Sequence[str],
    num_sites: int,
    seed: int = 0,
    num_heldout: int | float = PAPER_SIMULATED_HELDOUT,
    val_fraction: float = 0.2,
) -> Partition:
    """The paper's simulated federations: hold out first, deal the rest into equal sites.

    Subjects are shuffled; the first ``num_heldout`` are held out and the others are dealt in
    consecutive chunks to ``num_sites`` sites whose sizes differ by at most one (earlier sites
    get the extra subjects). Each site is then split train/val with :func:`split_train_val`.

    Args:
        subjects: subject ids (order does not matter).
        num_sites: number of institutions (the paper uses 4, 8, 16 and 32).
        seed: the random seed.
        num_heldout: held-out subjects, as a count (int) or a fraction of all subjects (float).
        val_fraction: share of each site's subjects used for validation.

    Returns:
        The partition; held-out subjects belong to no site.

    Example:
        >>> p = simulated_split([f"s{i:02d}" for i in range(42)], 4, num_heldout=32)
        >>> [len(s.subjects) for s in p.sites.values()], len(p.heldout)
        ([3, 3, 2, 2], 32)
    """
    subjects = _unique_subjects(subjects)
    check_int("num_sites", num_sites)
    n = len(subjects)
    held = _heldout_leaving_sites(num_heldout, n, num_sites)
    order = _shuffled(subjects, _rng(seed, "simulated"))
    heldout = tuple(sorted(order[:held]))
    sizes = apportion(n - held, [1] * num_sites)
    sites: dict[str, SiteSplit] = {}
    start = held
    for name, size in zip(_site_names(num_sites), sizes, strict=True):
        sites[name] = split_train_val(order[start : start + size], val_fraction, seed, name)
        start += size
    return Partition(sites, heldout)


def dirichlet_split(
    subjects: Sequence[str],
    sizes: Mapping[str, float],
    num_sites: int,
    alpha: float = 0.5,
    seed: int = 0,
    num_heldout: int | float = PAPER_SIMULATED_HELDOUT,
    val_fraction: float = 0.2,
    num_bins: int = 4,
) -> Partition:
    """A skewed (non-IID) federation: sites see different tumour sizes in different amounts.

    Held-out subjects are drawn first at random. The rest are ranked by ``sizes`` (ties by id)
    and cut into ``num_bins`` quantile bins of (almost) equal count; each bin is dealt to the
    sites in proportions drawn from ``Dirichlet(alpha, ..., alpha)``. Small ``alpha`` gives
    each bin to few sites (strong skew in both tumour size and site size); large ``alpha``
    approaches an even split. A site left without subjects then takes one at random from the
    currently largest site, so every site trains on at least one subject.

    Args:
        subjects: subject ids.
        sizes: a size per subject, e.g. its tumour volume in voxels.
        num_sites: number of institutions.
        alpha: Dirichlet concentration, positive.
        seed: the random seed.
        num_heldout: held-out subjects, as a count (int) or a fraction (float).
        val_fraction: share of each site's subjects used for validation.
        num_bins: number of size quantile bins.

    Returns:
        The partition; held-out subjects belong to no site.
    """
    subjects = _unique_subjects(subjects)
    check_int("num_sites", num_sites)
    if not alpha > 0 or not math.isfinite(alpha):
        raise ValueError(f"Expected `alpha` to be positive, but got {alpha}.")
    check_int("num_bins", num_bins)
    missing = [s for s in subjects if s not in sizes]
    if missing:
        raise ValueError(f"`sizes` has no size for subjects: {', '.join(sorted(missing))}.")
    n = len(subjects)
    held = _heldout_leaving_sites(num_heldout, n, num_sites)
    rng = _rng(seed, "dirichlet")
    order = _shuffled(subjects, rng)
    heldout = tuple(sorted(order[:held]))
    ranked = sorted(order[held:], key=lambda s: (float(sizes[s]), s))
    members: list[list[str]] = [[] for _ in range(num_sites)]
    start = 0
    for bin_size in apportion(len(ranked), [1] * min(num_bins, len(ranked))):
        bin_subjects = _shuffled(ranked[start : start + bin_size], rng)
        start += bin_size
        proportions = rng.dirichlet([alpha] * num_sites)
        offset = 0
        for site, count in enumerate(apportion(bin_size, proportions.tolist())):
            members[site].extend(bin_subjects[offset : offset + count])
            offset += count
    for site in range(num_sites):
        if not members[site]:
            donor = max(range(num_sites), key=lambda i: (len(members[i]), -i))
            taken = members[donor].pop(int(rng.integers(len(members[donor]))))
            members[site].append(taken)
    names = _site_names(num_sites)
    sites = {name: split_train_val(m, val_fraction, seed, name) for name, m in zip(names, members, strict=True)}
    return Partition(sites, heldout)


def _natural_key(name: str) -> tuple[tuple[int, int | str], ...]:
    """Sort key putting "2" before "10" and "site2" before "site10"."""
    return tuple((0, int(p)) if p.isdigit() else (1, p) for p in re.split(r"(\d+)", name) if p)


def group_by_site(subject_to_site: Mapping[str, str]) -> dict[str, list[str]]:
    """Each site's subjects, sites in natural name order ("site2" before "site10")."""
    if not subject_to_site:
        raise ValueError("Expected at least one subject, but got none.")
    groups: dict[str, list[str]] = {}
    for subject, site in subject_to_site.items():
        groups.setdefault(str(site), []).append(subject)
    return {name: groups[name] for name in sorted(groups, key=_natural_key)}


def hold_out_by_site(
    by_site: Mapping[str, Sequence[str]], num_heldout: int, seed: int, val_fraction: float
) -> tuple[dict[str, tuple[str, ...]], dict[str, list[str]]]:
    """Hold out ``num_heldout`` subjects of institutions that are known, apportioned by size.

    Each site keeps at least one training subject (and one validation subject when it has two
    or more and ``val_fraction > 0``); its held-out subjects are drawn at random, seeded by
    ``seed`` and the site name.

    Returns:
        Each site's held-out subjects (sorted) and the subjects it keeps (in the drawn order).
    """
    heldout_sizes = _heldout_per_site(num_heldout, [len(m) for m in by_site.values()], val_fraction)
    heldout_by_site: dict[str, tuple[str, ...]] = {}
    kept: dict[str, list[str]] = {}
    for (name, members), num_held in zip(by_site.items(), heldout_sizes, strict=True):
        order = _shuffled(members, _rng(seed, "heldout", name))
        heldout_by_site[name] = tuple(sorted(order[:num_held]))
        kept[name] = order[num_held:]
    return heldout_by_site, kept
