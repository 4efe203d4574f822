"""Time to accuracy as FeTS scores it: simulated wall time of a federation with unequal sites.

Pure functions, no Lightning. Each simulated institution gets a compute speed and a network
bandwidth (:func:`draw_profiles`); a measured round (each site's local training seconds on the
benchmark machine) then lasts, in simulated time (:func:`round_duration`):

* FedAvg (sites in parallel): as long as its slowest site, where a site takes its training
  seconds divided by its speed, plus the model's bytes over its bandwidth both ways (the global
  model down, the site's model up);
* CIIL and IIL (sites in sequence): the sum over the sites visited, not the maximum;
* CDS and single institutions: training only, no communication (the data or the model never
  leaves one place).

From the durations and a Dice series (one value per round): the simulated time to reach 95% of
a reference Dice (:func:`time_to_accuracy`, the reference being centralized data sharing) and
the area under the best-Dice-so-far curve over a fixed horizon divided by the horizon
(:func:`convergence_score`, FeTS 2022's convergence score: 1.0 would be a perfect model at time 0).

The distributions (stated in :func:`draw_profiles`): speeds log-normal with median 1x
(``sigma=0.5``: about two in three sites between 0.6x and 1.6x the benchmark machine),
bandwidths log-uniform between 10 and 1000 Mbit/s (a small hospital's uplink to a data centre's),
drawn from ``numpy.random.default_rng(seed)`` in site order.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

__all__ = [
    "SiteProfile",
    "convergence_score",
    "draw_profiles",
    "round_duration",
    "round_durations",
    "time_to_accuracy",
    "transfer_seconds",
]


@dataclass(frozen=True)
class SiteProfile:
    """A simulated institution's hardware: relative compute speed and network bandwidth."""

    speed: float
    """Training speed relative to the benchmark machine (2.0: twice as fast)."""
    bandwidth_mbit: float
    """Network bandwidth in Mbit/s, the same both ways."""


def draw_profiles(
    sites: Sequence[str],
    seed: int = 0,
    speed_sigma: float = 0.5,
    bandwidth_mbit: tuple[float, float] = (10.0, 1000.0),
) -> dict[str, SiteProfile]:
    """Seeded profiles of ``sites``: log-normal speeds (median 1), log-uniform bandwidths.

    Args:
        sites: the institutions, in the order their profiles are drawn.
        seed: seed of ``numpy.random.default_rng``; the same seed and sites give the same profiles.
        speed_sigma: standard deviation of the speeds' natural logarithm (0: every site at 1x).
        bandwidth_mbit: the bandwidths' range in Mbit/s, drawn uniformly in its logarithm.

    Example:
        >>> profiles = draw_profiles(["a", "b"], seed=0)
        >>> profiles == draw_profiles(["a", "b"], seed=0)
        True
        >>> all(10 <= p.bandwidth_mbit <= 1000 for p in profiles.values())
        True
        >>> draw_profiles(["a"], speed_sigma=0.0, bandwidth_mbit=(100.0, 100.0))["a"].speed
        1.0
    """
    low, high = bandwidth_mbit
    if not 0 < low <= high:
        raise ValueError(f"Expected `bandwidth_mbit` to be (low, high) with 0 < low <= high, but got {bandwidth_mbit}.")
    if speed_sigma < 0:
        raise ValueError(f"Expected `speed_sigma` to be non-negative, but got {speed_sigma}.")
    rng = np.random.default_rng(seed)
    speeds = rng.lognormal(mean=0.0, sigma=speed_sigma, size=len(sites))
    bandwidths = np.clip(np.exp(rng.uniform(math.log(low), math.log(high), size=len(sites))), low, high)
    return {
        site: SiteProfile(float(speed), float(bandwidth))
        for site, speed, bandwidth in zip(sites, speeds, bandwidths, strict=True)
    }


def transfer_seconds(model_bytes: float, bandwidth_mbit: float) -> float:
    """Seconds to send the model one way at ``bandwidth_mbit``.

    Example:
        >>> transfer_seconds(1_250_000, 10.0)  # 10 Mbit over 10 Mbit/s
        1.0
    """
    return 8.0 * model_bytes / (bandwidth_mbit * 1e6)


