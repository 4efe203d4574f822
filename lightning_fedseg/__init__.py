"""lightning_fedseg: federated brain-tumor segmentation as a PyTorch Lightning plugin.

Importing the package registers the strategy short names (``federated``, ``fedavg``, ``cds``,
``iil``, ``ciil``, ``single``) with Lightning's ``StrategyRegistry``.
"""

from lightning_fedseg.data import FederatedDataModule
from lightning_fedseg.federation import (
    CDS,
    CIIL,
    IIL,
    FedAvg,
    FederatedProgressBar,
    FederatedRichProgressBar,
    FederatedStrategy,
    RoundFailedError,
    SingleSite,
    SiteDataModule,
    register_strategies,
)
from lightning_fedseg.module import BrainTumorSegmentation

__version__ = "0.1.0"

register_strategies()

__all__ = [
    "CDS",
    "CIIL",
    "IIL",
    "BrainTumorSegmentation",
    "FedAvg",
    "FederatedDataModule",
    "FederatedProgressBar",
    "FederatedRichProgressBar",
    "FederatedStrategy",
    "RoundFailedError",
    "SingleSite",
    "SiteDataModule",
    "__version__",
]
