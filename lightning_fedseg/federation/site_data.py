"""The seam a user's project meets: a DataModule that hands over one site's loaders by name."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol, runtime_checkable

__all__ = ["SiteDataModule", "site_datamodule", "site_num_samples"]


@runtime_checkable
class SiteDataModule(Protocol):
    """What a DataModule offers so that the strategy can train sites one at a time.

    ``train_dataloader()`` (the pooled data) is used by the ``cds`` mode only. Optional:
    ``site_num_samples(site) -> int`` (the FedAvg weight; default ``len(loader.dataset)``) and
    ``restrict_sites(sites)`` (on torch.distributed, called with the sites of this rank before
    any dataloader is requested, so that a rank never materializes another site's samples) and
    ``set_training_sites(sites)`` (the sites that train in this fit, e.g. the one site of ``single``,
    told before any dataloader is requested).
    """

    site_names: Sequence[str]

    def site_train_dataloader(self, site: str) -> Any: ...


def site_datamodule(trainer: Any) -> SiteDataModule:
    """The trainer's DataModule, checked to offer sites (``TypeError`` naming what is missing)."""
    datamodule = getattr(trainer, "datamodule", None)
    if datamodule is None or not isinstance(datamodule, SiteDataModule):
        raise TypeError(
            "FederatedStrategy needs a DataModule with `site_names` and"
            " `site_train_dataloader(site)`, passed as `trainer.fit(model, datamodule=...)`;"
            f" got {type(datamodule).__name__}. HINT: see `SiteDataModule` in docs/own-project.md."
        )
    return datamodule


def site_num_samples(datamodule: Any, site: str, loader: Any) -> float:
    """A site's FedAvg weight: ``site_num_samples(site)`` where the DataModule has it, else the
    length of its training loader's dataset."""
    if hasattr(datamodule, "site_num_samples"):
        return float(datamodule.site_num_samples(site))
    dataset = getattr(loader, "dataset", None)
    try:
        return float(len(dataset))  # type: ignore[arg-type]
    except TypeError:
        raise TypeError(
            f"Cannot tell how many samples site {site!r} has: its loader's dataset has no length."
            " HINT: implement `site_num_samples(site)` on the DataModule."
        ) from None
