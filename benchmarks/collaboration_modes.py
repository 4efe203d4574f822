"""Sheller et al. (2018) on the synthetic institutions: CDS, FedAvg, CIIL, IIL and single sites.

Reproduces the study's Tables 2 and 3 (held-out Dice and percent of centralized data sharing)
on the package's synthetic BraTS-layout institutions, or on a BraTS folder (``--data-root``):

* ``real``: the real-split analogue, the dataset's own 10 institutions in the paper's proportions
  with held-out subjects taken per institution; modes CDS, FedAvg (1 local epoch per round), CIIL
  (1 epoch per site per cycle), IIL (patience), and single-institution baselines for the largest
  and a small institution.
* ``simulated``: 4, 8, 16 and 32 institutions, subjects split randomly and proportionally after
  holding out the paper's 32/210 of them; modes FedAvg, CIIL, IIL (and one CDS reference).

How each figure is reported (as the paper did where it says):

* held-out Dice is ``test/dice`` of the module (mean per-volume Dice on the held-out subjects);
* CDS, FedAvg and single sites: the round with the best validation Dice (what
  ``ModelCheckpoint(monitor=..., mode="max")`` keeps) is tested. CDS and FedAvg select on
  ``val/dice`` (all sites' validation volumes); a single institution on its own validation volumes
  ``val/<site>/dice`` (it has no other). CDS is the best of its seeds, chosen by validation Dice;
  the others are mean ± std over seeds;
* CIIL: the held-out Dice after every cycle, mean ± std over cycles and seeds;
* IIL: its final model (the best weights of the last institution), mean ± std over seeds.

Single institutions train for as many optimizer steps as CDS (epochs scaled by the pooled
batches over the site's batches, validated as often as CDS): otherwise a 2-subject site would be
compared after 1/50 of the training. Seeds vary initialization, data order and dropout; the
partition (the dataset) is fixed.

Outputs: ``<out>/results.json`` (every round of every run), ``<out>/tables.md`` (printed too) and
PNG plots in ``--plots-dir``. Presets: ``smoke`` (seconds, for tests), ``quick`` (the 10-institution
table in about 20 minutes on 2 CPU cores), ``paper`` (the paper's settings, for a GPU), and the
convergence presets ``table2`` and ``table3`` (the quick settings trained to convergence at batch 5,
the paper's optimizer steps per epoch and per site; 3 seeds)::

    .venv/bin/python benchmarks/collaboration_modes.py --preset quick
    .venv/bin/python benchmarks/collaboration_modes.py --preset quick --splits simulated
    .venv/bin/python benchmarks/collaboration_modes.py --preset paper --dry-run
    .venv/bin/python benchmarks/collaboration_modes.py --preset table3  # resumes from <out>/runs/

With ``--converge`` (or ``--patience``; the ``table2``/``table3`` presets) every run trains until
its validation Dice stops improving, rounds become caps (``--max-rounds``), each finished run is
kept in ``<out>/runs/`` and not repeated, and a time-to-accuracy table is added; see
``benchmarks/convergence.py`` and ``benchmarks/time_to_accuracy.py``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from collections.abc import Sequence
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import asdict, dataclass, field, replace
from functools import partial
from multiprocessing import get_context
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback

from benchmarks.collaboration_plots import plot_forgetting, plot_real, plot_simulated
from benchmarks.collaboration_tables import REAL_MODES, SIMULATED_MODES, real_table, simulated_table
from benchmarks.common import (
    REPO_ROOT,
    model_kwargs,
    per_volume_dice,
    provenance,
    quiet,
    set_threads,
    trainer_defaults,
    write_json,
)
from benchmarks.convergence import (
    DEFAULT_PATIENCE,
    SiteTimer,
    early_stopping,
    run_converged,
    stop_record,
    time_to_accuracy_table,
)
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


@dataclass(frozen=True)
class Preset:
    """Every setting of a benchmark run (the CLI can override most)."""

    name: str
    model: str  # configs/model/<model>.yaml
    accelerator: str
    synthetic_subjects: int | None
    synthetic_shape: tuple[int, int, int]
    crop_size: int | None
    slice_policy: str
    batch_size: int
    num_workers: int
    seeds: tuple[int, ...]
    rounds: int  # rounds (epochs) of CDS, FedAvg and CIIL on the real split
    simulated_rounds: int
    simulated_sites: tuple[int, ...]
    iil_patience: int
    iil_max_epochs_per_site: int | None
    threads: int | None
    jobs: int
    splits: str
    notes: tuple[str, ...] = field(default=())
    patience: int | None = None  # train to convergence (benchmarks/convergence.py); None: fixed rounds
    # Ablation factors (benchmarks/ablations.py); the defaults are the paper's.
    local_epochs: int = 1  # FedAvg's epochs per site per round (the paper's EpR)
    optimizer_state: str = "reset"  # FederatedStrategy(optimizer_state=...): "reset" (the paper's) or "keep"
    client: str | None = None  # a client step for FedAvg: "fedbn" (BatchNorm layers stay local)
    learning_rate: float | None = None  # Adam's learning rate; None: the model preset's (5e-4)


PAPER_STEPS_BATCH = 5
"""The batch size at which the synthetic default's epoch has the paper's optimizer steps (354 vs 345)."""

QUICK = Preset(
    name="quick",
    model="cpu",
    accelerator="cpu",
    synthetic_subjects=None,  # the package default, 120 subjects
    synthetic_shape=(48, 48, 32),
    crop_size=None,
    slice_policy="brain",
    batch_size=16,
    num_workers=0,
    seeds=(0, 1),
    rounds=10,
    simulated_rounds=10,
    simulated_sites=(4, 8, 16, 32),
    iil_patience=3,
    iil_max_epochs_per_site=12,
    threads=1,
    jobs=2,
    splits="real",
)

PRESETS: dict[str, Preset] = {
    "smoke": Preset(
        name="smoke",
        model="cpu",
        accelerator="cpu",
        synthetic_subjects=30,
        synthetic_shape=(16, 16, 8),
        crop_size=None,
        slice_policy="brain",
        batch_size=8,
        num_workers=0,
        seeds=(0,),
        rounds=2,
        simulated_rounds=1,
        simulated_sites=(4,),
        iil_patience=1,
        iil_max_epochs_per_site=1,
        threads=1,
        jobs=1,
        splits="all",
        notes=("smoke preset: tiny data, 1 seed, 2 rounds; for tests only",),
    ),
    "quick": QUICK,
    # Convergence presets: `rounds` / `simulated_rounds` are the caps; see benchmarks/convergence.py.
    # Batch 5 gives the paper's optimizer steps per epoch (ours 1768/5 = 354 on the pooled
    # training slices; the paper's 178 x 0.8 x 155 / 64 = 345), hence at every federation size
    # the paper's local steps per site per round (about 11 at 32 institutions; batch 16: 4).
    "table2": replace(
        QUICK,
        name="table2",
        seeds=(0, 1, 2),
        batch_size=PAPER_STEPS_BATCH,
        rounds=30,
        simulated_rounds=40,
        patience=DEFAULT_PATIENCE,
        notes=(
            "table2 preset: at convergence (patience 5, at most 30 rounds), batch 5 (the paper's optimizer"
            " steps per epoch), 3 seeds",
        ),
    ),
    "table3": replace(
        QUICK,
        name="table3",
        seeds=(0, 1, 2),
        batch_size=PAPER_STEPS_BATCH,
        rounds=30,
        simulated_rounds=40,
        splits="simulated",
        patience=DEFAULT_PATIENCE,
        notes=(
            "table3 preset: at convergence (patience 5, at most 40 rounds), batch 5 (the paper's optimizer"
            " steps per epoch and per site), 3 seeds",
        ),
    ),
    "paper": Preset(
        name="paper",
        model="paper",
        accelerator="auto",
        synthetic_subjects=210,
        synthetic_shape=(240, 240, 155),
        crop_size=128,
        slice_policy="all",
        batch_size=64,
        num_workers=4,
        seeds=(0, 1, 2),
        rounds=40,
        simulated_rounds=50,
        simulated_sites=(4, 8, 16, 32),
        iil_patience=8,
        iil_max_epochs_per_site=None,
        threads=None,
        jobs=1,
        splits="all",
    ),
}


@dataclass(frozen=True)
class Job:
    """One training run: a mode on a split with a seed."""

    split: str  # "real" or "simN"
    mode: str  # a key of MODE_LABELS
    seed: int
    num_sites: int | None = None  # simulated splits
    site: str | None = None  # single-site runs
    leave_out: str | None = None  # an institution left out of the federation, tested on alone

    @property
    def label(self) -> str:
        site = f" site {self.site}" if self.site else ""
        without = f" without {self.leave_out}" if self.leave_out else ""
        return f"{self.split}{without} {self.mode}{site} seed {self.seed}"


# ---------------------------------------------------------------------------------- callbacks
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


# ---------------------------------------------------------------------------------- one run
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


# ---------------------------------------------------------------------------------- plan and run
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


# ---------------------------------------------------------------------------------- main
def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), default="quick")
    parser.add_argument("--name", default=None, help="names the outputs (plots, default --out); default: the preset")
    parser.add_argument(
        "--splits",
        choices=("real", "simulated", "all"),
        default=None,
        help="which tables to run (default: the preset's; quick: real)",
    )
    parser.add_argument("--modes", nargs="+", choices=REAL_MODES, default=None, help="a subset of the modes")
    parser.add_argument("--seeds", type=int, nargs="+", default=None)
    parser.add_argument("--rounds", type=int, default=None, help="rounds of CDS, FedAvg and CIIL on the real split")
    parser.add_argument("--simulated-rounds", type=int, default=None)
    parser.add_argument("--sites", type=int, nargs="+", default=None, help="simulated federation sizes")
    parser.add_argument("--iil-patience", type=int, default=None)
    parser.add_argument("--iil-max-epochs-per-site", type=int, default=None, help="0: no cap")
    parser.add_argument(
        "--converge",
        action="store_true",
        help="train every run to convergence (early stopping on val/dice; benchmarks/convergence.py): rounds "
        "become caps, each finished run is kept in <out>/runs/ and not repeated",
    )
    parser.add_argument(
        "--patience",
        type=int,
        default=None,
        help=f"rounds without a better val/dice before a run stops (implies --converge; default {DEFAULT_PATIENCE})",
    )
    parser.add_argument("--max-rounds", type=int, default=None, help="the cap of rounds of every split (--converge)")
    parser.add_argument("--jobs", type=int, default=None, help="runs in parallel (worker processes)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads per run")
    parser.add_argument("--accelerator", default=None)
    parser.add_argument("--batch-size", type=int, default=None)
    parser.add_argument("--num-workers", type=int, default=None)
    parser.add_argument("--synthetic-subjects", type=int, default=None)
    parser.add_argument("--data-root", default=None, help="a BraTS-layout folder instead of the synthetic data")
    parser.add_argument(
        "--out", type=Path, default=None, help="default: benchmarks/results/collaboration_modes-<preset>"
    )
    parser.add_argument("--plots-dir", type=Path, default=REPO_ROOT / "benchmarks" / "plots")
    parser.add_argument(
        "--replot",
        type=Path,
        default=None,
        help="rebuild tables.md and the plots of an existing results.json (no training)",
    )
    parser.add_argument(
        "--dry-run",
        action="store_true",
        help="build every run, train 1 batch of each (no validation), test 1 batch; write nothing",
    )
    return parser.parse_args(argv)


def resolve_preset(args: argparse.Namespace) -> Preset:
    preset = PRESETS[args.preset]
    overrides: dict[str, Any] = {}
    for name in (
        "rounds",
        "simulated_rounds",
        "iil_patience",
        "jobs",
        "threads",
        "accelerator",
        "batch_size",
        "num_workers",
        "synthetic_subjects",
    ):
        value = getattr(args, name)
        if value is not None:
            overrides[name] = value
    if args.seeds is not None:
        overrides["seeds"] = tuple(args.seeds)
    if args.sites is not None:
        overrides["simulated_sites"] = tuple(args.sites)
    if args.iil_max_epochs_per_site is not None:
        overrides["iil_max_epochs_per_site"] = args.iil_max_epochs_per_site or None
    if args.splits is not None:
        overrides["splits"] = args.splits
    if args.patience is not None:
        overrides["patience"] = args.patience
    elif args.converge and preset.patience is None:
        overrides["patience"] = DEFAULT_PATIENCE
    if args.max_rounds is not None:
        overrides.update(rounds=args.max_rounds, simulated_rounds=args.max_rounds)
    if args.dry_run:
        overrides["seeds"] = tuple(overrides.get("seeds", preset.seeds))[:1]
    if args.name is not None:
        overrides["name"] = args.name
    return replace(preset, **overrides)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    quiet()
    if args.replot is not None:
        return replot(args.replot, args.plots_dir)
    preset = resolve_preset(args)
    set_threads(preset.threads)
    modes = tuple(args.modes) if args.modes else REAL_MODES
    meta = provenance(None if argv is None else [sys.argv[0], *argv])
    jobs = plan_jobs(preset, preset.splits, modes, args.data_root)
    print(f"{len(jobs)} runs, preset {preset.name}, {preset.jobs} worker(s) x {preset.threads or 'default'} thread(s)")
    started = time.perf_counter()
    out = args.out or REPO_ROOT / "benchmarks" / "results" / f"collaboration_modes-{preset.name}"
    if preset.patience is not None and not args.dry_run:  # one JSON per run, resumable
        results, warm = run_converged(preset, jobs, out / "runs", args.data_root)
    else:
        warm = warm_cache(preset, jobs, args.data_root)
        results = run_all(preset, jobs, args.data_root, args.dry_run)
    total = time.perf_counter() - started
    if args.dry_run:
        print(f"dry run: built and trained 1 batch of {len(results)} runs in {total:.0f} s")
        return {"results": results}
    meta.update(wall_seconds=total, warm_seconds=warm, preset_base=args.preset, preset=asdict(preset))
    return report({"meta": meta, "runs": results}, preset, out, args.plots_dir)


def budget_notes(preset: Preset, results: Sequence[dict[str, Any]]) -> list[str]:
    """What this run's budget changes from the paper's protocol (printed under the tables)."""
    notes = list(preset.notes)
    seeds = sorted({r["seed"] for r in results})
    rounds = {r["split"]: len(r["rounds"]) for r in results if r["mode"] in ("cds", "fedavg", "ciil")}
    if preset.patience is not None:
        notes.append(
            f"at convergence: each run stops when val/dice (single sites: their own) has not improved for"
            f" {preset.patience} rounds (CIIL: cycles), or at the cap (real split {preset.rounds}, simulated"
            f" {preset.simulated_rounds}; IIL: cap x institutions epochs); [rounds used and why, per seed]"
        )
    elif "real" in rounds:
        notes.append(f"{preset.rounds} rounds/cycles/epochs on the real split (CDS, FedAvg, CIIL)")
    if preset.patience is None and any(split.startswith("sim") for split in rounds):
        notes.append(f"{preset.simulated_rounds} rounds/cycles/epochs on the simulated splits")
    notes.append(f"{len(seeds)} seed(s)")
    if any(r["mode"] == "iil" for r in results) and (preset.iil_patience != 8 or preset.iil_max_epochs_per_site):
        cap = preset.iil_max_epochs_per_site
        notes.append(
            f"IIL patience {preset.iil_patience} (paper: 8)"
            + (f" and at most {cap} epochs per institution" if cap else "")
        )
    return notes


def report(document: dict[str, Any], preset: Preset, out: Path, plots_dir: Path) -> dict[str, Any]:
    """Tables (printed, ``tables.md``, the JSON's ``tables``) and plots of a finished benchmark."""
    results, meta = document["runs"], document["meta"]
    tables: dict[str, Any] = {}
    markdown: list[str] = []
    if any(r["split"] == "real" for r in results):
        text, numbers = real_table(results, preset)
        tables["real"] = numbers
        markdown += ["### Real-split analogue: 10 institutions (paper Table 2)", "", text, ""]
    if any(r["split"].startswith("sim") for r in results):
        text, numbers = simulated_table(results, preset)
        tables["simulated"] = numbers
        markdown += ["### Simulated splits (paper Table 3): held-out Dice (% of CDS)", "", text, ""]
    if preset.patience is not None:
        text, numbers = time_to_accuracy_table(results)
        tables["time_to_accuracy"] = numbers
        markdown += ["### Time to accuracy (simulated institutions; benchmarks/time_to_accuracy.py)", "", text]
    plots = []
    plots += plot_real(results, preset, plots_dir) if "real" in tables else []
    plots += plot_forgetting(results, preset, plots_dir) if "real" in tables else []
    plots += plot_simulated(results, preset, plots_dir)
    markdown += [
        f"Notes: {'; '.join(budget_notes(preset, results))}.",
        f"Wall time {meta['wall_seconds'] / 60:.1f} min (cache warm-up {meta['warm_seconds']:.0f} s);"
        f" {meta['command']}",
    ]
    text = "\n".join(markdown)
    print("\n" + text)
    meta["plots"] = [os.path.relpath(p, REPO_ROOT) for p in plots]
    document = {"meta": meta, "tables": tables, "runs": results}
    write_json(out / "results.json", document)
    (out / "tables.md").write_text(text + "\n")
    print(f"\nwrote {out / 'results.json'}, {out / 'tables.md'} and {len(plots)} plot(s) in {plots_dir}")
    return document


def replot(path: Path, plots_dir: Path) -> dict[str, Any]:
    """Rebuild the tables and plots of a ``results.json`` (written next to it) without training."""
    document = json.loads(path.read_text())
    fields = dict(document["meta"]["preset"])
    for key in ("seeds", "simulated_sites", "synthetic_shape"):
        fields[key] = tuple(fields[key])
    base = PRESETS.get(document["meta"].get("preset_base") or fields["name"])
    fields["notes"] = base.notes if base is not None else tuple(fields.get("notes", ()))
    return report(document, Preset(**fields), path.parent, plots_dir)


if __name__ == "__main__":
    main()
