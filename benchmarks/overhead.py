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
import contextlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback

from benchmarks.common import (
    REPO_ROOT,
    figure,
    model_kwargs,
    provenance,
    quiet,
    save_figure,
    set_threads,
    trainer_defaults,
    write_json,
)
from lightning_fedseg import BrainTumorSegmentation, FedAvg, FederatedDataModule, FederatedStrategy
from lightning_fedseg.federation import CoordinateMedian, Krum, TrimmedMean, WeightedMean
from lightning_fedseg.federation.aggregate import finalize_mean, state_to_cpu
from lightning_fedseg.federation.flat import BLOCK

SCRIPT = Path(__file__).resolve()


@dataclass(frozen=True)
class Preset:
    name: str
    synthetic_subjects: int | None
    synthetic_shape: tuple[int, int, int]
    batch_size: int
    threads: int
    repeats: int  # plain/FedAvg pairs
    epochs: int  # per fit; the first is a warm-up
    aggregation_sites: tuple[int, ...]
    aggregation_models: tuple[str, ...]
    naive_max_bytes: int  # keep-every-state reference only up to this many bytes of states
    loader_shapes: tuple[tuple[int, int, int], ...]
    loader_subjects: tuple[int, ...]
    model_steps: int
    processes: tuple[int, ...]
    rounds: int  # per distributed run; the first is a warm-up
    handover_rounds: int  # per hand-over fit; the first is a warm-up


PRESETS: dict[str, Preset] = {
    "smoke": Preset(
        name="smoke",
        synthetic_subjects=30,
        synthetic_shape=(16, 16, 8),
        batch_size=8,
        threads=1,
        repeats=1,
        epochs=2,
        aggregation_sites=(2, 4),
        aggregation_models=("cpu",),
        naive_max_bytes=1 << 26,
        loader_shapes=((16, 16, 8),),
        loader_subjects=(4,),
        model_steps=2,
        processes=(1, 2),
        rounds=2,
        handover_rounds=3,
    ),
    "quick": Preset(
        name="quick",
        synthetic_subjects=None,
        synthetic_shape=(48, 48, 32),
        batch_size=16,
        threads=1,
        repeats=3,
        epochs=3,
        aggregation_sites=(2, 4, 8, 16, 32, 64),
        aggregation_models=("cpu", "paper"),
        naive_max_bytes=1 << 30,
        loader_shapes=((48, 48, 32), (128, 128, 64)),
        loader_subjects=(20, 6),
        model_steps=12,
        processes=(1, 2, 3),
        rounds=4,
        handover_rounds=21,
    ),
}


def _data(preset: Preset, **extra: Any) -> FederatedDataModule:
    return FederatedDataModule(
        batch_size=preset.batch_size,
        synthetic_subjects=preset.synthetic_subjects,
        synthetic_shape=preset.synthetic_shape,
        **extra,
    )


def _model(name: str = "cpu") -> BrainTumorSegmentation:
    return BrainTumorSegmentation(**model_kwargs(name, compute_hd95=False, log_images=0))


class EpochTimer(Callback):
    """Wall time and optimizer steps of every training epoch (a FedAvg round included its
    aggregation: the strategy closes the round in a hook that runs before this one's)."""

    def __init__(self) -> None:
        self.seconds: list[float] = []
        self.steps: list[int] = []
        self._start = 0.0
        self._steps = 0

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._start = time.perf_counter()
        self._steps = trainer.global_step

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.seconds.append(time.perf_counter() - self._start)
        self.steps.append(trainer.global_step - self._steps)


def _summary(values: Sequence[float]) -> dict[str, float]:
    return {
        "median": statistics.median(values),
        "min": min(values),
        "max": max(values),
        "n": len(values),
    }


