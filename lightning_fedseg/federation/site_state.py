"""What belongs to a site between its visits: optimizer state, step-interval LR schedules.

The federation has one learning-rate schedule. Epoch-interval schedulers and ``ReduceLROnPlateau``
step once per round on the round's (global) metrics, as Lightning steps them once per epoch; every
site trains at the round's scheduled hyper-parameters, because a site's stored state is its
optimizer moments only (:meth:`SiteStates.enter` loads them under the optimizers' current
hyper-parameters). Step-interval schedulers (warm-up, ``OneCycleLR``) are local schedules: their
state and the hyper-parameters they set belong to the site like its optimizer moments.

Per-site state is kept only where it is used: under ``reset`` (a fresh optimizer at every visit)
nothing is stored; under ``keep``, or for modes that stay at one site, each process keeps its own
sites' states, and the states of one process never travel to another. The state of the site that
trained last stays live in the optimizers until another site needs them, so a process with one
site never copies anything, and a one-site federation is plain Lightning.
"""

from __future__ import annotations

import copy
import os
import shutil
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.core.optimizer import LightningOptimizer
from lightning.pytorch.utilities.types import LRSchedulerConfig
from torch import Tensor
from torch.optim import Optimizer

__all__ = ["SiteStates", "site_shard_dir"]

_NO_HYPER = ("params",)