def round_duration(
    site_seconds: Mapping[str, float],
    profiles: Mapping[str, SiteProfile],
    model_bytes: float,
    sequential: bool = False,
    communicate: bool = True,
) -> float:
    """Simulated duration of one round from each site's measured local training seconds.

    Args:
        site_seconds: each site of the round and its training seconds on the benchmark machine.
        profiles: every site's :class:`SiteProfile`.
        model_bytes: the model's size; with ``communicate`` it travels down and up at each site.
        sequential: the sites train one after another (CIIL, IIL): the sum, not the maximum.
        communicate: whether the model travels (False for CDS and single institutions).

    Example:
        A site 2x fast with 4 s of training and 1 s each way, beside one at 1x with 3 s and 0.5 s
        each way: in parallel the slower of 4/2 + 2 and 3 + 1, in sequence their sum.

        >>> profiles = {"a": SiteProfile(2.0, 10.0), "b": SiteProfile(1.0, 20.0)}
        >>> round_duration({"a": 4.0, "b": 3.0}, profiles, 1_250_000)
        4.0
        >>> round_duration({"a": 4.0, "b": 3.0}, profiles, 1_250_000, sequential=True)
        8.0
        >>> round_duration({"a": 4.0, "b": 3.0}, profiles, 1_250_000, communicate=False)
        3.0
    """
    missing = sorted(set(site_seconds) - set(profiles))
    if missing:
        raise KeyError(f"No profile for site(s) {missing}; profiles exist for {sorted(profiles)}.")
    times = []
    for site, seconds in site_seconds.items():
        profile = profiles[site]
        time = seconds / profile.speed
        if communicate:
            time += 2.0 * transfer_seconds(model_bytes, profile.bandwidth_mbit)
        times.append(time)
    if not times:
        return 0.0
    return float(sum(times) if sequential else max(times))


def round_durations(
    rounds: Sequence[Mapping[str, float]],
    profiles: Mapping[str, SiteProfile],
    model_bytes: float,
    sequential: bool = False,
    communicate: bool = True,
) -> list[float]:
    """:func:`round_duration` of every round.

    Example:
        >>> round_durations([{"a": 1.0}, {"a": 3.0}], {"a": SiteProfile(2.0, 1.0)}, 0.0)
        [0.5, 1.5]
    """
    return [round_duration(r, profiles, model_bytes, sequential, communicate) for r in rounds]


def _cumulative(durations: Sequence[float], dice: Sequence[float | None]) -> np.ndarray:
    if len(durations) != len(dice):
        raise ValueError(f"Expected one duration per Dice value, but got {len(durations)} and {len(dice)}.")
    if any(d < 0 for d in durations):
        raise ValueError(f"Expected non-negative durations, but got {list(durations)}.")
    return np.cumsum(np.asarray(durations, dtype=float))


def time_to_accuracy(
    durations: Sequence[float], dice: Sequence[float | None], reference: float, fraction: float = 0.95
) -> float | None:
    """Simulated time at the end of the first round whose Dice reaches ``fraction * reference``.

    ``None`` if no round does (``None`` and NaN Dice never do).

    Example:
        Rounds of 1, 1 and 2 s with Dice 0.5, 0.4, 0.8 against a reference of 0.8 (target 0.76):

        >>> time_to_accuracy([1.0, 1.0, 2.0], [0.5, 0.4, 0.8], reference=0.8)
        4.0
        >>> time_to_accuracy([1.0], [0.5], reference=0.8) is None
        True
    """
    ends = _cumulative(durations, dice)
    target = fraction * reference
    for end, value in zip(ends, dice, strict=True):
        if value is not None and not math.isnan(value) and value >= target:
            return float(end)
    return None


def convergence_score(durations: Sequence[float], dice: Sequence[float | None], horizon: float) -> float:
    """Area under the best-Dice-so-far curve over simulated time ``[0, horizon]``, over ``horizon``.

    The curve is 0 until the first round ends, then the best Dice of the rounds finished so far;
    after the last round it keeps its value up to the horizon (the run's model stays available);
    rounds ending after the horizon do not count.

    Example:
        Rounds end at 1, 2 and 4 s with Dice 0.5, 0.4, 0.8; over 5 s the area is
        0 * 1 + 0.5 * 1 + 0.5 * 2 + 0.8 * 1 = 2.3:

        >>> round(convergence_score([1.0, 1.0, 2.0], [0.5, 0.4, 0.8], horizon=5.0), 6)
        0.46
    """
    if not horizon > 0:
        raise ValueError(f"Expected `horizon` to be positive, but got {horizon}.")
    ends = _cumulative(durations, dice)
    area, best = 0.0, 0.0
    for index, end in enumerate(ends):
        if end >= horizon:
            break
        value = dice[index]
        if value is not None and not math.isnan(value):
            best = max(best, value)
        following = ends[index + 1] if index + 1 < len(ends) else horizon
        area += best * (min(following, horizon) - end)
    return float(area / horizon)
