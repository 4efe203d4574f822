"""Differential privacy, client-level and patient-level: held-out Dice against epsilon, beside FedAvg.

DP-FedAvg (McMahan et al., ICLR 2018) on the synthetic default's 10 institutions and on the
32-institution simulated split: every run is the algorithms benchmark's FedAvg run (same preset,
local training, rounds and seeds) with a :class:`~lightning_fedseg.federation.DPFedAvg` server
step. For each target epsilon (at ``delta``) the noise multiplier is the smallest that opacus's RDP
accountant finds to keep all the preset's rounds within it (``get_noise_multiplier``, sampling rate
1: every institution in every round); ``clip only`` is clipping without noise (epsilon infinite),
which separates the cost of clipping from the cost of noise. The clipping norm is one value for
every run, stated in ``CLIP_NORM``, never tuned per result. "no DP" is plain FedAvg, read from the
algorithms benchmark's runs when they exist (same protocol), otherwise run here.

Patient-level DP-SGD (:class:`~lightning_fedseg.federation.PatientDPSGD`, issue 25) is measured
step by step, so that each cost shows apart: ``gn`` is FedAvg with group norm instead of batch
norm (the architecture DP needs); ``gn-ploss`` adds the per-patient loss and the patient-level
Poisson sampling (``q`` = ``PATIENT_SAMPLE_RATE``, ``m`` = ``SLICES_PER_PATIENT`` slices per sampled
patient: the data pipeline of DP, without clipping or noise); ``p-clip`` adds per-patient
clipping at ``MAX_GRAD_NORM`` without noise; ``p-eps<e>`` is patient-level DP-SGD whose noise
multiplier opacus calibrates so that each institution spends ``e`` over all the preset's rounds
(``round(1/q)`` steps per round), and ``p-eps8-m1`` the same at ``m = 1``. ``q``, ``m`` and ``C`` are
fixed before any run (see their comments), never tuned per result. Patient sampling takes
``round(1/q)`` = 4 steps per local epoch at every institution (40 per round on the real split),
where shuffled batches of 16 slices take 2 to 50 (121 per round); the rows ending in ``-e5``
(added after the first pass showed that the sampling alone cost most of the Dice) train 5 local
epochs per round (200 steps), with the noise calibrated over those steps. Each run also records every
site's validation Dice at the selected round (the worst site's is shown), each round's seconds and
the process's peak resident memory.

Each finished run is written to ``<out>/runs/<split>-<setting>-seed<k>.json``; a run that exists is
not repeated, so an interrupted benchmark resumes.

Usage::

    python benchmarks/privacy.py --preset quick            # 2 CPU cores, in the background
    python benchmarks/privacy.py --preset smoke            # seconds, for the tests
    python benchmarks/privacy.py --preset quick --report   # tables and plot of the finished runs
    python benchmarks/privacy.py --preset quick --splits real --seeds 0 --settings p-eps8 gn   # a subset
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import re
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
    write_report,
)
from lightning_fedseg.federation import DPFedAvg, PatientDPSGD

DELTA = 1e-5
CLIP_NORM = 1.0  # the configs' default (configs/fedavg_dp.yaml), for every split, epsilon and seed
EPSILONS = (1.0, 3.0, 8.0)
SPLITS = {"smoke": ("sim4",), "quick": ("real", "sim32"), "paper": ("real", "sim32")}
# Patient-level DP-SGD. Chosen before any run: q = 0.25 gives 4 steps per local epoch at every
# institution, m = 4 slices of each sampled patient (the config's defaults); C = 1 is the config's
# default, as for DP-FedAvg. The real split's institutions hold 31, 13, 8, 6, 5, 5, 2, 2, 1 and 1
# training patients (measured after the runs), so q N, what the noise is divided by, is 0.25 to 7.75.
PATIENT_SAMPLE_RATE = 0.25
SLICES_PER_PATIENT = 4
MAX_GRAD_NORM = 1.0
PATIENT_EPSILONS = (1.0, 3.0, 8.0)


@dataclass(frozen=True)
class Job:
    split: str
    setting: str  # "nodp", "clip" (no noise) or "eps<value>"
    seed: int

    @property
    def key(self) -> str:
        return f"{self.split}-{self.setting}-seed{self.seed}"


def client_settings() -> list[str]:
    """In the order they run: the epsilons before clipping alone (the reference that explains them)."""
    return ["nodp", *(f"eps{e:g}" for e in sorted(EPSILONS, reverse=True)), "clip"]


def patient_settings() -> list[str]:
    """Patient-level rows, in the order they run: the headline (epsilon 8) first, then the costs apart."""
    eps = [f"p-eps{e:g}" for e in sorted(PATIENT_EPSILONS, reverse=True)]
    return [eps[0], "gn", "gn-ploss", "p-clip", f"{eps[0]}-m1", *eps[1:], "gn-ploss-e5", f"{eps[0]}-e5"]


def settings() -> list[str]:
    return [*client_settings(), *patient_settings()]


def label(setting: str) -> str:
    fixed = {
        "nodp": "no DP (FedAvg, batch norm, batch Dice)",
        "clip": f"client-level: clip only (C={CLIP_NORM:g}, no noise)",
        "gn": "group norm",
        "gn-ploss": f"group norm + patient loss + patient sampling (q={PATIENT_SAMPLE_RATE:g}, m={SLICES_PER_PATIENT})",
        "p-clip": f"patient-level: clip only (C={MAX_GRAD_NORM:g}, no noise)",
    }
    if setting.endswith("-e5"):
        return label(setting[:-3]) + ", 5 local epochs"
    if setting in fixed:
        return fixed[setting]
    if setting.startswith("p-eps"):
        epsilon, _, m1 = setting[5:].partition("-")
        return f"patient-level DP-SGD, epsilon {epsilon}" + (" (m=1)" if m1 else "")
    return f"client-level DP-FedAvg, epsilon {setting[3:]}"


def patient_kwargs(setting: str, rounds: int) -> dict[str, Any]:
    """``train_and_test`` arguments of a patient-level row."""
    out: dict[str, Any] = {"model_extra": {"normalization": "group"}}
    if setting.endswith("-e5"):
        out["local_epochs"] = 5
        setting = setting[:-3]
    if setting == "gn":
        return out
    out["model_extra"]["loss_unit"] = "patient"
    m = 1 if setting.endswith("-m1") else SLICES_PER_PATIENT
    out["data_extra"] = {"patient_sample_rate": PATIENT_SAMPLE_RATE, "slices_per_patient": m}
    if setting == "p-clip":
        out["client"] = PatientDPSGD(max_grad_norm=MAX_GRAD_NORM, noise_multiplier=0.0, delta=DELTA)
    elif setting.startswith("p-eps"):
        epsilon = float(setting[5:].partition("-")[0])
        out["client"] = PatientDPSGD(max_grad_norm=MAX_GRAD_NORM, target_epsilon=epsilon, delta=DELTA)
    return out


def peak_memory_reset() -> None:
    """Reset the process's peak resident memory (Linux: ``/proc/self/clear_refs``), if it can."""
    with contextlib.suppress(OSError):
        Path("/proc/self/clear_refs").write_text("5")


