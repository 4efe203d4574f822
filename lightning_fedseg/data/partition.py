"""Patient-disjoint splits of subjects into institutions (sites), validation and held-out sets.

Every function here is pure and seeded: the same subjects and seed give the same split on every
machine and in every process, which is what lets each rank of a distributed run compute the
federation on its own. Counts are apportioned with the largest-remainder method (exact
fractions, ties to the earlier site), so sizes can be checked by hand:

* :func:`paper_split` reproduces the BraTS 2018 "real" split of Sheller et al.: 10 institutions
  with 70, 27, 17, 12, 11, 9, 6, 6, 4, 3 training subjects and 45 held-out subjects taken per
  institution; :func:`paper_split_by_site` keeps institutions that are already known.
* :func:`simulated_split` draws the held-out subjects first and deals the rest into N
  institutions of (almost) equal size, the paper's 4/8/16/32-institution experiments.
* :func:`dirichlet_split` makes a skewed, non-IID federation over tumour-size quantile bins.
* :func:`read_fets_csv` reads FeTS institution partition files.

Within a site, training subjects are split into train and validation with
:func:`split_train_val`: ``round(val_fraction * n)`` validation subjects, at least one when the
site has two or more subjects and ``val_fraction > 0``, and always at least one train subject.
"""

from __future__ import annotations

import csv
import math
import re
import zlib
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path

import numpy as np

from lightning_fedseg._validation import check_int

__all__ = [
    "PAPER_HELDOUT_FRACTION",
    "PAPER_SIMULATED_HELDOUT",
    "PAPER_SITE_SIZES",
    "DuplicateSubjectsError",
    "Partition",
    "SiteSplit",
    "apportion",
    "dirichlet_split",
    "leave_out_sites",
    "paper_split",
    "paper_split_by_site",
    "read_fets_csv",
    "read_site_assignment",
    "resolve_count",
    "simulated_split",
    "split_train_val",
]

PAPER_SITE_SIZES: tuple[int, ...] = (70, 27, 17, 12, 11, 9, 6, 6, 4, 3)
"""Training subjects of the 10 institutions of the paper's real BraTS 2018 split."""

PAPER_HELDOUT_FRACTION: float = 45 / 210
"""Share of subjects held out in the paper's real split (45 of 210)."""

PAPER_SIMULATED_HELDOUT: int = 32
"""Subjects held out before the paper's simulated splits (32 of 210)."""

_SUBJECT = "Subject_ID"
_PARTITION = "Partition_ID"
_TRAIN_OR_VAL = "TrainOrVal"


@dataclass(frozen=True)
class SiteSplit:
    """The subjects of one institution.

    Attributes:
        train: subjects the site trains on.
        val: subjects the site validates on.
    """

    train: tuple[str, ...]
    val: tuple[str, ...] = ()

    @property
    def subjects(self) -> tuple[str, ...]:
        """Train then validation subjects."""
        return self.train + self.val


