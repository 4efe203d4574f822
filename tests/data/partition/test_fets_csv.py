"""Tests for reading FeTS partition CSVs; errors name the file and line."""

from __future__ import annotations

from pathlib import Path

import pytest

from lightning_fedseg.data.partition import (
    SiteSplit,
    read_fets_csv,
    read_site_assignment,
)

HEADER = "Subject_ID,Partition_ID\n"
HEADER_SPLIT = "Subject_ID,Partition_ID,TrainOrVal\n"


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
