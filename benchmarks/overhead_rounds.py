"""Overhead experiments 1 and 1b: a FedAvg round against a plain Lightning epoch, and the hand-over.

1. **FedAvg vs plain Lightning**: alternating fits over the same slices, epoch times.
1b. **Hand-over**: FedAvg rounds of one batch per site against plain epochs of as many batches,
    beside the strategy's own ``handover_seconds`` timer.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import replace
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback

from benchmarks.common import trainer_defaults
from benchmarks.overhead_setup import Preset, data_module, fmt_range, make_model, summary
from lightning_fedseg import FedAvg, FederatedStrategy

__all__ = ["EpochTimer", "fedavg_vs_plain", "handover", "handover_table", "strategy_table"]


class EpochTimer(Callback):
    """Wall time and optimizer steps of every training epoch (a FedAvg round included its
    aggregation: the strategy closes the round in a hook that runs before this one's)."""

    def __init__(self) -> None:
        self.seconds: list[float] = []
        self.steps: list[int] = []
        self._start = 0.0
        self._steps = 0

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._start = time.perf_counter()
        self._steps = trainer.global_step

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.seconds.append(time.perf_counter() - self._start)
        self.steps.append(trainer.global_step - self._steps)


def fedavg_vs_plain(preset: Preset) -> dict[str, Any]:
    """Alternating fits of plain Lightning and FedAvg over the same slices; epoch times."""
    dm = data_module(preset)
    dm.prepare_data()
    dm.setup("fit")
    samples = {s: dm.site_num_samples(s) for s in dm.site_names}  # also warms the cache
    runs: dict[str, list[dict[str, Any]]] = {"plain": [], "fedavg": []}
    held_bytes = 0
    for repeat in range(preset.repeats):
        for kind in ("plain", "fedavg"):
            pl.seed_everything(repeat, verbose=False)
            model = make_model()
            timer = EpochTimer()
            kwargs = trainer_defaults("cpu")
            strategy = FederatedStrategy(FedAvg(local_epochs=1), seed=repeat) if kind == "fedavg" else "auto"
            trainer = pl.Trainer(
                **kwargs, strategy=strategy, max_epochs=preset.epochs, limit_val_batches=0, callbacks=[timer]
            )
            trainer.fit(model, datamodule=data_module(preset))
            runs[kind].append({"epoch_seconds": timer.seconds, "epoch_steps": timer.steps})
            if kind == "fedavg":
                states = trainer.strategy.site_states.state_dict()
                held_bytes = sum(
                    t.numel() * t.element_size() for per_site in states.values() for t in _tensors(per_site)
                )
            print(f"  {kind} repeat {repeat}: epochs {', '.join(f'{s:.2f}' for s in timer.seconds)} s", flush=True)
    ratios_epoch, ratios_step = [], []
    for plain, fed in zip(runs["plain"], runs["fedavg"], strict=True):
        p = statistics.median(plain["epoch_seconds"][1:] or plain["epoch_seconds"])
        f = statistics.median(fed["epoch_seconds"][1:] or fed["epoch_seconds"])
        ratios_epoch.append(f / p)
        ratios_step.append((f / fed["epoch_steps"][-1]) / (p / plain["epoch_steps"][-1]))
    plain_times = [s for r in runs["plain"] for s in (r["epoch_seconds"][1:] or r["epoch_seconds"])]
    fed_times = [s for r in runs["fedavg"] for s in (r["epoch_seconds"][1:] or r["epoch_seconds"])]
    return {
        "sites": len(samples),
        "slices_per_epoch": sum(samples.values()),
        "steps_per_epoch": {
            "plain": runs["plain"][0]["epoch_steps"][-1],
            "fedavg": runs["fedavg"][0]["epoch_steps"][-1],
        },
        "plain_epoch_seconds": summary(plain_times),
        "fedavg_round_seconds": summary(fed_times),
        "ratio_per_epoch": summary(ratios_epoch),
        "ratio_per_step": summary(ratios_step),
        "strategy_site_optimizer_state_bytes": held_bytes,
        "runs": runs,
    }


def handover(preset: Preset) -> dict[str, Any]:
    """The non-training time per site hand-over, measured directly: FedAvg rounds of one batch per
    site against plain Lightning epochs of as many batches (same model, batch size and loader
    settings; no validation), alternating fits; plus the strategy's own timer
    (``handover_seconds``: site starts, site ends and the round's combine)."""
    dm = data_module(preset)
    dm.prepare_data()
    dm.setup("fit")
    sites = len(dm.site_names)
    # Every site's one batch is full: the batch is at most the smallest site's slices (smoke data).
    batch_size = min(preset.batch_size, *(dm.site_num_samples(s) for s in dm.site_names))
    runs: dict[str, list[list[float]]] = {"plain": [], "fedavg": []}
    timers: list[float] = []
    steps = {}
    for repeat in range(preset.repeats):
        for kind in ("plain", "fedavg"):
            pl.seed_everything(repeat, verbose=False)
            timer = EpochTimer()
            federated = kind == "fedavg"
            strategy = FederatedStrategy(FedAvg(local_epochs=1), seed=repeat) if federated else "auto"
            trainer = pl.Trainer(
                **trainer_defaults("cpu"),
                strategy=strategy,
                max_epochs=preset.handover_rounds,
                limit_train_batches=1 if federated else sites,
                limit_val_batches=0,
                callbacks=[timer],
            )
            trainer.fit(make_model(), datamodule=data_module(replace(preset, batch_size=batch_size)))
            runs[kind].append(timer.seconds[1:])
            steps[kind] = timer.steps[-1]
            if federated:
                timers += [h["handover_seconds"] for h in trainer.strategy.history[1:]]
            median = statistics.median(timer.seconds[1:])
            print(f"  hand-over {kind} repeat {repeat}: median {median:.3f} s", flush=True)
    if steps["plain"] != steps["fedavg"]:
        raise RuntimeError(f"Expected as many optimizer steps per epoch and round, got {steps}.")
    pairs = zip(runs["plain"], runs["fedavg"], strict=True)
    per_site = [(statistics.median(f) - statistics.median(p)) / sites for p, f in pairs]
    return {
        "sites": sites,
        "batch_size": batch_size,
        "batches_per_epoch": steps["plain"],
        "plain_epoch_seconds": summary([s for r in runs["plain"] for s in r]),
        "fedavg_round_seconds": summary([s for r in runs["fedavg"] for s in r]),
        "wall_ms_per_site": summary([1000 * v for v in per_site]),
        "timer_ms_per_site": summary([1000 * v / sites for v in timers]),
        "runs": runs,
    }


def _tensors(obj: Any) -> list[torch.Tensor]:
    if isinstance(obj, torch.Tensor):
        return [obj]
    if isinstance(obj, dict):
        return [t for v in obj.values() for t in _tensors(v)]
    if isinstance(obj, list | tuple):
        return [t for v in obj for t in _tensors(v)]
    return []


def strategy_table(s: Any) -> list[str]:
    lines: list[str] = []
    lines += [
        "### FedAvg round vs plain Lightning epoch (same slices, model, batch size; no validation)",
        "",
        "| | plain Lightning epoch | FedAvg round (10 sites) | ratio per epoch | ratio per optimizer step |",
        "|---|---|---|---|---|",
        f"| seconds (median, min-max) | {fmt_range(s['plain_epoch_seconds'], 2)} "
        f"| {fmt_range(s['fedavg_round_seconds'], 2)} | {fmt_range(s['ratio_per_epoch'])} "
        f"| {fmt_range(s['ratio_per_step'])} |",
        f"| optimizer steps | {s['steps_per_epoch']['plain']} | {s['steps_per_epoch']['fedavg']} | | |",
        "",
        f"{s['slices_per_epoch']} training slices per epoch; ratios are per plain/FedAvg pair (median over "
        f"{s['ratio_per_epoch']['n']} pairs, first epoch of each fit excluded). The strategy held "
        f"{s['strategy_site_optimizer_state_bytes'] / 2**20:.1f} MiB of per-site optimizer states after the fit.",
        "",
    ]
    return lines


def handover_table(h: Any) -> list[str]:
    lines: list[str] = []
    lines += [
        f"### Hand-over: FedAvg rounds of one batch per site ({h['sites']} sites) vs plain epochs of "
        f"{h['batches_per_epoch']} batches of {h['batch_size']} slices",
        "",
        "| plain epoch s | FedAvg round s | non-training ms per site (wall) | strategy timer ms per site |",
        "|---|---|---|---|",
        f"| {fmt_range(h['plain_epoch_seconds'], 3)} | {fmt_range(h['fedavg_round_seconds'], 3)} "
        f"| {fmt_range(h['wall_ms_per_site'], 2)} | {fmt_range(h['timer_ms_per_site'], 2)} |",
        "",
        "Wall: (median round - median epoch) / sites, per plain/FedAvg pair. Timer: the strategy's "
        "`handover_seconds` (site starts and ends, the round's combine) per site, every round after the first.",
        "",
    ]
    return lines
