"""Why FedAvg trails CDS at 32 institutions here: one factor at a time, at convergence.

Every run is FedAvg on the 32-institution simulated split (``sim32``), trained to convergence
with the protocol of :mod:`benchmarks.convergence` (patience 5 on ``val/dice``, at most 40
rounds, the best-validation round tested). The baseline is the ``table3`` preset of
:mod:`benchmarks.collaboration_modes`: the quick settings at batch 5, which gives the paper's
optimizer steps per epoch and so its local steps per site per round (about 11 at 32 sites),
Adam reset every round, one local epoch, learning rate 5e-4. Each other row changes one factor
of the baseline:

* ``batch16``: batch 16, the quick preset's (about 4 local steps per site per round);
* ``keep``: ``optimizer_state="keep"`` (each site's Adam moments persist across rounds) instead
  of the paper's reset;
* ``fedbn``: FedBN (each site trains and validates with its own BatchNorm layers: scanners
  differ between sites); the held-out test uses the global model, whose BatchNorm layers are the
  sample-weighted mean of the sites' (``FedBN(test_layers="aggregate")``);
* ``lr1e-3``: Adam's learning rate 1e-3;
* ``epochs3``: 3 local epochs per round (three times the compute per round).

A factor that also changes centralized training (batch size, learning rate) gets its own CDS
runs, and its "% of CDS" divides by that CDS (best of its seeds by validation Dice, as in the
paper); the others divide by the baseline's CDS. The runs are kept in the ``table3`` benchmark's
runs folder (``benchmarks/results/collaboration_modes-table3/runs``, one JSON per run keyed by
split, mode, seed and settings), so the baseline's runs are the table3 preset's own and either
benchmark resumes the other's work. Nothing in a factor is tuned: each is the value named.

    .venv/bin/python benchmarks/ablations.py                     # every factor, seeds 0-2
    .venv/bin/python benchmarks/ablations.py --factors baseline batch16 --seeds 0
    .venv/bin/python benchmarks/ablations.py --report            # tables from finished runs only
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, replace
from multiprocessing import get_context
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.collaboration_modes import PRESETS, Job, Preset, warm_cache
from benchmarks.collaboration_tables import _summarize
from benchmarks.common import REPO_ROOT, finished, fmt_mean_std, provenance, quiet, write_json
from benchmarks.convergence import RunFile, run_and_save, settings_hash, stops_text


@dataclass(frozen=True)
class Factor:
    """One row of the ablation: the baseline with some preset fields changed."""

    label: str
    overrides: dict[str, Any]
    changes_cds: bool  # whether centralized training changes too (it then gets its own CDS runs)


FACTORS: dict[str, Factor] = {
    "baseline": Factor("table3 preset: batch 5 (~11 local steps/site), reset Adam, 1 epoch, lr 5e-4", {}, True),
    "batch16": Factor("batch 16 (the quick preset; ~4 local steps/site)", {"batch_size": 16}, True),
    "keep": Factor("Adam state kept across rounds (`optimizer_state: keep`)", {"optimizer_state": "keep"}, False),
    "fedbn": Factor("FedBN: BatchNorm layers stay local", {"client": "fedbn"}, False),
    "lr1e-3": Factor("learning rate 1e-3", {"learning_rate": 1e-3}, True),
    "epochs3": Factor("3 local epochs per round", {"local_epochs": 3}, False),
}
SPLIT, SITES = "sim32", 32
CDS_SPLIT = "sim4"  # the table3 benchmark's CDS reference (the pooled training subjects are the same)
DEFAULT_RUNS = REPO_ROOT / "benchmarks" / "results" / "collaboration_modes-table3" / "runs"


def factor_preset(base: Preset, factor: str, jobs: int, threads: int | None) -> Preset:
    """The baseline preset with a factor's fields changed (workers and threads do not change results)."""
    return replace(base, jobs=jobs, threads=threads, **FACTORS[factor].overrides)


def plan(base: Preset, factors: Sequence[str], seeds: Sequence[int], jobs: int) -> list[tuple[Preset, RunFile]]:
    """Every (preset, run) of the ablation, seed by seed (every factor's seed 0 first), FedAvg
    runs before the CDS references; ``epochs3`` (three times the compute per round) last."""
    fedavg, cds = [], []
    for factor in factors:
        preset = factor_preset(base, factor, jobs, base.threads)
        settings = settings_hash(preset)
        for seed in seeds:
            fedavg.append((preset, RunFile(Job(SPLIT, "fedavg", seed, num_sites=SITES), settings)))
            if FACTORS[factor].changes_cds:
                cds.append((preset, RunFile(Job(CDS_SPLIT, "cds", seed, num_sites=4), settings)))
    costly = [pr for pr in fedavg if pr[0].local_epochs > 1]
    rest = [pr for pr in fedavg + cds if pr not in costly]
    return sorted(rest, key=lambda pr: (pr[1].job.seed, pr[1].job.mode != "fedavg")) + costly


