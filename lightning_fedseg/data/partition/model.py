"""The partition model: which subjects each site trains and validates on, and which are held out.

A :class:`Partition` is a patient-disjoint federation, checked on construction; the functions
that make one are in :mod:`~lightning_fedseg.data.partition.splits` and
:mod:`~lightning_fedseg.data.partition.fets_csv`. :func:`leave_out_sites` turns a partition into
an out-of-federation one.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

__all__ = [
    "PAPER_HELDOUT_FRACTION",
    "PAPER_SIMULATED_HELDOUT",
    "PAPER_SITE_SIZES",
    "Partition",
    "SiteSplit",
    "leave_out_sites",
]

PAPER_SITE_SIZES: tuple[int, ...] = (70, 27, 17, 12, 11, 9, 6, 6, 4, 3)
"""Training subjects of the 10 institutions of the paper's real BraTS 2018 split."""

PAPER_HELDOUT_FRACTION: float = 45 / 210
"""Share of subjects held out in the paper's real split (45 of 210)."""

PAPER_SIMULATED_HELDOUT: int = 32
"""Subjects held out before the paper's simulated splits (32 of 210)."""


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
