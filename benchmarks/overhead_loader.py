"""Overhead experiment 3: slices per second the cached loader serves against what the model trains.

The loader side is ``benchmarks/loader_throughput.py``'s ``measure`` (0 workers); the model side
is forward, backward and an Adam step on in-memory batches, at 48x48 and 128x128.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch

from benchmarks.overhead_setup import Preset, make_model

__all__ = ["loader_table", "loader_vs_model", "model_throughput"]


def model_throughput(name: str, size: int, batch_size: int, steps: int) -> float:
    """Training slices per second of a model on in-memory batches (forward, backward, Adam)."""
    torch.manual_seed(0)
    model = make_model(name)
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


def loader_table(loader: Any, batch_size: int) -> list[str]:
    lines: list[str] = []
    lines += [
        "### Cached slice loader vs model training throughput (slices/s, batch "
        f"{batch_size}, 1 thread, 0 loader workers)",
        "",
        "| slice | loader, 1st epoch (decode) | loader, cached | train, CPU U-Net | loader / CPU U-Net "
        "| train, paper U-Net | loader / paper U-Net |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in loader:
        paper = (
            f"| {r['model_paper']:.1f} | {r['loader_over_model_paper']:.0f}x |" if "model_paper" in r else "| - | - |"
        )
        lines.append(
            f"| {r['slice']} | {r['loader_first_epoch']:.0f} | {r['loader_cached']:.0f} | {r['model_cpu']:.0f} "
            f"| {r['loader_over_model_cpu']:.0f}x {paper}"
        )
    lines.append("")
    return lines
