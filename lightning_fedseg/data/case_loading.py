"""Loading a request's cases into the cache: validate once, preprocess once, and the bad-case policy.

:func:`cache_cases` is how the data module gets the
:class:`~lightning_fedseg.data.cache.CachedCase` of every case a loader or count needs.

Decisions:
    * Cases are checked per request (the cases of one loader, or of one fit's start), not per
      dataset: a process restricted to some sites never reads another site's volumes.
    * A request with bad cases fails once, naming every problem of every bad case, rather than
      at the first one; ``skip_bad_cases`` leaves them out with one warning that lists them, and
      remembers them, so that a later request does not read them again.
"""

from __future__ import annotations

import warnings
from collections.abc import MutableMapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from lightning.pytorch.utilities import rank_zero_info

from lightning_fedseg.data.cache import CachedCase, VolumeCache
from lightning_fedseg.data.cases import Case
from lightning_fedseg.data.conventions import LabelConvention
from lightning_fedseg.data.validation import BadCaseError, CheckReport

__all__ = ["cache_cases"]


def cache_cases(
    cache: VolumeCache,
    cases: Sequence[Case],
    group: str,
    loaded: MutableMapping[tuple[str, str], CachedCase],
    skipped: MutableMapping[str, CheckReport],
    *,
    root: Path,
    num_workers: int,
    skip_bad_cases: bool,
    label_convention: LabelConvention,
) -> list[CachedCase]:
    """The cache entries of ``cases`` (validating and building the missing ones), bad ones left out.

    Args:
        cache: the preprocessed-volume cache.
        cases: the cases of the request, in the order of the returned entries.
        group: the name space of ``loaded`` (``"train"`` for the partition's cases, ``"predict"``).
        loaded: entries already loaded, by ``(group, case_id)``; the new ones are added.
        skipped: bad cases left out so far, by case id; the new ones are added.
        root: the dataset folder (named in reports).
        num_workers: threads building missing entries (at least one).
        skip_bad_cases: leave bad cases out with a warning instead of raising.
        label_convention: the labels every segmentation must use.

    Raises:
        BadCaseError: some cases fail validation and ``skip_bad_cases`` is off; the report
            names every problem of every such case.
    """
    todo = [c for c in cases if (group, c.case_id) not in loaded and c.case_id not in skipped]
    found: dict[str, CachedCase | BadCaseError | None] = {c.case_id: cache.lookup(c) for c in todo}
    missing = [c for c in todo if found[c.case_id] is None]
    if missing:
        rank_zero_info(
            f"Checking and preprocessing {len(missing)} case(s) into {cache.cache_dir} "
            "(NIfTI is decoded once; later epochs and runs read the cache)."
        )
        threads = min(len(missing), max(1, num_workers))
        with ThreadPoolExecutor(threads) as pool:
            built = pool.map(lambda case: _build_or_report(cache, case), missing)
            found.update({c.case_id: e for c, e in zip(missing, built, strict=True)})
    bad = [entry for entry in found.values() if isinstance(entry, BadCaseError)]
    if bad:
        report = CheckReport([p for err in bad for p in err.report.problems], len(bad), root)
        if not skip_bad_cases:
            raise BadCaseError(
                report,
                f"fix these files (`lightning-fedseg data check {root}` lists every bad case), "
                "or set `skip_bad_cases: true` to leave them out.",
            )
        for case_id in report.bad_case_ids:
            skipped[case_id] = CheckReport([p for p in report.problems if p.case_id == case_id], 1, root)
        warnings.warn(
            f"skip_bad_cases: leaving out {len(report.bad_case_ids)} case(s) that fail validation: "
            f"{', '.join(report.bad_case_ids)}.\n{report.format()}",
            UserWarning,
            stacklevel=3,  # the caller of the data module's own request
        )
    for case in todo:
        entry = found[case.case_id]
        if isinstance(entry, CachedCase):
            if entry.has_labels:
                entry.check_labels(label_convention)
            loaded[(group, case.case_id)] = entry
    return [loaded[(group, c.case_id)] for c in cases if c.case_id not in skipped]


def _build_or_report(cache: VolumeCache, case: Case) -> CachedCase | BadCaseError:
    try:
        return cache.build(case)
    except BadCaseError as err:
        return err
