"""Out-of-federation generalization: leave one institution out, test on it alone.

The follow-up study (Sheller et al., Scientific Reports 2020) tested the federation's model on
institutions that never took part. Here one institution of the real-split analogue (the
synthetic default's 10 institutions, sized like the paper's) is left out
(``FederatedDataModule(leave_out=[site])``): the other nine keep exactly their training and
validation subjects, FedAvg and CDS train on them with the convergence protocol of
:mod:`benchmarks.convergence` (the ``table2`` preset: batch 5, patience 5 on ``val/dice``, at
most 30 rounds, the best-validation round tested), and the test set is every subject of the
left-out institution. Institutions differ in FLAIR contrast, bias field, noise, blur and tumour
size (docs/SYNTHETIC.md), so the test measures a shift the models never saw.

Both modes are reported as mean ± std over seeds (the question is how the two compare on the
same unseen institution, not the best model), with the rounds each seed used and why it
stopped. One JSON per run is kept in ``<out>/runs/`` (keyed by left-out site, mode, seed and
settings), so an interrupted benchmark resumes and ``--report`` rebuilds the table.

    .venv/bin/python benchmarks/out_of_federation.py                  # institutions 1, 3, 10; seeds 0-2
    .venv/bin/python benchmarks/out_of_federation.py --left-out 10 --seeds 0
    .venv/bin/python benchmarks/out_of_federation.py --report
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.collaboration_modes import PRESETS, Job, Preset, warm_cache
from benchmarks.common import REPO_ROOT, finished, fmt_mean_std, mean_std, provenance, quiet, run_pending, write_json
from benchmarks.convergence import RunFile, run_and_save, settings_hash, stops_text

LEFT_OUT = ("1", "3", "10")  # the largest (42% of the slices), a middle and the smallest
MODES = ("fedavg", "cds")
DEFAULT_OUT = REPO_ROOT / "benchmarks" / "results" / "out_of_federation-table2"


def benchmark_preset(name: str, jobs: int) -> Preset:
    """The ``table2`` preset (``smoke``: the tests' tiny one, patience 1, at most 2 rounds)."""
    preset = PRESETS[name]
    if name == "smoke":
        preset = replace(preset, patience=1, rounds=2)
    return replace(preset, jobs=jobs)


def plan(preset: Preset, left_out: Sequence[str], seeds: Sequence[int]) -> list[RunFile]:
    """Every run, seed by seed, FedAvg before CDS for each left-out institution."""
    settings = settings_hash(preset)
    return [
        RunFile(Job("real", mode, seed, leave_out=site), settings)
        for seed in seeds
        for site in left_out
        for mode in MODES
    ]


def summarize(runs: Sequence[dict[str, Any]], settings: str, left_out: Sequence[str]) -> list[dict[str, Any]]:
    """One row per left-out institution with finished runs: each mode's held-out Dice on it."""
    rows = []
    for site in left_out:
        row: dict[str, Any] = {"left_out": site}
        for mode in MODES:
            chosen = sorted(
                (r for r in runs if r.get("settings") == settings and r["mode"] == mode and r.get("leave_out") == site),
                key=lambda r: r["seed"],
            )
            mean, std, n = mean_std([r["heldout"] for r in chosen])
            row[mode] = {"mean": mean, "std": std, "n": n, "stops": stops_text(chosen) if chosen else "-"}
            if chosen:
                row["trained_sites"] = len(chosen[0]["sites"])
        if row["fedavg"]["n"] or row["cds"]["n"]:
            fedavg, cds = row["fedavg"], row["cds"]
            row["percent_of_cds"] = 100 * fedavg["mean"] / cds["mean"] if fedavg["n"] and cds["n"] else None
            rows.append(row)
    return rows


def table(rows: Sequence[dict[str, Any]]) -> str:
    """The leave-one-institution-out table (markdown)."""
    lines = [
        "| left-out institution | FedAvg on it | CDS on it | FedAvg % of CDS"
        " | rounds [stop], FedAvg | rounds [stop], CDS |",
        "|---|---|---|---:|---|---|",
    ]
    for row in rows:
        fedavg, cds = (
            "-"
            if not row[m]["n"]
            else fmt_mean_std(row[m]["mean"], row[m]["std"] if row[m]["n"] > 1 else None) + f" (n={row[m]['n']})"
            for m in MODES
        )
        percent = "-" if row["percent_of_cds"] is None else f"{row['percent_of_cds']:.1f}"
        stops = f"{row['fedavg']['stops']} | {row['cds']['stops']}"
        lines.append(f"| {row['left_out']} | {fedavg} | {cds} | {percent} | {stops} |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> list[dict[str, Any]]:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--preset", choices=("table2", "smoke"), default="table2")
    parser.add_argument("--left-out", nargs="+", default=list(LEFT_OUT), help="institutions left out, one per run")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--jobs", type=int, default=2, help="runs in parallel (worker processes, 1 thread each)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="results.json, tables.md and runs/")
    parser.add_argument("--report", action="store_true", help="only assemble the table from finished runs")
    args = parser.parse_args(argv)
    quiet()
    preset = benchmark_preset(args.preset, args.jobs)
    folder = args.out / "runs"
    if not args.report:
        runs = plan(preset, args.left_out, args.seeds)
        if any(not (folder / f"{run.key}.json").exists() for run in runs):
            warm_cache(preset, [Job("real", "cds", 0)], None)  # every subject of every institution
        folder.mkdir(parents=True, exist_ok=True)
        run_pending(run_and_save, preset, runs, folder)
    rows = summarize(finished(folder) if folder.is_dir() else [], settings_hash(preset), args.left_out)
    text = table(rows)
    print(text)
    meta = provenance(None if argv is None else [sys.argv[0], *argv])
    write_json(args.out / "results.json", {"meta": meta, "settings": settings_hash(preset), "rows": rows})
    (args.out / "tables.md").write_text(text + "\n")
    return rows


if __name__ == "__main__":
    main()
