"""Tests for the partition model: what a partition refuses, and leaving sites out."""

from __future__ import annotations

import re

import pytest

from lightning_fedseg.data.partition import (
    Partition,
    SiteSplit,
    leave_out_sites,
    paper_split_by_site,
)

SUBJECTS_210 = [f"BraTS_{i:03d}" for i in range(210)]


def test_partition_refuses_subject_in_two_sites() -> None:
    with pytest.raises(ValueError, match=r"s2 \(site a val, site b train\)"):
        Partition({"a": SiteSplit(("s1",), ("s2",)), "b": SiteSplit(("s2",))})


def test_partition_refuses_subject_in_train_and_heldout() -> None:
    with pytest.raises(ValueError, match=r"s1 \(site a train, held-out\)"):
        Partition({"a": SiteSplit(("s1", "s3"))}, heldout=("s1", "s4"))
    with pytest.raises(ValueError, match=r"s1 \(site a train, site a val\)"):
        Partition({"a": SiteSplit(("s1",), ("s1",))})


def test_partition_refuses_site_without_training_subject() -> None:
    with pytest.raises(ValueError, match=r"at least one training subject; none in: \['b'\]"):
        Partition({"a": SiteSplit(("s1",)), "b": SiteSplit((), ("s2",))})


def test_partition_heldout_by_site_must_match() -> None:
    with pytest.raises(ValueError, match="heldout_by_site"):
        Partition({"a": SiteSplit(("s1",))}, ("s2",), {"a": ("s3",)})
    p = Partition(
        {"a": SiteSplit(("s1",)), "b": SiteSplit(("s4",))},
        ("s2", "s3"),
        {"a": ("s2",), "b": ("s3",)},
    )
    assert p.heldout_of(["b"]) == ("s3",)
    assert p.site_of("s2") == "a"
    assert p.site_of("s4") == "b"


def test_leave_out_sites_tests_only_the_left_out_institutions() -> None:
    p = paper_split_by_site({s: f"site{int(s[-3:]) % 3 + 1}" for s in SUBJECTS_210[:30]}, seed=1, heldout_fraction=0.2)
    q = leave_out_sites(p, ["site2"])
    assert q.site_names == ["site1", "site3"]
    for name in q.site_names:  # the remaining sites keep exactly their subjects
        assert q.sites[name] == p.sites[name]
    everything_of_site2 = set(p.sites["site2"].subjects) | set(p.heldout_by_site["site2"])  # type: ignore[index]
    assert len(everything_of_site2) == 10
    assert set(q.heldout) == everything_of_site2  # no held-out subject of site1 or site3
    assert q.heldout_by_site == {"site2": tuple(sorted(everything_of_site2))}


def test_leave_out_without_known_heldout_origin_drops_the_heldout() -> None:
    p = Partition({"a": SiteSplit(("s1",), ("s2",)), "b": SiteSplit(("s3",))}, heldout=("s4",))
    q = leave_out_sites(p, ["a"])
    assert q.heldout == ("s1", "s2") and q.site_names == ["b"]


@pytest.mark.parametrize(
    ("sites", "message"),
    [
        (["c"], "Expected `leave_out` to name distinct sites among ['a', 'b'], but got ['c']."),
        (["a", "a"], "Expected `leave_out` to name distinct sites among ['a', 'b'], but got ['a', 'a']."),
        ([], "Expected `leave_out` to name distinct sites among ['a', 'b'], but got []."),
        (["a", "b"], "Expected `leave_out` to keep at least one site to train, but it names all of ['a', 'b']."),
    ],
)
def test_leave_out_refuses_bad_sites(sites: list[str], message: str) -> None:
    p = Partition({"a": SiteSplit(("s1",)), "b": SiteSplit(("s3",))})
    with pytest.raises(ValueError, match=re.escape(message)):
        leave_out_sites(p, sites)
