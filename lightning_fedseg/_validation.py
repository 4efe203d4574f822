"""Argument checks shared by the package, with messages that name the argument and the value."""

from __future__ import annotations

from typing import Any

__all__ = ["check_int"]


def check_int(name: str, value: Any, minimum: int = 1) -> int:
    """Return ``value`` if it is an integer (not a bool) of at least ``minimum``; else raise.

    Example:
        >>> check_int("local_epochs", 2)
        2
        >>> try:
        ...     check_int("local_epochs", 0)
        ... except ValueError as err:
        ...     print(err)
        Expected `local_epochs` to be a positive integer, but got 0.
    """
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        kind = {1: "a positive integer", 0: "a non-negative integer"}.get(minimum, f"an integer >= {minimum}")
        raise ValueError(f"Expected `{name}` to be {kind}, but got {value!r}.")
    return value
