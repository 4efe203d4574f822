"""Where the sites run: one process (simulated) or one rank per site on torch.distributed.

The DDP machinery of :class:`~lightning.pytorch.strategies.DDPStrategy` launches and connects the
processes; this base of :class:`~lightning_fedseg.federation.strategy.FederatedStrategy` keeps one
process free of any process group, refuses unauthenticated remote addresses unless acknowledged,
leaves the sites' loaders unsharded (only ``cds`` is plain DDP), builds the fit's
:class:`~lightning_fedseg.federation.transport.Transport`, and sends Lightning's own broadcasts
through it as tensors, never pickled.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from lightning.pytorch.strategies import DDPStrategy
from lightning.pytorch.trainer.states import RunningStage, TrainerFn
from torch import nn
from typing_extensions import override

from lightning_fedseg.federation.flare_transport import FlareSession, FlareTransport
from lightning_fedseg.federation.placement import assign_sites
from lightning_fedseg.federation.transport import CommStats, DistributedTransport, LocalTransport, Transport

__all__ = ["FederatedProcesses"]


class FederatedProcesses(DDPStrategy):
    """Process and device handling of a federation: DDP's launcher and process group, no DDP wrapper.

    Args:
        allow_remote: acknowledge that torch.distributed traffic is neither encrypted nor
            authenticated; without it, a multi-process run refuses a non-loopback address.
        **kwargs: as for ``DDPStrategy``.
    """

    def __init__(self, allow_remote: bool = False, flare_profile: str | None = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.allow_remote = allow_remote
        self.flare_profile = flare_profile
        self._transport: Transport | None = None
        self._flare: FlareSession | None = None  # the FLARE session of this fit
        self._flare_rank = 0
        self._fit_done = False

    @property
    def federated(self) -> bool:
        """Whether sites train one at a time (otherwise this is plain DDP over pooled data)."""
        return True

    @property
    def is_multiprocess(self) -> bool:
        """Whether sites are spread over several processes (otherwise they are simulated)."""
        return self.num_nodes * self.num_processes > 1

    @property
    def is_distributed(self) -> bool:
        return self.is_multiprocess

    @property
    def over_flare(self) -> bool:
        """Whether this fit is one site of a federation whose hub is an NVIDIA FLARE server."""
        trainer = self.lightning_module.trainer if self.lightning_module is not None else None
        return self.flare_profile is not None and trainer is not None and trainer.state.fn == TrainerFn.FITTING

    @property
    def spread(self) -> bool:
        """Whether the sites train on several processes (torch.distributed ranks or FLARE sites)."""
        return self.is_multiprocess or self.over_flare

    @property
    def federation_rank(self) -> int:
        if self.over_flare:
            return self._flare_rank
        return self.global_rank if self.is_multiprocess else 0

    @override
    def _configure_launcher(self) -> None:
        if self.is_multiprocess:
            super()._configure_launcher()
        else:
            self._launcher = None

    @override
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
    @override
    def distributed_sampler_kwargs(self) -> dict[str, Any]:
        # Only centralized training shards its pooled training data over ranks (plain DDP).
        # Validation stays whole: per-volume metrics need whole volumes, and a federated rank
        # evaluates exactly the sites it owns.
        trainer = self.lightning_module.trainer if self.lightning_module is not None else None
        training = trainer is not None and trainer.state.stage == RunningStage.TRAINING
        if not self.federated and training:
            return super().distributed_sampler_kwargs
        return {"num_replicas": 1, "rank": 0}

    @override
    def configure_ddp(self) -> None:
        # No gradient synchronization between sites: only CDS on several ranks is plain DDP.
        if not self.federated and self.is_multiprocess:
            super().configure_ddp()

    @override
    def _setup_model(self, model: Any) -> Any:
        if not self.federated and self.is_multiprocess:
            return super()._setup_model(model)
        return model

    def federation_sites(self, datamodule: Any) -> tuple[str, ...]:
        """The federation's sites: the DataModule's; over FLARE, the hub's (this site's among them)."""
        local = tuple(str(s) for s in datamodule.site_names)
        if not self.over_flare:
            return local
        if self._flare is None:
            self._flare = FlareSession(str(self.flare_profile), self._timeout)
            self._flare.start()
        site = self._flare.site
        if site not in local:
            raise ValueError(
                f"The FLARE attach profile {self.flare_profile!r} names site {site!r}, but the DataModule's sites"
                f" are {list(local)}."
            )
        return tuple(self._flare.sites)

    def place_sites(self, sites: Sequence[str], datamodule: Any) -> dict[str, int]:
        """Sites -> processes: all here in one process; over FLARE, this process is its own site; on
        several ranks, balanced by a size every process knows without reading any site's data
        (``site_num_subjects``); the DataModule is told which sites this process trains (``restrict_sites``)."""
        if self.over_flare and self._flare is not None:  # the session started in `federation_sites`
            self._flare_rank = sites.index(self._flare.site)
            if hasattr(datamodule, "restrict_sites"):
                datamodule.restrict_sites((self._flare.site,))
            return {s: i for i, s in enumerate(sites)}
        if not self.is_multiprocess:
            return dict.fromkeys(sites, 0)
        sizer = getattr(datamodule, "site_num_subjects", None)
        sizes = {s: float(sizer(s)) if sizer is not None else 1.0 for s in sites}
        placement = assign_sites(sites, sizes, self.world_size)
        if hasattr(datamodule, "restrict_sites"):
            datamodule.restrict_sites(tuple(s for s in sites if placement[s] == self.federation_rank))
        return placement

    def sync_initial_weights(self, module: nn.Module, transport: Transport) -> None:
        """Every site starts from rank 0's initial weights, as DDP would ensure."""
        received, _ = transport.broadcast_state(
            module.state_dict(), ok=True, src=0, stats=CommStats(), round_idx=-1, what="initial weights"
        )
        if received is not None:
            module.load_state_dict(received)

    def make_transport(self, placement: Mapping[str, int]) -> Transport:
        """The transport of this fit: in-process for one process, torch.distributed for several, the
        FLARE hub for a site of a FLARE federation."""
        if self.over_flare and self._flare is not None:
            return FlareTransport(placement, self._flare_rank, self._flare)
        if not self.is_multiprocess:
            return LocalTransport(placement)
        backend = dist.get_backend() if dist.is_available() and dist.is_initialized() else "gloo"
        device = self.root_device if backend == "nccl" else torch.device("cpu")
        return DistributedTransport(placement, self.federation_rank, self.world_size, self._timeout, device)

    @property
    def transport(self) -> Transport:
        """The fit's transport (before the sites are placed: one without placement)."""
        if self._transport is None:
            return self.make_transport({})
        return self._transport

    @override
    def reduce(self, tensor: Any, group: Any | None = None, reduce_op: Any = "mean") -> Any:
        """Over FLARE, Lightning's reductions (``sync_dist`` logging, stop decisions) go through the hub."""
        transport = self._transport
        if not (self.over_flare and isinstance(transport, FlareTransport) and isinstance(tensor, torch.Tensor)):
            return super().reduce(tensor, group, reduce_op)
        name = str(getattr(reduce_op, "name", reduce_op)).lower()  # a string or torch's ReduceOp
        mean = name in ("mean", "avg")
        if not mean and name != "sum":
            raise ValueError(f"Over FLARE, `reduce` supports 'sum' and 'mean', not {reduce_op!r}.")
        return transport.reduce(tensor, mean)

    @override
    def on_train_end(self) -> None:
        self._fit_done = True
        super().on_train_end()

    def close_flare(self) -> None:
        """Detach from the FLARE job: ``done`` after a fit that finished, else only detach."""
        if self._flare is not None:
            session, self._flare = self._flare, None
            session.close(success=self._fit_done)
        self._fit_done = False

    @override
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
        message = json.loads(self.transport.broadcast_text(text, src) or "null")
        if message["kind"] == "error":
            raise TypeError(
                f"FederatedStrategy broadcasts only JSON-compatible values between processes (nothing is pickled);"
                f" got a {message['value']}."
            )
        value = message["value"]
        return Path(value) if message["kind"] == "path" else tuple(value) if message["kind"] == "tuple" else value
