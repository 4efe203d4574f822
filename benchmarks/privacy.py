"""Client-level differential privacy: held-out Dice against epsilon, beside plain FedAvg.

DP-FedAvg (McMahan et al., ICLR 2018) on the synthetic default's 10 institutions and on the
32-institution simulated split: every run is the algorithms benchmark's FedAvg run (same preset,
local training, rounds and seeds) with a :class:`~lightning_fedseg.federation.DPFedAvg` server
step. For each target epsilon (at ``delta``) the noise multiplier is the smallest that opacus's RDP
accountant finds to keep all the preset's rounds within it (``get_noise_multiplier``, sampling rate
1: every institution in every round); ``clip only`` is clipping without noise (epsilon infinite),
which separates the cost of clipping from the cost of noise. The clipping norm is one value for
every run, stated in ``CLIP_NORM``, never tuned per result. "no DP" is plain FedAvg, read from the
algorithms benchmark's runs when they exist (same protocol), otherwise run here.

Each finished run is written to ``<out>/runs/<split>-<setting>-seed<k>.json``; a run that exists is
not repeated, so an interrupted benchmark resumes.

Usage::

    python benchmarks/privacy.py --preset quick            # 2 CPU cores, in the background
    python benchmarks/privacy.py --preset smoke            # seconds, for the tests
    python benchmarks/privacy.py --preset quick --report   # tables and plot of the finished runs
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.algorithms import PRESETS, Preset, preset_sites, train_and_test
from benchmarks.common import (
    REPO_ROOT,
    figure,
    finished,
    fmt_mean_std,
    mean_std,
    provenance,
    quiet,
    run_pending,
    save_figure,
    write_json,
)
from lightning_fedseg.federation import DPFedAvg

DELTA = 1e-5
CLIP_NORM = 1.0  # the configs' default (configs/fedavg_dp.yaml), for every split, epsilon and seed
EPSILONS = (1.0, 3.0, 8.0)
SPLITS = {"smoke": ("sim4",), "quick": ("real", "sim32"), "paper": ("real", "sim32")}


@dataclass(frozen=True)
class Job:
    split: str
    setting: str  # "nodp", "clip" (no noise) or "eps<value>"
    seed: int

    @property
    def key(self) -> str:
        return f"{self.split}-{self.setting}-seed{self.seed}"


def settings() -> list[str]:
    """In the order they run: the epsilons before clipping alone (the reference that explains them)."""
    return ["nodp", *(f"eps{e:g}" for e in sorted(EPSILONS, reverse=True)), "clip"]


def label(setting: str) -> str:
    return {"nodp": "no DP (FedAvg)", "clip": f"clip only (C={CLIP_NORM:g}, no noise)"}.get(
        setting, f"epsilon {setting[3:]}"
    )


def noise_multiplier(epsilon: float, rounds: int, sample_rate: float = 1.0) -> float:
    """The smallest noise multiplier that keeps ``rounds`` rounds within ``epsilon`` at ``DELTA``
    (opacus's RDP accountant, as DPFedAvg's default)."""
    from opacus.accountants.utils import get_noise_multiplier

    return float(
        get_noise_multiplier(
            target_epsilon=epsilon, target_delta=DELTA, sample_rate=sample_rate, steps=rounds, accountant="rdp"
        )
    )


def run_job(preset: Preset, job: Job) -> dict[str, Any]:
    extra: dict[str, Any] = {}
    sigma = None
    if job.setting != "nodp":
        sigma = 0.0 if job.setting == "clip" else noise_multiplier(float(job.setting[3:]), preset.rounds)
        extra["server"] = DPFedAvg(clip_norm=CLIP_NORM, noise_multiplier=sigma, delta=DELTA)
    result = train_and_test(preset, job.split, job.seed, **extra)
    return {**asdict(job), "noise_multiplier": sigma, "clip_norm": CLIP_NORM, **result}


def run_and_save(preset: Preset, job: Job, folder: Path) -> str:
    result = run_job(preset, job)
    write_json(folder / f"{job.key}.json", result)
    return f"{job.key}: held-out {result['heldout']:.3f} ({result['wall_seconds']:.0f} s)"


def reuse_fedavg(folder: Path, algorithms_runs: Path, jobs: Sequence[Job]) -> None:
    """Copy the algorithms benchmark's FedAvg runs (the same protocol) in as the ``nodp`` runs."""
    for job in jobs:
        source = algorithms_runs / f"{job.split}-fedavg-seed{job.seed}.json"
        target = folder / f"{job.key}.json"
        if job.setting == "nodp" and source.exists() and not target.exists():
            run = json.loads(source.read_text())
            shown = source.relative_to(REPO_ROOT) if source.is_relative_to(REPO_ROOT) else source
            run.update(setting="nodp", noise_multiplier=None, reused_from=str(shown))
            run.pop("algorithm", None)
            write_json(target, run)


