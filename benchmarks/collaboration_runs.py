"""One run of the collaboration-modes benchmark, and running a plan of them.

:func:`run_job` trains one mode on one split with one seed and tests the weights the protocol
selects (``benchmarks/collaboration_modes.py`` says which); :class:`RoundRecorder` records each
round and keeps those weights. :func:`plan_jobs` lists a benchmark's runs, :func:`warm_cache`
prepares the data once, and :func:`run_all` runs them, on several worker processes when asked.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import asdict
from functools import partial
from multiprocessing import get_context
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback

from benchmarks.collaboration_presets import Job, Preset
from benchmarks.collaboration_tables import SIMULATED_MODES
from benchmarks.common import model_kwargs, per_volume_dice, quiet, set_threads, trainer_defaults
from benchmarks.convergence import SiteTimer, early_stopping, stop_record
from lightning_fedseg import (
    CDS,
    CIIL,
    IIL,
    BrainTumorSegmentation,
    FedAvg,
    FederatedDataModule,
    FederatedStrategy,
    SingleSite,
)
from lightning_fedseg.federation import FedBN
from lightning_fedseg.federation.aggregate import state_to_cpu
from lightning_fedseg.federation.modes import CollaborationMode

__all__ = [
    "FirstSiteProbe",
    "RoundRecorder",
    "client_step",
    "data_kwargs",
    "plan_jobs",
    "run_all",
    "run_job",
    "warm_cache",
]


class RoundRecorder(Callback):
    """Records each round's validation metrics and wall time, and keeps the weights to test:
    those of the round with the best ``select`` metric, or of every validated round."""

    def __init__(self, select: str | None = None, keep_all: bool = False) -> None:
        self.select = select
        self.keep_all = keep_all
        self.rounds: list[dict[str, Any]] = []
        self.states: dict[int, dict[str, torch.Tensor]] = {}
        self.best: tuple[float, int] | None = None
        self._pending: dict[str, Any] | None = None
        self._started = 0.0

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._started = time.perf_counter()
        self._pending = None

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        metrics = {
            k: float(v)
            for k, v in trainer.callback_metrics.items()
            if k.startswith("val/") and k.endswith(("/dice", "/loss", "/slice_dice"))
        }
        self._pending = {"round": trainer.current_epoch, **metrics}
        if self.keep_all:
            self.states[trainer.current_epoch] = state_to_cpu(pl_module.state_dict())
        if self.select is not None:
            value = metrics.get(self.select, float("nan"))
            if not math.isnan(value) and (self.best is None or value > self.best[0]):
                self.best = (value, trainer.current_epoch)
                self.states = {trainer.current_epoch: state_to_cpu(pl_module.state_dict())}

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # Runs after the strategy closed the round (its hook is first in trainer.callbacks).
        if self._pending is None:
            return
        record = self._pending
        loss = trainer.callback_metrics.get("train/loss_epoch")
        record["train_loss"] = float(loss) if loss is not None else None
        record["seconds"] = time.perf_counter() - self._started
        history = getattr(trainer.strategy, "history", None)
        if history:
            record.update({k: history[-1][k] for k in ("train_seconds", "comm_seconds")})
        self.rounds.append(record)
        self._pending = None


class FirstSiteProbe(Callback):
    """The forgetting curve: the first institution's validation Dice after every site step.

    ``on_site_end`` is called by FederatedStrategy right after a site finished its local
    training, while the module holds that site's weights.
    """

    def __init__(self, loader: Any) -> None:
        self.loader = loader
        self.steps: list[dict[str, Any]] = []

    def on_site_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, site: str, round_idx: int) -> None:
        dice = per_volume_dice(pl_module, self.loader)
        self.steps.append({"step": len(self.steps) + 1, "round": round_idx, "site": site, "dice": dice})


def data_kwargs(preset: Preset, job: Job, data_root: str | None) -> dict[str, Any]:
    """FederatedDataModule arguments of a job's split."""
    kwargs: dict[str, Any] = {
        "data_root": data_root,
        "batch_size": preset.batch_size,
        "num_workers": preset.num_workers,
        "crop_size": preset.crop_size,
        "slice_policy": preset.slice_policy,
        "synthetic_subjects": preset.synthetic_subjects,
        "synthetic_shape": preset.synthetic_shape,
        "seed": 0,  # the partition is the dataset: fixed across the runs' seeds
    }
    if job.split == "real":
        # The synthetic dataset's own institutions; for a BraTS folder, the paper's split.
        kwargs["partition"] = "auto" if data_root is None else "paper"
    else:
        kwargs.update(partition="simulated", num_sites=job.num_sites)
    if job.leave_out is not None:
        kwargs["leave_out"] = [job.leave_out]
    return kwargs


