"""Federated checkpoints: the mode's state and history in Lightning's checkpoint, site states at home.

Lightning's own ``optimizer_states`` hold the round's hyper-parameters and no site's moments; the
federation part holds the mode, server and client steps' state and the history. Each site's
optimizer and client-step state is written by the process that trains it: inside the checkpoint in
one process, or beside it (``<checkpoint>.sites/site<i>.pt``) on several. A checkpoint inside a
round is refused: it would hold one site's local weights as if they were the global model.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from lightning.pytorch.strategies import DDPStrategy
from torch.optim import Optimizer

from lightning_fedseg.federation.site_state import SiteStates

if TYPE_CHECKING:
    from lightning_fedseg.federation.client_steps import ClientStep
    from lightning_fedseg.federation.engine import RoundEngine
    from lightning_fedseg.federation.modes import CollaborationMode
    from lightning_fedseg.federation.server import ServerStep

__all__ = ["FEDERATION_KEY", "FederatedCheckpointing"]

FEDERATION_KEY = "federation"
_STATE_VERSION = 2


class FederatedCheckpointing(DDPStrategy):
    """Checkpoint handling of :class:`~lightning_fedseg.federation.strategy.FederatedStrategy`."""

    mode: CollaborationMode
    server: ServerStep
    clients: tuple[ClientStep, ...]
    engine: RoundEngine
    site_states: SiteStates
    optimizer_state_policy: str
    history: list[dict[str, Any]]
    completed_rounds: int
    _ready: bool
    _pending_state: dict[str, Any] | None
    _pending_path: str | None

    if TYPE_CHECKING:  # provided by FederatedStrategy and FederatedProcesses

        @property
        def federated(self) -> bool: ...

        @property
        def is_multiprocess(self) -> bool: ...

        @property
        def local_sites(self) -> tuple[str, ...]: ...

        def site_index(self, site: str) -> int: ...

    def federation_state_dict(self) -> dict[str, Any]:
        """The mode's state, the history and the round count (each process's site states go beside)."""
        return {
            "version": _STATE_VERSION,
            "mode": type(self.mode).__name__,
            "mode_state": self.mode.state_dict(),
            "optimizer_state": self.optimizer_state_policy,
            "site_states": {} if self.is_multiprocess else self.site_states.state_dict(),
            "client_states": {} if self.is_multiprocess else self.site_states.client,
            "server": self.server.state_dict(),
            "clients": {step.name: step.state_dict() for step in self.clients},
            "history": self.history,
            "completed_rounds": self.completed_rounds,
        }

    def _load_federation_state(self, state: Mapping[str, Any]) -> None:
        if state.get("mode") != type(self.mode).__name__:
            raise ValueError(
                f"The checkpoint was written by the {state.get('mode')} mode, but this run uses"
                f" {type(self.mode).__name__}."
            )
        if state.get("version") != _STATE_VERSION:
            raise ValueError(
                f"The checkpoint's federation state has version {state.get('version')}; this lightning_fedseg"
                f" reads version {_STATE_VERSION}. HINT: resume with the version that wrote it."
            )
        self.mode.load_state_dict(state["mode_state"])
        local = set(self.local_sites)
        site_states = {s: v for s, v in state.get("site_states", {}).items() if s in local}
        client_states = {s: dict(v) for s, v in state.get("client_states", {}).items() if s in local}
        if self._pending_path is not None:
            for site, shard in SiteStates.read_shards(self._pending_path, self.local_sites).items():
                if shard["state"] is not None:
                    site_states[site] = shard["state"]
                client_states[site] = dict(shard["client"])
        self.site_states.load_state_dict(site_states)
        self.site_states.client = client_states
        self.server.load_state_dict(state["server"])
        for step in self.clients:
            step.load_state_dict(state["clients"][step.name])
        self.history = list(state.get("history", []))
        self.completed_rounds = int(state["completed_rounds"])

    def optimizer_state(self, optimizer: Optimizer) -> dict[str, Any]:
        if not self.federated:
            return super().optimizer_state(optimizer)
        return self.site_states.optimizer_state(optimizer)

    def save_checkpoint(self, checkpoint: dict[str, Any], filepath: Any, storage_options: Any | None = None) -> None:
        if self.engine.in_round:
            rnd = self.engine.round
            raise RuntimeError(
                f"A checkpoint was requested inside round {rnd.index if rnd else '?'}, while the module holds one"
                " site's local weights; resuming from it would take them for the global model. Federated"
                " checkpoints are taken at round ends. HINT: `ModelCheckpoint(every_n_epochs=...)`; under SLURM,"
                " `SLURMEnvironment(auto_requeue=False)` and resume from `last.ckpt`."
            )
        if self._ready:
            checkpoint[FEDERATION_KEY] = self.federation_state_dict()
            if self.is_multiprocess and self._has_site_states:
                index = {s: self.site_index(s) for s in self.local_sites}
                self.site_states.save_shards(filepath, self.local_sites, index)
        super().save_checkpoint(checkpoint, filepath, storage_options=storage_options)

    @property
    def _has_site_states(self) -> bool:
        return self.site_states.keep or bool(self.clients)

    def remove_checkpoint(self, filepath: Any) -> None:
        if self.is_multiprocess and self._has_site_states:
            SiteStates.remove_shards(filepath, self.local_sites, {s: self.site_index(s) for s in self.local_sites})
        super().remove_checkpoint(filepath)

    def load_checkpoint(self, checkpoint_path: Any, weights_only: bool | None = None) -> dict[str, Any]:
        checkpoint = super().load_checkpoint(checkpoint_path, weights_only=weights_only)
        if FEDERATION_KEY in checkpoint:
            self._pending_state = checkpoint[FEDERATION_KEY]
            self._pending_path = os.fspath(checkpoint_path)
            self._ready = False
        return checkpoint
