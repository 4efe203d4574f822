"""Where the sites run: one process (simulated) or one rank per site on torch.distributed.

The DDP machinery of :class:`~lightning.pytorch.strategies.DDPStrategy` launches and connects the
processes; this mixin keeps one process free of any process group, refuses unauthenticated
remote addresses unless acknowledged, leaves the sites' loaders unsharded (only ``cds`` is plain
DDP), and sends Lightning's own broadcasts as tensors, never pickled.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
from lightning.pytorch.strategies import DDPStrategy
from lightning.pytorch.trainer.states import RunningStage

from lightning_fedseg.federation.comm import SiteComm

__all__ = ["FederatedProcesses"]


class FederatedProcesses(DDPStrategy):
    """Process and device handling of :class:`~lightning_fedseg.federation.strategy.FederatedStrategy`."""

    allow_remote: bool
    placement: dict[str, int]

    if TYPE_CHECKING:  # provided by FederatedStrategy

        @property
        def federated(self) -> bool: ...

    @property
    def is_multiprocess(self) -> bool:
        """Whether sites are spread over several processes (otherwise they are simulated)."""
        return self.num_nodes * self.num_processes > 1

    @property
    def is_distributed(self) -> bool:
        return self.is_multiprocess

    @property
    def federation_rank(self) -> int:
        return self.global_rank if self.is_multiprocess else 0

    def _configure_launcher(self) -> None:
        if self.is_multiprocess:
            super()._configure_launcher()
        else:
            self._launcher = None

    def setup_distributed(self) -> None:
        self.set_world_ranks()
        if not self.is_multiprocess:
            return
        self._check_address()
        super().setup_distributed()

    def _check_address(self) -> None:
        import ipaddress
        import socket

        assert self.cluster_environment is not None
        address = self.cluster_environment.main_address
        try:
            loopback = all(ipaddress.ip_address(info[4][0]).is_loopback for info in socket.getaddrinfo(address, None))
        except (OSError, ValueError):
            loopback = False
        if not loopback and not self.allow_remote:
            raise RuntimeError(
                f"FederatedStrategy refuses to bind the non-loopback address {address!r}:"
                " torch.distributed traffic is neither encrypted nor authenticated."
                " HINT: run the sites over a private network, a VPN or an SSH tunnel, then set"
                " `allow_remote=True` to acknowledge this."
            )

    @property
    def distributed_sampler_kwargs(self) -> dict[str, Any]:
        # Only centralized training shards its pooled training data over ranks (plain DDP).
        # Validation stays whole: per-volume metrics need whole volumes, and a federated rank
        # evaluates exactly the sites it owns.
        trainer = self.lightning_module.trainer if self.lightning_module is not None else None
        training = trainer is not None and trainer.state.stage == RunningStage.TRAINING
        if not self.federated and training:
            return super().distributed_sampler_kwargs
        return {"num_replicas": 1, "rank": 0}

    def configure_ddp(self) -> None:
        # No gradient synchronization between sites: only CDS on several ranks is plain DDP.
        if not self.federated and self.is_multiprocess:
            super().configure_ddp()

    def _setup_model(self, model: Any) -> Any:
        if not self.federated and self.is_multiprocess:
            return super()._setup_model(model)
        return model

    @property
    def comm(self) -> SiteComm:
        """Collectives between this process and the others (a no-op in one process)."""
        world = self.world_size if self.is_multiprocess else 1
        backend = dist.get_backend() if dist.is_available() and dist.is_initialized() else "gloo"
        device = self.root_device if backend == "nccl" else torch.device("cpu")
        return SiteComm(self.placement, self.federation_rank, world, self._timeout, device)

    def broadcast(self, obj: Any, src: int = 0) -> Any:
        """Lightning's broadcasts (checkpoint paths, flags) as JSON text in a byte tensor, never pickled."""
        if not (self.is_multiprocess and dist.is_available() and dist.is_initialized()):
            return obj
        text = None
        if self.global_rank == src:
            kind = "path" if isinstance(obj, os.PathLike) else "tuple" if isinstance(obj, tuple) else "json"
            try:
                text = json.dumps({"kind": kind, "value": os.fspath(obj) if kind == "path" else obj})
            except TypeError:
                text = json.dumps({"kind": "error", "value": type(obj).__name__})
        message = json.loads(self.comm.broadcast_text(text, src) or "null")
        if message["kind"] == "error":
            raise TypeError(
                f"FederatedStrategy broadcasts only JSON-compatible values between processes (nothing is pickled);"
                f" got a {message['value']}."
            )
        value = message["value"]
        return Path(value) if message["kind"] == "path" else tuple(value) if message["kind"] == "tuple" else value
