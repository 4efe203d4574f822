"""The engine's host on Lightning: what only the Trainer can give the round engine.

:class:`~lightning_fedseg.federation.engine.RoundEngine` talks to a narrow
:class:`~lightning_fedseg.federation.rounds.RoundHost`; :class:`LightningHost` is that host for
:class:`~lightning_fedseg.federation.strategy.FederatedStrategy` (a base class of it): the live
LightningModule and its device, a site's training loader and FedAvg weight from the DataModule's
site seam (:mod:`.site_data`), and the ``on_site_start`` / ``on_site_end`` callback hooks.
"""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import torch

from lightning_fedseg.federation.site_data import site_datamodule, site_num_samples

__all__ = ["LightningHost"]


class LightningHost:
    """The :class:`~lightning_fedseg.federation.rounds.RoundHost` side of a Lightning strategy."""

    lightning_module: pl.LightningModule | None
    root_device: torch.device

    @property
    def module(self) -> pl.LightningModule:
        assert self.lightning_module is not None
        return self.lightning_module

    @property
    def device(self) -> torch.device:
        return self.root_device

    def datamodule(self) -> Any:
        trainer = self.lightning_module.trainer if self.lightning_module is not None else None
        return site_datamodule(trainer)

    def site_train_dataloader(self, site: str) -> Any:
        return self.datamodule().site_train_dataloader(site)

    def site_weight(self, site: str, loader: Any = None) -> float:
        return site_num_samples(self.datamodule(), site, loader)

    def call_site_hook(self, name: str, site: str, round_idx: int) -> None:
        """Call ``on_site_start`` / ``on_site_end(trainer, pl_module, site, round_idx)`` on the
        callbacks that define them: at ``on_site_end`` the module holds the site's trained weights."""
        trainer = self.module.trainer
        for callback in trainer.callbacks:  # type: ignore[attr-defined]
            hook = getattr(callback, name, None)
            if callable(hook):
                hook(trainer, self.module, site, round_idx)
