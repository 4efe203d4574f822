"""The transport seam: everything that crosses a site boundary, behind one interface.

Only model weights, sample counts, metrics, flags and public keys cross, always as tensors (never
pickled objects); samples, labels, gradients and optimizer moments never do. The round engine and
the client steps call the operations of :class:`Transport` (weighted sums, masked sums, every
site's state for robust rules, chained hand-overs, metrics, flags, short texts); each is built on
three primitives, an all-reduce, a broadcast and an all-gather of one flat tensor.

Two transports today, chosen once per fit by the strategy:

* :class:`LocalTransport`: every site in one process (the simulation); nothing is sent.
* :class:`DistributedTransport`: one or more sites per process on torch.distributed. Every
  primitive is a collective over the default process group, counted in :class:`CommStats`
  (seconds and bytes) and wrapped so that a dead or hung peer surfaces as an error naming the
  round and the missing sites.

A transport across institutions (hub and spoke, e.g. NVIDIA FLARE) implements the same operations.
"""

from __future__ import annotations

import math
import re
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, ClassVar

import torch
import torch.distributed as dist
from torch import Tensor

__all__ = ["CommStats", "DistributedTransport", "LocalTransport", "Transport", "flatten_state", "unflatten_state"]


def flatten_state(state: Mapping[str, Tensor], *extra: float, device: torch.device | str = "cpu") -> Tensor:
    """One float64 vector on ``device`` of every tensor of ``state`` (in key order), then ``extra`` scalars.

    Example:
        >>> flatten_state({"w": torch.tensor([[1.0, 2.0]]), "n": torch.tensor(3)}, 9.0).tolist()
        [1.0, 2.0, 3.0, 9.0]
    """
    parts = [v.detach().reshape(-1).to(device, torch.float64) for v in state.values()]
    return torch.cat([*parts, torch.tensor(extra, dtype=torch.float64, device=device)])


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