def peak_memory_mib() -> float | None:
    """The process's peak resident memory since the last reset (Linux ``VmHWM``), in MiB."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


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
    peak_memory_reset()
    if job.setting in patient_settings():
        extra = patient_kwargs(job.setting, preset.rounds)
        result = train_and_test(preset, job.split, job.seed, **extra)
        client = extra.get("client")
        return {
            **asdict(job),
            "noise_multiplier": getattr(client, "noise_multiplier", None),
            "max_grad_norm": MAX_GRAD_NORM if client is not None else None,
            "patient_sample_rate": extra.get("data_extra", {}).get("patient_sample_rate"),
            "slices_per_patient": extra.get("data_extra", {}).get("slices_per_patient"),
            "peak_rss_mib": peak_memory_mib(),
            **result,
        }
    if job.setting != "nodp":
        sigma = 0.0 if job.setting == "clip" else noise_multiplier(float(job.setting[3:]), preset.rounds)
        extra["server"] = DPFedAvg(clip_norm=CLIP_NORM, noise_multiplier=sigma, delta=DELTA)
    result = train_and_test(preset, job.split, job.seed, **extra)
    return {
        **asdict(job),
        "noise_multiplier": sigma,
        "clip_norm": CLIP_NORM,
        "peak_rss_mib": peak_memory_mib(),
        **result,
    }


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


def epsilons(run: dict[str, Any]) -> list[float]:
    """The epsilon spent after the last round: DP-FedAvg's one, or each institution's (patient level)."""
    last = (run.get("privacy") or [{}])[-1]
    if run["setting"].startswith("p-"):
        return [
            math.inf if v is None else float(v)  # JSON keeps an infinite epsilon as null
            for k, v in last.items()
            if k.startswith("privacy/") and k.endswith("/epsilon") and k != "privacy/epsilon"
        ]
    value = last.get("privacy/epsilon")
    return [] if value is None else [float(value)]


def _median(values: Sequence[float]) -> float:
    ordered = sorted(values)
    mid = len(ordered) // 2
    return ordered[mid] if len(ordered) % 2 else (ordered[mid - 1] + ordered[mid]) / 2


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
            "| setting | noise multiplier | epsilon spent (max / median over sites) | held-out Dice | % of no DP"
            " | worst site's val Dice | s/round | peak RSS (MiB) | seeds |",
            "|---|---:|---:|---|---:|---:|---:|---:|---:|",
        ]
        numbers[split] = {}
        for setting in settings():
            mine = [r for r in runs if r["setting"] == setting]
            if not mine:
                continue
            mean, std, n = mean_std(r["heldout"] for r in mine)
            sigma = mine[0].get("noise_multiplier")
            spent = [e for r in mine for e in epsilons(r)]
            if setting.removesuffix("-e5") in ("nodp", "gn", "gn-ploss"):
                eps = "-"
            elif not spent or sigma == 0:
                eps = "inf"
            else:
                eps = f"{max(spent):.2f} / {_median(spent):.2f}"
            share = f"{100 * mean / nodp:.1f}" if nodp and not math.isnan(nodp) else "-"
            shown_sigma = "-" if sigma is None else f"{sigma:.3f}"
            dice = fmt_mean_std(mean, std if n > 1 else None)
            worst = [
                min(v for v in r["site_val_dice"].values() if v is not None) for r in mine if r.get("site_val_dice")
            ]
            worst_shown = f"{sum(worst) / len(worst):.3f}" if worst else "-"
            seconds = [s for r in mine for s in r.get("round_seconds", []) if s is not None]
            per_round = f"{sum(seconds) / len(seconds):.0f}" if seconds else "-"
            memory = [r["peak_rss_mib"] for r in mine if r.get("peak_rss_mib") is not None]
            peak = f"{max(memory):.0f}" if memory else "-"
            cells = [label(setting), shown_sigma, eps, dice, share, worst_shown, per_round, peak, str(n)]
            lines.append("| " + " | ".join(cells) + " |")
            numbers[split][setting] = {
                "mean": mean, "std": std, "n": n, "noise_multiplier": sigma, "epsilon": eps,
                "worst_site_val": worst_shown, "seconds_per_round": per_round, "peak_rss_mib": peak,
            }  # fmt: skip
        lines.append("")
    return "\n".join(lines), numbers


def plot(numbers: dict[str, Any], preset: Preset, out: Path) -> Path | None:
    if not numbers:
        return None
    fig, axes = figure(size=(6.4, 4.4))
    ax = axes[0][0]
    for index, (split, rows) in enumerate(numbers.items()):
        color = f"C{index}"  # one colour per split: its DP points and its reference lines
        for prefix, suffix, marker, style, name in (
            ("eps", "", "o", "-", "client-level DP-FedAvg"),
            ("p-eps", "", "s", "--", "patient-level DP-SGD"),
            ("p-eps", "-e5", "^", ":", "patient-level DP-SGD, 5 local epochs"),
        ):
            pattern = re.compile(re.escape(prefix) + r"([0-9.]+)" + re.escape(suffix))
            points = sorted(
                (float(match.group(1)), rows[s]) for s in settings() if (match := pattern.fullmatch(s)) and s in rows
            )
            if points:
                ax.errorbar(
                    [e for e, _ in points],
                    [r["mean"] for _, r in points],
                    yerr=[r["std"] if r["n"] > 1 else 0.0 for _, r in points],
                    marker=marker,
                    linestyle=style,
                    capsize=3,
                    color=color,
                    label=f"{split}: {name}",
                )
        for setting, style in (
            ("nodp", "-"),
            ("gn", "-."),
            ("gn-ploss", (0, (5, 1))),
            ("clip", ":"),
            ("p-clip", (0, (1, 3))),
        ):
            if setting in rows:
                ax.axhline(rows[setting]["mean"], linestyle=style, linewidth=1, color=color,
                           label=f"{split}: {label(setting)}")  # fmt: skip
    ax.set_xscale("log")
    ax.set_xlabel(f"epsilon at delta={DELTA:g} after all rounds (per institution for patient level)")
    ax.set_ylabel("held-out Dice (mean ± std over seeds)")
    ax.set_title("Client-level and patient-level DP: Dice against the privacy budget")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=5)
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
    parser.add_argument("--seeds", nargs="+", type=int, default=None, help="a subset of the preset's seeds")
    parser.add_argument("--jobs", type=int, default=None, help="runs at a time (default: the preset's)")
    args = parser.parse_args(argv)
    quiet()
    preset = PRESETS[args.preset]
    splits = SPLITS[args.preset]
    preset = replace(preset, splits=splits, jobs=args.jobs or preset.jobs)
    out = args.out or REPO_ROOT / "benchmarks" / "results" / f"privacy-{preset.name}"
    folder = out / "runs"
    folder.mkdir(parents=True, exist_ok=True)
    chosen = args.settings or settings()
    run_splits = args.splits or splits
    seeds = args.seeds if args.seeds is not None else preset.seeds
    jobs = [Job(split, setting, seed) for setting in chosen for seed in seeds for split in run_splits]
    algorithms_runs = REPO_ROOT / "benchmarks" / "results" / f"algorithms-{preset.name}" / "runs"
    reuse_fedavg(folder, args.algorithms_runs or algorithms_runs, jobs)
    if not args.report:
        run_pending(run_and_save, preset, jobs, folder)
    results = finished(folder)
    shown = [*splits, *sorted({r["split"] for r in results} - set(splits))]  # e.g. a --splits sim4 run
    text, numbers = tables(results, preset, shown)
    figure_path = plot(numbers, preset, args.plots_dir)
    document = {"meta": {**provenance(argv), "preset": asdict(preset), "delta": DELTA, "clip_norm": CLIP_NORM},
                "tables": numbers, "runs": results}  # fmt: skip
    write_report(out, document, text, also=str(figure_path) if figure_path else "")
    return document


if __name__ == "__main__":
    main()