# ---------------------------------------------------------------------------------- 1. strategy
def fedavg_vs_plain(preset: Preset) -> dict[str, Any]:
    """Alternating fits of plain Lightning and FedAvg over the same slices; epoch times."""
    dm = _data(preset)
    dm.prepare_data()
    dm.setup("fit")
    samples = {s: dm.site_num_samples(s) for s in dm.site_names}  # also warms the cache
    runs: dict[str, list[dict[str, Any]]] = {"plain": [], "fedavg": []}
    held_bytes = 0
    for repeat in range(preset.repeats):
        for kind in ("plain", "fedavg"):
            pl.seed_everything(repeat, verbose=False)
            model = _model()
            timer = EpochTimer()
            kwargs = trainer_defaults("cpu")
            strategy = FederatedStrategy(FedAvg(local_epochs=1), seed=repeat) if kind == "fedavg" else "auto"
            trainer = pl.Trainer(
                **kwargs, strategy=strategy, max_epochs=preset.epochs, limit_val_batches=0, callbacks=[timer]
            )
            trainer.fit(model, datamodule=_data(preset))
            runs[kind].append({"epoch_seconds": timer.seconds, "epoch_steps": timer.steps})
            if kind == "fedavg":
                states = trainer.strategy.site_states.state_dict()
                held_bytes = sum(
                    t.numel() * t.element_size() for per_site in states.values() for t in _tensors(per_site)
                )
            print(f"  {kind} repeat {repeat}: epochs {', '.join(f'{s:.2f}' for s in timer.seconds)} s", flush=True)
    ratios_epoch, ratios_step = [], []
    for plain, fed in zip(runs["plain"], runs["fedavg"], strict=True):
        p = statistics.median(plain["epoch_seconds"][1:] or plain["epoch_seconds"])
        f = statistics.median(fed["epoch_seconds"][1:] or fed["epoch_seconds"])
        ratios_epoch.append(f / p)
        ratios_step.append((f / fed["epoch_steps"][-1]) / (p / plain["epoch_steps"][-1]))
    plain_times = [s for r in runs["plain"] for s in (r["epoch_seconds"][1:] or r["epoch_seconds"])]
    fed_times = [s for r in runs["fedavg"] for s in (r["epoch_seconds"][1:] or r["epoch_seconds"])]
    return {
        "sites": len(samples),
        "slices_per_epoch": sum(samples.values()),
        "steps_per_epoch": {
            "plain": runs["plain"][0]["epoch_steps"][-1],
            "fedavg": runs["fedavg"][0]["epoch_steps"][-1],
        },
        "plain_epoch_seconds": _summary(plain_times),
        "fedavg_round_seconds": _summary(fed_times),
        "ratio_per_epoch": _summary(ratios_epoch),
        "ratio_per_step": _summary(ratios_step),
        "strategy_site_optimizer_state_bytes": held_bytes,
        "runs": runs,
    }


# ---------------------------------------------------------------------------------- 1b. hand-over
def handover(preset: Preset) -> dict[str, Any]:
    """The non-training time per site hand-over, measured directly: FedAvg rounds of one batch per
    site against plain Lightning epochs of as many batches (same model, batch size and loader
    settings; no validation), alternating fits; plus the strategy's own timer
    (``handover_seconds``: site starts, site ends and the round's combine)."""
    dm = _data(preset)
    dm.prepare_data()
    dm.setup("fit")
    sites = len(dm.site_names)
    # Every site's one batch is full: the batch is at most the smallest site's slices (smoke data).
    batch_size = min(preset.batch_size, *(dm.site_num_samples(s) for s in dm.site_names))
    runs: dict[str, list[list[float]]] = {"plain": [], "fedavg": []}
    timers: list[float] = []
    steps = {}
    for repeat in range(preset.repeats):
        for kind in ("plain", "fedavg"):
            pl.seed_everything(repeat, verbose=False)
            timer = EpochTimer()
            federated = kind == "fedavg"
            strategy = FederatedStrategy(FedAvg(local_epochs=1), seed=repeat) if federated else "auto"
            trainer = pl.Trainer(
                **trainer_defaults("cpu"),
                strategy=strategy,
                max_epochs=preset.handover_rounds,
                limit_train_batches=1 if federated else sites,
                limit_val_batches=0,
                callbacks=[timer],
            )
            trainer.fit(_model(), datamodule=_data(replace(preset, batch_size=batch_size)))
            runs[kind].append(timer.seconds[1:])
            steps[kind] = timer.steps[-1]
            if federated:
                timers += [h["handover_seconds"] for h in trainer.strategy.history[1:]]
            median = statistics.median(timer.seconds[1:])
            print(f"  hand-over {kind} repeat {repeat}: median {median:.3f} s", flush=True)
    if steps["plain"] != steps["fedavg"]:
        raise RuntimeError(f"Expected as many optimizer steps per epoch and round, got {steps}.")
    pairs = zip(runs["plain"], runs["fedavg"], strict=True)
    per_site = [(statistics.median(f) - statistics.median(p)) / sites for p, f in pairs]
    return {
        "sites": sites,
        "batch_size": batch_size,
        "batches_per_epoch": steps["plain"],
        "plain_epoch_seconds": _summary([s for r in runs["plain"] for s in r]),
        "fedavg_round_seconds": _summary([s for r in runs["fedavg"] for s in r]),
        "wall_ms_per_site": _summary([1000 * v for v in per_site]),
        "timer_ms_per_site": _summary([1000 * v / sites for v in timers]),
        "runs": runs,
    }


