"""Tests for the pure, seeded split algorithms, against sizes computed by hand."""

from __future__ import annotations

import pytest

from lightning_fedseg.data.partition import (
    Partition,
    dirichlet_split,
    paper_split,
    paper_split_by_site,
    simulated_split,
    split_train_val,
)

SUBJECTS_210 = [f"BraTS_{i:03d}" for i in range(210)]


def _all(partition: Partition) -> list[str]:
    return [s for sp in partition.sites.values() for s in sp.subjects] + list(partition.heldout)


def _assert_disjoint_cover(partition: Partition, subjects: list[str]) -> None:
    everyone = _all(partition)
    assert len(everyone) == len(set(everyone))
    assert sorted(everyone) == sorted(subjects)


@pytest.mark.parametrize(
    ("n", "fraction", "expected_val"),
    [(10, 0.2, 2), (27, 0.2, 5), (4, 0.2, 1), (2, 0.2, 1), (1, 0.2, 0), (5, 0.0, 0), (3, 0.9, 2)],
)
def test_split_train_val_sizes(n: int, fraction: float, expected_val: int) -> None:
    # round(0.2 * 27) = 5; 0.2 * 4 rounds to 1; 2 subjects still validate on 1; 3 * 0.9 = 2.7
    # rounds to 3 but one must train.
    split = split_train_val([f"s{i}" for i in range(n)], fraction, seed=3)
    assert len(split.val) == expected_val
    assert len(split.train) == n - expected_val
    assert split.train == tuple(sorted(split.train))
    assert not set(split.train) & set(split.val)


def test_split_train_val_is_seeded_and_order_free() -> None:
    subjects = [f"s{i}" for i in range(20)]
    a = split_train_val(subjects, 0.2, seed=1, key="x")
    assert a == split_train_val(list(reversed(subjects)), 0.2, seed=1, key="x")
    assert a != split_train_val(subjects, 0.2, seed=2, key="x")


# --------------------------------------------------------------------------- paper split
def test_paper_split_reproduces_the_paper_on_210_subjects() -> None:
    p = paper_split(SUBJECTS_210, seed=0)
    assert p.site_names == [f"site{i:02d}" for i in range(1, 11)]
    # The paper's training subjects per institution; 80/20 train/val inside each.
    assert [len(s.subjects) for s in p.sites.values()] == [70, 27, 17, 12, 11, 9, 6, 6, 4, 3]
    # round(0.2 n), at least 1: 14, 5.4, 3.4, 2.4, 2.2, 1.8, 1.2, 1.2, 0.8, 0.6.
    assert [len(s.val) for s in p.sites.values()] == [14, 5, 3, 2, 2, 2, 1, 1, 1, 1]
    # 45 held out in proportion to (70, 27, ...): 19.09, 7.36, 4.64, 3.27, 3, 2.45, 1.64, ...
    assert p.heldout_by_site is not None
    assert [len(v) for v in p.heldout_by_site.values()] == [19, 7, 5, 3, 3, 2, 2, 2, 1, 1]
    assert len(p.heldout) == 45
    _assert_disjoint_cover(p, SUBJECTS_210)


def test_paper_split_is_seeded() -> None:
    assert paper_split(SUBJECTS_210, seed=0) == paper_split(SUBJECTS_210[::-1], seed=0)
    assert paper_split(SUBJECTS_210, seed=0) != paper_split(SUBJECTS_210, seed=1)


def test_paper_split_scales_down_and_keeps_a_validation_subject() -> None:
    subjects = [f"s{i:02d}" for i in range(40)]
    p = paper_split(subjects)
    # round(40 * 45 / 210) = 9 held out; 31 >= 2 * 10, so every site keeps two subjects.
    assert len(p.heldout) == 9
    assert all(len(s.train) >= 1 and len(s.val) >= 1 for s in p.sites.values())
    assert sum(len(s.subjects) for s in p.sites.values()) == 31
    _assert_disjoint_cover(p, subjects)


def test_paper_split_refuses_too_few_subjects() -> None:
    with pytest.raises(ValueError, match="at least one training subject for each of its 10"):
        paper_split([f"s{i}" for i in range(11)])
    with pytest.raises(ValueError, match="listed more than once: a"):
        paper_split(["a", "a", "b"], site_sizes=(1,))


