"""Short strategy names for ``Trainer(strategy="fedavg")`` and YAML, registered on import."""

from __future__ import annotations

from typing import Any

from lightning.pytorch.strategies import StrategyRegistry

from lightning_fedseg.federation.modes import CDS, CIIL, IIL, CollaborationMode, FedAvg, SingleSite
from lightning_fedseg.federation.strategy import FederatedStrategy

__all__ = ["register_strategies"]


def register_strategies() -> None:
    """Register the short names ``federated``, ``fedavg``, ``cds``, ``iil``, ``ciil``, ``single``."""
    entries: dict[str, tuple[str, type[CollaborationMode] | None]] = {
        "federated": ("Federated training (FedAvg by default) over the DataModule's sites", None),
        "fedavg": ("Federated averaging over the DataModule's sites", FedAvg),
        "cds": ("Centralized data sharing (pooled training) through FederatedStrategy", CDS),
        "iil": ("Institutional incremental learning over the DataModule's sites", IIL),
        "ciil": ("Cyclic institutional incremental learning over the DataModule's sites", CIIL),
        "single": ("The first site alone (institution-only baseline)", SingleSite),
    }
    for name, (description, mode_cls) in entries.items():
        if name in StrategyRegistry:
            continue
        if mode_cls is None:
            StrategyRegistry.register(name, FederatedStrategy, description=description)
        else:
            StrategyRegistry.register(name, _factory(mode_cls), description=description)


def _factory(mode_cls: type[CollaborationMode]) -> Any:
    """A builder of a FederatedStrategy with a fresh default mode each time the short name is used."""

    def build(**kwargs: Any) -> FederatedStrategy:
        return FederatedStrategy(mode=mode_cls(), **kwargs)

    build.__name__ = f"FederatedStrategy_{mode_cls.name}"
    return build