@dataclass(frozen=True)
class Partition:
    """A patient-disjoint federation: sites with train/val subjects, plus held-out subjects.

    Construction validates the split: every site has at least one training subject and no
    subject appears twice (in two sites, or in two of train, validation and held-out).

    Attributes:
        sites: the split of each site, in a fixed site order.
        heldout: subjects no site trains or validates on (the test set).
        heldout_by_site: the institution each held-out subject came from, when known; its
            values together are exactly ``heldout``.

    Example:
        >>> p = Partition({"a": SiteSplit(("s1", "s2"), ("s3",))}, heldout=("s4",))
        >>> p.site_names, p.num_subjects
        (['a'], 4)
        >>> Partition({"a": SiteSplit(("s1",)), "b": SiteSplit(("s1",))})  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        ValueError: Subjects appear more than once in the partition: s1 (site a train, site b ...
    """

    sites: Mapping[str, SiteSplit]
    heldout: tuple[str, ...] = ()
    heldout_by_site: Mapping[str, tuple[str, ...]] | None = field(default=None)

    def __post_init__(self) -> None:
        object.__setattr__(self, "sites", dict(self.sites))
        object.__setattr__(self, "heldout", tuple(self.heldout))
        if self.heldout_by_site is not None:
            object.__setattr__(self, "heldout_by_site", {k: tuple(v) for k, v in self.heldout_by_site.items()})
        self.validate()

    def validate(self) -> None:
        """Check the partition; called on construction.

        Raises:
            ValueError: no site, a site without training subjects, a subject listed twice
                (the message names every such subject and where it appears), or a
                ``heldout_by_site`` that does not match ``heldout``.
        """
        if not self.sites:
            raise ValueError("Expected a partition with at least one site, but got none.")
        empty = [name for name, split in self.sites.items() if not split.train]
        if empty:
            raise ValueError(f"Every site needs at least one training subject; none in: {empty}.")
        places: dict[str, list[str]] = {}
        for name, split in self.sites.items():
            for subject in split.train:
                places.setdefault(subject, []).append(f"site {name} train")
            for subject in split.val:
                places.setdefault(subject, []).append(f"site {name} val")
        for subject in self.heldout:
            places.setdefault(subject, []).append("held-out")
        duplicated = {s: where for s, where in places.items() if len(where) > 1}
        if duplicated:
            listed = ", ".join(f"{s} ({', '.join(w)})" for s, w in sorted(duplicated.items()))
            raise ValueError(f"Subjects appear more than once in the partition: {listed}.")
        if self.heldout_by_site is not None:
            by_site = [s for subjects in self.heldout_by_site.values() for s in subjects]
            if sorted(by_site) != sorted(self.heldout):
                raise ValueError(
                    "Expected `heldout_by_site` to hold exactly the held-out subjects, but its "
                    f"{len(by_site)} subjects differ from the {len(self.heldout)} held-out ones."
                )

    @property
    def site_names(self) -> list[str]:
        """Site names in the partition's order."""
        return list(self.sites)

    @property
    def num_subjects(self) -> int:
        """Number of subjects in sites and held-out together."""
        return sum(len(split.subjects) for split in self.sites.values()) + len(self.heldout)

    def site_of(self, subject: str) -> str | None:
        """The site a subject trains or validates at, or the site it was held out from."""
        for name, split in self.sites.items():
            if subject in split.train or subject in split.val:
                return name
        for name, subjects in (self.heldout_by_site or {}).items():
            if subject in subjects:
                return name
        return None

    def heldout_of(self, sites: Iterable[str]) -> tuple[str, ...]:
        """Held-out subjects taken from ``sites`` (all held-out ones when this is unknown)."""
        if self.heldout_by_site is None:
            return self.heldout
        wanted = set(sites)
        return tuple(s for name, ss in self.heldout_by_site.items() if name in wanted for s in ss)


def apportion(
    total: int,
    weights: Sequence[float],
    minimum: int = 0,
    maximum: Sequence[int] | None = None,
) -> list[int]:
    """Split ``total`` into integers proportional to ``weights`` (largest-remainder method).

    Each share lies in ``[minimum, maximum[i]]``: shares whose exact quota falls outside are
    fixed at the bound and the rest is re-apportioned among the others. Remainders are compared
    exactly (as fractions); ties go to the earlier position.

    Args:
        total: the non-negative integer to split.
        weights: one non-negative weight per share, not all zero.
        minimum: the smallest share.
        maximum: the largest share of each position (no limit when ``None``).

    Returns:
        Integer shares summing to ``total``.

    Raises:
        ValueError: a weight is negative or not finite, all are zero, or the bounds cannot hold.

    Example:
        >>> apportion(10, [1, 1, 1])
        [4, 3, 3]
        >>> apportion(45, [70, 27, 17, 12, 11, 9, 6, 6, 4, 3])
        [19, 7, 5, 3, 3, 2, 2, 2, 1, 1]
        >>> apportion(5, [100, 1, 1], minimum=1)
        [3, 1, 1]
    """
    k = len(weights)
    if k == 0:
        raise ValueError("Expected at least one weight, but got none.")
    if any(not math.isfinite(w) or w < 0 for w in weights):
        raise ValueError(f"Expected finite non-negative weights, but got {list(weights)}.")
    if total < 0:
        raise ValueError(f"Expected a non-negative total, but got {total}.")
    upper = [math.inf] * k if maximum is None else [float(m) for m in maximum]
    if len(upper) != k or any(m < minimum for m in upper):
        raise ValueError(f"Expected one maximum of at least {minimum} per weight, got {maximum}.")
    if minimum * k > total or sum(upper) < total:
        raise ValueError(
            f"Cannot split {total} into {k} shares of at least {minimum}"
            + ("" if maximum is None else f" and at most {list(maximum)}")
            + "."
        )
    exact = [Fraction(w) for w in weights]
    if sum(exact) == 0:
        exact = [Fraction(1)] * k
    fixed: dict[int, int] = {}
    while True:
        free = [i for i in range(k) if i not in fixed]
        rest = total - sum(fixed.values())
        weight = sum(exact[i] for i in free)
        quota = {i: (rest * exact[i] / weight if weight else Fraction(rest, len(free))) for i in free}
        low = [i for i in free if quota[i] < minimum]
        high = [i for i in free if quota[i] > upper[i]]
        if not low and not high:
            break
        for i in low or high:
            fixed[i] = minimum if low else int(upper[i])
        if len(fixed) == k:
            break
    shares = [0] * k
    for i, value in fixed.items():
        shares[i] = value
    free = [i for i in range(k) if i not in fixed]
    if free:
        for i in free:
            shares[i] = math.floor(quota[i])
        left = total - sum(shares)
        by_remainder = sorted(free, key=lambda i: -(quota[i] - math.floor(quota[i])))
        for i in by_remainder[:left]:
            shares[i] += 1
    if sum(shares) != total:  # only when every share was fixed at a bound
        raise ValueError(f"Cannot split {total} into shares bounded by [{minimum}, {maximum}].")
    return shares


