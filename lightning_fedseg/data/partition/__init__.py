"""Patient-disjoint splits of subjects into institutions (sites), validation and held-out sets.

* :mod:`~lightning_fedseg.data.partition.model`: the :class:`Partition` (sites' train and
  validation subjects, held-out subjects), checked on construction, and :func:`leave_out_sites`.
* :mod:`~lightning_fedseg.data.partition.apportion`: largest-remainder counts, checkable by hand.
* :mod:`~lightning_fedseg.data.partition.splits`: the paper's real and simulated splits, the
  Dirichlet (non-IID) split and the train/validation split within a site; pure and seeded.
* :mod:`~lightning_fedseg.data.partition.fets_csv`: FeTS institution partition CSVs.

Every name is importable from ``lightning_fedseg.data.partition``.
"""

from lightning_fedseg.data.partition.apportion import apportion, resolve_count
from lightning_fedseg.data.partition.fets_csv import DuplicateSubjectsError, read_fets_csv, read_site_assignment
from lightning_fedseg.data.partition.model import (
    PAPER_HELDOUT_FRACTION,
    PAPER_SIMULATED_HELDOUT,
    PAPER_SITE_SIZES,
    Partition,
    SiteSplit,
    leave_out_sites,
)
from lightning_fedseg.data.partition.splits import (
    dirichlet_split,
    paper_split,
    paper_split_by_site,
    simulated_split,
    split_train_val,
)

__all__ = [
    "PAPER_HELDOUT_FRACTION",
    "PAPER_SIMULATED_HELDOUT",
    "PAPER_SITE_SIZES",
    "DuplicateSubjectsError",
    "Partition",
    "SiteSplit",
    "apportion",
    "dirichlet_split",
    "leave_out_sites",
    "paper_split",
    "paper_split_by_site",
    "read_fets_csv",
    "read_site_assignment",
    "resolve_count",
    "simulated_split",
    "split_train_val",
]
