"""Training to convergence in the collaboration-modes benchmark: early stopping, stop reasons,
per-site training seconds and resumable runs.

The protocol (``benchmarks/collaboration_modes.py --converge``, or the ``table2`` / ``table3``
presets):

* CDS, FedAvg and CIIL stop when the validation Dice ``val/dice`` has not improved for
  ``patience`` rounds, or at the cap of ``--max-rounds`` rounds; one round is one Lightning epoch
  (CDS: an epoch over the pooled data; FedAvg: every site trains once and the weights are
  averaged; CIIL: one cycle through the sites), so Lightning's own ``EarlyStopping`` decides, and
  for CIIL patience counts cycles. A single institution stops on its own ``val/<site>/dice``,
  patience counting its validations (each after as many optimizer steps as a CDS round).
* IIL keeps its own rule (each institution trains until its validation Dice has not improved for
  ``--iil-patience`` epochs, at most ``--iil-max-epochs-per-site``), and the whole pass is capped
  at ``--max-rounds`` epochs per institution.
* The round tested is the one the fixed-round protocol tests: the best-validation round (CDS,
  FedAvg, single), every cycle (CIIL), the final model (IIL).
* Each run records ``rounds_used`` and ``stop_reason``: ``patience``, ``cap`` or ``iil-done``
  (IIL finished its last institution), and each round's training seconds per site (for
  :mod:`benchmarks.time_to_accuracy`).
* Time to accuracy (:mod:`benchmarks.time_to_accuracy`): every institution of a split gets a
  seeded speed and bandwidth (seed 0, the same for every run of the split); CDS trains at 1x
  centrally. The table gives the simulated time until ``val/dice`` first reaches 95% of the best
  CDS ``val/dice`` and FeTS 2022's convergence score over a common horizon (default: the longest
  simulated run). IIL's model travels once per institution, not every epoch.
* Each finished run is written to ``<out>/runs/<split>-<mode>[-<site>]-seed<k>-<settings>.json``,
  where ``<settings>`` is a short hash of the settings that change the result
  (:func:`settings_hash`); a run whose file exists is not repeated, and the tables are assembled
  from the finished runs of the same settings.
"""

from __future__ import annotations

import hashlib
import json
import math
import statistics
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from enum import StrEnum
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback, EarlyStopping
from lightning.pytorch.callbacks.early_stopping import EarlyStoppingReason

from benchmarks.common import finished, fmt_mean_std, mean_std, run_pending, write_json
from benchmarks.time_to_accuracy import SiteProfile, convergence_score, draw_profiles, round_duration, time_to_accuracy
from lightning_fedseg.federation.modes import POOLED

DEFAULT_PATIENCE = 5
"""Rounds without a better ``val/dice`` before a run stops, where ``--converge`` gives none."""

RESULT_SETTINGS = (
    "model",
    "synthetic_subjects",
    "synthetic_shape",
    "crop_size",
    "slice_policy",
    "batch_size",
    "rounds",
    "simulated_rounds",
    "iil_patience",
    "iil_max_epochs_per_site",
    "patience",
    "local_epochs",
    "optimizer_state",
    "client",
    "learning_rate",
)
"""The preset fields that change a run's result (workers, threads, seeds and names do not)."""


class StopReason(StrEnum):
    """Why a run stopped training."""

    PATIENCE = "patience"
    """The monitored validation Dice did not improve for ``patience`` rounds."""
    CAP = "cap"
    """The run reached its cap of rounds first."""
    IIL_DONE = "iil-done"
    """IIL finished its last institution."""


@dataclass(frozen=True)
class Stop:
    """Where early stopping ends a series: rounds used, why, and the best round (0-based)."""

    rounds: int
    reason: StopReason
    best_round: int | None