def _make_mode(preset: Preset, job: Job) -> CollaborationMode:
    if job.mode == "cds":
        return CDS()
    if job.mode == "fedavg":
        return FedAvg(local_epochs=preset.local_epochs)
    if job.mode == "ciil":
        return CIIL(epochs_per_site=1)
    if job.mode == "iil":
        return IIL(
            patience=preset.iil_patience,
            monitor="val/{site}/dice",
            max_epochs_per_site=preset.iil_max_epochs_per_site,
        )
    assert job.site is not None
    return SingleSite(job.site)


def client_step(preset: Preset, mode: str) -> dict[str, Any]:
    """``FederatedStrategy``'s ``client`` argument of a preset's FedAvg runs (other modes: none)."""
    if preset.client is None or mode != "fedavg":
        return {}
    if preset.client != "fedbn":
        raise ValueError(f"Expected `client` to be None or 'fedbn', but got {preset.client!r}.")
    return {"client": FedBN()}


def _batches(samples: int, batch_size: int) -> int:
    return max(1, math.ceil(samples / batch_size))


def run_job(preset: Preset, job: Job, data_root: str | None, dry_run: bool = False) -> dict[str, Any]:
    """Train one mode on one split with one seed and test the weights the protocol selects."""
    quiet()
    set_threads(preset.threads)
    started = time.perf_counter()
    pl.seed_everything(job.seed, workers=True, verbose=False)
    dm = FederatedDataModule(**data_kwargs(preset, job, data_root))
    dm.prepare_data()
    dm.setup("fit")
    sites = list(dm.site_names)
    kwargs = model_kwargs(preset.model, in_channels=dm.in_channels, compute_hd95=False, log_images=0)
    if preset.learning_rate is not None:
        kwargs["optimizer"] = partial(kwargs["optimizer"], lr=preset.learning_rate)
    model = BrainTumorSegmentation(**kwargs)
    mode = _make_mode(preset, job)
    rounds = preset.rounds if job.split == "real" else preset.simulated_rounds
    max_epochs, val_every = rounds, 1
    select: str | None = "val/dice"
    callbacks: list[Callback] = []
    probe: FirstSiteProbe | None = None
    if job.mode.startswith("single"):
        assert job.site is not None
        pooled = _batches(sum(dm.site_num_samples(s) for s in sites), preset.batch_size)
        val_every = max(1, round(pooled / _batches(dm.site_num_samples(job.site), preset.batch_size)))
        max_epochs = rounds * val_every
        select = f"val/{job.site}/dice"
    elif job.mode == "ciil":
        select = None
        probe = FirstSiteProbe(dm.site_val_dataloader(sites[0]))
        callbacks.append(probe)
    elif job.mode == "iil":
        select = None
        cap = preset.iil_max_epochs_per_site
        # At convergence the pass is capped at `rounds` epochs per institution.
        max_epochs = len(sites) * (rounds if preset.patience else cap if cap is not None else 200)
    recorder = RoundRecorder(select=select, keep_all=job.mode == "ciil")
    timer = SiteTimer()
    callbacks[:0] = [recorder, timer]
    limits: dict[str, Any] = {}
    if dry_run:
        max_epochs, val_every = 1, 1
        limits = {"limit_train_batches": 1, "limit_val_batches": 0}
    stopper = None
    if preset.patience is not None and job.mode != "iil" and not dry_run:
        stopper = early_stopping(select or "val/dice", preset.patience)  # CIIL: patience counts cycles
        callbacks.append(stopper)
    trainer = pl.Trainer(
        **trainer_defaults(preset.accelerator),
        strategy=FederatedStrategy(
            mode, optimizer_state=preset.optimizer_state, seed=job.seed, **client_step(preset, job.mode)
        ),
        max_epochs=max_epochs,
        check_val_every_n_epoch=val_every,
        callbacks=callbacks,
        **limits,
    )
    fit_started = time.perf_counter()
    if dry_run and job.mode == "iil":
        pass  # IIL needs its sites' validation Dice after every epoch: built, not trained
    else:
        trainer.fit(model, datamodule=dm)
    fit_seconds = time.perf_counter() - fit_started
    tester = pl.Trainer(**trainer_defaults(preset.accelerator), **({"limit_test_batches": 1} if dry_run else {}))

    def heldout(state: dict[str, torch.Tensor] | None = None) -> float:
        if state is not None:
            model.load_state_dict(state)
        results = tester.test(model, datamodule=dm, verbose=False)
        return float(results[0].get("test/dice", float("nan")))

    result: dict[str, Any] = {
        **asdict(job),
        "sites": sites,
        "site_samples": {s: dm.site_num_samples(s) for s in sites},
        "parameters": sum(p.numel() for p in model.parameters()),
        "max_epochs": max_epochs,
        "val_every_n_epochs": val_every,
        "select": select,
        "rounds": recorder.rounds,
        "history": [_compact(h) for h in getattr(trainer.strategy, "history", [])],
        "fit_seconds": fit_seconds,
        "global_step": trainer.global_step,
        "device": str(trainer.strategy.root_device),
        "site_seconds": timer.epochs,
        "model_bytes": sum(t.numel() * t.element_size() for t in model.state_dict().values()),
    }
    if preset.patience is not None and not dry_run:
        result.update(stop_record(job.mode, stopper, mode, len(recorder.rounds)))
    if dry_run:
        result["heldout"] = float("nan") if job.mode == "iil" else heldout()
    elif job.mode == "ciil":
        result["heldout_per_cycle"] = {r: heldout(s) for r, s in sorted(recorder.states.items())}
        result["probe"] = probe.steps if probe is not None else []
    elif job.mode == "iil":
        result["iil_history"] = getattr(mode, "history", [])
        result["iil_completed"] = getattr(mode, "position", 0) >= len(sites)
        result["heldout"] = heldout()  # the final model
    else:
        assert recorder.best is not None, f"{job.label}: no validation round logged {select!r}"
        value, best_round = recorder.best
        result.update(selected_round=best_round, selected_val=value, heldout=heldout(recorder.states[best_round]))
    result["wall_seconds"] = time.perf_counter() - started
    return result