def resolve_count(value: int | float, total: int, name: str = "num_heldout") -> int:
    """Turn a count (int) or a fraction (float in ``[0, 1)``) of ``total`` into a count.

    Example:
        >>> resolve_count(32, 210), resolve_count(45 / 210, 210), resolve_count(0.5, 5)
        (32, 45, 2)
    """
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"Expected `{name}` to be a count or a fraction, but got {value!r}.")
    if isinstance(value, float):
        if not 0.0 <= value < 1.0:
            raise ValueError(f"Expected `{name}` as a fraction in [0, 1), but got {value}.")
        return round(value * total)
    if value < 0:
        raise ValueError(f"Expected `{name}` to be a non-negative count, but got {value}.")
    return value


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


def _check_fraction(value: float, name: str) -> None:
    if not 0.0 <= value < 1.0:
        raise ValueError(f"Expected `{name}` to be in [0, 1), but got {value}.")


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
    _check_fraction(val_fraction, "val_fraction")
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
    _check_fraction(heldout_fraction, "heldout_fraction")
    _check_fraction(val_fraction, "val_fraction")
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
    _check_fraction(heldout_fraction, "heldout_fraction")
    by_site = _group_by_site(subject_to_site)
    sizes = [len(s) for s in by_site.values()]
    num_heldout = round(heldout_fraction * sum(sizes))
    heldout_sizes = _heldout_per_site(num_heldout, sizes, val_fraction)
    sites: dict[str, SiteSplit] = {}
    heldout_by_site: dict[str, tuple[str, ...]] = {}
    for (name, members), num_held in zip(by_site.items(), heldout_sizes, strict=True):
        order = _shuffled(members, _rng(seed, "heldout", name))
        heldout_by_site[name] = tuple(sorted(order[:num_held]))
        sites[name] = split_train_val(order[num_held:], val_fraction, seed, name)
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


