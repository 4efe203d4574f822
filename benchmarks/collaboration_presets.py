"""The collaboration-modes benchmark's presets and jobs: every setting of a run, and one run's identity.

``smoke`` (seconds, for tests), ``quick`` (the 10-institution table on 2 CPU cores), ``paper``
(the paper's settings, for a GPU) and the convergence presets ``table2`` and ``table3``;
``benchmarks/collaboration_modes.py`` documents how each figure is reported.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from benchmarks.convergence import DEFAULT_PATIENCE

__all__ = ["PAPER_STEPS_BATCH", "PRESETS", "QUICK", "Job", "Preset"]


@dataclass(frozen=True)
class Preset:
    """Every setting of a benchmark run (the CLI can override most)."""

    name: str
    model: str  # configs/model/<model>.yaml
    accelerator: str
    synthetic_subjects: int | None
    synthetic_shape: tuple[int, int, int]
    crop_size: int | None
    slice_policy: str
    batch_size: int
    num_workers: int
    seeds: tuple[int, ...]
    rounds: int  # rounds (epochs) of CDS, FedAvg and CIIL on the real split
    simulated_rounds: int
    simulated_sites: tuple[int, ...]
    iil_patience: int
    iil_max_epochs_per_site: int | None
    threads: int | None
    jobs: int
    splits: str
    notes: tuple[str, ...] = field(default=())
    patience: int | None = None  # train to convergence (benchmarks/convergence.py); None: fixed rounds
    # Ablation factors (benchmarks/ablations.py); the defaults are the paper's.
    local_epochs: int = 1  # FedAvg's epochs per site per round (the paper's EpR)
    optimizer_state: str = "reset"  # FederatedStrategy(optimizer_state=...): "reset" (the paper's) or "keep"
    client: str | None = None  # a client step for FedAvg: "fedbn" (BatchNorm layers stay local)
    learning_rate: float | None = None  # Adam's learning rate; None: the model preset's (5e-4)


PAPER_STEPS_BATCH = 5
"""The batch size at which the synthetic default's epoch has the paper's optimizer steps (354 vs 345)."""


QUICK = Preset(
    name="quick",
    model="cpu",
    accelerator="cpu",
    synthetic_subjects=None,  # the package default, 120 subjects
    synthetic_shape=(48, 48, 32),
    crop_size=None,
    slice_policy="brain",
    batch_size=16,
    num_workers=0,
    seeds=(0, 1),
    rounds=10,
    simulated_rounds=10,
    simulated_sites=(4, 8, 16, 32),
    iil_patience=3,
    iil_max_epochs_per_site=12,
    threads=1,
    jobs=2,
    splits="real",
)


PRESETS: dict[str, Preset] = {
    "smoke": Preset(
        name="smoke",
        model="cpu",
        accelerator="cpu",
        synthetic_subjects=30,
        synthetic_shape=(16, 16, 8),
        crop_size=None,
        slice_policy="brain",
        batch_size=8,
        num_workers=0,
        seeds=(0,),
        rounds=2,
        simulated_rounds=1,
        simulated_sites=(4,),
        iil_patience=1,
        iil_max_epochs_per_site=1,
        threads=1,
        jobs=1,
        splits="all",
        notes=("smoke preset: tiny data, 1 seed, 2 rounds; for tests only",),
    ),
    "quick": QUICK,
    # Convergence presets: `rounds` / `simulated_rounds` are the caps; see benchmarks/convergence.py.
    # Batch 5 gives the paper's optimizer steps per epoch (ours 1768/5 = 354 on the pooled
    # training slices; the paper's 178 x 0.8 x 155 / 64 = 345), hence at every federation size
    # the paper's local steps per site per round (about 11 at 32 institutions; batch 16: 4).
    "table2": replace(
        QUICK,
        name="table2",
        seeds=(0, 1, 2),
        batch_size=PAPER_STEPS_BATCH,
        rounds=30,
        simulated_rounds=40,
        patience=DEFAULT_PATIENCE,
        notes=(
            "table2 preset: at convergence (patience 5, at most 30 rounds), batch 5 (the paper's optimizer"
            " steps per epoch), 3 seeds",
        ),
    ),
    "table3": replace(
        QUICK,
        name="table3",
        seeds=(0, 1, 2),
        batch_size=PAPER_STEPS_BATCH,
        rounds=30,
        simulated_rounds=40,
        splits="simulated",
        patience=DEFAULT_PATIENCE,
        notes=(
            "table3 preset: at convergence (patience 5, at most 40 rounds), batch 5 (the paper's optimizer"
            " steps per epoch and per site), 3 seeds",
        ),
    ),
    "paper": Preset(
        name="paper",
        model="paper",
        accelerator="auto",
        synthetic_subjects=210,
        synthetic_shape=(240, 240, 155),
        crop_size=128,
        slice_policy="all",
        batch_size=64,
        num_workers=4,
        seeds=(0, 1, 2),
        rounds=40,
        simulated_rounds=50,
        simulated_sites=(4, 8, 16, 32),
        iil_patience=8,
        iil_max_epochs_per_site=None,
        threads=None,
        jobs=1,
        splits="all",
    ),
}


@dataclass(frozen=True)
class Job:
    """One training run: a mode on a split with a seed."""

    split: str  # "real" or "simN"
    mode: str  # a key of MODE_LABELS
    seed: int
    num_sites: int | None = None  # simulated splits
    site: str | None = None  # single-site runs
    leave_out: str | None = None  # an institution left out of the federation, tested on alone

    @property
    def label(self) -> str:
        site = f" site {self.site}" if self.site else ""
        without = f" without {self.leave_out}" if self.leave_out else ""
        return f"{self.split}{without} {self.mode}{site} seed {self.seed}"
