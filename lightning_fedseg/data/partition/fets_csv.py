"""FeTS partition CSVs: read which institution each subject belongs to, and split them.

Both header orders are accepted (FeTS 2021 ``Subject_ID,Partition_ID``, FeTS 2022
``Partition_ID,Subject_ID``, case-insensitive), with an optional ``TrainOrVal`` column; the
synthetic datasets write the 2021 layout. Every error names the file and the line.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

from lightning_fedseg.data.partition.apportion import check_fraction, resolve_count
from lightning_fedseg.data.partition.model import Partition, SiteSplit
from lightning_fedseg.data.partition.splits import group_by_site, hold_out_by_site, split_train_val

__all__ = ["DuplicateSubjectsError", "read_fets_csv", "read_site_assignment"]

_SUBJECT = "Subject_ID"
_PARTITION = "Partition_ID"
_TRAIN_OR_VAL = "TrainOrVal"


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
    check_fraction(val_fraction, "val_fraction")
    rows = _read_rows(path)
    by_site = group_by_site({row.subject: row.site for row in rows})
    split_of = {row.subject: row.train_or_val for row in rows}
    held = resolve_count(num_heldout, len(rows))
    try:
        heldout_by_site, kept_by_site = hold_out_by_site(by_site, held, seed, val_fraction)
    except ValueError as err:
        raise ValueError(f"{path}: {err}") from err
    sites: dict[str, SiteSplit] = {}
    for name, kept in kept_by_site.items():
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