def run(pending: Sequence[tuple[Preset, RunFile]], folder: Path, jobs: int) -> None:
    """Train the runs without a result file (``jobs`` at a time on spawned workers)."""
    todo = [(p, r) for p, r in pending if not (folder / f"{r.key}.json").exists()]
    print(f"{len(todo)} of {len(pending)} runs to do", flush=True)
    if not todo:
        return
    warm_cache(todo[0][0], [Job(SPLIT, "fedavg", 0, num_sites=SITES), Job(CDS_SPLIT, "cds", 0, num_sites=4)], None)
    folder.mkdir(parents=True, exist_ok=True)
    if jobs <= 1:
        for preset, run_file in todo:
            print(" ", run_and_save(preset, run_file, folder), flush=True)
        return
    with ProcessPoolExecutor(jobs, mp_context=get_context("spawn")) as pool:
        futures = [pool.submit(run_and_save, preset, run_file, folder) for preset, run_file in todo]
        for future in as_completed(futures):
            print(" ", future.result(), flush=True)


def summarize(runs: Sequence[dict[str, Any]], base: Preset, factors: Sequence[str]) -> list[dict[str, Any]]:
    """One row per factor with finished FedAvg runs: held-out Dice, % of its CDS, rounds and stops."""
    rows = []
    baseline_cds = _cds(runs, settings_hash(base))
    for factor in factors:
        settings = settings_hash(factor_preset(base, factor, base.jobs, base.threads))
        # The table3 benchmark's FedAvg runs on sim4-16 share the baseline's settings: sim32 only.
        fedavg = [r for r in runs if r["settings"] == settings and r["mode"] == "fedavg" and r["split"] == SPLIT]
        fedavg.sort(key=lambda r: r["seed"])
        if not fedavg:
            continue
        summary = _summarize(fedavg, "fedavg")
        cds = _cds(runs, settings) if FACTORS[factor].changes_cds else baseline_cds
        rows.append(
            {
                "factor": factor,
                "label": FACTORS[factor].label,
                "settings": settings,
                "fedavg": summary,
                "cds": cds,
                "percent_of_cds": 100 * summary["mean"] / cds["mean"] if cds else None,
                "stops": stops_text(fedavg),
            }
        )
    return rows


def _cds(runs: Sequence[dict[str, Any]], settings: str) -> dict[str, Any] | None:
    cds = [r for r in runs if r["settings"] == settings and r["mode"] == "cds" and r["split"] == CDS_SPLIT]
    return _summarize(sorted(cds, key=lambda r: r["seed"]), "cds") if cds else None


def table(rows: Sequence[dict[str, Any]]) -> str:
    """The ablation table (markdown): each factor's FedAvg held-out Dice and its CDS reference."""
    baseline = next((r for r in rows if r["factor"] == "baseline"), None)
    lines = [
        "| factor (one change from the baseline) | FedAvg held-out Dice | change from baseline"
        " | CDS (same training settings) | % of CDS | rounds used [stop], per seed |",
        "|---|---|---:|---|---:|---|",
    ]
    for row in rows:
        fedavg, cds = row["fedavg"], row["cds"]
        delta = "-" if baseline is None or row is baseline else f"{fedavg['mean'] - baseline['fedavg']['mean']:+.3f}"
        reference = "-" if cds is None else f"{cds['mean']:.3f} (best of {cds['n']})"
        percent = "-" if row["percent_of_cds"] is None else f"{row['percent_of_cds']:.1f}"
        dice = fmt_mean_std(fedavg["mean"], fedavg["std"]) + f" (n={fedavg['n']})"
        lines.append(f"| {row['label']} | {dice} | {delta} | {reference} | {percent} | {row['stops']} |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> list[dict[str, Any]]:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--factors", nargs="+", choices=sorted(FACTORS), default=list(FACTORS))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--jobs", type=int, default=2, help="runs in parallel (worker processes, 1 thread each)")
    parser.add_argument("--runs", type=Path, default=DEFAULT_RUNS, help="the folder of per-run JSON files")
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "benchmarks" / "results" / "ablations-table3")
    parser.add_argument("--report", action="store_true", help="only assemble the table from finished runs")
    args = parser.parse_args(argv)
    quiet()
    base = PRESETS["table3"]
    if not args.report:
        run(plan(base, args.factors, args.seeds, args.jobs), args.runs, args.jobs)
    rows = summarize(finished(args.runs) if args.runs.is_dir() else [], base, args.factors)
    text = table(rows)
    print(text)
    meta = provenance(None if argv is None else [sys.argv[0], *argv])
    write_json(args.out / "results.json", {"meta": meta, "rows": rows})
    (args.out / "tables.md").write_text(text + "\n")
    return rows


if __name__ == "__main__":
    main()