def _clone(obj: Any) -> Any:
    """Deep CPU copy of nested dicts/lists/tuples of tensors (never views of live state)."""
    if isinstance(obj, Tensor):
        return obj.detach().to("cpu", copy=True)
    if isinstance(obj, dict):
        return {k: _clone(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_clone(v) for v in obj]
    if isinstance(obj, tuple):
        return tuple(_clone(v) for v in obj)
    return copy.copy(obj)


def _hyperparameters(optimizer: Optimizer) -> list[dict[str, Any]]:
    return [{k: copy.copy(v) for k, v in group.items() if k not in _NO_HYPER} for group in optimizer.param_groups]


def site_shard_dir(checkpoint_path: str | os.PathLike[str]) -> Path:
    """Folder beside a checkpoint where each process writes its own sites' states."""
    return Path(f"{os.fspath(checkpoint_path)}.sites")


class SiteStates:
    """Optimizer and step-scheduler state per site, on the process that trains the site.

    Args:
        optimizers: the module's optimizers (Lightning's wrappers are unwrapped).
        schedulers: Lightning's scheduler configs.
        keep: whether a site's state is kept from one visit to the next.
    """

    def __init__(self, optimizers: Sequence[Optimizer], schedulers: Sequence[LRSchedulerConfig], keep: bool) -> None:
        self.optimizers = [o.optimizer if isinstance(o, LightningOptimizer) else o for o in optimizers]
        self.schedulers = list(schedulers)
        self.keep = keep
        self._local = {id(c.scheduler) for c in self.schedulers if c.interval == "step"}
        # The state every fresh visit starts from: the optimizers (and local schedules) as configured.
        self._initial = self._capture()
        self._stored: dict[str, dict[str, Any]] = {}
        self.live: str | None = None
        self.client: dict[str, dict[str, Any]] = {}
        """``{site: {client step name: state}}``: what client steps keep per site (always kept)."""

    def _local_configs(self) -> list[LRSchedulerConfig]:
        return [c for c in self.schedulers if id(c.scheduler) in self._local]

    def _local_optimizers(self) -> set[int]:
        return {id(c.scheduler.optimizer) for c in self._local_configs()}

    # ------------------------------------------------------------------ visits
    def enter(self, site: str) -> None:
        """Put ``site``'s state into the optimizers: its own if kept, else a fresh one; zero the gradients."""
        if not self.keep:
            self._load(self._initial)
        elif site != self.live:
            if self.live is not None:
                self._stored[self.live] = self._capture()
            self._load(self._stored.get(site, self._initial))
        self.live = site
        for optimizer in self.optimizers:
            optimizer.zero_grad(set_to_none=True)

    def forget(self, site: str) -> None:
        """Discard the live state of ``site`` (a failed visit): its next visit starts from its last stored state."""
        if self.live == site:
            self.live = None

    def _capture(self) -> dict[str, Any]:
        local = self._local_optimizers()
        return {
            "optimizers": [_clone(o.state_dict()["state"]) for o in self.optimizers],
            "hyper": [_hyperparameters(o) if id(o) in local else None for o in self.optimizers],
            "schedulers": [_clone(c.scheduler.state_dict()) for c in self._local_configs()],
        }

    def _load(self, stored: Mapping[str, Any]) -> None:
        for optimizer, state, hyper in zip(self.optimizers, stored["optimizers"], stored["hyper"], strict=True):
            # The hyper-parameters (LR, momentum, ...) stay the round's: they are not the site's state.
            if not state and not optimizer._optimizer_load_state_dict_pre_hooks:
                optimizer.state.clear()  # what loading an empty state with the same groups does, at no cost
                for hook in optimizer._optimizer_load_state_dict_post_hooks.values():
                    hook(optimizer)
            else:
                groups = optimizer.state_dict()["param_groups"]
                optimizer.load_state_dict({"state": _clone(state), "param_groups": groups})
            if hyper is not None:  # a local schedule: the site's own hyper-parameters
                for group, values in zip(optimizer.param_groups, hyper, strict=True):
                    group.update(copy.deepcopy(values))
        for config, state in zip(self._local_configs(), stored["schedulers"], strict=True):
            config.scheduler.load_state_dict(_clone(state))

    # ------------------------------------------------------------------ checkpoints
    def optimizer_state(self, optimizer: Optimizer) -> dict[str, Any]:
        """What Lightning's own ``optimizer_states`` hold: the round's hyper-parameters, no site's moments."""
        state = optimizer.state_dict()
        index = self.optimizers.index(optimizer)
        return {"state": _clone(self._initial["optimizers"][index]), "param_groups": state["param_groups"]}

    def state_dict(self, sites: Iterable[str] | None = None) -> dict[str, dict[str, Any]]:
        """Every stored site's state (and the live site's, copied): ``{site: state}``."""
        out = {site: state for site, state in self._stored.items()}
        if self.keep and self.live is not None:
            out[self.live] = self._capture()
        if sites is not None:
            wanted = set(sites)
            out = {s: v for s, v in out.items() if s in wanted}
        return out

    def load_state_dict(self, states: Mapping[str, Mapping[str, Any]]) -> None:
        self._stored = {site: dict(state) for site, state in states.items()}
        self.live = None

    def client_state(self, site: str, name: str) -> Any | None:
        return self.client.get(site, {}).get(name)

    def set_client_state(self, site: str, name: str, state: Any) -> None:
        self.client.setdefault(site, {})[name] = state

    def save_shards(
        self, checkpoint_path: str | os.PathLike[str], sites: Sequence[str], index: Mapping[str, int]
    ) -> None:
        """Write this process's sites' states beside the checkpoint, one file per site, atomically."""
        folder = site_shard_dir(checkpoint_path)
        folder.mkdir(parents=True, exist_ok=True)
        optimizer_states = self.state_dict(sites)
        for site in sites:
            if site not in optimizer_states and site not in self.client:
                continue
            path = folder / f"site{index[site]}.pt"
            tmp = path.with_suffix(".pt.tmp")
            shard = {"site": site, "state": optimizer_states.get(site), "client": self.client.get(site, {})}
            torch.save(shard, tmp)
            os.replace(tmp, path)

    @staticmethod
    def read_shards(checkpoint_path: str | os.PathLike[str], sites: Sequence[str]) -> dict[str, dict[str, Any]]:
        """The shards (``{"state", "client"}``) of ``sites`` beside ``checkpoint_path`` (a linked
        ``last.ckpt`` is followed)."""
        folder = site_shard_dir(checkpoint_path)
        if not folder.is_dir():
            folder = site_shard_dir(os.path.realpath(checkpoint_path))
        out: dict[str, dict[str, Any]] = {}
        if not folder.is_dir():
            return out
        wanted = set(sites)
        for path in sorted(folder.glob("site*.pt")):
            shard = torch.load(path, map_location="cpu", weights_only=True)
            if shard["site"] in wanted:
                out[shard["site"]] = shard
        return out

    @staticmethod
    def remove_shards(checkpoint_path: str | os.PathLike[str], sites: Sequence[str], index: Mapping[str, int]) -> None:
        folder = site_shard_dir(checkpoint_path)
        for site in sites:
            (folder / f"site{index[site]}.pt").unlink(missing_ok=True)
        if folder.is_dir() and not any(folder.iterdir()):
            shutil.rmtree(folder, ignore_errors=True)
