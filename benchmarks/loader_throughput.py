"""Slices per second served by FederatedDataModule: first epoch (NIfTI decode) vs. the cache.

The first epoch decodes every NIfTI case, z-scores it and writes it to the preprocessed-volume
cache; later epochs read axial slices from memory maps. Both are timed over full passes of the
pooled training loader (batch 16, shuffled, every slice), on synthetic data at 128x128 slices
and at the synthetic default size, and printed as a markdown table. Runs in well under a
minute on 2 CPU cores::

    .venv/bin/python benchmarks/loader_throughput.py

Options: ``--num-workers`` (DataLoader workers, default 1), ``--epochs`` (cached epochs timed,
default 5), ``--subjects-128`` / ``--subjects-default`` (cases per size), ``--subjects-many``
(a third row at the default size with more cases than a dataset keeps memory-mapped at once, so
shuffled reads keep reopening maps; 0 skips it).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path
from typing import Any

from torch.utils.data import DataLoader

from lightning_fedseg.data import DEFAULT_SHAPE, FederatedDataModule, write_synthetic_dataset


def _epoch(loader: DataLoader[dict[str, Any]]) -> tuple[int, float]:
    """Slices served and seconds taken by one full pass of ``loader``."""
    start = time.perf_counter()
    slices = sum(int(batch["image"].shape[0]) for batch in loader)
    return slices, time.perf_counter() - start


def measure(shape: tuple[int, int, int], subjects: int, epochs: int, num_workers: int, work: Path) -> dict[str, float]:
    """Time the first (decoding) epoch and ``epochs`` cached epochs for one volume size."""
    name = "x".join(str(s) for s in shape) + f"-{subjects}"
    data = write_synthetic_dataset(work / f"data-{name}", num_subjects=subjects, shape=shape, num_sites=1, seed=0)
    dm = FederatedDataModule(
        data_root=str(data.root),
        partition="simulated",
        num_sites=1,
        num_heldout=0,
        val_fraction=0.0,
        slice_policy="all",
        batch_size=16,
        num_workers=num_workers,
        cache_dir=str(work / f"cache-{name}"),
    )
    dm.setup("fit")
    start = time.perf_counter()
    loader = dm.train_dataloader()  # decodes, normalizes and caches every case
    slices, seconds = _epoch(loader)
    first = time.perf_counter() - start
    cached_slices, cached = 0, 0.0
    for _ in range(epochs):  # the same loader, as Lightning keeps it from epoch to epoch
        n, seconds = _epoch(loader)
        cached_slices += n
        cached += seconds
    return {
        "cases": subjects,
        "slices": slices,
        "first": slices / first,
        "cached": cached_slices / cached,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num-workers", type=int, default=1)
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--subjects-128", type=int, default=6)
    parser.add_argument("--subjects-default", type=int, default=20)
    parser.add_argument("--subjects-many", type=int, default=200)
    args = parser.parse_args()
    sizes = [((128, 128, 64), args.subjects_128), (DEFAULT_SHAPE, args.subjects_default)]
    if args.subjects_many:
        sizes.append((DEFAULT_SHAPE, args.subjects_many))
    workers = f"{args.num_workers} worker" + ("s" if args.num_workers != 1 else "")
    lines = [
        f"| volume | cases | slices | 1st epoch, NIfTI decode (slices/s) "
        f"| cached epochs, {workers} (slices/s) | speed-up |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    with tempfile.TemporaryDirectory(prefix="loader_throughput-") as tmp:
        for shape, subjects in sizes:
            r = measure(shape, subjects, args.epochs, args.num_workers, Path(tmp))
            lines.append(
                f"| {'x'.join(map(str, shape))} | {r['cases']:.0f} | {r['slices']:.0f} "
                f"| {r['first']:,.0f} | {r['cached']:,.0f} | {r['cached'] / r['first']:.1f}x |"
            )
    print("\n".join(lines))


if __name__ == "__main__":
    main()
