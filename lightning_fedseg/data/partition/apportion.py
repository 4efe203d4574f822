"""Counts: split an integer in proportion to weights, and read a count-or-fraction argument.

:func:`apportion` is the largest-remainder method with exact fractions and ties to the earlier
position, so every size a split produces can be checked by hand.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from fractions import Fraction

__all__ = ["apportion", "check_fraction", "resolve_count"]


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


def check_fraction(value: float, name: str) -> None:
    """Refuse a fraction outside ``[0, 1)``, naming the argument."""
    if not 0.0 <= value < 1.0:
        raise ValueError(f"Expected `{name}` to be in [0, 1), but got {value}.")
