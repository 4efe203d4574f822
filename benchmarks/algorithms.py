"""Federated algorithms side by side: FedAvg and CDS beside FedProx, FedOpt, SCAFFOLD, FedBN, robust rules.

On the splits where plain FedAvg struggles: the 32-institution simulated split, a Dirichlet-skewed
non-IID split (tumour size), and the synthetic default's 10 institutions, whose scanners differ
(where FedBN should help). Every algorithm runs with the hyper-parameters of its paper's defaults
(stated in ``ALGORITHM_SETTINGS`` and RESULTS.md), never tuned per result; every run uses the same
local training (the CPU U-Net, Adam 5e-4 reset every round, 1 local epoch), the same rounds and
seeds. Reported: held-out Dice of the best-validation round (mean ± std over seeds), the first
round whose validation Dice reaches 95% of the best FedAvg validation Dice of the same split and
seed, and Dice per round (plot).

Each finished run is written to ``<out>/runs/<split>-<algorithm>-seed<k>.json``; a run that
exists is not repeated, so an interrupted benchmark resumes, and the tables are assembled from
whatever runs are finished.

Usage::

    python benchmarks/algorithms.py --preset quick            # 2 CPU cores, in the background
    python benchmarks/algorithms.py --preset smoke            # seconds, for the tests
    python benchmarks/algorithms.py --preset quick --report   # tables and plots of the finished runs
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import lightning.pytorch as pl

from benchmarks.collaboration_modes import RoundRecorder
from benchmarks.common import (
    REPO_ROOT,
    figure,
    finished,
    fmt_mean_std,
    mean_std,
    model_kwargs,
    provenance,
    quiet,
    run_pending,
    save_figure,
    set_threads,
    trainer_defaults,
    write_json,
    write_report,
)
from lightning_fedseg import CDS, BrainTumorSegmentation, FedAvg, FederatedDataModule, FederatedStrategy
from lightning_fedseg.federation import (
    SCAFFOLD,
    CoordinateMedian,
    FedAdagrad,
    FedAdam,
    FedAvgM,
    FedBN,
    FedProx,
    FedYogi,
    Krum,
    TrimmedMean,
)

ALGORITHM_SETTINGS: dict[str, tuple[str, Callable[[], dict[str, Any]]]] = {
    "cds": ("CDS (pooled)", dict),
    "fedavg": ("FedAvg", dict),
    "fedprox": ("FedProx mu=0.01", lambda: {"client": FedProx(mu=0.01)}),
    "fedavgm": ("FedAvgM lr=1 beta=0.9", lambda: {"server": FedAvgM(server_lr=1.0, momentum=0.9)}),
    "fedadam": ("FedAdam lr=0.01 tau=1e-3", lambda: {"server": FedAdam(server_lr=0.01, tau=1e-3)}),
    "fedyogi": ("FedYogi lr=0.01 tau=1e-3", lambda: {"server": FedYogi(server_lr=0.01, tau=1e-3)}),
    "fedadagrad": ("FedAdagrad lr=0.01 tau=1e-3", lambda: {"server": FedAdagrad(server_lr=0.01, tau=1e-3)}),
    "scaffold": ("SCAFFOLD (option II)", lambda: {"client": SCAFFOLD()}),
    "fedbn": ("FedBN", lambda: {"client": FedBN()}),
    "median": ("coordinate median", lambda: {"server": CoordinateMedian()}),
    "trimmed_mean": ("trimmed mean beta=0.1", lambda: {"server": TrimmedMean(beta=0.1)}),
    "krum": ("multi-Krum f=1 m=n-f", lambda: {"server": None}),  # filled per split: m depends on n
}


# One distinct colour per algorithm.
PALETTE = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22",
           "#17becf", "#aec7e8", "#ffbb78"]  # fmt: skip


@dataclass(frozen=True)
class Preset:
    name: str
    model: str
    synthetic_subjects: int | None
    synthetic_shape: tuple[int, int, int]
    batch_size: int
    rounds: int
    seeds: tuple[int, ...]
    splits: tuple[str, ...]
    jobs: int


PRESETS = {
    "smoke": Preset("smoke", "cpu", 30, (16, 16, 8), 8, 2, (0,), ("sim4",), 1),
    "quick": Preset("quick", "cpu", None, (48, 48, 32), 16, 8, (0, 1, 2), ("real", "sim32", "dirichlet10"), 2),
    "paper": Preset("paper", "paper", 210, (240, 240, 155), 64, 30, (0, 1, 2), ("real", "sim32", "dirichlet10"), 1),
}


@dataclass(frozen=True)
class Job:
    split: str
    algorithm: str
    seed: int

    @property
    def key(self) -> str:
        return f"{self.split}-{self.algorithm}-seed{self.seed}"


def data_kwargs(preset: Preset, split: str) -> dict[str, Any]:
    kwargs: dict[str, Any] = {
        "batch_size": preset.batch_size,
        "synthetic_subjects": preset.synthetic_subjects,
        "synthetic_shape": preset.synthetic_shape,
        "seed": 0,  # the partition is the dataset: fixed across the runs' seeds
    }
    if split.startswith("sim"):
        kwargs.update(partition="simulated", num_sites=int(split[3:]))
    elif split.startswith("dirichlet"):
        kwargs.update(partition="dirichlet", num_sites=int(split[9:]), dirichlet_alpha=0.5)
    return kwargs


def strategy_kwargs(algorithm: str, num_sites: int) -> dict[str, Any]:
    if algorithm == "krum":
        return {"server": Krum(num_byzantine=1, multi=num_sites - 1)}
    return ALGORITHM_SETTINGS[algorithm][1]()


def run_job(preset: Preset, job: Job) -> dict[str, Any]:
    extra = {} if job.algorithm == "cds" else strategy_kwargs(job.algorithm, preset_sites(preset, job.split))
    return {**asdict(job), **train_and_test(preset, job.split, job.seed, federated=job.algorithm != "cds", **extra)}


def preset_sites(preset: Preset, split: str) -> int:
    """The number of institutions of ``split`` (the real split: the synthetic default's 10)."""
    return int(split[3:]) if split.startswith("sim") else int(split[9:]) if split.startswith("dirichlet") else 10


def train_and_test(
    preset: Preset,
    split: str,
    seed: int,
    federated: bool = True,
    data_extra: dict[str, Any] | None = None,
    model_extra: dict[str, Any] | None = None,
    local_epochs: int = 1,
    **strategy_extra: Any,
) -> dict[str, Any]:
    """One run: FedAvg (1 local epoch) with ``strategy_extra``, or CDS; the best-validation round's
    held-out Dice and each site's validation Dice, the validation Dice (and server metrics) of
    every round, and each round's seconds. ``data_extra`` and ``model_extra`` add arguments of the
    data module and the model; ``local_epochs`` is FedAvg's."""
    quiet()
    set_threads(1)
    started = time.perf_counter()
    pl.seed_everything(seed, workers=True, verbose=False)
    dm = FederatedDataModule(**data_kwargs(preset, split), **(data_extra or {}))
    dm.prepare_data()
    dm.setup("fit")
    if len(dm.site_names) != preset_sites(preset, split):
        expected = preset_sites(preset, split)
        raise RuntimeError(f"Expected {expected} sites for split {split!r}, got {len(dm.site_names)}.")
    model = BrainTumorSegmentation(
        **model_kwargs(preset.model, in_channels=dm.in_channels, compute_hd95=False, **(model_extra or {}))
    )
    mode = FedAvg(local_epochs=local_epochs) if federated else CDS()
    recorder = RoundRecorder(select="val/dice")
    strategy = FederatedStrategy(mode, seed=seed, **strategy_extra)
    trainer = pl.Trainer(
        **trainer_defaults("auto" if preset.model == "paper" else "cpu"),
        strategy=strategy,
        max_epochs=preset.rounds,
        callbacks=[recorder],
    )
    trainer.fit(model, datamodule=dm)
    assert recorder.best is not None
    value, best_round = recorder.best
    model.load_state_dict(recorder.states[best_round])
    tester = pl.Trainer(**trainer_defaults("auto" if preset.model == "paper" else "cpu"))
    heldout = float(tester.test(model, datamodule=dm, verbose=False)[0]["test/dice"])
    privacy = [{k: v for k, v in h.items() if k.startswith("privacy/")} for h in strategy.history]
    selected = next((r for r in recorder.rounds if r["round"] == best_round), {})
    return {
        "sites": len(dm.site_names),
        "val_dice": [r.get("val/dice") for r in recorder.rounds],
        "site_val_dice": {s: selected.get(f"val/{s}/dice") for s in dm.site_names},
        "round_seconds": [r.get("seconds") for r in recorder.rounds],
        "selected_round": best_round,
        "selected_val": value,
        "heldout": heldout,
        **({"privacy": privacy} if any(privacy) else {}),
        "wall_seconds": time.perf_counter() - started,
    }


def run_and_save(preset: Preset, job: Job, folder: Path) -> str:
    result = run_job(preset, job)
    write_json(folder / f"{job.key}.json", result)
    return f"{job.key}: held-out {result['heldout']:.3f} ({result['wall_seconds']:.0f} s)"


def rounds_to(series: Sequence[float | None], target: float) -> int | None:
    """The first round (1-based) whose value reaches ``target``; ``None`` if none does.

    Example:
        >>> rounds_to([0.2, 0.5, 0.9], 0.5), rounds_to([0.2], 0.5)
        (2, None)
    """
    for index, value in enumerate(series):
        if value is not None and value >= target:
            return index + 1
    return None


def tables(results: Sequence[dict[str, Any]], preset: Preset) -> tuple[str, dict[str, Any]]:
    lines: list[str] = []
    numbers: dict[str, Any] = {}
    for split in preset.splits:
        runs = [r for r in results if r["split"] == split]
        if not runs:
            continue
        fedavg_best = {
            r["seed"]: max(v for v in r["val_dice"] if v is not None) for r in runs if r["algorithm"] == "fedavg"
        }
        cds = [r["heldout"] for r in runs if r["algorithm"] == "cds"]
        lines += [
            f"#### {split} ({runs[0]['sites']} institutions, {preset.rounds} rounds)",
            "",
            "| algorithm | held-out Dice | % of CDS | seeds | rounds to 95% of best FedAvg val Dice |",
            "|---|---|---:|---:|---|",
        ]
        numbers[split] = {}
        for algorithm, (label, _) in ALGORITHM_SETTINGS.items():
            mine = sorted((r for r in runs if r["algorithm"] == algorithm), key=lambda r: r["seed"])
            if not mine:
                continue
            mean, std, n = mean_std(r["heldout"] for r in mine)
            share = f"{100 * mean / max(cds):.1f}" if cds else "-"
            reach = [
                rounds_to(r["val_dice"], 0.95 * fedavg_best[r["seed"]]) if r["seed"] in fedavg_best else None
                for r in mine
            ]
            shown = ", ".join("-" if v is None else str(v) for v in reach)
            lines.append(f"| {label} | {fmt_mean_std(mean, std if n > 1 else None)} | {share} | {n} | {shown} |")
            numbers[split][algorithm] = {"mean": mean, "std": std, "n": n, "rounds_to_95": reach}
        lines.append("")
    return "\n".join(lines), numbers


def plot(results: Sequence[dict[str, Any]], preset: Preset, out: Path) -> list[Path]:
    paths = []
    for split in preset.splits:
        runs = [r for r in results if r["split"] == split]
        if not runs:
            continue
        fig, axes = figure(size=(6.4, 4.2))
        ax = axes[0][0]
        for index, (algorithm, (label, _)) in enumerate(ALGORITHM_SETTINGS.items()):
            mine = [r["val_dice"] for r in runs if r["algorithm"] == algorithm]
            if not mine:
                continue
            width = min(len(m) for m in mine)
            mean = [sum(m[i] or 0.0 for m in mine) / len(mine) for i in range(width)]
            style = "-" if algorithm in ("cds", "fedavg") else "--"
            ax.plot(
                range(1, width + 1),
                mean,
                style,
                marker="o",
                ms=3,
                label=label,
                color="black" if algorithm == "cds" else PALETTE[index % len(PALETTE)],
            )
        ax.set_xlabel("round")
        ax.set_ylabel("validation Dice (mean over seeds)")
        ax.set_title(f"{split}: validation Dice per round")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=6, ncol=2, loc="lower right")
        paths.append(save_figure(fig, out / f"{preset.name}-algorithms-{split}.png"))
    return paths


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), default="quick")
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--plots-dir", type=Path, default=REPO_ROOT / "benchmarks" / "plots")
    parser.add_argument("--algorithms", nargs="+", choices=sorted(ALGORITHM_SETTINGS), default=None)
    parser.add_argument("--report", action="store_true", help="only assemble tables and plots of finished runs")
    args = parser.parse_args(argv)
    quiet()
    preset = PRESETS[args.preset]
    out = args.out or REPO_ROOT / "benchmarks" / "results" / f"algorithms-{preset.name}"
    folder = out / "runs"
    folder.mkdir(parents=True, exist_ok=True)
    algorithms = args.algorithms or list(ALGORITHM_SETTINGS)
    jobs = [Job(s, a, seed) for seed in preset.seeds for s in preset.splits for a in algorithms]
    if not args.report:
        run_pending(run_and_save, preset, jobs, folder)
    results = finished(folder)
    text, numbers = tables(results, preset)
    plots = plot(results, preset, args.plots_dir)
    meta = provenance(argv)
    document = {"meta": {**meta, "preset": asdict(preset)}, "tables": numbers, "runs": results}
    write_report(out, document, text, also=f"{len(plots)} plot(s)")
    return document


if __name__ == "__main__":
    main()
