"""What the federation costs, side by side in one run: strategy overhead, aggregation, loader, processes.

1. **FedAvg vs plain Lightning.** Wall time of a FedAvg round (10 sites, 1 local epoch, the
   global model replaced by the weighted mean) against an epoch of ordinary Lightning training
   (no strategy) over the same slices, with the same model, batch size and loader settings and no
   validation. Runs alternate (plain, FedAvg, plain, ...); the first epoch of each fit is a
   warm-up and is not counted. FedAvg also takes a few more optimizer steps (each site's last batch
   is partial), so the ratio is given per epoch and per optimizer step.
1b. **Hand-over.** The non-training time per site, measured directly: FedAvg rounds of one batch
   per site (``limit_train_batches=1``) against plain epochs of as many batches, alternating fits,
   first epoch of each fit excluded; beside it, the strategy's own ``handover_seconds`` timer.
2. **Aggregation.** Time and peak memory of :class:`~lightning_fedseg.federation.WeightedMean`
   (add every site's state, then the final division, as the engine does) against the number of
   sites (2..64), for the CPU and the paper model, beside one flat add over the same bytes. Times
   come from a child process with glibc's default allocator (what a training process has). Peak
   memory comes from a second child where glibc maps every allocation of 128 KiB or more on its
   own (``MALLOC_MMAP_THRESHOLD_``), so that freed tensors leave the resident set at once: the rise
   of its peak resident set size (Linux ``VmHWM``, reset through ``/proc/self/clear_refs``). It
   covers the accumulator, the one site state being added and the temporaries. Keeping every
   site's state and averaging at the end is measured beside it.
3. **Loader vs model.** Slices per second the cached slice loader serves
   (``benchmarks/loader_throughput.py``'s ``measure``) against slices per second the model
   trains (forward, backward, Adam step on in-memory batches), at 48x48 and 128x128.
4. **Processes.** The same FedAvg run simulated in one process and on 2 and 3 processes over
   gloo (the strategy launches the ranks itself, like DDP): wall time per round (training,
   aggregation and validation) and each rank's communication seconds and bytes.

Writes ``<out>/results.json``, ``<out>/tables.md`` and ``--plots-dir/<preset>-overhead-*.png``::

    .venv/bin/python benchmarks/overhead.py --preset quick
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import REPO_ROOT, provenance, quiet, set_threads, write_json
from benchmarks.overhead_aggregation import (
    KEEPS_STATES,
    METHODS,
    aggregation,
    aggregation_tables,
    aggregation_worker,
    plot_aggregation,
)
from benchmarks.overhead_loader import loader_table, loader_vs_model, model_throughput
from benchmarks.overhead_processes import (
    RoundTimer,
    dist_worker,
    masking_table,
    masking_work,
    processes,
    processes_table,
)
from benchmarks.overhead_rounds import EpochTimer, fedavg_vs_plain, handover, handover_table, strategy_table
from benchmarks.overhead_setup import ENTRY, PRESETS, Preset

SCRIPT = ENTRY
"""This script (the experiments' child processes run it)."""

__all__ = [
    "KEEPS_STATES",
    "METHODS",
    "PRESETS",
    "SCRIPT",
    "EpochTimer",
    "Preset",
    "RoundTimer",
    "aggregation",
    "aggregation_tables",
    "aggregation_worker",
    "dist_worker",
    "fedavg_vs_plain",
    "handover",
    "loader_vs_model",
    "main",
    "masking_work",
    "model_throughput",
    "plot_aggregation",
    "processes",
    "tables",
]


def tables(report: dict[str, Any]) -> str:
    """The report's markdown: one table per section that ran, in the sections' order."""
    lines: list[str] = []
    if report.get("strategy"):
        lines += strategy_table(report["strategy"])
    if report.get("handover"):
        lines += handover_table(report["handover"])
    if report.get("aggregation"):
        lines += aggregation_tables(report["aggregation"])
    if report.get("loader"):
        lines += loader_table(report["loader"], report["preset"]["batch_size"])
    if report.get("processes"):
        lines += processes_table(report["processes"])
    if report.get("masking"):
        lines += masking_table(report["masking"])
    return "\n".join(lines)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), default="quick")
    parser.add_argument(
        "--sections",
        nargs="+",
        choices=("strategy", "handover", "aggregation", "loader", "processes", "masking"),
        default=["strategy", "handover", "aggregation", "loader", "processes", "masking"],
    )
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--rounds", type=int, default=None, help="rounds per distributed run")
    parser.add_argument("--processes", type=int, nargs="+", default=None)
    parser.add_argument("--out", type=Path, default=None, help="default: benchmarks/results/overhead-<preset>")
    parser.add_argument("--plots-dir", type=Path, default=REPO_ROOT / "benchmarks" / "plots")
    parser.add_argument("--aggregation-worker", type=Path, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--dist-worker", type=Path, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--devices", type=int, default=1, help=argparse.SUPPRESS)
    parser.add_argument("--masking", action="store_true", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> dict[str, Any] | None:
    args = parse_args(argv)
    preset = PRESETS[args.preset]
    overrides: dict[str, Any] = {}
    if args.repeats is not None:
        overrides["repeats"] = args.repeats
    if args.rounds is not None:
        overrides["rounds"] = args.rounds
    if args.processes is not None:
        overrides["processes"] = tuple(args.processes)
    preset = replace(preset, **overrides)
    if args.aggregation_worker is not None:
        result = aggregation_worker(preset.aggregation_models, preset.aggregation_sites, preset.naive_max_bytes)
        args.aggregation_worker.write_text(json.dumps(result))
        return None
    if args.dist_worker is not None:
        dist_worker(preset, args.devices, args.dist_worker, args.masking)
        return None
    quiet()
    set_threads(preset.threads)
    meta = provenance(None if argv is None else [sys.argv[0], *argv])
    report: dict[str, Any] = {"meta": meta, "preset": asdict(preset), "seconds": {}}
    with tempfile.TemporaryDirectory(prefix="overhead-") as tmp:
        work = Path(tmp)
        sections = {
            "strategy": lambda: fedavg_vs_plain(preset),
            "handover": lambda: handover(preset),
            "aggregation": lambda: aggregation(preset, work),
            "loader": lambda: loader_vs_model(preset, work),
            "processes": lambda: processes(preset, work),
            "masking": lambda: masking_work(preset),
        }
        for name in args.sections:
            print(f"{name} ...", flush=True)
            started = time.perf_counter()
            report[name] = sections[name]()
            report["seconds"][name] = time.perf_counter() - started
    plots = plot_aggregation(report, args.plots_dir)
    seconds = ", ".join(f"{k} {v:.0f} s" for k, v in report["seconds"].items())
    text = tables(report) + f"\nSections' wall time: {seconds}; {meta['command']}\n"
    print("\n" + text)
    out = args.out or REPO_ROOT / "benchmarks" / "results" / f"overhead-{preset.name}"
    report["meta"]["plots"] = [str(p) for p in plots]
    write_json(out / "results.json", report)
    (out / "tables.md").write_text(text)
    print(f"wrote {out / 'results.json'}, {out / 'tables.md'} and {len(plots)} plot(s) in {args.plots_dir}")
    return report


if __name__ == "__main__":
    main()
