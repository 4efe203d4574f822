"""The overhead benchmark's presets and the pieces every experiment shares (data, model, summaries).

The experiments are in ``overhead_rounds`` (1, 1b), ``overhead_aggregation`` (2),
``overhead_loader`` (3) and ``overhead_processes`` (4, 5); ``benchmarks/overhead.py`` runs them
and writes the report.
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from benchmarks.common import model_kwargs
from lightning_fedseg import BrainTumorSegmentation, FederatedDataModule

__all__ = ["ENTRY", "PRESETS", "Preset", "data_module", "fmt_range", "make_model", "summary"]

ENTRY = Path(__file__).resolve().with_name("overhead.py")
"""The script the child processes run (``--aggregation-worker``, ``--dist-worker``)."""


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


def data_module(preset: Preset, **extra: Any) -> FederatedDataModule:
    return FederatedDataModule(
        batch_size=preset.batch_size,
        synthetic_subjects=preset.synthetic_subjects,
        synthetic_shape=preset.synthetic_shape,
        **extra,
    )


def make_model(name: str = "cpu") -> BrainTumorSegmentation:
    return BrainTumorSegmentation(**model_kwargs(name, compute_hd95=False, log_images=0))


def summary(values: Sequence[float]) -> dict[str, float]:
    return {
        "median": statistics.median(values),
        "min": min(values),
        "max": max(values),
        "n": len(values),
    }


def fmt_range(s: dict[str, float], digits: int = 3, unit: str = "") -> str:
    return f"{s['median']:.{digits}f}{unit} ({s['min']:.{digits}f}-{s['max']:.{digits}f}, n={s['n']})"