def early_stop(series: Sequence[float | None], patience: int, max_rounds: int, min_delta: float = 0.0) -> Stop:
    """Where Lightning's ``EarlyStopping(mode="max", check_finite=False)`` stops a recorded series.

    A value improves when it exceeds the best so far by more than ``min_delta``; otherwise the
    wait grows by one, and at ``patience`` the run stops after that round. A run that reaches
    ``max_rounds`` first (or at the same round) stops at the cap only if patience did not also
    run out there. ``None`` and NaN never improve.

    Example:
        The best round is the second (0-based 1); two rounds without improvement stop the run
        after the fourth:

        >>> early_stop([0.5, 0.7, 0.6, 0.7, 0.9], patience=2, max_rounds=10)
        Stop(rounds=4, reason=<StopReason.PATIENCE: 'patience'>, best_round=1)
        >>> early_stop([0.5, 0.6, 0.7], patience=2, max_rounds=3).reason
        <StopReason.CAP: 'cap'>
    """
    if patience < 1:
        raise ValueError(f"Expected `patience` to be a positive integer, but got {patience}.")
    if max_rounds < 1:
        raise ValueError(f"Expected `max_rounds` to be a positive integer, but got {max_rounds}.")
    best: float | None = None
    best_round: int | None = None
    wait = 0
    for index, value in enumerate(series[:max_rounds]):
        if value is not None and value == value and (best is None or value - min_delta > best):
            best, best_round, wait = value, index, 0
        else:
            wait += 1
            if wait >= patience:
                return Stop(index + 1, StopReason.PATIENCE, best_round)
    return Stop(min(len(series), max_rounds), StopReason.CAP, best_round)


def early_stopping(monitor: str, patience: int) -> EarlyStopping:
    """Lightning's ``EarlyStopping`` with the semantics of :func:`early_stop`."""
    return EarlyStopping(monitor=monitor, mode="max", patience=patience, check_finite=False, strict=True)


def stop_record(mode: str, stopper: EarlyStopping | None, strategy_mode: Any, rounds_used: int) -> dict[str, Any]:
    """``rounds_used`` and ``stop_reason`` of a finished run (IIL: also its institutions that hit
    their per-site cap before their patience)."""
    record: dict[str, Any] = {"rounds_used": rounds_used}
    if mode == "iil":
        done = strategy_mode.position >= len(strategy_mode.sites)
        record["stop_reason"] = StopReason.IIL_DONE if done else StopReason.CAP
        last: dict[str, int] = {}
        for entry in strategy_mode.history:
            last[entry["site"]] = entry["wait"]
        left = strategy_mode.sites[: strategy_mode.position]  # the institutions that passed the model on
        record["iil_sites_at_cap"] = sum(1 for site in left if last.get(site, 0) < strategy_mode.patience)
    else:
        patience = stopper is not None and stopper.stopping_reason == EarlyStoppingReason.PATIENCE_EXHAUSTED
        record["stop_reason"] = StopReason.PATIENCE if patience else StopReason.CAP
    record["stop_reason"] = str(record["stop_reason"])
    return record


class SiteTimer(Callback):
    """Each round's local training seconds per site, from the strategy's site hooks.

    ``epochs[e]`` maps the sites that trained in epoch ``e`` to their seconds (from
    ``on_site_start`` to ``on_site_end``, which FederatedStrategy calls around each site's local
    training); an epoch without site hooks (CDS) records its training time under ``"pooled"``.
    """

    def __init__(self) -> None:
        self.epochs: list[dict[str, float]] = []
        self._current: dict[str, float] = {}
        self._epoch_started = self._site_started = 0.0
        self._closed = False

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._current, self._closed = {}, False
        self._epoch_started = time.perf_counter()

    def on_site_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, site: str, round_idx: int) -> None:
        self._site_started = time.perf_counter()

    def on_site_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, site: str, round_idx: int) -> None:
        self._current[site] = self._current.get(site, 0.0) + time.perf_counter() - self._site_started

    def _close(self) -> None:
        if not self._closed and not self._current:
            self._current[POOLED] = time.perf_counter() - self._epoch_started
        self._closed = True

    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not trainer.sanity_checking:
            self._close()  # the strategy's own hook, first in the callbacks, has closed the round

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._close()
        self.epochs.append(self._current)