class Transport:
    """Everything that crosses a site boundary, for the sites ``placement`` puts on processes.

    The operations are the same for every transport; a subclass provides the three primitives
    (:meth:`_all_reduce`, :meth:`_broadcast`, :meth:`_all_gather`). Where :attr:`active` is false
    (one process) every operation returns its local input and sends nothing.

    Args:
        placement: ``{site: rank}``.
        rank: this process's rank.
        world_size: number of processes (1: everything is local, nothing is sent).
        timeout: the primitives' timeout, for messages.
        device: where tensors must be for the primitives (the GPU for NCCL, else the CPU).
    """

    hub_runs_site_steps: ClassVar[bool] = False
    """Whether a hub runs the server steps that need each site's own state (:meth:`step_at_hub`),
    so that no process receives another's state; otherwise every process gathers them."""

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
        """Whether anything is sent (several processes)."""
        return False

    # ------------------------------------------------------------------ primitives
    def _all_reduce(self, flat: Tensor, op: str = "sum") -> None:
        """Reduce ``flat`` in place over all processes (``op``: ``"sum"`` or ``"max"``)."""
        raise NotImplementedError

    def _broadcast(self, flat: Tensor, src: int) -> None:
        """Replace ``flat`` in place by ``src``'s."""
        raise NotImplementedError

    def _all_gather(self, flat: Tensor) -> list[Tensor]:
        """Every process's ``flat`` (all of one shape), in rank order."""
        raise NotImplementedError

    def unresponsive_sites(self) -> str:
        """Name the sites of the processes that do not answer (for error messages)."""
        others = sorted(s for s, r in self.placement.items() if r != self.rank)
        return f"a process among those of sites {others}"

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

    def all_reduce_sums(
        self,
        sums: Mapping[str, Tensor],
        total: float,
        count: int,
        reference: Mapping[str, Tensor],
        stats: CommStats,
        round_idx: int,
        masked: bool = False,
    ) -> tuple[dict[str, Tensor], float, int]:
        """Add up weighted sums, total weight and site count over all processes (one all-reduce;
        with ``masked``, of pairwise-masked fixed-point encodings, see :mod:`.masking`).

        A process whose sites all failed (or that trained none) contributes zeros.
        """
        if not self.active:
            return dict(sums), total, count
        zeros = {k: sums[k] if k in sums else torch.zeros(v.shape, dtype=torch.float64) for k, v in reference.items()}
        if masked:  # the fixed-point encoding and the masks are made on the CPU
            flat = self._masked_sum(flatten_state(zeros, total, float(count)), count > 0, stats, round_idx)
        else:  # flattened where the backend reduces (the GPU for NCCL): no round trip through the CPU
            flat = flatten_state(zeros, total, float(count), device=self.device)
            self._call(stats, round_idx, "weighted all-reduce", self._all_reduce, flat)
            nbytes = flat.numel() * flat.element_size()
            stats.bytes_sent += nbytes
            stats.bytes_received += nbytes
        home = next(iter(reference.values())).device if reference else torch.device("cpu")
        flat = flat.to(home)  # where the global model lives
        scalars = flat[-2:].tolist()
        return unflatten_state(flat, reference, cast=False), float(scalars[0]), round(scalars[1])

    def broadcast_state(
        self, state: Mapping[str, Tensor], ok: bool, src: int, stats: CommStats, round_idx: int, what: str
    ) -> tuple[dict[str, Tensor] | None, bool]:
        """Send ``state`` (and whether its site succeeded) from ``src`` to every process.

        Returns the received state (``None`` on ``src`` itself) and the ``ok`` flag.
        """
        if not self.active:
            return None, ok
        flat = flatten_state(state, 1.0 if ok else 0.0).to(self.device)
        self._call(stats, round_idx, what, self._broadcast, flat, src)
        nbytes = flat.numel() * flat.element_size()
        if src == self.rank:
            stats.bytes_sent += nbytes * (self.world_size - 1)
            return None, ok
        stats.bytes_received += nbytes
        flat = flat.cpu()
        return unflatten_state(flat, state), bool(flat[-1] > 0.5)

    def _masked_sum(self, flat: Tensor, participating: bool, stats: CommStats, round_idx: int) -> Tensor:
        """The sum over processes of ``flat`` (float64), each process's vector pairwise-masked."""
        from lightning_fedseg.federation.masking import RoundKeys, decode, encode, mask

        flags = torch.zeros(self.world_size, dtype=torch.float64, device=self.device)
        flags[self.rank] = 1.0 if participating else 0.0
        self._call(stats, round_idx, "agreement on the masked set", self._all_reduce, flags)
        members = [r for r, flag in enumerate(flags.tolist()) if flag > 0]
        keys = RoundKeys() if participating else None
        publics = self._public_keys(keys.public_bytes() if keys is not None else None, members, stats, round_idx)
        encoded = encode(flat)
        if keys is not None:
            pair_keys = {
                peer: keys.shared_key(publics[peer], round_idx, min(peer, self.rank), max(peer, self.rank))
                for peer in members
                if peer != self.rank
            }
            encoded = mask(encoded, self.rank, pair_keys, round_idx)
        encoded = encoded.to(self.device)
        self._call(stats, round_idx, "masked all-reduce", self._all_reduce, encoded)
        nbytes = encoded.numel() * encoded.element_size() + 32 * self.world_size + flags.numel() * 8
        stats.bytes_sent += nbytes
        stats.bytes_received += nbytes
        return decode(encoded.cpu())

    def _public_keys(
        self, public: bytes | None, members: Sequence[int], stats: CommStats, round_idx: int
    ) -> dict[int, bytes]:
        """Every member's round public key (32 bytes), by rank: one all-gather (``public`` is
        ``None`` where this process has no site in the round). A transport whose relay could swap
        keys authenticates them (:class:`~lightning_fedseg.federation.flare_transport.FlareTransport`)."""
        mine = torch.zeros(32, dtype=torch.uint8)
        if public is not None:
            mine = torch.frombuffer(bytearray(public), dtype=torch.uint8)
        gathered = self._call(stats, round_idx, "key exchange", self._all_gather, mine.to(self.device))
        return {rank: bytes(gathered[rank].cpu().tolist()) for rank in members}

    def step_at_hub(
        self,
        rows: Sequence[tuple[int, float, Mapping[str, Tensor]]],
        reference: Mapping[str, Tensor],
        param_keys: Sequence[str],
        stats: CommStats,
        round_idx: int,
        min_sites: int,
    ) -> tuple[dict[str, Tensor] | None, int]:
        """Where :attr:`hub_runs_site_steps`: this process's ``(site index, weight, state)`` rows go to
        the hub, which runs the step; ``(new global state or None below min_sites, sites combined)``."""
        raise NotImplementedError(f"{type(self).__name__} has no hub.")

    def union(self, sites: Sequence[str], local: Iterable[str]) -> set[str]:
        """The sites (of ``sites``) named by ``local`` on any process: one all-reduce of 0/1 flags."""
        local = set(local)
        if not self.active:
            return local
        flags = torch.tensor([1.0 if s in local else 0.0 for s in sites], dtype=torch.float64, device=self.device)
        self._call(CommStats(), -1, "union of site flags", self._all_reduce, flags)
        return {s for s, flag in zip(sites, flags.tolist(), strict=True) if flag > 0}

    def merged_metrics(self, local: Mapping[str, float], keys: Sequence[str]) -> dict[str, float]:
        """``local`` plus each of ``keys`` from the processes that logged it, so that every process
        decides the same. A site's own metric exists on its process only; where several processes
        logged a key, the mean of their finite values. One all-reduce of (value, count) pairs."""
        merged = dict(local)
        if not self.active or not keys:
            return merged
        pairs = []
        for key in keys:
            value = local.get(key)
            present = value is not None and math.isfinite(value)
            pairs += [float(value) if present else 0.0, 1.0 if present else 0.0]  # type: ignore[arg-type]
        flat = torch.tensor(pairs, dtype=torch.float64, device=self.device)
        self._call(CommStats(), -1, "merge of round metrics", self._all_reduce, flat)
        for i, key in enumerate(keys):
            total, count = float(flat[2 * i]), float(flat[2 * i + 1])
            if count > 0:
                merged[key] = total / count
            elif key in local:
                merged[key] = local[key]
        return merged

    def gather_states(
        self,
        local: Sequence[tuple[int, float, Mapping[str, Tensor]]],
        reference: Mapping[str, Tensor],
        stats: CommStats,
        round_idx: int,
    ) -> list[tuple[int, float, dict[str, Tensor]]]:
        """Every process's ``(site index, weight, state)`` of the round, sorted by site index.

        For server steps that need each site's state (robust rules). One all-reduce of the site
        count, then one all-gather of ``max count x (2 + state size)`` float64 values per process.
        """
        rows = sorted(local, key=lambda r: r[0])
        if not self.active:
            return [(i, w, dict(s)) for i, w, s in rows]
        count = torch.tensor([float(len(rows))], dtype=torch.float64, device=self.device)
        self._call(stats, round_idx, "count of site states", self._all_reduce, count, "max")
        most = int(count.item())
        size = sum(v.numel() for v in reference.values()) + 2
        buffer = torch.zeros(most, size, dtype=torch.float64)
        for row, (index, weight, state) in enumerate(rows):  # [state..., site index, weight]
            buffer[row] = flatten_state({k: state[k] for k in reference}, float(index), float(weight))
        buffer = buffer.to(self.device)
        gathered = self._call(stats, round_idx, "all-gather of site states", self._all_gather, buffer)
        nbytes = buffer.numel() * buffer.element_size()
        stats.bytes_sent += nbytes * (self.world_size - 1)
        stats.bytes_received += nbytes * (self.world_size - 1)
        out = []
        for part in gathered:
            for row in part.cpu():
                if row[-1] > 0:  # padding rows have weight 0
                    out.append((int(row[-2]), float(row[-1]), unflatten_state(row[:-2], reference)))
        return sorted(out, key=lambda r: r[0])

    def broadcast_text(self, text: str | None, src: int = 0) -> str | None:
        """Send a short string (a checkpoint path, a version) from ``src`` as a byte tensor, never pickled."""
        if not self.active:
            return text
        data = b"" if text is None else text.encode()
        header = torch.tensor([len(data), 0 if text is None else 1], dtype=torch.int64, device=self.device)
        self._call(CommStats(), -1, "broadcast of a text's length", self._broadcast, header, src)
        buffer = torch.zeros(int(header[0]), dtype=torch.uint8, device=self.device)
        if self.rank == src:
            buffer = torch.frombuffer(bytearray(data), dtype=torch.uint8).to(self.device) if data else buffer
        if buffer.numel():
            self._call(CommStats(), -1, "broadcast of a text", self._broadcast, buffer, src)
        if not int(header[1]):
            return None
        return bytes(buffer.cpu().tolist()).decode()


class LocalTransport(Transport):
    """Every site in this one process (the simulation): nothing crosses a process boundary."""

    def __init__(self, placement: Mapping[str, int], device: torch.device | None = None) -> None:
        super().__init__(placement, rank=0, world_size=1, timeout=None, device=device or torch.device("cpu"))


class DistributedTransport(Transport):
    """Sites on the processes of torch.distributed's default process group (gloo or NCCL).

    Plain TCP with no encryption or authentication: for one trusted network (a cluster, a VPN).
    """

    @property
    def active(self) -> bool:
        return self.world_size > 1 and dist.is_available() and dist.is_initialized()

    def _all_reduce(self, flat: Tensor, op: str = "sum") -> None:
        dist.all_reduce(flat, op=dist.ReduceOp.MAX if op == "max" else dist.ReduceOp.SUM)

    def _broadcast(self, flat: Tensor, src: int) -> None:
        dist.broadcast(flat, src=src)

    def _all_gather(self, flat: Tensor) -> list[Tensor]:
        out = [torch.empty_like(flat) for _ in range(self.world_size)]
        dist.all_gather(out, flat)
        return out

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
        return super().unresponsive_sites()
