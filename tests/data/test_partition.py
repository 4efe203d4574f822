"""Tests for the pure, seeded partition functions, against sizes computed by hand."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from lightning_fedseg.data.partition import (
    Partition,
    SiteSplit,
    apportion,
    dirichlet_split,
    leave_out_sites,
    paper_split,
    paper_split_by_site,
    read_fets_csv,
    read_site_assignment,
    resolve_count,
    simulated_split,
    split_train_val,
)

SUBJECTS_210 = [f"BraTS_{i:03d}" for i in range(210)]
HEADER = "Subject_ID,Partition_ID\n"
HEADER_SPLIT = "Subject_ID,Partition_ID,TrainOrVal\n"


def _all(partition: Partition) -> list[str]:
    return [s for sp in partition.sites.values() for s in sp.subjects] + list(partition.heldout)


def _assert_disjoint_cover(partition: Partition, subjects: list[str]) -> None:
    everyone = _all(partition)
    assert len(everyone) == len(set(everyone))
    assert sorted(everyone) == sorted(subjects)


# --------------------------------------------------------------------------- apportion
def test_apportion_largest_remainder_by_hand() -> None:
    # 10 / 3 = 3.33 each; one remainder left goes to the earliest tie.
    assert apportion(10, [1, 1, 1]) == [4, 3, 3]
    # 7 * (5, 3, 2) / 10 = 3.5, 2.1, 1.4 -> floors 3, 2, 1 (6) + 1 to the largest remainder .5.
    assert apportion(7, [5, 3, 2]) == [4, 2, 1]
    assert apportion(0, [1, 2]) == [0, 0]


def test_apportion_bounds() -> None:
    # Quotas 4.9, 0.05, 0.05 -> the two small ones are lifted to 1, the rest (3) goes to the first.
    assert apportion(5, [98, 1, 1], minimum=1) == [3, 1, 1]
    # Quotas 6, 3, 1 with the first capped at 2: the remaining 8 split 3:1 -> 6, 2.
    assert apportion(10, [6, 3, 1], maximum=[2, 10, 10]) == [2, 6, 2]
    with pytest.raises(ValueError, match="Cannot split 2 into 3 shares of at least 1"):
        apportion(2, [1, 1, 1], minimum=1)
    with pytest.raises(ValueError, match="non-negative weights"):
        apportion(2, [1, -1])


def test_resolve_count() -> None:
    assert resolve_count(32, 210) == 32
    assert resolve_count(45 / 210, 210) == 45
    assert resolve_count(0.25, 10) == 2  # round(2.5) is 2 (banker's rounding)
    with pytest.raises(ValueError, match=r"`num_heldout` as a fraction in \[0, 1\), but got 1.5"):
        resolve_count(1.5, 10)
    with pytest.raises(ValueError, match="non-negative count, but got -1"):
        resolve_count(-1, 10)


# --------------------------------------------------------------------------- Partition
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


# --------------------------------------------------------------------------- train / val
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


# --------------------------------------------------------------------------- FeTS CSV
def _csv(tmp_path: Path, text: str, name: str = "partitioning.csv") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def test_read_fets_csv_both_header_orders(tmp_path: Path) -> None:
    rows = [(f"FeTS_{i:03d}", 1 if i < 10 else (2 if i < 15 else 10)) for i in range(17)]
    v2021 = _csv(tmp_path, HEADER + "".join(f"{s},{p}\n" for s, p in rows), "a.csv")
    v2022 = _csv(tmp_path, "Partition_ID,Subject_ID\n" + "".join(f"{p},{s}\n" for s, p in rows), "b.csv")
    a, b = read_fets_csv(v2021, seed=1), read_fets_csv(v2022, seed=1)
    assert a == b
    assert a.site_names == ["1", "2", "10"]
    # 10, 5, 2 subjects -> 2, 1, 1 validation subjects.
    assert [(len(s.train), len(s.val)) for s in a.sites.values()] == [(8, 2), (4, 1), (1, 1)]
    assert a.heldout == ()
    assert read_site_assignment(v2022)["FeTS_016"] == "10"


def test_read_fets_csv_train_or_val_column(tmp_path: Path) -> None:
    path = _csv(
        tmp_path,
        "Subject_ID,Partition_ID,TrainOrVal\nA,1,train\nB,1,VAL\nC,2,Train\nD,2,train\n",
    )
    p = read_fets_csv(path)
    assert p.sites == {"1": SiteSplit(("A",), ("B",)), "2": SiteSplit(("C", "D"), ())}


def test_read_fets_csv_num_heldout(tmp_path: Path) -> None:
    rows = "".join(f"s{i},{1 if i < 6 else 2}\n" for i in range(9))
    p = read_fets_csv(_csv(tmp_path, HEADER + rows), num_heldout=3)
    # 3 held out over sizes 6 and 3: quotas 2 and 1.
    assert p.heldout_by_site is not None
    assert [len(v) for v in p.heldout_by_site.values()] == [2, 1]


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("Subject,Partition_ID\nA,1\n", r":1: header .* lacks column\(s\) Subject_ID"),
        (HEADER_SPLIT + "A,1,train\nB,1,test\n", r":3: TrainOrVal must be 'train' or 'val'"),
        (HEADER + "A,1\nB,2\nA,2\n", r": 1 subject\(s\) are listed more than once: A on lines 2, 4\."),
        (HEADER + "A,1\nB\n", r":3: expected 2 columns, but got 1"),
        (HEADER + "A,\n", r":2: empty Subject_ID or Partition_ID"),
        ("", r": the file is empty"),
        (HEADER, r": no subject rows"),
        (HEADER_SPLIT + "A,1,val\nB,2,train\n", r": partition 1 \(lines 2-2\) has no 'train'"),
    ],
)
def test_read_fets_csv_errors_name_file_and_line(tmp_path: Path, text: str, message: str) -> None:
    with pytest.raises(ValueError, match="partitioning.csv" + message):
        read_fets_csv(_csv(tmp_path, text))


def test_read_fets_csv_missing_file(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"nope\.csv does not exist"):
        read_fets_csv(tmp_path / "nope.csv")


# --------------------------------------------------------------------------- leave out
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
