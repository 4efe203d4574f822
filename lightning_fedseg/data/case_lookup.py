"""The data module's case seam: a volume's case, by id, back on its own files.

A batch names its case (``case_id``); what lies outside the batch is asked of the data module by
that id. Both methods are optional for a user's own DataModule (looked up with ``hasattr``):

- ``case_reference(case_id)``: where a prediction goes back to (reference NIfTI, full shape,
  crop); :class:`~lightning_fedseg.prediction.NiftiPredictionWriter` needs it to write files;
- ``full_target(case_id)``: the ground truth on the full, uncropped grid; with it
  :class:`~lightning_fedseg.module.BrainTumorSegmentation` scores whole volumes, as an evaluation
  of the written files would, instead of the cropped slices.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

from lightning_fedseg.data.cache import CachedCase, VolumeCache
from lightning_fedseg.data.cases import Case, CaseReference
from lightning_fedseg.data.conventions import LabelConvention, Target, labels_to_regions

__all__ = ["CaseLookup"]


class CaseLookup:
    """A loaded (or predictable) case of the data module by id: its reference and full-grid target.

    The data module provides the state annotated here (set in its ``__init__``, filled by its
    loaders).
    """

    cache: VolumeCache
    target: Target
    label_convention: LabelConvention
    _cases: dict[str, Case]
    _predict_cases: dict[str, Case] | None
    _cached: dict[tuple[str, str], CachedCase]

    def case_reference(self, case_id: str) -> CaseReference:
        """Where a prediction of ``case_id`` goes back to: reference NIfTI, full shape, crop."""
        for group, cases in (("predict", self._predict_cases or {}), ("train", self._cases)):
            if case_id in cases:
                cached = self._cached.get((group, case_id))
                return cached.reference() if cached else self.cache.reference(cases[case_id])
        raise KeyError(f"Unknown case {case_id!r}.")

    def full_target(self, case_id: str) -> npt.NDArray[np.bool_]:
        """Ground-truth region masks ``[K, X, Y, Z]`` of a loaded case on its full, uncropped grid.

        Tumour outside the crop is included, so metrics on it equal an evaluation of the written
        prediction files against the segmentation files.

        Raises:
            KeyError: the case has not been loaded by any loader of this data module.
            ValueError: the case has no segmentation.
        """
        entry = next((e for (_, cid), e in self._cached.items() if cid == case_id), None)
        if entry is None:
            raise KeyError(f"Case {case_id!r} has not been loaded by this data module.")
        labels = entry.full_labels()
        if labels is None:
            raise ValueError(f"Case {case_id!r} has no segmentation.")
        return labels_to_regions(labels, self.target, self.label_convention)