def _tensors(obj: Any) -> list[torch.Tensor]:
    if isinstance(obj, torch.Tensor):
        return [obj]
    if isinstance(obj, dict):
        return [t for v in obj.values() for t in _tensors(v)]
    if isinstance(obj, list | tuple):
        return [t for v in obj for t in _tensors(v)]
    return []


# ---------------------------------------------------------------------------------- 2. aggregation
def _memory_kib() -> dict[str, int]:
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(("VmHWM", "VmRSS")):
                key, value = line.split(":")
                out[key] = int(value.split()[0])
    return out


def _release_free_memory() -> None:
    """Return glibc's free heap pages to the OS, so that the resident set counts live memory."""
    import ctypes

    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def _reset_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _site_state(reference: dict[str, torch.Tensor], index: int) -> dict[str, torch.Tensor]:
    """A site's distinct state: the reference scaled (floats) or shifted (integers)."""
    return {k: v * (1 + 0.01 * index) if v.is_floating_point() else v + index for k, v in reference.items()}


METHODS = (
    "WeightedMean",
    "fused add",
    "blocked add",
    "float32 add",
    "keep every state",
    "median",
    "trimmed mean",
    "Krum",
)
KEEPS_STATES = ("keep every state", "median", "trimmed mean", "Krum")


def _flat(state: dict[str, torch.Tensor]) -> torch.Tensor:
    return torch.cat([v.reshape(-1) for v in state.values() if v.is_floating_point()])


_ACCUMULATORS: dict[int, WeightedMean] = {}  # per reference state, reused as the engine reuses its own


def _blocked_add(acc: torch.Tensor, x: torch.Tensor, alpha: float, block: torch.Tensor | None) -> None:
    """``acc += alpha * x``; with ``block``, ``x`` cast to ``acc``'s dtype block by block through it."""
    if block is None:
        acc.add_(x, alpha=alpha)
        return
    for start in range(0, x.numel(), block.numel()):
        stop = min(x.numel(), start + block.numel())
        part = block[: stop - start]
        part.copy_(x[start:stop])
        acc[start:stop].add_(part, alpha=alpha)