# ---------------------------------------------------------------------------------- resumable runs
def settings_hash(preset: Any) -> str:
    """8 hex digits of the SHA-1 of the preset's :data:`RESULT_SETTINGS` (stable across runs).

    Example:
        >>> from dataclasses import replace
        >>> from benchmarks.collaboration_modes import PRESETS
        >>> smoke = PRESETS["smoke"]
        >>> settings_hash(smoke) == settings_hash(smoke) != settings_hash(replace(smoke, patience=3))
        True
    """
    fields = asdict(preset)
    settings = {name: fields[name] for name in RESULT_SETTINGS}
    return hashlib.sha1(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:8]


@dataclass(frozen=True)
class RunFile:
    """One run of the benchmark and the name of its result file."""

    job: Any  # benchmarks.collaboration_modes.Job
    settings: str
    data_root: str | None = None

    @property
    def key(self) -> str:
        job = self.job
        site = f"-{job.site}" if job.site else ""
        without = f"-without-{job.leave_out}" if job.leave_out else ""
        return f"{job.split}{without}-{job.mode}{site}-seed{job.seed}-{self.settings}"


def run_and_save(preset: Any, run: RunFile, folder: Path) -> str:
    """Train and test one run and write its result to ``<folder>/<key>.json``; one line to print."""
    from benchmarks.collaboration_runs import run_job  # collaboration_runs imports this module

    result = {**run_job(preset, run.job, run.data_root), "settings": run.settings, "key": run.key}
    write_json(folder / f"{run.key}.json", result)
    stopped = f"{result['rounds_used']} rounds ({result['stop_reason']})"
    return f"{run.job.label}: {stopped}, {result['wall_seconds']:.0f} s"


def run_converged(
    preset: Any, jobs: Sequence[Any], folder: Path, data_root: str | None
) -> tuple[list[dict[str, Any]], float]:
    """Run the jobs that have no result file in ``folder`` yet; the finished runs of these
    settings (of any split, mode or seed) and the seconds spent warming the data cache."""
    from benchmarks.collaboration_runs import warm_cache

    settings = settings_hash(preset)
    runs = [RunFile(job, settings, data_root) for job in jobs]
    todo = [run.job for run in runs if not (folder / f"{run.key}.json").exists()]
    warm = warm_cache(preset, todo, data_root) if todo else 0.0
    folder.mkdir(parents=True, exist_ok=True)
    run_pending(run_and_save, preset, runs, folder)
    results = [r for r in finished(folder) if r.get("settings") == settings]
    return results, warm


def stops_text(runs: Sequence[dict[str, Any]]) -> str:
    """Rounds used and why, per seed: ``14 patience, 20 cap`` (empty for fixed-round runs).

    Example:
        >>> stops_text([{"rounds_used": 14, "stop_reason": "patience"}, {"rounds_used": 20, "stop_reason": "cap"}])
        '14 patience, 20 cap'
    """
    return ", ".join(f"{r['rounds_used']} {r['stop_reason']}" for r in runs if "stop_reason" in r)


# ---------------------------------------------------------------------------------- time to accuracy
def steady_site_seconds(epochs: Sequence[dict[str, float]]) -> list[dict[str, float]]:
    """Each epoch's training seconds per site, with each site's seconds replaced by its median over
    the epochs it trained in: a site does the same work every round, so a load spike or a pause
    of the shared benchmark machine in one epoch does not make that round a straggler's.

    Example:
        >>> steady_site_seconds([{"a": 2.0, "b": 3.0}, {"a": 2.2, "b": 30.0}, {"a": 1.8, "b": 3.2}])
        [{'a': 2.0, 'b': 3.2}, {'a': 2.0, 'b': 3.2}, {'a': 2.0, 'b': 3.2}]
    """
    per_site: dict[str, list[float]] = {}
    for seconds in epochs:
        for site, value in seconds.items():
            per_site.setdefault(site, []).append(value)
    medians = {site: statistics.median(values) for site, values in per_site.items()}
    return [{site: medians[site] for site in seconds} for seconds in epochs]


