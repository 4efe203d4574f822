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
PNG plots in ``--plots-dir``. Presets: ``smoke`` (for tests), ``quick`` (the 10-institution table
on a CPU; ``benchmarks/RESULTS.md`` gives its wall time), ``paper`` (the paper's settings, for a
GPU), and the convergence presets ``table2`` and ``table3`` (the quick settings trained to
convergence at batch 5, the paper's optimizer steps per epoch and per site; 3 seeds)::

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
import os
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.collaboration_plots import plot_forgetting, plot_real, plot_simulated
from benchmarks.collaboration_presets import PAPER_STEPS_BATCH, PRESETS, QUICK, Job, Preset
from benchmarks.collaboration_runs import (
    FirstSiteProbe,
    RoundRecorder,
    client_step,
    data_kwargs,
    plan_jobs,
    run_all,
    run_job,
    warm_cache,
)
from benchmarks.collaboration_tables import REAL_MODES, real_table, simulated_table
from benchmarks.common import REPO_ROOT, provenance, quiet, set_threads, write_json
from benchmarks.convergence import DEFAULT_PATIENCE, run_converged, time_to_accuracy_table

__all__ = [
    "PAPER_STEPS_BATCH",
    "PRESETS",
    "QUICK",
    "FirstSiteProbe",
    "Job",
    "Preset",
    "RoundRecorder",
    "client_step",
    "data_kwargs",
    "main",
    "plan_jobs",
    "replot",
    "run_all",
    "run_job",
    "warm_cache",
]


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