def tables(results: Sequence[dict[str, Any]], preset: Preset, splits: Sequence[str]) -> tuple[str, dict[str, Any]]:
    lines: list[str] = []
    numbers: dict[str, Any] = {}
    for split in splits:
        runs = [r for r in results if r["split"] == split]
        if not runs:
            continue
        nodp = mean_std(r["heldout"] for r in runs if r["setting"] == "nodp")[0]
        lines += [
            f"#### {split} ({preset_sites(preset, split)} institutions, {preset.rounds} rounds, delta {DELTA:g})",
            "",
            "| setting | noise multiplier | epsilon spent | held-out Dice | % of no DP | seeds |",
            "|---|---:|---:|---|---:|---:|",
        ]
        numbers[split] = {}
        for setting in settings():
            mine = [r for r in runs if r["setting"] == setting]
            if not mine:
                continue
            mean, std, n = mean_std(r["heldout"] for r in mine)
            sigma = mine[0].get("noise_multiplier")
            spent = [h.get("privacy/epsilon") for h in mine[0].get("privacy", [])]
            eps = "-" if setting == "nodp" else "inf" if not spent or spent[-1] is None else f"{spent[-1]:.2f}"
            share = f"{100 * mean / nodp:.1f}" if nodp and not math.isnan(nodp) else "-"
            shown_sigma = "-" if sigma is None else f"{sigma:.3f}"
            dice = fmt_mean_std(mean, std if n > 1 else None)
            lines.append(f"| {label(setting)} | {shown_sigma} | {eps} | {dice} | {share} | {n} |")
            numbers[split][setting] = {"mean": mean, "std": std, "n": n, "noise_multiplier": sigma, "epsilon": eps}
        lines.append("")
    return "\n".join(lines), numbers


def plot(numbers: dict[str, Any], preset: Preset, out: Path) -> Path | None:
    if not numbers:
        return None
    fig, axes = figure(size=(6.0, 4.0))
    ax = axes[0][0]
    for index, (split, rows) in enumerate(numbers.items()):
        color = f"C{index}"  # one colour per split: its DP points and its reference lines
        points = sorted((float(s[3:]), rows[s]) for s in settings() if s.startswith("eps") and s in rows)
        if points:
            ax.errorbar(
                [e for e, _ in points],
                [r["mean"] for _, r in points],
                yerr=[r["std"] if r["n"] > 1 else 0.0 for _, r in points],
                marker="o",
                capsize=3,
                color=color,
                label=f"{split}: DP-FedAvg",
            )
        for setting, style in (("nodp", "-"), ("clip", ":")):
            if setting in rows:
                ax.axhline(rows[setting]["mean"], linestyle=style, linewidth=1, color=color,
                           label=f"{split}: {label(setting)}")  # fmt: skip
    ax.set_xscale("log")
    ax.set_xlabel(f"epsilon at delta={DELTA:g} after all rounds")
    ax.set_ylabel("held-out Dice (mean ± std over seeds)")
    ax.set_title("Client-level DP: Dice against the privacy budget")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=6)
    return save_figure(fig, out / f"{preset.name}-privacy-epsilon.png")


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", choices=sorted(SPLITS), default="quick")
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--plots-dir", type=Path, default=REPO_ROOT / "benchmarks" / "plots")
    parser.add_argument("--algorithms-runs", type=Path, default=None, help="the algorithms benchmark's runs folder")
    parser.add_argument("--report", action="store_true", help="only assemble the tables and plot of finished runs")
    parser.add_argument("--settings", nargs="+", choices=settings(), default=None, help="run these, in this order")
    parser.add_argument("--splits", nargs="+", default=None, help="a subset of the preset's splits")
    args = parser.parse_args(argv)
    quiet()
    preset = PRESETS[args.preset]
    splits = SPLITS[args.preset]
    preset = replace(preset, splits=splits)
    out = args.out or REPO_ROOT / "benchmarks" / "results" / f"privacy-{preset.name}"
    folder = out / "runs"
    folder.mkdir(parents=True, exist_ok=True)
    chosen = args.settings or settings()
    run_splits = args.splits or splits
    jobs = [Job(split, setting, seed) for setting in chosen for seed in preset.seeds for split in run_splits]
    algorithms_runs = REPO_ROOT / "benchmarks" / "results" / f"algorithms-{preset.name}" / "runs"
    reuse_fedavg(folder, args.algorithms_runs or algorithms_runs, jobs)
    if not args.report:
        run_pending(run_and_save, preset, jobs, folder)
    results = finished(folder)
    text, numbers = tables(results, preset, splits)
    figure_path = plot(numbers, preset, args.plots_dir)
    document = {"meta": {**provenance(argv), "preset": asdict(preset), "delta": DELTA, "clip_norm": CLIP_NORM},
                "tables": numbers, "runs": results}  # fmt: skip
    write_json(out / "results.json", document)
    (out / "tables.md").write_text(text + "\n")
    print("\n" + text)
    print(f"wrote {out / 'results.json'}, {out / 'tables.md'}" + (f" and {figure_path}" if figure_path else ""))
    return document


if __name__ == "__main__":
    main()
