"""Overhead experiments 4 and 5: FedAvg on 1, 2 and 3 processes, and the masking arithmetic.

4. **Processes**: the same FedAvg run simulated in one process and on 2 and 3 processes over gloo
   (plain and masked): wall time per round and each rank's communication seconds and bytes.
5. **Masking work**: encode, mask against 2 peers and decode one process's sum, beside one
   float64 add of the same size.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback

from benchmarks.common import REPO_ROOT, quiet, set_threads, trainer_defaults
from benchmarks.overhead_setup import ENTRY, Preset, data_module, fmt_range, make_model, summary
from lightning_fedseg import FedAvg, FederatedStrategy

__all__ = ["RoundTimer", "dist_worker", "masking_table", "masking_work", "processes", "processes_table"]


class RoundTimer(Callback):
    """Wall and CPU seconds of this process per round (a round's validation included)."""

    def __init__(self) -> None:
        self.seconds: list[float] = []
        self.cpu_seconds: list[float] = []
        self._start = (0.0, 0.0)

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._start = (time.perf_counter(), time.process_time())

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.seconds.append(time.perf_counter() - self._start[0])
        self.cpu_seconds.append(time.process_time() - self._start[1])


def dist_worker(preset: Preset, devices: int, out: Path, masking: bool = False) -> None:
    """One FedAvg fit on ``devices`` processes (1: simulated), masked or not; every rank writes its figures."""
    quiet()
    set_threads(1)
    pl.seed_everything(0, verbose=False)
    timer = RoundTimer()
    strategy = FederatedStrategy(FedAvg(local_epochs=1), seed=0, timeout=600.0, masking=masking)
    kwargs = {**trainer_defaults("cpu"), "devices": devices}
    trainer = pl.Trainer(**kwargs, strategy=strategy, max_epochs=preset.rounds, callbacks=[timer])
    started = time.perf_counter()
    trainer.fit(make_model(), datamodule=data_module(preset))
    record = {
        "rank": trainer.global_rank,
        "world_size": trainer.world_size,
        "local_sites": list(strategy.local_sites) if devices > 1 else list(strategy.sites),
        "round_seconds": timer.seconds,
        "round_cpu_seconds": timer.cpu_seconds,
        "fit_seconds": time.perf_counter() - started,
        "history": strategy.history,
        "val_dice": float(trainer.callback_metrics.get("val/dice", float("nan"))),
    }
    out.with_suffix(f".rank{trainer.global_rank}.json").write_text(json.dumps(record))


def processes(preset: Preset, work: Path) -> list[dict[str, Any]]:
    """Launch :func:`dist_worker` for each process count; per-round figures after the warm-up."""
    rows = []
    runs = [(d, m) for d in preset.processes for m in ((False, True) if d > 1 else (False,))]
    for devices, masking in runs:
        out = work / f"dist{devices}{'-masked' if masking else ''}.json"
        command = [
            sys.executable,
            str(ENTRY),
            "--dist-worker",
            str(out),
            "--devices",
            str(devices),
            "--preset",
            preset.name,
            *(["--masking"] if masking else []),
        ]
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        load_before = os.getloadavg()[0]
        started = time.perf_counter()
        if devices == 1:  # the simulation needs no launcher: run it here, saving a start-up
            dist_worker(preset, 1, out)
        else:
            subprocess.run(command, cwd=REPO_ROOT, env=env, check=True)
        wall = time.perf_counter() - started
        ranks = [json.loads(out.with_suffix(f".rank{r}.json").read_text()) for r in range(devices)]
        zero = ranks[0]
        measured = zero["round_seconds"][1:] or zero["round_seconds"]
        skip = 1 if len(zero["round_seconds"]) > 1 else 0
        per_rank = []
        for rank in ranks:
            hist = rank["history"][skip:]
            per_rank.append(
                {
                    "rank": rank["rank"],
                    "sites": rank["local_sites"],
                    "train_seconds": statistics.mean(h["train_seconds"] for h in hist),
                    "round_seconds": statistics.mean(rank["round_seconds"][skip:]),
                    "round_cpu_seconds": statistics.mean(rank["round_cpu_seconds"][skip:]),
                    "comm_seconds": statistics.mean(h["comm_seconds"] for h in hist),
                    "bytes_sent": statistics.mean(h["bytes_sent"] for h in hist),
                    "bytes_received": statistics.mean(h["bytes_received"] for h in hist),
                }
            )
        rows.append(
            {
                "processes": devices,
                "masked": masking,
                "round_seconds": summary(measured),
                "all_round_seconds": zero["round_seconds"],
                "launch_to_exit_seconds": wall,
                "load_average_before": load_before,
                "load_average_after": os.getloadavg()[0],
                "val_dice": zero["val_dice"],
                "ranks": per_rank,
            }
        )
        shown = " (masked)" if masking else ""
        print(f"  {devices} process(es){shown}: {statistics.median(measured):.2f} s per round", flush=True)
    return rows


def masking_work(preset: Preset, peers: int = 2, repeats: int = 3) -> list[dict[str, Any]]:
    """The arithmetic of one masked round on one process, for each model preset's size: encode the
    float64 sum to fixed point, add ``peers`` ChaCha20 mask streams, decode the summed result;
    beside one float64 add of the same size (the unmasked round's arithmetic). Best of ``repeats``."""
    from lightning_fedseg.federation.masking import decode, encode, mask

    rows = []
    for name in preset.aggregation_models:
        numel = sum(v.numel() for v in make_model(name).state_dict().values()) + 2  # + total weight, count
        values = torch.randn(numel, dtype=torch.float64)
        keys = {peer: bytes([peer + 1]) * 32 for peer in range(1, peers + 1)}
        timings: dict[str, float] = {"encode": float("inf"), "mask": float("inf"), "decode": float("inf")}
        add = float("inf")
        for _ in range(repeats):
            start = time.perf_counter()
            encoded = encode(values)
            middle = time.perf_counter()
            masked = mask(encoded, 0, keys, round_idx=0)
            end = time.perf_counter()
            decode(masked)
            done = time.perf_counter()
            for key, took in (("encode", middle - start), ("mask", end - middle), ("decode", done - end)):
                timings[key] = min(timings[key], took)
            other = values.clone()
            start = time.perf_counter()
            other.add_(values)
            add = min(add, time.perf_counter() - start)
        rows.append({"model": name, "values": numel, "peers": peers, **{f"{k}_s": v for k, v in timings.items()},
                     "float64_add_s": add})  # fmt: skip
        print(f"  masking {name}: {sum(timings.values()):.3f} s against {add:.4f} s for one add", flush=True)
    return rows


def processes_table(procs: Any) -> list[str]:
    lines: list[str] = []
    base = procs[0]["round_seconds"]["median"]
    lines += [
        "### FedAvg simulated in one process vs 2 and 3 processes on gloo (1 thread per process),"
        " plain and with masked aggregation",
        "",
        "| processes | masked | s per round (median, min-max) | vs 1 process | load avg before/after "
        "| per rank: sites, train s, comm s, CPU s / wall s, MiB sent / received per round |",
        "|---:|---|---|---:|---|---|",
    ]
    for p in procs:
        ranks = "; ".join(
            f"r{r['rank']}: {len(r['sites'])} site(s), {r['train_seconds']:.1f}, {r['comm_seconds']:.2f}, "
            f"{r['round_cpu_seconds']:.1f} / {r['round_seconds']:.1f}, "
            f"{r['bytes_sent'] / 2**20:.1f} / {r['bytes_received'] / 2**20:.1f}"
            for r in p["ranks"]
        )
        lines.append(
            f"| {p['processes']} | {'yes' if p.get('masked') else 'no'} | {fmt_range(p['round_seconds'], 2)} "
            f"| {p['round_seconds']['median'] / base:.2f} "
            f"| {p['load_average_before']:.1f} / {p['load_average_after']:.1f} | {ranks} |"
        )
    lines.append("")
    return lines


def masking_table(work: Any) -> list[str]:
    lines: list[str] = []
    lines += [
        "### Masking work of one process per round (encode, mask against 2 peers, decode) vs one float64 add",
        "",
        "| model | values | encode s | mask s | decode s | total s | one float64 add s |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in work:
        total = r["encode_s"] + r["mask_s"] + r["decode_s"]
        lines.append(
            f"| {r['model']} | {r['values']:,} | {r['encode_s']:.4f} | {r['mask_s']:.4f} | {r['decode_s']:.4f} "
            f"| {total:.4f} | {r['float64_add_s']:.5f} |"
        )
    lines.append("")
    return lines
