"""The collaboration-modes benchmark's plots: Dice per round, CIIL's forgetting, FedAvg's convergence."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from benchmarks.collaboration_tables import MODE_LABELS, runs_of
from benchmarks.common import figure, save_figure

if TYPE_CHECKING:
    from benchmarks.collaboration_presets import Preset

MODE_COLORS = {
    "cds": "black",
    "fedavg": "tab:blue",
    "ciil": "tab:orange",
    "iil": "tab:green",
    "single_large": "tab:purple",
    "single_small": "tab:brown",
}


def _finish(ax: Any, xlabel: str, title: str, ylabel: str | None = None) -> None:
    """Labels, title, grid and legend of one panel."""
    ax.set_xlabel(xlabel)
    if ylabel is not None:
        ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")


def _band(ax: Any, xs: Sequence[float], series: Sequence[Sequence[float]], color: str, label: str, **kw: Any) -> None:
    """Mean ± std over the series; where some stopped earlier (early stopping), over those left."""
    length = min(len(xs), max(len(s) for s in series))
    arr = np.full((len(series), length), np.nan)
    for row, values in zip(arr, series, strict=True):
        row[: min(len(values), length)] = np.asarray(values[:length], dtype=float)
    mean = np.nanmean(arr, axis=0)
    ax.plot(xs[:length], mean, color=color, label=label, **kw)
    if len(series) > 1:
        std = np.nanstd(arr, axis=0)
        ax.fill_between(xs[:length], mean - std, mean + std, color=color, alpha=0.15, linewidth=0)


def _longest(runs: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """The run with the most validated rounds (its rounds are the x axis of a band)."""
    return max(runs, key=lambda r: len(r["rounds"]))


def plot_real(results: Sequence[dict[str, Any]], preset: Preset, out: Path) -> list[Path]:
    """Validation Dice per round of every mode, CIIL's held-out per cycle, IIL per epoch."""
    iil_runs = runs_of(results, "real", "iil")
    fig, axes = figure(ncols=2 if iil_runs else 1, size=(6.4, 4.2))
    ax, ax_iil = axes[0][0], axes[0][-1]
    for mode in ("cds", "fedavg", "ciil", "single_large", "single_small"):
        runs = runs_of(results, "real", mode)
        if not runs:
            continue
        scale = runs[0]["val_every_n_epochs"]
        series = [[r.get("val/dice", float("nan")) for r in run["rounds"]] for run in runs]
        xs = [(rec["round"] + 1) / scale for rec in _longest(runs)["rounds"]]
        _band(ax, xs, series, MODE_COLORS[mode], f"{MODE_LABELS[mode]}: val/dice")
        if mode == "ciil":
            held = [list(run["heldout_per_cycle"].values()) for run in runs]
            cycles = list(range(1, max(map(len, held)) + 1))
            _band(ax, cycles, held, MODE_COLORS[mode], "CIIL: held-out", linestyle="--")
        elif "selected_round" in runs[0]:
            for run in runs:
                ax.plot((run["selected_round"] + 1) / scale, run["heldout"], marker="*", color=MODE_COLORS[mode], ms=9)
    _finish(
        ax,
        "round / cycle / epoch over the pooled data (single sites: equal optimizer steps)",
        "Real-split analogue, 10 institutions (★ held-out Dice of the selected round)",
        ylabel="Dice",
    )
    for run in iil_runs:
        rounds = run["rounds"]
        ax_iil.plot(
            [r["round"] + 1 for r in rounds],
            [r.get("val/dice", float("nan")) for r in rounds],
            color=MODE_COLORS["iil"],
            alpha=0.8,
            label=f"seed {run['seed']}: val/dice",
        )
        ax_iil.axhline(run["heldout"], color=MODE_COLORS["iil"], linestyle=":", alpha=0.8)
        if run is iil_runs[0]:
            previous = None
            for entry in run["iil_history"]:
                if entry["site"] != previous and previous is not None:
                    ax_iil.axvline(entry["round"] + 0.5, color="grey", alpha=0.3, linewidth=0.8)
                previous = entry["site"]
    if iil_runs:
        _finish(
            ax_iil,
            "IIL epoch (grey: next institution)",
            f"IIL, patience {preset.iil_patience} (dotted: final model's held-out Dice)",
        )
    return [save_figure(fig, out / f"{preset.name}-real-dice-per-round.png")]