def _aggregate(reference: dict[str, torch.Tensor], n: int, method: str) -> tuple[float, int, dict[str, float]]:
    """Combine ``n`` generated site states by ``method``; returns the seconds of the combining alone
    (a site's state is made before its clock starts, as the module holds it in a round), the bytes
    the method held at the end, and extra figures (float32 add: its error against float64).

    ``fused add`` is the issue's reference: one ``add_(flat float32 state, alpha=w)`` per site into
    a flat float64 buffer, over states already flat. On a CPU torch first makes a promoted float64
    copy of the whole operand, so ``blocked add`` is the same add cast through one reused float64
    block of :data:`~lightning_fedseg.federation.flat.BLOCK` values (:func:`_blocked_add`): the
    fastest single pass over the same bytes we know of. The robust rules and ``keep every state``
    hold every site's state until the round's end."""
    seconds, extra = 0.0, {}
    if method == "WeightedMean":  # as the engine does it: one accumulator for the whole fit
        acc = _ACCUMULATORS.setdefault(id(reference), WeightedMean())
        acc.reset()
        for i in range(n):
            state = _site_state(reference, i)
            start = time.perf_counter()
            acc.add(state, weight=float(i + 1), site=str(i))
            seconds += time.perf_counter() - start
        start = time.perf_counter()
        sums, total = acc.sums()
        finalize_mean(sums, total, reference)
        seconds += time.perf_counter() - start
        return seconds, sum(t.numel() * t.element_size() for t in sums.values()), extra
    if method in ("fused add", "blocked add", "float32 add"):
        total = None
        exact = None
        block = None
        for i in range(n):
            flat = _flat(_site_state(reference, i))
            if total is None:
                total = torch.zeros(flat.numel(), dtype=torch.float32 if method == "float32 add" else torch.float64)
                exact = torch.zeros(flat.numel(), dtype=torch.float64) if method == "float32 add" else None
                block = torch.empty(BLOCK, dtype=torch.float64) if method == "blocked add" else None
            start = time.perf_counter()
            _blocked_add(total, flat, float(i + 1), block)
            seconds += time.perf_counter() - start
            if exact is not None:
                exact.add_(flat, alpha=float(i + 1))
        assert total is not None
        if exact is not None:
            weight = n * (n + 1) / 2
            mean64, mean32 = exact / weight, (total / weight).double()
            error = (mean32 - mean64).abs()
            extra = {
                "max_abs_error": float(error.max()),
                "max_rel_error": float((error / mean64.abs().clamp_min(1e-6)).max()),
            }
        return seconds, total.numel() * total.element_size(), extra
    kept = [(_site_state(reference, i), float(i + 1)) for i in range(n)]
    start = time.perf_counter()
    if method == "keep every state":
        total = sum(w for _, w in kept)
        for key, value in reference.items():
            mean = sum(s[key].double() * w for s, w in kept) / total
            (mean if value.is_floating_point() else torch.round(mean)).to(value.dtype)
    else:
        step = {
            "median": CoordinateMedian(),
            "trimmed mean": TrimmedMean(beta=0.1),
            "Krum": Krum(num_byzantine=1, multi=max(1, n - 1)),
        }[method]
        step.step_from_sites(reference, [s for s, _ in kept], [w for _, w in kept], round_idx=0)
    seconds = time.perf_counter() - start
    return seconds, sum(t.numel() * t.element_size() for s, _ in kept for t in s.values()), extra


def aggregation_worker(
    models: Sequence[str], sites: Sequence[int], naive_max_bytes: int, repeats: int = 2
) -> dict[str, Any]:
    """Run in a child process (see :func:`aggregation`): time and peak memory per configuration,
    the smallest of ``repeats`` measurements, after one unmeasured warm-up."""
    quiet()
    set_threads(1)
    results: dict[str, Any] = {"peak_method": "VmHWM", "configs": []}
    for name in models:
        reference = state_to_cpu(_model(name).state_dict())
        state_bytes = sum(v.numel() * v.element_size() for v in reference.values())
        params = sum(v.numel() for v in reference.values() if v.is_floating_point())
        for method in METHODS:
            _aggregate(reference, 5, method)  # warm-up: first-use allocations are not the method's
        for n in sites:
            for method in METHODS:
                if method in KEEPS_STATES and n * state_bytes > naive_max_bytes:
                    continue
                if method == "Krum" and n < 5:  # Krum with f = 1 needs more than 2f + 2 sites
                    continue
                seconds, peak_kib, held, extra = float("inf"), float("inf"), 0, {}
                for _ in range(repeats):
                    _release_free_memory()
                    before = _memory_kib()["VmRSS"]
                    if not _reset_peak():
                        results["peak_method"] = "unavailable (no /proc/self/clear_refs)"
                    took, held, extra = _aggregate(reference, n, method)
                    seconds = min(seconds, took)
                    peak_kib = min(peak_kib, _memory_kib()["VmHWM"] - before)
                results["configs"].append(
                    {
                        "model": name,
                        "parameters": params,
                        "state_mib": state_bytes / 2**20,
                        "sites": n,
                        "method": method,
                        "seconds": seconds,
                        "ms_per_site": 1000 * seconds / n,
                        "peak_mib": peak_kib / 1024,
                        "held_mib": held / 2**20,
                        **extra,
                    }
                )
    return results


