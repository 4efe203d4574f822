"""What the hub does with one exchange: pure functions over the sites' arrays, in site order.

Over NVIDIA FLARE the sites never talk to each other: every collective of the
:class:`~lightning_fedseg.federation.transport.Transport` becomes one exchange with the hub. Each
site sends its array (and the op), the hub combines them here and sends the result back to every
site, which continues exactly as after a torch.distributed collective. The hub sees each site's
array: weighted sums (or, with masking, their masked encodings), hand-over weights, flags, public
keys and metrics, never samples, gradients or optimizer moments.

Decisions:

* **Order.** Sums are taken in site order, starting from zeros, so the result does not depend on
  which site answered first.
* **Integers wrap.** Masked encodings are int64 sums modulo ``2**64``; numpy's int64 addition wraps
  the same way as torch's, so masks cancel exactly.
* **Agreement.** Every site runs the same sequence of collectives; a site that sent another op,
  sequence number or shape is a bug or a tampered site, and the exchange is refused naming it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

__all__ = ["OPS", "Message", "RelayError", "relay"]

OPS = ("sum", "max", "broadcast", "gather", "aggregate", "done")

Array = npt.NDArray[Any]


class RelayError(RuntimeError):
    """The sites' messages of one exchange do not agree."""


@dataclass(frozen=True)
class Message:
    """One site's part of an exchange.

    Args:
        site: the sending site.
        op: one of :data:`OPS`.
        seq: the exchange's sequence number (the same at every site).
        array: the site's array (empty for a broadcast's receivers and for ``done``).
        src: the index of the broadcasting site (``broadcast`` only).
    """

    site: str
    op: str
    seq: int
    array: Array
    src: int = -1


def check_agreement(messages: Sequence[Message]) -> tuple[str, int, int]:
    """``(op, seq, src)`` shared by every message; raises :class:`RelayError` naming the odd site.

    Example:
        >>> a = Message("a", "sum", 3, np.zeros(2))
        >>> check_agreement([a, Message("b", "sum", 3, np.ones(2))])
        ('sum', 3, -1)
        >>> check_agreement([a, Message("b", "max", 3, np.ones(2))])  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        lightning_fedseg.deploy.relay.RelayError: Exchange 3: site 'b' sent op 'max' (seq 3, src -1), but site ...
    """
    if not messages:
        raise RelayError("An exchange with no site.")
    first = messages[0]
    if first.op not in OPS:
        raise RelayError(f"Exchange {first.seq}: site {first.site!r} sent the unknown op {first.op!r}.")
    for m in messages[1:]:
        if (m.op, m.seq, m.src) != (first.op, first.seq, first.src):
            raise RelayError(
                f"Exchange {first.seq}: site {m.site!r} sent op {m.op!r} (seq {m.seq}, src {m.src}), but site"
                f" {first.site!r} sent {first.op!r} (seq {first.seq}, src {first.src})."
            )
    return first.op, first.seq, first.src


def _same_shape(messages: Sequence[Message]) -> None:
    shape, dtype = messages[0].array.shape, messages[0].array.dtype
    for m in messages[1:]:
        if m.array.shape != shape or m.array.dtype != dtype:
            raise RelayError(
                f"Exchange {m.seq}: site {m.site!r} sent a {m.array.dtype} array of shape {m.array.shape},"
                f" site {messages[0].site!r} a {dtype} array of shape {shape}."
            )


def relay(messages: Sequence[Message]) -> Array:
    """The result every site receives for one exchange (``messages`` in site order).

    Example:
        >>> msgs = [Message("a", "sum", 0, np.array([1.0, 2.0])), Message("b", "sum", 0, np.array([3.0, 4.0]))]
        >>> relay(msgs).tolist()
        [4.0, 6.0]
        >>> src = 1
        >>> relay([Message("a", "broadcast", 1, np.array([7]), src), Message("b", "broadcast", 1, np.array([9]), src)])
        array([9])
        >>> relay([Message("a", "gather", 2, np.array([1])), Message("b", "gather", 2, np.array([2]))]).tolist()
        [[1], [2]]
        >>> relay([Message("a", "sum", 3, np.array([2**62])), Message("b", "sum", 3, np.array([2**62]))])[0] < 0
        np.True_
    """
    op, seq, src = check_agreement(messages)
    if op == "done":
        return np.zeros(0)
    if op == "aggregate":
        raise RelayError(f"Exchange {seq}: site states are combined by the hub's server step, not relayed.")
    if op == "broadcast":
        if not 0 <= src < len(messages):
            raise RelayError(f"Exchange {seq}: broadcast from site index {src}, but {len(messages)} sites.")
        return messages[src].array
    _same_shape(messages)
    if op == "gather":
        return np.stack([m.array for m in messages])
    if op == "max":
        return np.maximum.reduce([m.array for m in messages])
    total = np.zeros_like(messages[0].array)
    with np.errstate(over="ignore"):
        for m in messages:
            total = total + m.array  # site order; int64 wraps like torch
    return total


def contribution_weights(messages: Sequence[Message], tail: int = 2) -> Mapping[str, tuple[float, int]]:
    """``{site: (total weight, site count)}`` from weighted sums whose last ``tail`` entries are the
    weight and the count (the layout of :meth:`Transport.all_reduce_sums`): what the hub logs.

    Example:
        >>> contribution_weights([Message("a", "sum", 0, np.array([0.5, 12.0, 1.0]))])
        {'a': (12.0, 1)}
    """
    return {m.site: (float(m.array[-tail]), round(float(m.array[-tail + 1]))) for m in messages if m.array.size >= tail}
