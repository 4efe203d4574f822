"""Full-scale rehearsal: a FeTS 2022-sized federation of full-size volumes, end to end, on CPU.

A slow benchmark, never run in CI (hours of CPU and ~9 GB of disk at 1,251 subjects). Phases,
each in its own process under the usual soft limit of 1,024 open files:

1. ``synth``: ``lightning-fedseg synth --full_size --num_subjects N --num_sites 23`` (skipped if the
   dataset exists; time it with ``/usr/bin/time -v`` instead when generated beforehand);
2. ``refuse``: a FeTS 2022-style partition CSV (``Partition_ID,Subject_ID``, 23 institutions) with
   three subjects missing on disk and one listed twice must be refused, naming them;
3. ``check``: ``lightning-fedseg data check ROOT --workers W`` over every case;
4. ``fit``: one FedAvg round over all 23 sites with the paper's model preset (8.07M-parameter
   U-Net, FLAIR, 128x128 crops, batch 64) on the CPU. Every case is validated and preprocessed
   into the cache and weighs in FedAvg; to fit in CPU time each site then trains on one batch
   holding one random slice of each of its training cases, so every case's memory map is opened;
   validation scores every slice of the validation cases (``val_fraction``);
5. ``test``: the round's model on the held-out cases (full-grid Dice and HD95);
6. ``predict``: label maps of the held-out cases written as NIfTI.

For each phase the parent records the wall time, the peak resident memory summed over the
phase's process tree and the peak number of open file descriptors (both sampled every 0.2 s
from ``/proc``), and prints a markdown table (also written to ``WORK/rehearsal.json``)::

    nice -n 19 python benchmarks/fullscale_rehearsal.py --root /work/fullscale/brats_synth \\
        --work /work/fullscale/run --subjects 1251

Linux only (``/proc``).
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import json
import os
import resource
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

SOFT_FD_LIMIT = 1024
NUM_SITES = 23
MISSING = ("FeTS2022_90001", "FeTS2022_90002", "FeTS2022_90003")


# ------------------------------------------------------------------ measuring a phase
def _tree(pid: int) -> list[int]:
    pids, todo = [], [pid]
    while todo:
        current = todo.pop()
        pids.append(current)
        for task in Path(f"/proc/{current}/task").glob("*/children"):
            with contextlib.suppress(OSError):
                todo.extend(int(c) for c in task.read_text().split())
    return pids


def _sample(pid: int) -> tuple[int, int, int]:
    """Open descriptors of the process holding most, and descriptors and resident kB summed over
    ``pid`` and its descendants (the sum counts pages forked workers share more than once)."""
    fds = rss = most = 0
    for p in _tree(pid):
        try:
            count = len(os.listdir(f"/proc/{p}/fd"))
            fds, most = fds + count, max(most, count)
            for line in Path(f"/proc/{p}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    rss += int(line.split()[1])
        except OSError:
            pass
    return most, fds, rss


def _limit_fds() -> None:
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(SOFT_FD_LIMIT, hard), hard))


def run_phase(name: str, command: list[str], log: Path) -> dict[str, Any]:
    """Run ``command`` as one phase; wall time, peak tree RSS and peak open descriptors."""
    start = time.perf_counter()
    with log.open("w") as out:
        proc = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, preexec_fn=_limit_fds)
        peak = {"fds": 0, "tree_fds": 0, "rss_kb": 0}
        done = threading.Event()

        def poll() -> None:
            while not done.is_set():
                for key, value in zip(("fds", "tree_fds", "rss_kb"), _sample(proc.pid), strict=True):
                    peak[key] = max(peak[key], value)
                done.wait(0.2)

        thread = threading.Thread(target=poll, daemon=True)
        thread.start()
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
        done.set()
        thread.join()
    result = {
        "phase": name,
        "seconds": round(time.perf_counter() - start, 1),
        "max_rss_mb_one_process": round(usage.ru_maxrss / 1024),
        "peak_rss_mb_tree": round(peak["rss_kb"] / 1024),
        "peak_open_fds_one_process": peak["fds"],
        "peak_open_fds_tree": peak["tree_fds"],
        "returncode": proc.returncode,
        "log": str(log),
    }
    print(json.dumps(result), flush=True)
    return result


# ------------------------------------------------------------------ phases run in child processes
def write_csvs(root: Path, work: Path) -> tuple[Path, Path]:
    """The FeTS 2022-style CSV of the synthetic institutions, and a broken copy of it."""
    with (root / "partition.csv").open(newline="") as handle:
        rows = [(row["Partition_ID"], row["Subject_ID"]) for row in csv.DictReader(handle)]
    sites = {site for site, _ in rows}
    if len(sites) != NUM_SITES:
        raise ValueError(f"{root / 'partition.csv'} has {len(sites)} institutions; expected {NUM_SITES}.")
    good, bad = work / "partitioning_23.csv", work / "partitioning_23_broken.csv"
    lines = ["Partition_ID,Subject_ID"] + [f"{site},{subject}" for site, subject in rows]
    good.write_text("\n".join(lines) + "\n")
    broken = lines + [f"{i % NUM_SITES + 1},{s}" for i, s in enumerate(MISSING)] + [f"5,{rows[7][1]}"]
    bad.write_text("\n".join(broken) + "\n")
    return good, bad


def _datamodule(args: argparse.Namespace, csv_path: Path) -> Any:
    from torch.utils.data import DataLoader, Sampler

    from lightning_fedseg.data import FederatedDataModule

    class OneSlicePerCase(Sampler[int]):
        """One random slice of every case of a dataset, in random order."""

        def __init__(self, dataset: Any, seed: int) -> None:
            self.dataset, self.seed = dataset, seed

        def __len__(self) -> int:
            return len(self.dataset.cases)

        def __iter__(self) -> Any:
            rng = np.random.default_rng(self.seed)
            counts = np.array(list(self.dataset.num_slices.values()))
            starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
            picks = starts + (rng.random(len(counts)) * counts).astype(np.int64)
            return iter(rng.permutation(picks).tolist())

    class OneBatchPerSite(FederatedDataModule):
        def site_train_dataloader(self, site: str) -> DataLoader[Any]:
            dataset = self.site_train_dataset(site)
            return DataLoader(dataset, batch_size=self.batch_size, sampler=OneSlicePerCase(dataset, self.seed))

    return OneBatchPerSite(
        data_root=str(args.root),
        partition="fets",
        partition_csv=str(csv_path),
        num_heldout=args.predict,
        val_fraction=args.val_fraction,
        modalities=["flair"],
        batch_size=64,
        num_workers=args.loader_workers,
        cache_dir=str(args.work / "cache"),
    )


def _paper_model() -> Any:
    from lightning_fedseg.module import BrainTumorSegmentation

    return BrainTumorSegmentation(  # configs/model/paper.yaml
        in_channels=1,
        target="wt",
        arch="unet",
        encoder_name="tu-resnet10t",
        encoder_depth=5,
        decoder_channels=[256, 128, 64, 32, 16],
        compute_hd95=True,
        log_images=0,
    )


def _trainer(args: argparse.Namespace, **kwargs: Any) -> Any:
    import lightning.pytorch as pl

    options = {
        "accelerator": "cpu",
        "devices": 1,
        "max_epochs": 1,
        "num_sanity_val_steps": 0,
        "logger": False,
        "enable_checkpointing": False,
        "enable_progress_bar": False,
        "default_root_dir": str(args.work),
    }
    return pl.Trainer(**(options | kwargs))


def child(args: argparse.Namespace) -> None:
    import torch

    from lightning_fedseg import FedAvg, FederatedStrategy
    from lightning_fedseg.module import BrainTumorSegmentation
    from lightning_fedseg.prediction import NiftiPredictionWriter

    torch.set_num_threads(args.threads)
    good, bad = args.work / "partitioning_23.csv", args.work / "partitioning_23_broken.csv"
    out: dict[str, Any] = {}
    if args.phase == "refuse":
        try:
            _datamodule(args, bad).setup("fit")
        except ValueError as err:
            out["refused"] = str(err)
        else:
            raise SystemExit("the broken partition CSV was accepted")
    elif args.phase == "fit":
        dm = _datamodule(args, good)
        strategy = FederatedStrategy(mode=FedAvg(local_epochs=1), optimizer_state="reset", min_sites=1, seed=0)
        trainer = _trainer(args, strategy=strategy)
        model = _paper_model()
        trainer.fit(model, datamodule=dm)
        trainer.save_checkpoint(args.work / "round1.ckpt")
        out = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith(("val/dice", "val/hd95"))}
        out["sites"] = len(dm.site_names)
        out["train_cases"] = sum(len(s.train) for s in dm.partition.sites.values())
        out["val_cases"] = sum(len(s.val) for s in dm.partition.sites.values())
        out["fedavg_weight_slices"] = sum(dm.site_num_samples(s) for s in dm.site_names)
    else:
        dm = _datamodule(args, good)
        model = BrainTumorSegmentation.load_from_checkpoint(args.work / "round1.ckpt", weights_only=False)
        if args.phase == "test":
            (out,) = _trainer(args).test(model, datamodule=dm, verbose=False)
        else:
            writer = NiftiPredictionWriter(args.work / "predictions")
            _trainer(args, callbacks=[writer]).predict(model, datamodule=dm, return_predictions=False)
            out["written"] = [p.name for p in writer.written]
    (args.work / f"{args.phase}.json").write_text(json.dumps(out, indent=1))


# ------------------------------------------------------------------ driver
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", type=Path, required=True, help="the full-size synthetic dataset (written if missing)")
    parser.add_argument("--work", type=Path, required=True, help="cache, CSVs, checkpoint, predictions, logs")
    parser.add_argument("--subjects", type=int, default=1251)
    parser.add_argument("--workers", type=int, default=2, help="data check processes")
    parser.add_argument("--loader_workers", type=int, default=0, help="DataLoader workers (also preprocessing threads)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1: no spinning on busy cores)")
    parser.add_argument("--predict", type=int, default=10, help="held-out cases tested and predicted")
    parser.add_argument("--val_fraction", type=float, default=0.02)
    parser.add_argument("--phases", nargs="+", default=["synth", "refuse", "check", "fit", "test", "predict"])
    parser.add_argument("--phase", help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    if args.phase:
        child(args)
        return
    exe = [sys.executable]
    results = []
    for phase in args.phases:
        if phase == "synth":
            if args.root.exists():
                continue
            command = [*exe, "-m", "lightning_fedseg", "synth", "--out", str(args.root), "--full_size"]
            command += ["--num_subjects", str(args.subjects), "--num_sites", str(NUM_SITES)]
            command += ["--num_workers", str(args.workers)]
        elif phase == "check":
            command = [*exe, "-m", "lightning_fedseg", "data", "check", str(args.root), "--workers", str(args.workers)]
        else:
            if phase == "refuse":
                write_csvs(args.root, args.work)
            command = [*exe, __file__, *sys.argv[1:], "--phase", phase]
        results.append(run_phase(phase, command, args.work / f"{phase}.log"))
        if results[-1]["returncode"] != 0:
            break
    (args.work / "rehearsal.json").write_text(json.dumps(results, indent=1))
    print("| phase | wall time (s) | peak RSS, largest process (MB) | peak open descriptors, one process | exit |")
    print("|---|---:|---:|---:|---:|")
    for r in results:
        row = [r["seconds"], r["max_rss_mb_one_process"], r["peak_open_fds_one_process"], r["returncode"]]
        print(f"| {r['phase']} | " + " | ".join(map(str, row)) + " |")


if __name__ == "__main__":
    main()
