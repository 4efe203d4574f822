"""The pieces of one round: its state, the batch records, and the round's training 'dataloader'.

One Trainer epoch is one round. The :class:`RoundIterable` walks the round's local site tasks and
records, for every batch it yields, which task and which local batch it is (:class:`BatchRecord`);
the engine takes the records in the order Lightning uses the batches.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Iterable, Iterator, Sized
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypeVar

from torch import Tensor

from lightning_fedseg.federation.modes import RoundPlan
from lightning_fedseg.federation.transport import CommStats

if TYPE_CHECKING:
    from lightning_fedseg.federation.engine import RoundEngine

__all__ = ["IDLE", "BatchRecord", "Round", "RoundFailedError", "RoundIterable", "site_batch_limit", "with_last"]

T = TypeVar("T")


class RoundFailedError(RuntimeError):
    """Too few sites finished a round; the run stops and the last checkpoint stays as it was."""


class _IdleBatch:
    """Yielded once by a process that trains no site this round, so that its epoch still validates."""

    def __repr__(self) -> str:
        return "<idle federated rank>"


IDLE = _IdleBatch()


@dataclass(frozen=True)
class BatchRecord:
    """Where a yielded batch belongs: its task (-1: idle), its index in the site's local epoch, and
    whether it is that local epoch's last batch."""

    task: int
    index: int
    last: bool


@dataclass
class Round:
    index: int
    plan: RoundPlan
    local_tasks: tuple[int, ...]
    global_state: dict[str, Tensor] | None = None
    live: dict[str, Tensor] | None = None  # the module's own tensors, where loading is a plain copy
    records: deque[BatchRecord] = field(default_factory=deque)
    current: BatchRecord | None = None
    active: int | None = None
    start_state: dict[str, Tensor] | None = None
    batches: int = 0  # batches taken so far (none: Lightning replayed a finished epoch's end on resume)
    client_sums: dict[str, dict[str, Tensor]] = field(default_factory=dict)
    succeeded: list[str] = field(default_factory=list)
    failed: dict[int, str] = field(default_factory=dict)
    synced_tasks: int = 0
    finished: bool = False
    train_seconds: float = 0.0
    handover_seconds: float = 0.0  # this process's site starts and ends, and the round's combine
    comm: CommStats = field(default_factory=CommStats)
    task_started_at: float = 0.0


def site_batch_limit(limit: int | float, loader: Any, site: str) -> int | None:
    """The number of batches ``limit_train_batches`` allows a site per local epoch (``None``: all).

    Example:
        >>> [site_batch_limit(limit, range(5), "a") for limit in (2, 0.5, 1.0)]
        [2, 2, None]
    """
    if isinstance(limit, int):
        return limit
    if limit >= 1.0:
        return None
    if not isinstance(loader, Sized):
        raise ValueError(
            f"`limit_train_batches={limit}` is a fraction, but site {site!r}'s loader has no length."
            " HINT: give an integer number of batches."
        )
    count = int(len(loader) * limit)
    if count == 0 and limit > 0 and len(loader) > 0:
        raise ValueError(
            f"`limit_train_batches={limit}` leaves site {site!r} no batch of its {len(loader)}."
            f" HINT: use at least {math.ceil(1 / len(loader) * 1000) / 1000}."
        )
    return count


def with_last(items: Iterable[T], limit: int | None = None) -> Iterator[tuple[T, bool]]:
    """Yield ``(item, is_last)`` for at most ``limit`` items, looking one item ahead (never past
    the limit: a site's loader is not asked for a batch it will not train on).

    Example:
        >>> list(with_last("abc")), list(with_last("abc", limit=2))
        ([('a', False), ('b', False), ('c', True)], [('a', False), ('b', True)])
    """
    if limit is not None and limit <= 0:
        return
    iterator = iter(items)
    try:
        item = next(iterator)
    except StopIteration:
        return
    count = 1
    while limit is None or count < limit:
        try:
            upcoming = next(iterator)
        except StopIteration:
            break
        yield item, False
        item, count = upcoming, count + 1
    yield item, True


class RoundIterable:
    """The training 'dataloader' of a federated fit: one pass is one round's local site tasks."""

    def __init__(self, engine: RoundEngine) -> None:
        self.engine = engine

    def __iter__(self) -> Iterator[Any]:
        engine = self.engine
        rnd = engine.start_round()
        yielded = False
        for task_idx in rnd.local_tasks:
            task = rnd.plan.tasks[task_idx]
            loader = engine.site_loader(task.site)
            limit = site_batch_limit(engine.batch_limit, loader, task.site)
            for epoch in range(task.epochs):
                engine.seed_loader(loader, rnd.index, task_idx, epoch)
                for index, (batch, last) in enumerate(with_last(loader, limit)):
                    if task_idx in rnd.failed:
                        break
                    rnd.records.append(BatchRecord(task_idx, index, last))
                    yielded = True
                    yield batch
        if not yielded:
            rnd.records.append(BatchRecord(-1, 0, True))
            yield IDLE
