"""Shared helpers of the benchmark scripts: environment, provenance, model presets, small stats,
per-volume Dice of a loader, resumable runs (one JSON per finished run), markdown and figures.

The scripts are run from the repository root (``.venv/bin/python benchmarks/<script>.py``); each
puts the repository root on ``sys.path`` before importing this module, since the package is not
installed.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import json
import logging
import math
import os
import platform
import subprocess
import sys
import warnings
from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import ProcessPoolExecutor
from functools import partial
from multiprocessing import get_context
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

__all__ = [
    "REPO_ROOT",
    "figure",
    "finished",
    "fmt_mean_std",
    "git_revision",
    "machine_info",
    "mean_std",
    "model_kwargs",
    "per_volume_dice",
    "provenance",
    "quiet",
    "run_pending",
    "save_figure",
    "set_threads",
    "trainer_defaults",
    "write_json",
]


# ---------------------------------------------------------------------------------- environment
def quiet() -> None:
    """Silence Lightning's banners and the warnings every short benchmark run would repeat."""
    warnings.filterwarnings("ignore")
    os.environ.setdefault("PYTHONWARNINGS", "ignore")  # inherited by spawned workers and ranks
    for name in ("lightning", "lightning.pytorch", "lightning.fabric", "lightning_fedseg"):
        logging.getLogger(name).setLevel(logging.ERROR)


def set_threads(threads: int | None) -> int:
    """Use ``threads`` intra-op threads (``None``: leave torch's default); returns the count in use.

    On this project's shared 2-core machines one thread per process is several times faster than
    two for the small CPU U-Net: with another process on a core, the second OpenMP thread makes
    every operation wait for a descheduled core (measured: 160 vs 17-37 slices/s).
    """
    if threads is not None:
        if threads < 1:
            raise ValueError(f"Expected `threads` to be a positive integer, but got {threads}.")
        torch.set_num_threads(threads)
        os.environ["OMP_NUM_THREADS"] = str(threads)
    return torch.get_num_threads()


def trainer_defaults(accelerator: str = "cpu") -> dict[str, Any]:
    """Trainer arguments of every benchmark run: one device, no logger, checkpoints or bars."""
    return {
        "accelerator": accelerator,
        "devices": 1,
        "logger": False,
        "enable_checkpointing": False,
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "num_sanity_val_steps": 0,
    }


# ---------------------------------------------------------------------------------- provenance
def _git(*args: str) -> str:
    try:
        out = subprocess.run(["git", *args], cwd=REPO_ROOT, capture_output=True, text=True, check=True)
    except (OSError, subprocess.CalledProcessError):
        return ""
    return out.stdout.strip()


def git_revision() -> str:
    """``git rev-parse --short HEAD``, plus what is uncommitted (benchmark scripts, package)."""
    head = _git("rev-parse", "--short", "HEAD") or "unknown"
    dirty = _git("status", "--porcelain", "--untracked-files=all").splitlines()
    paths = [line[3:] for line in dirty]
    mine = [p for p in paths if p.startswith(("benchmarks/", "tests/benchmarks/"))]
    other = [p for p in paths if p not in mine]
    if mine:
        head += " + uncommitted benchmark scripts"
    if other:
        head += f" + {len(other)} other uncommitted file(s)"
    return head


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def machine_info() -> dict[str, Any]:
    """CPU model, core count, load, Python/torch/Lightning versions, GPU if any."""
    import lightning

    info: dict[str, Any] = {
        "cpu_model": _cpu_model(),
        "cpu_cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "lightning": lightning.__version__,
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }
    with contextlib.suppress(OSError):
        info["load_average"] = [round(x, 2) for x in os.getloadavg()]
    return info


