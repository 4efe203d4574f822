"""Tests for largest-remainder counts, against values computed by hand."""

from __future__ import annotations

import pytest

from lightning_fedseg.data.partition import (
    apportion,
    resolve_count,
)


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