def leave_out_sites(partition: Partition, sites: Sequence[str]) -> Partition:
    """The federation without ``sites``; their subjects become the only held-out ones.

    Out-of-federation generalization (Sheller et al., Sci. Rep. 2020): the other sites train
    and validate on exactly the subjects they had, and the test set is every subject of the
    left-out sites (their training, validation and held-out ones), so a test measures
    institutions the federation never saw. The other sites' held-out subjects are used by
    neither; when ``heldout_by_site`` is unknown no held-out subject can be told apart, so the
    left-out sites contribute their training and validation subjects only.

    Args:
        partition: the federation.
        sites: the sites to leave out (distinct, at least one site must remain).

    Returns:
        The partition of the remaining sites, with ``heldout_by_site`` naming the left-out ones.

    Raises:
        ValueError: an unknown or repeated site, none given, or no site left to train.

    Example:
        >>> p = Partition({"a": SiteSplit(("s1",), ("s2",)), "b": SiteSplit(("s3",))}, ("s4",), {"a": ("s4",)})
        >>> q = leave_out_sites(p, ["a"])
        >>> q.site_names, q.heldout, q.heldout_by_site
        (['b'], ('s1', 's2', 's4'), {'a': ('s1', 's2', 's4')})
    """
    left = [str(s) for s in sites]
    unknown = [s for s in left if s not in partition.sites]
    if not left or len(set(left)) != len(left) or unknown:
        raise ValueError(
            f"Expected `leave_out` to name distinct sites among {partition.site_names}, but got {list(sites)!r}."
        )
    kept = {name: split for name, split in partition.sites.items() if name not in left}
    if not kept:
        raise ValueError(f"Expected `leave_out` to keep at least one site to train, but it names all of {left}.")
    known = partition.heldout_by_site is not None
    by_site = {
        s: tuple(sorted(partition.sites[s].subjects + (partition.heldout_of([s]) if known else ()))) for s in left
    }
    heldout = tuple(sorted(subject for subjects in by_site.values() for subject in subjects))
    return Partition(kept, heldout, by_site)


def _natural_key(name: str) -> tuple[tuple[int, int | str], ...]:
    """Sort key putting "2" before "10" and "site2" before "site10"."""
    return tuple((0, int(p)) if p.isdigit() else (1, p) for p in re.split(r"(\d+)", name) if p)


def _group_by_site(subject_to_site: Mapping[str, str]) -> dict[str, list[str]]:
    if not subject_to_site:
        raise ValueError("Expected at least one subject, but got none.")
    groups: dict[str, list[str]] = {}
    for subject, site in subject_to_site.items():
        groups.setdefault(str(site), []).append(subject)
    return {name: groups[name] for name in sorted(groups, key=_natural_key)}


@dataclass(frozen=True)
class _Row:
    subject: str
    site: str
    train_or_val: str | None
    line: int


class DuplicateSubjectsError(ValueError):
    """A partition CSV lists subjects more than once; every repetition is named.

    Attributes:
        path: the CSV file.
        duplicates: each repeated subject with all the lines it is on.
        subjects: every subject the file lists, in order, once each.
    """

    def __init__(self, path: Path, duplicates: dict[str, list[int]], subjects: list[str]) -> None:
        self.path, self.duplicates, self.subjects = path, duplicates, subjects
        shown = "; ".join(f"{s} on lines {', '.join(map(str, lines))}" for s, lines in duplicates.items())
        super().__init__(f"{path}: {len(duplicates)} subject(s) are listed more than once: {shown}.")


def _read_rows(path: Path) -> list[_Row]:
    """Rows of a FeTS-style partition CSV; errors name the file and line."""
    if not path.is_file():
        raise FileNotFoundError(f"Partition file {path} does not exist.")
    with path.open(newline="", encoding="utf-8-sig") as handle:
        reader = csv.reader(handle)
        header = next(reader, None)
        if header is None:
            raise ValueError(f"{path}: the file is empty; expected a header line.")
        columns = {name.strip().lower(): i for i, name in enumerate(header)}
        wanted = {key.lower(): key for key in (_SUBJECT, _PARTITION)}
        missing = [key for low, key in wanted.items() if low not in columns]
        if missing:
            raise ValueError(
                f"{path}:1: header {','.join(header)} lacks column(s) {', '.join(missing)}; "
                f"expected {_SUBJECT},{_PARTITION} (FeTS 2021) or {_PARTITION},{_SUBJECT} "
                f"(FeTS 2022), optionally with {_TRAIN_OR_VAL}."
            )
        i_subject, i_site = columns[_SUBJECT.lower()], columns[_PARTITION.lower()]
        i_split = columns.get(_TRAIN_OR_VAL.lower())
        rows: list[_Row] = []
        seen: dict[str, int] = {}
        repeated: dict[str, list[int]] = {}
        for line, record in enumerate(reader, start=2):
            if not record or all(not cell.strip() for cell in record):
                continue
            needed = max(i_subject, i_site, -1 if i_split is None else i_split)
            if len(record) <= needed:
                raise ValueError(
                    f"{path}:{line}: expected {len(header)} columns, but got {len(record)}: {','.join(record)}."
                )
            subject, site = record[i_subject].strip(), record[i_site].strip()
            if not subject or not site:
                raise ValueError(f"{path}:{line}: empty {_SUBJECT} or {_PARTITION}.")
            if subject in seen:
                repeated.setdefault(subject, [seen[subject]]).append(line)
                continue
            seen[subject] = line
            split = None
            if i_split is not None:
                split = record[i_split].strip().lower()
                if split not in ("train", "val"):
                    raise ValueError(
                        f"{path}:{line}: {_TRAIN_OR_VAL} must be 'train' or 'val', but got {record[i_split]!r}."
                    )
            rows.append(_Row(subject, site, split, line))
    if repeated:
        raise DuplicateSubjectsError(path, repeated, list(seen))
    if not rows:
        raise ValueError(f"{path}: no subject rows after the header.")
    return rows


