"""Federation: aggregation (pure), collaboration modes (pure), the Lightning strategy and callbacks."""

from lightning_fedseg.federation.aggregate import (
    IncompatibleStateError,
    IntegerPolicy,
    NonFiniteStateError,
    WeightedMean,
    check_compatible,
    check_finite,
    weighted_average,
)
from lightning_fedseg.federation.callbacks import FederatedProgressBar, FederatedRichProgressBar
from lightning_fedseg.federation.modes import (
    CDS,
    CIIL,
    IIL,
    CollaborationMode,
    FedAvg,
    RoundPlan,
    SingleSite,
    SiteTask,
    mode_from_name,
)
from lightning_fedseg.federation.placement import assign_sites
from lightning_fedseg.federation.registry import register_strategies
from lightning_fedseg.federation.semantics import UnsupportedFeatureError
from lightning_fedseg.federation.strategy import FederatedStrategy, RoundFailedError, SiteDataModule

__all__ = [
    "CDS",
    "CIIL",
    "IIL",
    "CollaborationMode",
    "FedAvg",
    "FederatedProgressBar",
    "FederatedRichProgressBar",
    "FederatedStrategy",
    "IncompatibleStateError",
    "IntegerPolicy",
    "NonFiniteStateError",
    "RoundFailedError",
    "RoundPlan",
    "SingleSite",
    "SiteDataModule",
    "SiteTask",
    "UnsupportedFeatureError",
    "WeightedMean",
    "assign_sites",
    "check_compatible",
    "check_finite",
    "mode_from_name",
    "register_strategies",
    "weighted_average",
]