def aggregation(preset: Preset, work: Path) -> dict[str, Any]:
    """Run :func:`aggregation_worker` in two fresh child processes: times from one with glibc's
    default allocator, peak memory from one with every allocation of 128 KiB or more mmapped."""
    results = {}
    for kind, extra in (("timing", {}), ("memory", {"MALLOC_MMAP_THRESHOLD_": str(128 * 1024)})):
        out = work / f"aggregation-{kind}.json"
        env = {k: v for k, v in os.environ.items() if k != "MALLOC_MMAP_THRESHOLD_"}
        env.update(OMP_NUM_THREADS="1", **extra)
        command = [sys.executable, str(SCRIPT), "--aggregation-worker", str(out), "--preset", preset.name]
        subprocess.run(command, cwd=REPO_ROOT, env=env, check=True)
        results[kind] = json.loads(out.read_text())
    merged = results["timing"]
    peaks = {(c["model"], c["sites"], c["method"]): c["peak_mib"] for c in results["memory"]["configs"]}
    for config in merged["configs"]:
        config["peak_mib"] = peaks[(config["model"], config["sites"], config["method"])]
    merged["peak_method"] = results["memory"]["peak_method"]
    merged["timing_allocator"] = "glibc default"
    return merged


# ---------------------------------------------------------------------------------- 3. loader vs model
def model_throughput(name: str, size: int, batch_size: int, steps: int) -> float:
    """Training slices per second of a model on in-memory batches (forward, backward, Adam)."""
    torch.manual_seed(0)
    model = _model(name)
    optimizer = model.optimizer(model.parameters())
    image = torch.randn(batch_size, 1, size, size)
    target = (torch.rand(batch_size, 1, size, size) > 0.9).float()
    model.train()

    def step() -> None:
        optimizer.zero_grad()
        model.loss(model(image), target).backward()
        optimizer.step()

    for _ in range(2):
        step()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    return steps * batch_size / (time.perf_counter() - start)


def loader_vs_model(preset: Preset, work: Path) -> list[dict[str, Any]]:
    """Cached loader throughput (loader_throughput.py's ``measure``, 0 workers) vs training."""
    from benchmarks.loader_throughput import measure

    rows = []
    for shape, subjects in zip(preset.loader_shapes, preset.loader_subjects, strict=True):
        loader = measure(shape, subjects, epochs=3, num_workers=0, work=work)
        row: dict[str, Any] = {
            "slice": f"{shape[0]}x{shape[1]}",
            "volume": "x".join(map(str, shape)),
            "loader_first_epoch": loader["first"],
            "loader_cached": loader["cached"],
        }
        for name in ("cpu", "paper") if shape[0] >= 128 else ("cpu",):
            steps = max(2, preset.model_steps // (4 if name == "paper" else 1))
            row[f"model_{name}"] = model_throughput(name, shape[0], preset.batch_size, steps)
            row[f"loader_over_model_{name}"] = loader["cached"] / row[f"model_{name}"]
        rows.append(row)
        print(
            f"  loader {row['slice']}: {row['loader_cached']:.0f} slices/s cached; model "
            + ", ".join(f"{k[6:]} {v:.0f}" for k, v in row.items() if k.startswith("model_")),
            flush=True,
        )
    return rows


# ---------------------------------------------------------------------------------- 4. processes
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
    trainer.fit(_model(), datamodule=_data(preset))
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
            str(SCRIPT),
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
                "round_seconds": _summary(measured),
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


# ---------------------------------------------------------------------------------- report
def _fmt_range(s: dict[str, float], digits: int = 3, unit: str = "") -> str:
    return f"{s['median']:.{digits}f}{unit} ({s['min']:.{digits}f}-{s['max']:.{digits}f}, n={s['n']})"


def tables(report: dict[str, Any]) -> str:
    lines: list[str] = []
    s = report.get("strategy")
    if s:
        lines += [
            "### FedAvg round vs plain Lightning epoch (same slices, model, batch size; no validation)",
            "",
            "| | plain Lightning epoch | FedAvg round (10 sites) | ratio per epoch | ratio per optimizer step |",
            "|---|---|---|---|---|",
            f"| seconds (median, min-max) | {_fmt_range(s['plain_epoch_seconds'], 2)} "
            f"| {_fmt_range(s['fedavg_round_seconds'], 2)} | {_fmt_range(s['ratio_per_epoch'])} "
            f"| {_fmt_range(s['ratio_per_step'])} |",
            f"| optimizer steps | {s['steps_per_epoch']['plain']} | {s['steps_per_epoch']['fedavg']} | | |",
            "",
            f"{s['slices_per_epoch']} training slices per epoch; ratios are per plain/FedAvg pair (median over "
            f"{s['ratio_per_epoch']['n']} pairs, first epoch of each fit excluded). The strategy held "
            f"{s['strategy_site_optimizer_state_bytes'] / 2**20:.1f} MiB of per-site optimizer states after the fit.",
            "",
        ]
    h = report.get("handover")
    if h:
        lines += [
            f"### Hand-over: FedAvg rounds of one batch per site ({h['sites']} sites) vs plain epochs of "
            f"{h['batches_per_epoch']} batches of {h['batch_size']} slices",
            "",
            "| plain epoch s | FedAvg round s | non-training ms per site (wall) | strategy timer ms per site |",
            "|---|---|---|---|",
            f"| {_fmt_range(h['plain_epoch_seconds'], 3)} | {_fmt_range(h['fedavg_round_seconds'], 3)} "
            f"| {_fmt_range(h['wall_ms_per_site'], 2)} | {_fmt_range(h['timer_ms_per_site'], 2)} |",
            "",
            "Wall: (median round - median epoch) / sites, per plain/FedAvg pair. Timer: the strategy's "
            "`handover_seconds` (site starts and ends, the round's combine) per site, every round after the first.",
            "",
        ]
    agg = report.get("aggregation")
    if agg:
        lines += aggregation_tables(agg)
    loader = report.get("loader")
    if loader:
        lines += [
            "### Cached slice loader vs model training throughput (slices/s, batch "
            f"{report['preset']['batch_size']}, 1 thread, 0 loader workers)",
            "",
            "| slice | loader, 1st epoch (decode) | loader, cached | train, CPU U-Net | loader / CPU U-Net "
            "| train, paper U-Net | loader / paper U-Net |",
            "|---|---:|---:|---:|---:|---:|---:|",
        ]
        for r in loader:
            paper = (
                f"| {r['model_paper']:.1f} | {r['loader_over_model_paper']:.0f}x |"
                if "model_paper" in r
                else "| - | - |"
            )
            lines.append(
                f"| {r['slice']} | {r['loader_first_epoch']:.0f} | {r['loader_cached']:.0f} | {r['model_cpu']:.0f} "
                f"| {r['loader_over_model_cpu']:.0f}x {paper}"
            )
        lines.append("")
    procs = report.get("processes")
    if procs:
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
                f"| {p['processes']} | {'yes' if p.get('masked') else 'no'} | {_fmt_range(p['round_seconds'], 2)} "
                f"| {p['round_seconds']['median'] / base:.2f} "
                f"| {p['load_average_before']:.1f} / {p['load_average_after']:.1f} | {ranks} |"
            )
        lines.append("")
    work = report.get("masking")
    if work:
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
    return "\n".join(lines)


