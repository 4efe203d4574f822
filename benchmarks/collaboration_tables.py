"""The collaboration-modes benchmark's tables: the paper's Tables 2 and 3 beside ours.

How each mode's held-out Dice is summarized is stated in ``benchmarks/collaboration_modes.py``;
runs trained to convergence (``--converge``) show their rounds used and stop reason per seed in
brackets beside each figure (see ``benchmarks/convergence.py``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from benchmarks.common import fmt_mean_std, mean_std
from benchmarks.convergence import stops_text

if TYPE_CHECKING:
    from benchmarks.collaboration_presets import Preset

# The paper's results (Sheller et al. 2018): Dice, std (None: best of several runs), % of CDS.
PAPER_REAL: dict[str, tuple[float, float | None, float]] = {
    "cds": (0.862, None, 100.0),
    "fedavg": (0.852, 0.002, 98.7),
    "ciil": (0.82, 0.04, 95.0),
    "iil": (0.803, 0.042, 93.0),
}
PAPER_SIMULATED: dict[int, dict[str, tuple[float, float, float]]] = {
    4: {"fedavg": (0.862, 0.003, 99.9), "ciil": (0.843, 0.011, 97.7), "iil": (0.841, 0.004, 97.4)},
    8: {"fedavg": (0.865, 0.002, 100.2), "ciil": (0.839, 0.016, 97.3), "iil": (0.823, 0.014, 95.4)},
    16: {"fedavg": (0.863, 0.002, 99.9), "ciil": (0.82, 0.032, 95.0), "iil": (0.82, 0.018, 95.0)},
    32: {"fedavg": (0.857, 0.001, 99.3), "ciil": (0.809, 0.023, 93.7), "iil": (0.701, 0.058, 81.2)},
}
MODE_LABELS = {
    "cds": "CDS",
    "fedavg": "FedAvg",
    "ciil": "CIIL",
    "iil": "IIL",
    "single_large": "single (largest)",
    "single_small": "single (small)",
}
REAL_MODES = ("cds", "fedavg", "ciil", "iil", "single_large", "single_small")
SIMULATED_MODES = ("fedavg", "ciil", "iil")


def runs_of(results: Sequence[dict[str, Any]], split: str, mode: str) -> list[dict[str, Any]]:
    return sorted((r for r in results if r["split"] == split and r["mode"] == mode), key=lambda r: r["seed"])


def summarize_mode(results: Sequence[dict[str, Any]], split: str, mode: str) -> dict[str, Any] | None:
    """Held-out Dice of a mode on a split, reported as the protocol says."""
    runs = runs_of(results, split, mode)
    if not runs:
        return None
    summary = _summarize(runs, mode)
    if stops_text(runs):
        summary["stops"] = stops_text(runs)
    return summary


def _summarize(runs: Sequence[dict[str, Any]], mode: str) -> dict[str, Any]:
    if mode == "ciil":
        per_seed = [list(r["heldout_per_cycle"].values()) for r in runs]
        every = [v for values in per_seed for v in values]
        mean, std, n = mean_std(every)
        last = mean_std([values[-1] for values in per_seed])
        return {
            "mean": mean,
            "std": std,
            "n": n,
            "how": f"every cycle, {len(runs)} seed(s) x {len(per_seed[0])} cycles",
            "last_cycle_mean": last[0],
            "last_cycle_std": last[1],
            "per_seed": per_seed,
        }
    values = [r["heldout"] for r in runs]
    if mode == "cds":
        best = max(runs, key=lambda r: r.get("selected_val", float("-inf")))
        return {
            "mean": best["heldout"],
            "std": None,
            "n": len(runs),
            "how": f"best of {len(runs)} seed(s) by validation Dice (seed {best['seed']})",
            "seed_mean": mean_std(values)[0],
            "seed_std": mean_std(values)[1],
            "per_seed": values,
        }
    mean, std, n = mean_std(values)
    how = {
        "fedavg": "best-validation round",
        "iil": "final model",
        "single_large": "best own-validation round",
        "single_small": "best own-validation round",
    }[mode]
    summary = {"mean": mean, "std": std, "n": n, "how": f"{how}, mean ± std over {n} seed(s)", "per_seed": values}
    if mode.startswith("single"):
        summary["site"] = runs[0]["site"]
        summary["training_subjects_share"] = runs[0]["site_samples"][runs[0]["site"]] / sum(
            runs[0]["site_samples"].values()
        )
    if mode == "iil" and not all(r.get("iil_completed", True) for r in runs):
        summary["how"] += " (did not reach the last institution)"
    return summary


def real_table(results: Sequence[dict[str, Any]], preset: Preset) -> tuple[str, dict[str, Any]]:
    """The paper's Table 2 beside ours (markdown) and its numbers."""
    summaries = {m: summarize_mode(results, "real", m) for m in REAL_MODES}
    cds = summaries.get("cds")
    reference = cds["mean"] if cds else float("nan")
    lines = [
        "| mode | held-out Dice (ours) | % of CDS (ours) | Dice (paper) | % of CDS (paper) | how ours is reported |",
        "|---|---|---:|---|---:|---|",
    ]
    for mode, summary in summaries.items():
        if summary is None:
            continue
        label = MODE_LABELS[mode]
        if mode == "iil":
            label += f" (patience {preset.iil_patience}" + (
                f", ≤{preset.iil_max_epochs_per_site} epochs/site)" if preset.iil_max_epochs_per_site else ")"
            )
        if mode.startswith("single"):
            label += f": site {summary['site']}, {100 * summary['training_subjects_share']:.0f}% of slices"
        percent = 100 * summary["mean"] / reference if reference == reference else float("nan")
        summary["percent_of_cds"] = percent
        paper = PAPER_REAL.get(mode)
        paper_dice = fmt_mean_std(paper[0], paper[1]) if paper else "-"
        paper_pct = f"{paper[2]:g}" if paper else "-"
        lines.append(
            f"| {label} | {fmt_mean_std(summary['mean'], summary['std'])} | {percent:.1f} "
            f"| {paper_dice} | {paper_pct} | {summary['how']}{_stops(summary)} |"
        )
    return "\n".join(lines), summaries