def _compact(record: dict[str, Any]) -> dict[str, Any]:
    """A strategy history record with site counts instead of site lists."""
    out = {k: v for k, v in record.items() if k not in ("sites", "succeeded", "failed")}
    out.update(sites=len(record.get("sites", ())), succeeded=len(record.get("succeeded", ())))
    out["failed"] = record.get("failed", {})
    return out


def _init_worker(threads: int | None) -> None:
    quiet()
    set_threads(threads)


def plan_jobs(preset: Preset, splits: str, modes: Sequence[str], data_root: str | None) -> list[Job]:
    """The runs of a benchmark, longest expected first (for packing on several workers)."""
    jobs: list[Job] = []
    if splits in ("real", "all"):
        dm = FederatedDataModule(**data_kwargs(preset, Job("real", "cds", 0), data_root))
        dm.setup("fit")
        sizes = {s: dm.site_num_subjects(s) for s in dm.site_names}
        largest = max(sizes, key=lambda s: sizes[s])
        small = min(reversed(list(sizes)), key=lambda s: sizes[s])
        for seed in preset.seeds:
            for mode in modes:
                site = largest if mode == "single_large" else small if mode == "single_small" else None
                jobs.append(Job("real", mode, seed, site=site))
    if splits in ("simulated", "all"):
        for seed in preset.seeds:
            jobs.append(Job(f"sim{min(preset.simulated_sites)}", "cds", seed, num_sites=min(preset.simulated_sites)))
            for n in preset.simulated_sites:
                for mode in SIMULATED_MODES:
                    if mode in modes:
                        jobs.append(Job(f"sim{n}", mode, seed, num_sites=n))
    cost = {"iil": 0, "ciil": 1, "fedavg": 2, "cds": 3, "single_large": 4, "single_small": 5}
    return sorted(jobs, key=lambda j: (cost[j.mode], -(j.num_sites or 10), j.seed))


def warm_cache(preset: Preset, jobs: Sequence[Job], data_root: str | None) -> float:
    """Write the synthetic data and preprocess every case once, before workers share the cache."""
    started = time.perf_counter()
    seen: set[str] = set()
    for job in jobs:
        if job.split in seen:
            continue
        seen.add(job.split)
        dm = FederatedDataModule(**data_kwargs(preset, job, data_root))
        dm.prepare_data()
        dm.setup("fit")
        for site in dm.site_names:
            dm.site_num_samples(site)
            dm.site_val_dataset(site)
        dm.test_dataloader()
    return time.perf_counter() - started


def run_all(preset: Preset, jobs: Sequence[Job], data_root: str | None, dry_run: bool) -> list[dict[str, Any]]:
    """Run the jobs, on ``preset.jobs`` worker processes when more than one."""
    results: list[dict[str, Any]] = []

    def report(result: dict[str, Any]) -> None:
        job = Job(result["split"], result["mode"], result["seed"], result["num_sites"], result["site"])
        if dry_run:
            trained = "built only" if job.mode == "iil" else f"{result['global_step']} optimizer step(s), tested"
            shown = f"{trained}; {result['parameters'] / 1e6:.2f}M parameters, {len(result['sites'])} sites"
        elif "heldout_per_cycle" in result:
            values = list(result["heldout_per_cycle"].values())
            shown = f"held-out per cycle {', '.join(f'{v:.3f}' for v in values)}"
        else:
            shown = f"held-out {result['heldout']:.3f}"
        print(f"  {job.label}: {shown} ({result['wall_seconds']:.0f} s)", flush=True)
        results.append(result)

    if preset.jobs <= 1 or dry_run:
        for job in jobs:
            report(run_job(preset, job, data_root, dry_run))
        return results
    context = get_context("spawn")
    with ProcessPoolExecutor(
        preset.jobs, mp_context=context, initializer=_init_worker, initargs=(preset.threads,)
    ) as pool:
        futures: list[Future[dict[str, Any]]] = [pool.submit(run_job, preset, job, data_root) for job in jobs]
        for future in futures:
            report(future.result())
    return results