def aggregation_tables(agg: dict[str, Any]) -> list[str]:
    configs = agg["configs"]

    def get(model: str, n: int, method: str, key: str) -> float | None:
        found = [c for c in configs if (c["model"], c["sites"], c["method"]) == (model, n, method)]
        return found[0].get(key) if found else None

    def fmt(value: float | None, digits: int = 2) -> str:
        return "-" if value is None else f"{value:.{digits}f}"

    models = list(dict.fromkeys(c["model"] for c in configs))
    sites = sorted({c["sites"] for c in configs})
    lines = [
        "### Aggregation per site against one fused pass over the same bytes (1 thread; times with glibc's"
        f" default allocator; peak: {agg['peak_method']} rise in a second run with glibc's mmap threshold at 128 KiB)",
        "",
        "| model | sites | WeightedMean ms/site | fused add ms/site | ratio | blocked add ms/site | ratio"
        " | WeightedMean peak MiB | float32 add ms/site | float32 max abs / rel error |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for m in models:
        first = next(c for c in configs if c["model"] == m)
        label = f"{m} ({first['parameters'] / 1e6:.2f}M, {first['state_mib']:.1f} MiB)"
        for n in sites:
            ours, fused = get(m, n, "WeightedMean", "ms_per_site"), get(m, n, "fused add", "ms_per_site")
            blocked = get(m, n, "blocked add", "ms_per_site")
            ratio = None if ours is None or not fused else ours / fused
            ratio_blocked = None if ours is None or not blocked else ours / blocked
            abs_error, rel_error = get(m, n, "float32 add", "max_abs_error"), get(m, n, "float32 add", "max_rel_error")
            error = "-" if abs_error is None or rel_error is None else f"{abs_error:.1e} / {rel_error:.1e}"
            peak, f32 = get(m, n, "WeightedMean", "peak_mib"), get(m, n, "float32 add", "ms_per_site")
            lines.append(
                f"| {label} | {n} | {fmt(ours, 3)} | {fmt(fused, 3)} | {fmt(ratio)} | {fmt(blocked, 3)}"
                f" | {fmt(ratio_blocked)} | {fmt(peak, 1)} | {fmt(f32, 3)} | {error} |"
            )
            label = ""
    lines += [
        "",
        "WeightedMean: per site, copy the state into a flat staging buffer of its own dtype, one finiteness"
        " reduction over it, one float64 add cast through a reused block (the first site: a multiply into"
        " the sum); plus the"
        " final division (`finalize_mean`, as the engine does), with the buffers of the previous round"
        " reused (the engine keeps one accumulator for the whole fit). Fused add: only the"
        " add, one `add_(flat float32, alpha=w)` into a flat float64 buffer over a state already flat (torch"
        " first copies the whole operand to float64). Blocked add: the same add cast through one reused"
        " float64 block of 32768 values, the fastest single pass we know of. Float32 add: the same add into"
        " a float32 buffer; its error is against the float64 mean.",
        "",
        "### Rules that hold every site's state of the round: time of the combine and peak memory",
        "",
        "| model | sites | keep-all mean s / peak MiB | median s / peak MiB | trimmed mean s / peak MiB "
        "| Krum (f=1, m=n-1) s / peak MiB |",
        "|---|---:|---|---|---|---|",
    ]
    for m in models:
        label = m
        for n in sites:
            cells = [
                f"{fmt(get(m, n, method, 'seconds'), 3)} / {fmt(get(m, n, method, 'peak_mib'), 0)}"
                for method in KEEPS_STATES
            ]
            if all(c.startswith("- ") for c in cells):
                continue
            lines.append(f"| {label} | {n} | " + " | ".join(cells) + " |")
            label = ""
    lines += ["", "-: not run (more than the preset's byte limit of held states, or too few sites for Krum).", ""]
    return lines


def plot_aggregation(report: dict[str, Any], out: Path) -> list[Path]:
    agg = report.get("aggregation")
    if not agg:
        return []
    fig, axes = figure(ncols=2, size=(5.0, 3.8))
    ax_t, ax_m = axes[0]
    styles = {
        "WeightedMean": "-",
        "fused add": "-.",
        "blocked add": (0, (1, 1)),
        "keep every state": "--",
        "median": ":",
    }
    colors = {"cpu": "tab:blue", "paper": "tab:red"}
    for model in sorted({c["model"] for c in agg["configs"]}):
        for method, style in styles.items():
            rows = [c for c in agg["configs"] if c["model"] == model and c["method"] == method]
            if not rows:
                continue
            xs = [c["sites"] for c in rows]
            line = {"linestyle": style, "marker": "o", "color": colors.get(model), "label": f"{model} model, {method}"}
            ax_t.plot(xs, [1000 * c["seconds"] for c in rows], **line)
            ax_m.plot(xs, [c["peak_mib"] for c in rows], **line)
    for ax, ylabel in ((ax_t, "aggregation time (ms)"), (ax_m, f"peak memory rise (MiB, {agg['peak_method']})")):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("sites")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=8)
    ax_t.set_title("WeightedMean: add every site's state, then compute")
    ax_m.set_title("Peak memory stays flat in the number of sites")
    return [save_figure(fig, out / f"{report['preset']['name']}-overhead-aggregation.png")]


# ---------------------------------------------------------------------------------- 5. masking work
def masking_work(preset: Preset, peers: int = 2, repeats: int = 3) -> list[dict[str, Any]]:
    """The arithmetic of one masked round on one process, for each model preset's size: encode the
    float64 sum to fixed point, add ``peers`` ChaCha20 mask streams, decode the summed result;
    beside one float64 add of the same size (the unmasked round's arithmetic). Best of ``repeats``."""
    from lightning_fedseg.federation.masking import decode, encode, mask

    rows = []
    for name in preset.aggregation_models:
        numel = sum(v.numel() for v in _model(name).state_dict().values()) + 2  # + total weight, count
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


# ---------------------------------------------------------------------------------- main
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
