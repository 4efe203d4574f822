"""What crosses process boundaries on torch.distributed: model weights, counts and metrics.

Samples, labels and per-batch gradients never do. Every operation here is a collective over the
default process group, counted in :class:`CommStats` (seconds and bytes), and wrapped so that a
dead or hung peer surfaces as an error naming the round and the missing sites.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

__all__ = ["CommStats", "SiteComm", "flatten_state", "unflatten_state"]


def flatten_state(state: Mapping[str, Tensor], *extra: float) -> Tensor:
    """One float64 vector of every tensor of ``state`` (in key order), then ``extra`` scalars.

    Example:
        >>> flatten_state({"w": torch.tensor([[1.0, 2.0]]), "n": torch.tensor(3)}, 9.0).tolist()
        [1.0, 2.0, 3.0, 9.0]
    """
    parts = [v.detach().reshape(-1).to("cpu", torch.float64) for v in state.values()]
    return torch.cat([*parts, torch.tensor(extra, dtype=torch.float64)])


def unflatten_state(flat: Tensor, reference: Mapping[str, Tensor], cast: bool = True) -> dict[str, Tensor]:
    """Inverse of :func:`flatten_state`: shapes (and, with ``cast``, dtypes) from ``reference``.

    Example:
        >>> ref = {"w": torch.zeros(1, 2), "n": torch.tensor(0)}
        >>> out = unflatten_state(torch.tensor([1.0, 2.0, 3.0, 9.0], dtype=torch.float64), ref)
        >>> out["w"].tolist(), out["n"].item()
        ([[1.0, 2.0]], 3)
    """
    out: dict[str, Tensor] = {}
    offset = 0
    for key, value in reference.items():
        n = value.numel()
        chunk = flat[offset : offset + n].view(value.shape)
        out[key] = chunk.to(value.dtype) if cast else chunk
        offset += n
    return out


@dataclass
class CommStats:
    """Communication of one process in one round."""

    seconds: float = 0.0
    bytes_sent: int = 0
    bytes_received: int = 0


class SiteComm:
    """Collectives between the processes of a federation, each owning some sites.

    Args:
        placement: ``{site: rank}``.
        rank: this process's global rank.
        world_size: number of processes (1: everything is local, nothing is sent).
        timeout: the collectives' timeout, for messages.
        device: where tensors must be for the backend (the GPU for NCCL, else the CPU).
    """

    def __init__(
        self, placement: Mapping[str, int], rank: int, world_size: int, timeout: timedelta | None, device: torch.device
    ) -> None:
        self.placement = dict(placement)
        self.rank = rank
        self.world_size = world_size
        self.timeout = timeout
        self.device = device

    @property
    def active(self) -> bool:
        return self.world_size > 1 and dist.is_available() and dist.is_initialized()

    def _call(self, stats: CommStats, round_idx: int, what: str, fn: Callable[..., Any], *args: Any, **kw: Any) -> Any:
        start = time.perf_counter()
        try:
            return fn(*args, **kw)
        except Exception as err:
            raise RuntimeError(
                f"Round {round_idx}: the {what} failed or timed out (timeout {self.timeout});"
                f" missing: {self.unresponsive_sites()}. The last round checkpoint is intact and resumable."
                f" Cause: {err}"
            ) from err
        finally:
            stats.seconds += time.perf_counter() - start

    def unresponsive_sites(self) -> str:
        """Name the sites of the processes that do not answer (gloo's monitored barrier)."""
        others = {s: r for s, r in self.placement.items() if r != self.rank}
        try:
            dist.monitored_barrier(timeout=timedelta(seconds=5), wait_all_ranks=True)
        except Exception as err:
            match = re.search(r"[Rr]anks? ([\d, ]+) failed", str(err))
            if match:
                ranks = {int(r) for r in re.findall(r"\d+", match.group(1))}
                return str(sorted(s for s, r in others.items() if r in ranks))
        return f"a process among those of sites {sorted(others)}"

    def all_reduce_sums(
        self,
        sums: Mapping[str, Tensor],
        total: float,
        count: int,
        reference: Mapping[str, Tensor],
        stats: CommStats,
        round_idx: int,
    ) -> tuple[dict[str, Tensor], float, int]:
        """Add up weighted sums, total weight and site count over all processes (one all-reduce).

        A process whose sites all failed (or that trained none) contributes zeros.
        """
        if not self.active:
            return dict(sums), total, count
        zeros = {k: sums[k] if k in sums else torch.zeros(v.shape, dtype=torch.float64) for k, v in reference.items()}
        flat = flatten_state(zeros, total, float(count)).to(self.device)
        self._call(stats, round_idx, "weighted all-reduce", dist.all_reduce, flat, op=dist.ReduceOp.SUM)
        nbytes = flat.numel() * flat.element_size()
        stats.bytes_sent += nbytes
        stats.bytes_received += nbytes
        flat = flat.cpu()
        return unflatten_state(flat, reference, cast=False), float(flat[-2]), round(float(flat[-1]))

    def broadcast_state(
        self, state: Mapping[str, Tensor], ok: bool, src: int, stats: CommStats, round_idx: int, what: str
    ) -> tuple[dict[str, Tensor] | None, bool]:
        """Send ``state`` (and whether its site succeeded) from ``src`` to every process.

        Returns the received state (``None`` on ``src`` itself) and the ``ok`` flag.
        """
        flat = flatten_state(state, 1.0 if ok else 0.0).to(self.device)
        self._call(stats, round_idx, what, dist.broadcast, flat, src=src)
        nbytes = flat.numel() * flat.element_size()
        if src == self.rank:
            stats.bytes_sent += nbytes * (self.world_size - 1)
            return None, ok
        stats.bytes_received += nbytes
        flat = flat.cpu()
        return unflatten_state(flat, state), bool(flat[-1] > 0.5)

    def gather_union(self, local: Any) -> Any:
        """Union of a set or dict over all processes (the object itself in one process)."""
        if not self.active:
            return local
        gathered: list[Any] = [None] * self.world_size
        dist.all_gather_object(gathered, local)
        merged = type(local)()
        for part in gathered:
            merged.update(part)
        return merged

    def merged_metrics(self, local: Mapping[str, float]) -> dict[str, float]:
        """Every process's metrics, so that all processes take the same decision: a site's own
        metric exists on its process only; a key several processes logged keeps the first finite value."""
        if not self.active:
            return dict(local)
        gathered: list[Any] = [None] * self.world_size
        dist.all_gather_object(gathered, dict(local))
        merged: dict[str, float] = {}
        for part in gathered:
            for key, value in part.items():
                if key not in merged or (value == value and merged[key] != merged[key]):
                    merged[key] = value
        return merged