def simulated_table(results: Sequence[dict[str, Any]], preset: Preset) -> tuple[str, dict[str, Any]]:
    """The paper's Table 3 beside ours (markdown) and its numbers."""
    sizes = sorted({r["num_sites"] for r in results if r["split"].startswith("sim") and r["mode"] != "cds"})
    cds_sizes = sorted(r["num_sites"] for r in results if r["split"].startswith("sim") and r["mode"] == "cds")
    cds_size = cds_sizes[0] if cds_sizes else min(preset.simulated_sites)
    cds = summarize_mode(results, f"sim{cds_size}", "cds")
    reference = cds["mean"] if cds else float("nan")
    numbers: dict[str, Any] = {"cds": cds}
    header = "| institutions | " + " | ".join(
        f"{MODE_LABELS[m]} (ours) | {MODE_LABELS[m]} (paper)" for m in SIMULATED_MODES
    )
    lines = [header + " |", "|---|" + "---|---|" * len(SIMULATED_MODES)]
    for n in sizes:
        cells = []
        numbers[str(n)] = {}
        for mode in SIMULATED_MODES:
            summary = summarize_mode(results, f"sim{n}", mode)
            paper = PAPER_SIMULATED.get(n, {}).get(mode)
            paper_cell = f"{fmt_mean_std(paper[0], paper[1])} ({paper[2]:g}%)" if paper else "-"
            if summary is None:
                cells += ["-", paper_cell]
                continue
            summary["percent_of_cds"] = 100 * summary["mean"] / reference
            numbers[str(n)][mode] = summary
            figure_cell = f"{fmt_mean_std(summary['mean'], summary['std'])} ({summary['percent_of_cds']:.1f}%)"
            cells += [figure_cell + _stops(summary), paper_cell]
        lines.append(f"| {n} | " + " | ".join(cells) + " |")
    if cds:
        lines.append("")
        lines.append(
            f"CDS reference (pooled {cds_size}-site split, {cds['how']}): "
            f"{fmt_mean_std(cds['mean'], None)} (paper: 0.862). FedAvg, IIL: {SIMULATED_HOW}."
        )
    return "\n".join(lines), numbers


def _stops(summary: dict[str, Any]) -> str:
    return f" [{summary['stops']}]" if "stops" in summary else ""


SIMULATED_HOW = "mean ± std over seeds (FedAvg at its best-validation round, IIL final); CIIL over every cycle"
