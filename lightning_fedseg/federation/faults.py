"""Fault injection: make sites fail on purpose, to test and drill the federation's fault tolerance."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from enum import StrEnum

from lightning_fedseg.federation.modes import derive_seed

__all__ = ["FaultInjector", "FaultKind"]


class FaultKind(StrEnum):
    """How an injected fault shows: the site's training raises, or it returns NaN weights."""

    RAISE = "raise"
    NAN = "nan"


class FaultInjector:
    """Decides, reproducibly on every process, which site fails in which round.

    Args:
        schedule: ``{site: [rounds]}`` in which the site fails.
        probability: additionally, each site fails each round with this seeded probability.
        kind: ``"raise"`` or ``"nan"``.
        seed: the federation's seed.

    Example:
        >>> faults = FaultInjector({"a": [1]}, kind="nan")
        >>> faults.due("a", 1, site_index=0), faults.due("a", 0, site_index=0), faults.due("b", 1, site_index=1)
        (True, False, False)
    """

    def __init__(
        self,
        schedule: Mapping[str, Sequence[int]] | None = None,
        probability: float = 0.0,
        kind: str = "raise",
        seed: int = 0,
    ) -> None:
        if not 0.0 <= probability <= 1.0:
            raise ValueError(f"Expected `fault_probability` to be in [0, 1], but got {probability}.")
        try:
            self.kind = FaultKind(kind)
        except ValueError:
            raise ValueError(f"Expected `fault_kind` to be 'raise' or 'nan', but got {kind!r}.") from None
        self.schedule = {str(k): {int(r) for r in v} for k, v in (schedule or {}).items()}
        self.probability = probability
        self.seed = seed

    def due(self, site: str, round_idx: int, site_index: int) -> bool:
        """Whether ``site`` (at ``site_index`` in the data's site list) fails in round ``round_idx``."""
        if round_idx in self.schedule.get(site, ()):
            return True
        if self.probability > 0.0:
            return derive_seed(self.seed, round_idx, site_index, 7) / 2**32 < self.probability
        return False