def test_paper_split_by_site_keeps_institutions() -> None:
    sites = {**{f"a{i}": "10" for i in range(10)}, **{f"b{i}": "2" for i in range(5)}}
    sites |= {"c0": "x", "c1": "x"}
    p = paper_split_by_site(sites, seed=0, heldout_fraction=0.2, val_fraction=0.2)
    # Natural order: "2" before "10"; letters after numbers.
    assert p.site_names == ["2", "10", "x"]
    # round(17 * 0.2) = 3 held out; quotas 0.88 ("2"), 1.76 ("10"), 0.35 ("x"), but "x" must
    # keep its two subjects (one trains, one validates): capped at 0, the 3 split 5:10 -> 1, 2.
    assert p.heldout_by_site is not None
    assert [len(v) for v in p.heldout_by_site.values()] == [1, 2, 0]
    for name, split in p.sites.items():
        held = p.heldout_by_site[name]
        assert {sites[s] for s in split.subjects + held} == {name}
    assert [len(s.val) for s in p.sites.values()] == [1, 2, 1]  # 4, 8, 2 subjects left


def test_paper_split_by_site_refuses_impossible_heldout() -> None:
    with pytest.raises(ValueError, match="at most 0 can be held out"):
        paper_split_by_site({"a": "1", "b": "1", "c": "2", "d": "2"}, heldout_fraction=0.5)


# --------------------------------------------------------------------------- simulated
@pytest.mark.parametrize("num_sites", [4, 8, 16, 32])
def test_simulated_split_paper_sizes(num_sites: int) -> None:
    p = simulated_split(SUBJECTS_210, num_sites, seed=0)
    assert len(p.heldout) == 32
    sizes = [len(s.subjects) for s in p.sites.values()]
    # 178 subjects dealt as evenly as possible, extra ones to the first sites.
    base, extra = divmod(178, num_sites)
    assert sizes == [base + 1] * extra + [base] * (num_sites - extra)
    assert p.site_names[0] == "site01"
    _assert_disjoint_cover(p, SUBJECTS_210)


def test_simulated_split_fraction_and_refusal() -> None:
    subjects = [f"s{i}" for i in range(20)]
    p = simulated_split(subjects, 3, num_heldout=0.25)
    assert len(p.heldout) == 5
    assert [len(s.subjects) for s in p.sites.values()] == [5, 5, 5]
    with pytest.raises(ValueError, match="Cannot give each of 8 sites a training subject"):
        simulated_split(subjects, 8, num_heldout=13)
    with pytest.raises(ValueError, match="`num_sites` to be a positive integer, but got 0"):
        simulated_split(subjects, 0)


# --------------------------------------------------------------------------- dirichlet
def test_dirichlet_split_skew_follows_alpha() -> None:
    subjects = [f"s{i:03d}" for i in range(200)]
    sizes = {s: float(i) for i, s in enumerate(subjects)}
    even = dirichlet_split(subjects, sizes, 4, alpha=1e4, seed=0, num_heldout=0, num_bins=4)
    # Near-uniform proportions: every site gets about 50 subjects (12-13 per bin).
    assert all(45 <= len(s.subjects) <= 55 for s in even.sites.values())
    skewed = dirichlet_split(subjects, sizes, 4, alpha=1e-3, seed=0, num_heldout=0, num_bins=4)
    # Each quantile bin (50 subjects, sizes 0-49, 50-99, ...) lands (almost) on one site.
    for b in range(4):
        members = {f"s{i:03d}" for i in range(50 * b, 50 * b + 50)}
        per_site = [len(members & set(s.subjects)) for s in skewed.sites.values()]
        assert max(per_site) >= 48
    assert all(len(s.train) >= 1 for s in skewed.sites.values())
    _assert_disjoint_cover(skewed, subjects)


def test_dirichlet_split_is_seeded_and_checks_input() -> None:
    subjects = [f"s{i}" for i in range(30)]
    sizes = {s: float(i % 7) for i, s in enumerate(subjects)}
    a = dirichlet_split(subjects, sizes, 3, alpha=0.5, seed=4, num_heldout=5)
    assert a == dirichlet_split(subjects, sizes, 3, alpha=0.5, seed=4, num_heldout=5)
    assert len(a.heldout) == 5
    _assert_disjoint_cover(a, subjects)
    with pytest.raises(ValueError, match="30 subjects leave -2 after holding out 32"):
        dirichlet_split(subjects, sizes, 3)  # the paper's 32 held-out subjects by default
    with pytest.raises(ValueError, match="no size for subjects: s1"):
        dirichlet_split(["s0", "s1"], {"s0": 1.0}, 1, num_heldout=0)
    with pytest.raises(ValueError, match="`alpha` to be positive, but got 0"):
        dirichlet_split(subjects, sizes, 2, alpha=0)