def read_site_assignment(path: Path | str) -> dict[str, str]:
    """The institution of each subject in a partition CSV (FeTS 2021/2022 or synthetic layout).

    Example:
        >>> import tempfile
        >>> with tempfile.TemporaryDirectory() as d:
        ...     _ = (Path(d) / "p.csv").write_text("Partition_ID,Subject_ID\\n2,b\\n1,a\\n")
        ...     read_site_assignment(Path(d) / "p.csv")
        {'b': '2', 'a': '1'}
    """
    return {row.subject: row.site for row in _read_rows(Path(path))}


def read_fets_csv(
    path: Path | str,
    val_fraction: float = 0.2,
    seed: int = 0,
    num_heldout: int | float = 0,
) -> Partition:
    """Read a FeTS institution partition CSV.

    Both header orders are accepted (2021 ``Subject_ID,Partition_ID``, 2022
    ``Partition_ID,Subject_ID``; names are case-insensitive), with an optional ``TrainOrVal``
    column (``train`` / ``val``, case-insensitive). Without it each partition is split
    train/val by :func:`split_train_val`. Sites are named by their ``Partition_ID`` and ordered
    naturally ("2" before "10").

    Args:
        path: the CSV file.
        val_fraction: share of each partition validated on when there is no ``TrainOrVal``.
        seed: the random seed.
        num_heldout: subjects held out for testing, as a count (int) or fraction (float),
            apportioned over the partitions by size like :func:`paper_split_by_site`. FeTS
            files define no test set, hence the default 0.

    Returns:
        The partition.

    Raises:
        FileNotFoundError: the file does not exist.
        ValueError: a malformed file; the message names the file and line.
    """
    path = Path(path)
    _check_fraction(val_fraction, "val_fraction")
    rows = _read_rows(path)
    by_site = _group_by_site({row.subject: row.site for row in rows})
    split_of = {row.subject: row.train_or_val for row in rows}
    sizes = [len(members) for members in by_site.values()]
    held = resolve_count(num_heldout, len(rows))
    try:
        heldout_sizes = _heldout_per_site(held, sizes, val_fraction)
    except ValueError as err:
        raise ValueError(f"{path}: {err}") from err
    sites: dict[str, SiteSplit] = {}
    heldout_by_site: dict[str, tuple[str, ...]] = {}
    for (name, members), num_held in zip(by_site.items(), heldout_sizes, strict=True):
        order = _shuffled(members, _rng(seed, "heldout", name))
        heldout_by_site[name] = tuple(sorted(order[:num_held]))
        kept = order[num_held:]
        if rows[0].train_or_val is None:
            sites[name] = split_train_val(kept, val_fraction, seed, name)
        else:
            train = tuple(sorted(s for s in kept if split_of[s] == "train"))
            val = tuple(sorted(s for s in kept if split_of[s] == "val"))
            if not train:
                lines = sorted(row.line for row in rows if row.site == name)
                raise ValueError(
                    f"{path}: partition {name} (lines {lines[0]}-{lines[-1]}) has no "
                    f"'train' subject; every site needs at least one."
                )
            sites[name] = SiteSplit(train, val)
    heldout = tuple(sorted(s for ss in heldout_by_site.values() for s in ss))
    return Partition(sites, heldout, heldout_by_site if held else None)