def plot_forgetting(results: Sequence[dict[str, Any]], preset: Preset, out: Path) -> list[Path]:
    """CIIL: the first institution's validation Dice after every site step; FedAvg and IIL beside."""
    ciil = runs_of(results, "real", "ciil")
    if not ciil or not ciil[0].get("probe"):
        return []
    iil_runs = runs_of(results, "real", "iil")
    fig, axes = figure(ncols=2 if iil_runs else 1, size=(6.4, 4.0))
    ax, ax_iil = axes[0][0], axes[0][-1]
    sites = ciil[0]["sites"]
    first = sites[0]
    for run in ciil:
        steps = run["probe"]
        ax.plot(
            [s["step"] for s in steps],
            [s["dice"] for s in steps],
            color=MODE_COLORS["ciil"],
            alpha=0.8,
            marker=".",
            ms=3,
            label=f"CIIL seed {run['seed']}, after each site",
        )
        for s in steps:
            if s["site"] == first:
                ax.plot(s["step"], s["dice"], marker="o", color="red", ms=4)
    for run in runs_of(results, "real", "fedavg"):
        xs = [(r["round"] + 1) * len(sites) for r in run["rounds"]]
        ax.plot(
            xs,
            [r.get(f"val/{first}/dice", float("nan")) for r in run["rounds"]],
            color=MODE_COLORS["fedavg"],
            marker="s",
            ms=3,
            label=f"FedAvg seed {run['seed']}, global model per round",
        )
    for cycle in range(1, len(ciil[0]["heldout_per_cycle"])):
        ax.axvline(cycle * len(sites) + 0.5, color="grey", alpha=0.25, linewidth=0.8)
    _finish(
        ax,
        f"site step ({len(sites)} per cycle/round; red: right after institution {first} trained)",
        f"Forgetting: institution {first} (the largest) under CIIL",
        ylabel=f"Dice on institution {first}'s validation volumes",
    )
    for run in iil_runs:
        rounds = run["rounds"]
        ax_iil.plot(
            [r["round"] + 1 for r in rounds],
            [r.get(f"val/{first}/dice", float("nan")) for r in rounds],
            color=MODE_COLORS["iil"],
            label=f"IIL seed {run['seed']}",
        )
    if iil_runs:
        _finish(ax_iil, "IIL epoch", f"IIL: institution {first}'s validation Dice")
    return [save_figure(fig, out / f"{preset.name}-ciil-forgetting.png")]


def plot_simulated(results: Sequence[dict[str, Any]], preset: Preset, out: Path) -> list[Path]:
    """FedAvg convergence (validation Dice per round) for 4 to 32 institutions, CIIL held-out per cycle."""
    sizes = sorted({r["num_sites"] for r in results if r["split"].startswith("sim") and r["mode"] == "fedavg"})
    if not sizes:
        return []
    import matplotlib as mpl

    colors = mpl.colormaps["viridis"]
    with_ciil = any(r["split"].startswith("sim") and r["mode"] == "ciil" for r in results)
    fig, axes = figure(ncols=2 if with_ciil else 1, size=(6.0, 4.0))
    ax, ax_ciil = axes[0][0], axes[0][-1]
    for i, n in enumerate(sizes):
        color = colors(i / max(len(sizes) - 1, 1))
        runs = runs_of(results, f"sim{n}", "fedavg")
        series = [[r.get("val/dice", float("nan")) for r in run["rounds"]] for run in runs]
        _band(ax, [r["round"] + 1 for r in _longest(runs)["rounds"]], series, color, f"FedAvg, {n} institutions")
        ciil = runs_of(results, f"sim{n}", "ciil")
        if ciil:
            held = [list(run["heldout_per_cycle"].values()) for run in ciil]
            _band(ax_ciil, list(range(1, max(map(len, held)) + 1)), held, color, f"CIIL, {n} institutions")
    cds = runs_of(results, f"sim{min(preset.simulated_sites)}", "cds")
    if cds:
        series = [[r.get("val/dice", float("nan")) for r in run["rounds"]] for run in cds]
        _band(ax, [r["round"] + 1 for r in _longest(cds)["rounds"]], series, "black", "CDS", linestyle="--")
    real = runs_of(results, "real", "fedavg")
    if real:
        series = [[r.get("val/dice", float("nan")) for r in run["rounds"]] for run in real]
        xs = [r["round"] + 1 for r in _longest(real)["rounds"]]
        _band(ax, xs, series, "tab:red", "FedAvg, real split (10)", linestyle=":")
    ax.set_xlabel("round")
    ax.set_ylabel("validation Dice (val/dice)")
    ax.set_title("FedAvg convergence, simulated splits")
    panels = [ax]
    if with_ciil:
        ax_ciil.set_xlabel("cycle")
        ax_ciil.set_ylabel("held-out Dice")
        ax_ciil.set_title("CIIL, held-out Dice after every cycle")
        panels.append(ax_ciil)
    for a in panels:
        a.grid(alpha=0.3)
        a.legend(fontsize=8, loc="lower right")
    return [save_figure(fig, out / f"{preset.name}-simulated-convergence.png")]
