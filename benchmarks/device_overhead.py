"""The cost of federation on one accelerator: FedAvg rounds against plain epochs, and aggregation
on the device, with the paper's U-Net (the GPU half of ``benchmarks/overhead.py``).

1. **Rounds.** For each federation size (10 and 32 simulated institutions), alternating fits of
   plain Lightning (no strategy: what a CDS epoch costs) and FedAvg (one local epoch per site, all
   sites simulated in this process) over the same slices, model, batch size and loader; no
   validation. Throughput is training slices per second; the ratio FedAvg / plain is the figure
   (goal: at least 0.95). The first epoch of each fit is a warm-up and is not counted. Beside it
   the strategy's own ``handover_seconds`` per round.
2. **Aggregation on the device.** :class:`~lightning_fedseg.federation.WeightedMean` adding site
   states that live on the device, against one flat ``add_`` of the same size on the device (both
   timed with the device synchronized), and the float64 sum's error if float32 were used instead.

The ``gpu`` preset is what a lent H200 runs in one call (a few minutes: synthetic 240x240x155
volumes cropped to 128x128, all slices, batch 64); ``smoke`` runs the same code on the CPU in
seconds, for tests. Writes ``<out>/results.json`` and ``<out>/tables.md``::

    .venv/bin/python benchmarks/device_overhead.py --preset gpu
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import lightning.pytorch as pl
import torch

from benchmarks.common import REPO_ROOT, model_kwargs, provenance, quiet, trainer_defaults, write_json
from benchmarks.overhead import EpochTimer
from lightning_fedseg import BrainTumorSegmentation, FedAvg, FederatedDataModule, FederatedStrategy
from lightning_fedseg.federation import WeightedMean


@dataclass(frozen=True)
class Preset:
    name: str
    accelerator: str
    model: str  # configs/model/<model>.yaml
    synthetic_subjects: int
    synthetic_shape: tuple[int, int, int]
    crop_size: int | None
    batch_size: int
    num_workers: int
    sites: tuple[int, ...]
    epochs: int  # per fit; the first is a warm-up
    repeats: int  # plain/FedAvg pairs per federation size
    aggregation_sites: int


PRESETS = {
    "smoke": Preset("smoke", "cpu", "cpu", 24, (16, 16, 8), None, 8, 0, (4,), 2, 1, 3),
    "gpu": Preset("gpu", "gpu", "paper", 80, (240, 240, 155), 128, 64, 4, (10, 32), 3, 2, 32),
}


def _data(preset: Preset, sites: int) -> FederatedDataModule:
    return FederatedDataModule(
        batch_size=preset.batch_size,
        num_workers=preset.num_workers,
        crop_size=preset.crop_size,
        slice_policy="all",
        synthetic_subjects=preset.synthetic_subjects,
        synthetic_shape=preset.synthetic_shape,
        partition="simulated",
        num_sites=sites,
        seed=0,
    )


def _model(preset: Preset) -> BrainTumorSegmentation:
    return BrainTumorSegmentation(**model_kwargs(preset.model, compute_hd95=False, log_images=0))


def rounds(preset: Preset, sites: int) -> dict[str, Any]:
    """Alternating plain and FedAvg fits over the same slices; throughput and its ratio."""
    dm = _data(preset, sites)
    dm.prepare_data()
    dm.setup("fit")
    slices = sum(dm.site_num_samples(s) for s in dm.site_names)  # also warms the cache
    seconds: dict[str, list[float]] = {"plain": [], "fedavg": []}
    ratios, handover = [], []
    for repeat in range(preset.repeats):
        medians = {}
        for kind in ("plain", "fedavg"):
            pl.seed_everything(repeat, verbose=False)
            timer = EpochTimer()
            strategy = FederatedStrategy(FedAvg(local_epochs=1), seed=repeat) if kind == "fedavg" else "auto"
            trainer = pl.Trainer(
                **trainer_defaults(preset.accelerator),
                strategy=strategy,
                max_epochs=preset.epochs,
                limit_val_batches=0,
                callbacks=[timer],
            )
            trainer.fit(_model(preset), datamodule=_data(preset, sites))
            seconds[kind] += timer.seconds[1:]
            medians[kind] = statistics.median(timer.seconds[1:])
            if kind == "fedavg":
                handover += [h["handover_seconds"] for h in trainer.strategy.history[1:]]
        ratios.append(medians["plain"] / medians["fedavg"])  # throughput ratio: same slices
        print(f"  {sites} sites, repeat {repeat}: throughput FedAvg / plain {ratios[-1]:.3f}", flush=True)
    return {
        "sites": sites,
        "slices_per_epoch": slices,
        "plain_slices_per_s": slices / statistics.median(seconds["plain"]),
        "fedavg_slices_per_s": slices / statistics.median(seconds["fedavg"]),
        "throughput_ratio": statistics.median(ratios),
        "throughput_ratios": ratios,
        "handover_seconds_per_round": statistics.median(handover) if handover else None,
    }


def _timed(device: torch.device, work: Callable[[], Any], repeats: int = 5) -> float:
    """The smallest of ``repeats`` timings of ``work`` (after a warm-up), the device synchronized."""

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    work()
    best = float("inf")
    for _ in range(repeats):
        sync()
        start = time.perf_counter()
        work()
        sync()
        best = min(best, time.perf_counter() - start)
    return best


def aggregation(preset: Preset) -> dict[str, Any]:
    """WeightedMean over site states on the device against one flat add on the device."""
    device = torch.device("cuda" if preset.accelerator == "gpu" else "cpu")
    reference = {k: v.detach().to(device) for k, v in _model(preset).state_dict().items()}
    n = preset.aggregation_sites
    states = [{k: v * (1 + 0.01 * i) if v.is_floating_point() else v for k, v in reference.items()} for i in range(n)]
    accumulator = WeightedMean()

    def ours() -> None:
        accumulator.reset()
        for i, state in enumerate(states):
            accumulator.add(state, float(i + 1), site=str(i))
        accumulator.compute()

    flats = [torch.cat([v.reshape(-1) for v in s.values() if v.is_floating_point()]) for s in states]
    total = torch.zeros(flats[0].numel(), dtype=torch.float64, device=device)
    total32 = torch.zeros(flats[0].numel(), dtype=torch.float32, device=device)

    def fused(acc: torch.Tensor) -> Callable[[], None]:
        def work() -> None:
            acc.zero_()
            for i, flat in enumerate(flats):
                acc.add_(flat, alpha=float(i + 1))

        return work

    ours_s, fused_s, fused32_s = _timed(device, ours), _timed(device, fused(total)), _timed(device, fused(total32))
    error = (total32.double() - total).abs().max() / total.abs().max()
    return {
        "device": str(torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"),
        "sites": n,
        "parameters": flats[0].numel(),
        "weighted_mean_ms_per_site": 1000 * ours_s / n,
        "fused_add_ms_per_site": 1000 * fused_s / n,
        "float32_add_ms_per_site": 1000 * fused32_s / n,
        "ratio": ours_s / fused_s,
        "float32_max_rel_error": float(error),
        "on_device": {t.device.type for t in accumulator.sums()[0].values()} == {device.type},
    }


def tables(report: dict[str, Any]) -> str:
    lines = [
        f"### FedAvg rounds vs plain epochs on {report['aggregation']['device']} (paper U-Net, no validation)",
        "",
        "| sites | slices/epoch | plain slices/s | FedAvg slices/s | throughput ratio (goal ≥ 0.95)"
        " | hand-over s/round |",
        "|---:|---:|---:|---:|---:|---:|",
    ]
    for r in report["rounds"]:
        handover = "-" if r["handover_seconds_per_round"] is None else f"{r['handover_seconds_per_round']:.3f}"
        lines.append(
            f"| {r['sites']} | {r['slices_per_epoch']} | {r['plain_slices_per_s']:.0f} | {r['fedavg_slices_per_s']:.0f}"
            f" | {r['throughput_ratio']:.3f} | {handover} |"
        )
    a = report["aggregation"]
    lines += [
        "",
        f"### Aggregation on the device ({a['sites']} sites, {a['parameters'] / 1e6:.2f}M values)",
        "",
        "| WeightedMean ms/site | flat float64 add ms/site | ratio | flat float32 add ms/site | float32 max rel error"
        " | sums on the device |",
        "|---:|---:|---:|---:|---:|---|",
        f"| {a['weighted_mean_ms_per_site']:.3f} | {a['fused_add_ms_per_site']:.3f} | {a['ratio']:.2f}"
        f" | {a['float32_add_ms_per_site']:.3f} | {a['float32_max_rel_error']:.1e} | {a['on_device']} |",
    ]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), default="gpu")
    parser.add_argument("--out", type=Path, default=None, help="default: benchmarks/results/device_overhead-<preset>")
    args = parser.parse_args(argv)
    quiet()
    preset = PRESETS[args.preset]
    report: dict[str, Any] = {
        "meta": provenance(None if argv is None else [sys.argv[0], *argv]),
        "preset": asdict(preset),
    }
    report["aggregation"] = aggregation(preset)
    report["rounds"] = [rounds(preset, n) for n in preset.sites]
    text = tables(report)
    print(text)
    out = args.out or REPO_ROOT / "benchmarks" / "results" / f"device_overhead-{preset.name}"
    write_json(out / "results.json", report)
    (out / "tables.md").write_text(text + "\n")
    return report


if __name__ == "__main__":
    main()