def simulated_durations(run: dict[str, Any], profiles: dict[str, SiteProfile]) -> list[float]:
    """Simulated seconds of each validated round of a run record (its epochs in between summed),
    from each site's steady training seconds (:func:`steady_site_seconds`).

    Example:
        A FedAvg round of two sites at 1x without transfer cost, then one of site a alone (a's
        seconds are its median over both rounds, 1.5):

        >>> profiles = {"a": SiteProfile(1.0, math.inf), "b": SiteProfile(1.0, math.inf)}
        >>> run = {"mode": "fedavg", "model_bytes": 8, "rounds": [{"round": 0}, {"round": 1}],
        ...        "site_seconds": [{"a": 2.0, "b": 3.0}, {"a": 1.0}]}
        >>> simulated_durations(run, profiles)
        [3.0, 1.5]
    """
    mode, model_bytes = run["mode"], run["model_bytes"]
    per_epoch, previous = [], None
    for seconds in steady_site_seconds(run["site_seconds"]):
        if mode == "cds":
            duration = round_duration(seconds, {POOLED: SiteProfile(1.0, math.inf)}, 0, communicate=False)
        elif mode.startswith("single"):
            duration = round_duration({run["site"]: sum(seconds.values())}, profiles, 0, communicate=False)
        elif mode == "iil":
            site = next(iter(seconds), None)
            duration = round_duration(seconds, profiles, model_bytes, communicate=site != previous)
            previous = site
        else:
            duration = round_duration(seconds, profiles, model_bytes, sequential=mode == "ciil")
        per_epoch.append(duration)
    durations, start = [], 0
    for record in run["rounds"]:
        durations.append(sum(per_epoch[start : record["round"] + 1]))
        start = record["round"] + 1
    return durations


def time_to_accuracy_table(
    results: Sequence[dict[str, Any]], horizon: float | None = None, fraction: float = 0.95
) -> tuple[str, dict[str, Any]]:
    """Simulated time to ``fraction`` of the best CDS ``val/dice`` and the convergence score of
    every split and mode (markdown and numbers); runs without site seconds are left out."""
    runs = [r for r in results if r.get("site_seconds") and r["rounds"]]
    lines: list[str] = []
    numbers: dict[str, Any] = {}
    for family in ("real", "sim"):
        mine = [r for r in runs if r["split"].startswith(family)]
        mine.sort(key=lambda r: (r["num_sites"] or 0, r["seed"]))
        cds = [r for r in mine if r["mode"] == "cds"]
        if not cds:
            continue
        reference = max(max(x.get("val/dice") or 0.0 for x in r["rounds"]) for r in cds)
        groups: dict[tuple[str, str], list[tuple[dict[str, Any], list[float], list[float | None]]]] = {}
        for run in mine:
            durations = simulated_durations(run, draw_profiles(run["sites"], seed=0))
            entry = (run, durations, [x.get("val/dice") for x in run["rounds"]])
            groups.setdefault((run["split"], run["mode"]), []).append(entry)
        end = horizon or max(sum(d) for entries in groups.values() for _, d, _ in entries)
        where = ", ".join(sorted({r["split"] for r in cds}))
        lines += [
            f"Target: {fraction:.0%} of CDS's best val/dice, {reference:.3f} ({where}); horizon {end:.3g} simulated s.",
            "",
            "| split | mode | simulated s to target (per seed) | convergence score | rounds (stop) |",
            "|---|---|---|---|---|",
        ]
        for (split, mode), entries in groups.items():
            reach = [time_to_accuracy(d, v, reference, fraction) for _, d, v in entries]
            mean, std, n = mean_std(convergence_score(d, v, end) for _, d, v in entries)
            shown = ", ".join("-" if t is None else f"{t:.3g}" for t in reach)
            stops = stops_text([r for r, _, _ in entries]) or "-"
            lines.append(f"| {split} | {mode} | {shown} | {fmt_mean_std(mean, std if n > 1 else None)} | {stops} |")
            numbers.setdefault(split, {})[mode] = {"seconds_to_target": reach, "score_mean": mean, "score_std": std}
        numbers[f"{family}_reference"] = {"val_dice": reference, "horizon_seconds": end}
        lines.append("")
    return "\n".join(lines), numbers
