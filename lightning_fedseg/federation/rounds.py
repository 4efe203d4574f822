"""The pieces of one round: its state, the batch records, the round's training 'dataloader', and
the engine's two interfaces with its host: :class:`RoundHost` (what the training framework does
for the engine) and :class:`RoundOutcome` (what closing a round tells it).

One Trainer epoch is one round. The :class:`RoundIterable` walks the round's local site tasks and
records, for every batch it yields, which task and which local batch it is (:class:`BatchRecord`);
the engine takes the records in the order Lightning uses the batches.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

import torch
from torch import Tensor, nn

from lightning_fedseg.federation.modes import RoundPlan
from lightning_fedseg.federation.transport import CommStats

if TYPE_CHECKING:
    from lightning_fedseg.federation.engine import RoundEngine

__all__ = [
    "IDLE",
    "BatchRecord",
    "Round",
    "RoundFailedError",
    "RoundHost",
    "RoundIterable",
    "RoundOutcome",
    "with_last",
]

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


class RoundHost(Protocol):
    """What the training framework does for the engine (Lightning's strategy is one host)."""

    @property
    def module(self) -> nn.Module:
        """The live module being trained."""
        ...

    @property
    def device(self) -> torch.device:
        """Where the module lives."""
        ...

    def site_train_dataloader(self, site: str) -> Any:
        """The training loader of one of this process's sites."""
        ...

    def site_weight(self, site: str, loader: Any) -> float:
        """The site's FedAvg weight (its number of training samples)."""
        ...

    def call_site_hook(self, name: str, site: str, round_idx: int) -> None:
        """``on_site_start`` / ``on_site_end`` of the callbacks that define them."""
        ...


@dataclass(frozen=True)
class RoundOutcome:
    """What closing a round tells the host: the round's record, the mode's weights to load (IIL's
    best), whether to stop, and why."""

    record: dict[str, Any]
    weights: Mapping[str, Tensor] | None
    stop: bool
    stop_reason: str | None
    metrics: dict[str, float]  # the server and client steps' figures of the round


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
            loader = engine.loaders.get(task.site)
            limit = engine.loaders.limit(loader, task.site)
            for epoch in range(task.epochs):
                engine.loaders.seed(loader, rnd.index, engine.site_index(task.site), epoch)
                for index, (batch, last) in enumerate(with_last(loader, limit)):
                    if task_idx in rnd.failed:
                        break
                    rnd.records.append(BatchRecord(task_idx, index, last))
                    yielded = True
                    yield batch
        if not yielded:
            rnd.records.append(BatchRecord(-1, 0, True))
            yield IDLE
