"""Federated checkpoints: the federation's part of Lightning's checkpoint, and each site's shard.

Lightning's own ``optimizer_states`` hold the round's hyper-parameters and no site's moments; the
federation part (:data:`FEDERATION_KEY`) holds the round counter and history, the mode's, server
step's and client steps' state, all of one closed round. Each site's optimizer and client-step
state is written by the process that trains it: inside the checkpoint in one process, or beside it
(``<checkpoint>.sites/site<i>.pt``) on several. A checkpoint inside a round is refused: it would
hold one site's local weights as if they were the global model.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

from lightning_fedseg.federation.client_steps import ClientStep
from lightning_fedseg.federation.engine import RoundEngine
from lightning_fedseg.federation.modes import CollaborationMode
from lightning_fedseg.federation.server import ServerStep
from lightning_fedseg.federation.site_state import SiteStates

__all__ = ["FEDERATION_KEY", "FederationCheckpoint"]

FEDERATION_KEY = "federation"
_STATE_VERSION = 3  # 3: the counter and the history move with the round's server step (closed rounds)


class FederationCheckpoint:
    """Writes and reads the federation's part of a checkpoint and the site shards beside it.

    Args:
        mode, server, clients: the federation's algorithm objects (their own ``state_dict``).
        engine: the round engine (round counter and history).
        site_states: this process's sites' states.
        local_sites: the sites this process trains.
        site_index: ``{site: index}`` of the whole federation (names the shard files).
        sharded: whether site states go beside the checkpoint (several processes).
    """

    def __init__(
        self,
        mode: CollaborationMode,
        server: ServerStep,
        clients: Sequence[ClientStep],
        engine: RoundEngine,
        site_states: SiteStates,
        local_sites: Sequence[str],
        site_index: Mapping[str, int],
        sharded: bool,
    ) -> None:
        self.mode = mode
        self.server = server
        self.clients = tuple(clients)
        self.engine = engine
        self.site_states = site_states
        self.local_sites = tuple(local_sites)
        self.site_index = dict(site_index)
        self.sharded = sharded

    @property
    def has_site_states(self) -> bool:
        return self.site_states.keep or bool(self.clients)

    def state_dict(self) -> dict[str, Any]:
        """The federation part of the checkpoint (each process's site states go beside when sharded)."""
        return {
            "version": _STATE_VERSION,
            "mode": type(self.mode).__name__,
            "mode_state": self.mode.state_dict(),
            "site_states": {} if self.sharded else self.site_states.state_dict(),
            "client_states": {} if self.sharded else self.site_states.client,
            "server": self.server.state_dict(),
            "clients": {step.name: step.state_dict() for step in self.clients},
            **self.engine.state_dict(),  # `completed_rounds` and `history`
        }

    def load_state_dict(self, state: Mapping[str, Any], checkpoint_path: str | None) -> None:
        """Restore everything :meth:`state_dict` wrote, and this process's shards beside ``checkpoint_path``."""
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
        if checkpoint_path is not None:
            for site, shard in SiteStates.read_shards(checkpoint_path, self.local_sites).items():
                if shard["state"] is not None:
                    site_states[site] = shard["state"]
                client_states[site] = dict(shard["client"])
        self.site_states.load_state_dict(site_states)
        self.site_states.client = client_states
        self.server.load_state_dict(state["server"])
        for step in self.clients:
            step.load_state_dict(state["clients"][step.name])
        self.engine.load_state_dict(state)

    def save(self, checkpoint: dict[str, Any], filepath: str | os.PathLike[str]) -> None:
        """Add the federation part to ``checkpoint``; write this process's shards beside ``filepath``."""
        rnd = self.engine.round
        if rnd is not None:  # training (one site's weights) or validating (the round not yet closed)
            held = (
                "the round's new global weights before the round closed" if rnd.finished else "one site's local weights"
            )
            raise RuntimeError(
                f"A checkpoint was requested inside round {rnd.index}, while the module holds {held};"
                " resuming from it would not continue the federation where it stopped. Federated"
                " checkpoints are taken at round ends. HINT: `ModelCheckpoint(every_n_epochs=...)`; under SLURM,"
                " `SLURMEnvironment(auto_requeue=False)` and resume from `last.ckpt`."
            )
        checkpoint[FEDERATION_KEY] = self.state_dict()
        if self.sharded and self.has_site_states:
            self.site_states.save_shards(filepath, self.local_sites, self.site_index)

    def remove(self, filepath: str | os.PathLike[str]) -> None:
        """Remove this process's shards of the checkpoint at ``filepath``."""
        if self.sharded and self.has_site_states:
            SiteStates.remove_shards(filepath, self.local_sites, self.site_index)