def provenance(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Machine, commit, date and the exact command of a benchmark run."""
    argv = list(sys.argv if argv is None else argv)
    script = os.path.relpath(argv[0], REPO_ROOT) if argv and argv[0].endswith(".py") else argv[0]
    python = Path(sys.executable)
    if python.is_relative_to(REPO_ROOT):
        python = python.relative_to(REPO_ROOT)
    return {
        "date": _dt.datetime.now().astimezone().isoformat(timespec="seconds"),
        "commit": git_revision(),
        "command": " ".join([str(python), script, *argv[1:]]),
        "machine": machine_info(),
    }


# ---------------------------------------------------------------------------------- models
def model_kwargs(preset: str, **overrides: Any) -> dict[str, Any]:
    """``BrainTumorSegmentation`` arguments of ``configs/model/<preset>.yaml`` (``cpu``, ``paper``).

    The YAML's ``optimizer`` (``class_path`` + ``init_args``) becomes a callable; ``overrides``
    replace or add arguments (e.g. ``compute_hd95=False``).
    """
    path = REPO_ROOT / "configs" / "model" / f"{preset}.yaml"
    if not path.is_file():
        choices = sorted(p.stem for p in path.parent.glob("*.yaml"))
        raise KeyError(f"Unknown model preset {preset!r}; configs/model has {choices}.")
    init_args = dict(yaml.safe_load(path.read_text())["model"]["init_args"])
    optimizer = init_args.pop("optimizer", None)
    init_args.pop("lr_scheduler", None)
    if isinstance(optimizer, Mapping):
        module_name, _, cls_name = optimizer["class_path"].rpartition(".")
        cls = getattr(__import__(module_name, fromlist=[cls_name]), cls_name)
        init_args["optimizer"] = partial(cls, **optimizer.get("init_args", {}))
    init_args.update(overrides)
    return init_args


# ---------------------------------------------------------------------------------- statistics
def mean_std(values: Iterable[float]) -> tuple[float, float, int]:
    """Mean, sample standard deviation (0 for one value) and count, ignoring NaN."""
    arr = np.asarray([v for v in values if v is not None and not math.isnan(v)], dtype=float)
    if arr.size == 0:
        return float("nan"), float("nan"), 0
    std = float(arr.std(ddof=1)) if arr.size > 1 else 0.0
    return float(arr.mean()), std, int(arr.size)


def fmt_mean_std(mean: float, std: float | None, digits: int = 3) -> str:
    """``0.852 ± 0.002`` (or ``0.862`` without a spread); ``-`` for NaN."""
    if mean is None or math.isnan(mean):
        return "-"
    if std is None or math.isnan(std):
        return f"{mean:.{digits}f}"
    return f"{mean:.{digits}f} ± {std:.{digits}f}"


# ---------------------------------------------------------------------------------- evaluation
def dice_from_counts(counts: Mapping[str, np.ndarray]) -> float:
    """Mean over volumes of the region-averaged Dice, from per-volume ``[intersection, |P|, |T|]``
    counts of shape ``[K, 3]``; a region empty in both prediction and truth scores 1 (BraTS).

    Example:
        >>> dice_from_counts({"a": np.array([[1.0, 2.0, 2.0]]), "b": np.array([[0.0, 0.0, 0.0]])})
        0.75
    """
    scores = []
    for value in counts.values():
        inter, pred, truth = value[:, 0], value[:, 1], value[:, 2]
        total = pred + truth
        dice = np.where(total > 0, 2 * inter / np.maximum(total, 1), 1.0)
        scores.append(float(dice.mean()))
    return float(np.mean(scores)) if scores else float("nan")


@torch.no_grad()
def per_volume_dice(module: Any, loader: Iterable[Mapping[str, Any]]) -> float:
    """The module's mean per-volume Dice over ``loader`` (the definition of ``val/dice``).

    Runs in eval mode and restores the module's mode and the global RNG state afterwards, so
    probing in the middle of training does not change the training run.
    """
    was_training = module.training
    module.eval()
    counts: dict[str, np.ndarray] = defaultdict(lambda: np.zeros((0, 3)))
    try:
        with torch.random.fork_rng(devices=[]):
            for batch in loader:
                logits = module(batch["image"].to(module.device))
                pred = (logits.sigmoid() > module.threshold).flatten(2)
                truth = (batch["target"].to(module.device) > 0.5).flatten(2)
                stats = (
                    torch.stack([(pred & truth).sum(-1), pred.sum(-1), truth.sum(-1)], dim=-1).double().cpu().numpy()
                )  # [B, K, 3]
                for case_id, value in zip(batch["case_id"], stats, strict=True):
                    counts[case_id] = value if counts[case_id].size == 0 else counts[case_id] + value
    finally:
        module.train(was_training)
    return dice_from_counts(counts)


# ---------------------------------------------------------------------------------- resumable runs
def run_pending(run_and_save: Callable[[Any, Any, Path], str], preset: Any, jobs: Sequence[Any], folder: Path) -> None:
    """Run the jobs without a result file ``<folder>/<job.key>.json`` (``preset.jobs`` at a time, on
    spawned worker processes when more than one), printing the line ``run_and_save`` returns for each.

    ``run_and_save(preset, job, folder)`` trains and tests one job and writes its result file, so
    an interrupted benchmark resumes where it stopped.
    """
    todo = [j for j in jobs if not (folder / f"{j.key}.json").exists()]
    if not todo:
        return
    print(f"{len(todo)} of {len(jobs)} runs to do ({len(jobs) - len(todo)} finished)", flush=True)
    if preset.jobs <= 1:
        for job in todo:
            print(" ", run_and_save(preset, job, folder), flush=True)
        return
    with ProcessPoolExecutor(preset.jobs, mp_context=get_context("spawn")) as pool:
        for line in pool.map(run_and_save, [preset] * len(todo), todo, [folder] * len(todo)):
            print(" ", line, flush=True)


def finished(folder: Path) -> list[dict[str, Any]]:
    """Every result file in ``folder``, in file-name order."""
    return [json.loads(p.read_text()) for p in sorted(folder.glob("*.json"))]


# ---------------------------------------------------------------------------------- output
def write_json(path: Path, obj: Any) -> None:
    """Write ``obj`` as JSON, floats to 6 significant digits, NaN as null, creating the folder."""

    def clean(value: Any) -> Any:
        if isinstance(value, float):
            return float(f"{value:.6g}") if math.isfinite(value) else None
        if isinstance(value, dict):
            return {str(k): clean(v) for k, v in value.items()}
        if isinstance(value, list | tuple):
            return [clean(v) for v in value]
        if isinstance(value, np.generic):
            return clean(value.item())
        return value

    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(clean(obj), indent=1) + "\n")


def write_report(out: Path, document: Any, text: str, also: str = "") -> None:
    """A benchmark's ``out/results.json`` and ``out/tables.md``, then the tables and where they went
    (``also``: what else was written, e.g. plots)."""
    write_json(out / "results.json", document)
    (out / "tables.md").write_text(text + "\n")
    print("\n" + text)
    print(f"wrote {out / 'results.json'} and {out / 'tables.md'}" + (f"; also {also}" if also else ""))


def figure(ncols: int = 1, nrows: int = 1, size: tuple[float, float] = (6.0, 4.0)) -> tuple[Any, Any]:
    """A matplotlib figure on the Agg canvas (object API, no pyplot) and its axes."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(size[0] * ncols, size[1] * nrows), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(nrows, ncols, squeeze=False)
    return fig, axes


def save_figure(fig: Any, path: Path) -> Path:
    """Save ``fig`` as PNG (100 dpi), creating the folder."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    return path
