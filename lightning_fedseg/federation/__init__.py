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
from lightning_fedseg.federation.byzantine import ByzantineServer, SiteAttack, byzantine_sites
from lightning_fedseg.federation.callbacks import FederatedProgressBar, FederatedRichProgressBar
from lightning_fedseg.federation.client_steps import SCAFFOLD, ClientStep, FedBN, FedProx
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
from lightning_fedseg.federation.patient_dp import PatientDPSGD
from lightning_fedseg.federation.placement import assign_sites
from lightning_fedseg.federation.preaggregation import Bucketing, NearestNeighborMixing
from lightning_fedseg.federation.privacy import DPFedAvg
from lightning_fedseg.federation.registry import register_strategies
from lightning_fedseg.federation.robust import CoordinateMedian, Krum, TrimmedMean
from lightning_fedseg.federation.robust_updates import CenteredClipping, GeometricMedian, NormBounding
from lightning_fedseg.federation.semantics import UnsupportedFeatureError
from lightning_fedseg.federation.server import FedAdagrad, FedAdam, FedAvgM, FedAvgStep, FedYogi, ServerStep
from lightning_fedseg.federation.strategy import FederatedStrategy, RoundFailedError, SiteDataModule

__all__ = [
    "CDS",
    "CIIL",
    "IIL",
    "SCAFFOLD",
    "Bucketing",
    "ByzantineServer",
    "CenteredClipping",
    "ClientStep",
    "CollaborationMode",
    "CoordinateMedian",
    "DPFedAvg",
    "FedAdagrad",
    "FedAdam",
    "FedAvg",
    "FedAvgM",
    "FedAvgStep",
    "FedBN",
    "FedProx",
    "FedYogi",
    "FederatedProgressBar",
    "FederatedRichProgressBar",
    "FederatedStrategy",
    "GeometricMedian",
    "IncompatibleStateError",
    "IntegerPolicy",
    "Krum",
    "NearestNeighborMixing",
    "NonFiniteStateError",
    "NormBounding",
    "PatientDPSGD",
    "RoundFailedError",
    "RoundPlan",
    "ServerStep",
    "SingleSite",
    "SiteAttack",
    "SiteDataModule",
    "SiteTask",
    "TrimmedMean",
    "UnsupportedFeatureError",
    "WeightedMean",
    "assign_sites",
    "byzantine_sites",
    "check_compatible",
    "check_finite",
    "mode_from_name",
    "register_strategies",
    "weighted_average",
]
