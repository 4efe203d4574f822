"""The convergence protocol of the collaboration-modes benchmark and the time-to-accuracy math.

Early stopping and the simulated times are checked against values computed by hand; Lightning's
own ``EarlyStopping`` is checked to stop where the pure function says on scripted Dice series;
the slow tests run the smoke preset with ``--converge`` as a user runs it. No measured time
decides a test.
"""

from __future__ import annotations

import doctest
import json
import math
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch

from benchmarks import convergence, time_to_accuracy
from benchmarks.collaboration_modes import PRESETS
from benchmarks.common import trainer_defaults
from benchmarks.convergence import StopReason, early_stop, early_stopping, settings_hash, simulated_durations
from benchmarks.time_to_accuracy import (
    SiteProfile,
    convergence_score,
    draw_profiles,
    round_duration,
    round_durations,
)
from benchmarks.time_to_accuracy import (
    time_to_accuracy as reach,
)

REPO = Path(__file__).resolve().parents[2]
NAN = float("nan")


@pytest.mark.parametrize("module", [convergence, time_to_accuracy])
def test_doctests(module: object) -> None:
    assert doctest.testmod(module).failed == 0  # type: ignore[arg-type]


# ---------------------------------------------------------------------------------- early stopping
@pytest.mark.parametrize(
    ("series", "patience", "cap", "expected"),
    [
        # best at round 1 (0-based); rounds 2 and 3 do not beat 0.7: stops after 4 rounds
        ([0.5, 0.7, 0.6, 0.7, 0.9], 2, 10, (4, StopReason.PATIENCE, 1)),
        # always improving: runs to the cap of 3 of the 5 rounds
        ([0.1, 0.2, 0.3, 0.4, 0.5], 2, 3, (3, StopReason.CAP, 2)),
        # patience runs out on the cap's round: patience, not the cap
        ([0.5, 0.4, 0.3], 2, 3, (3, StopReason.PATIENCE, 0)),
        # NaN and None never improve (Lightning with check_finite=False)
        ([0.5, NAN, None, 0.6], 2, 10, (3, StopReason.PATIENCE, 0)),
        # patience 1 stops at the first round without a better value
        ([0.2, 0.3, 0.3, 0.9], 1, 10, (3, StopReason.PATIENCE, 1)),
        # a series shorter than the cap (the run ended for another reason) is not a patience stop
        ([0.2, 0.3], 3, 10, (2, StopReason.CAP, 1)),
    ],
)
def test_early_stop_by_hand(series: list[float | None], patience: int, cap: int, expected: tuple) -> None:
    stop = early_stop(series, patience, cap)
    assert (stop.rounds, stop.reason, stop.best_round) == expected


def test_early_stop_min_delta_and_arguments() -> None:
    # 0.505 beats 0.5 by less than min_delta 0.01: no improvement
    assert early_stop([0.5, 0.505, 0.509], patience=2, max_rounds=10, min_delta=0.01).rounds == 3
    with pytest.raises(ValueError, match="`patience`"):
        early_stop([0.5], patience=0, max_rounds=3)
    with pytest.raises(ValueError, match="`max_rounds`"):
        early_stop([0.5], patience=1, max_rounds=0)


class _Scripted(pl.LightningModule):
    """Logs a scripted ``val/dice`` per epoch; trains one tiny linear layer."""

    def __init__(self, series: list[float]) -> None:
        super().__init__()
        self.series = series
        self.layer = torch.nn.Linear(1, 1)

    def training_step(self, batch: list[torch.Tensor], batch_idx: int) -> torch.Tensor:
        return self.layer(batch[0]).pow(2).mean()

    def validation_step(self, batch: list[torch.Tensor], batch_idx: int) -> None:
        self.log("val/dice", self.series[self.current_epoch])

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.01)

    def train_dataloader(self) -> torch.utils.data.DataLoader:
        return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.ones(2, 1)), batch_size=2)

    def val_dataloader(self) -> torch.utils.data.DataLoader:
        return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.ones(2, 1)), batch_size=2)


@pytest.mark.parametrize(
    ("series", "patience", "cap"),
    [([0.5, 0.7, 0.6, 0.7, 0.9, 0.9], 2, 6), ([0.1, 0.2, 0.3, 0.4], 2, 4), ([0.5, 0.4, 0.3], 2, 3)],
)
def test_lightning_early_stopping_agrees(series: list[float], patience: int, cap: int, tmp_path: Path) -> None:
    stopper = early_stopping("val/dice", patience)
    trainer = pl.Trainer(**trainer_defaults("cpu"), max_epochs=cap, callbacks=[stopper], default_root_dir=tmp_path)
    trainer.fit(_Scripted(series))
    expected = early_stop(series, patience, cap)
    assert trainer.current_epoch == expected.rounds
    record = convergence.stop_record("fedavg", stopper, None, trainer.current_epoch)
    assert record == {"rounds_used": expected.rounds, "stop_reason": str(expected.reason)}


def test_settings_hash_keys_only_what_changes_a_result() -> None:
    smoke = PRESETS["smoke"]
    same = replace(smoke, jobs=2, threads=None, seeds=(0, 1, 2), name="other", splits="real")
    assert settings_hash(same) == settings_hash(smoke)
    assert settings_hash(replace(smoke, patience=3)) != settings_hash(replace(smoke, patience=4))
    assert settings_hash(replace(smoke, rounds=3)) != settings_hash(smoke)


# ---------------------------------------------------------------------------------- time to accuracy
def test_round_duration_by_hand() -> None:
    # 1.25 MB = 10 Mbit: 1 s each way at 10 Mbit/s, 0.5 s at 20 Mbit/s
    profiles = {"a": SiteProfile(speed=2.0, bandwidth_mbit=10.0), "b": SiteProfile(speed=0.5, bandwidth_mbit=20.0)}
    seconds = {"a": 4.0, "b": 3.0}
    # parallel: max(4/2 + 2*1, 3/0.5 + 2*0.5) = max(4, 7)
    assert round_duration(seconds, profiles, 1_250_000) == pytest.approx(7.0)
    # sequential: 4 + 7
    assert round_duration(seconds, profiles, 1_250_000, sequential=True) == pytest.approx(11.0)
    # no communication: max(2, 6)
    assert round_duration(seconds, profiles, 1_250_000, communicate=False) == pytest.approx(6.0)
    assert round_durations([{"a": 4.0}, {}], profiles, 0.0) == [2.0, 0.0]
    with pytest.raises(KeyError, match="No profile"):
        round_duration({"c": 1.0}, profiles, 0.0)


def test_draw_profiles_is_seeded_and_in_range() -> None:
    sites = [f"site{i:02d}" for i in range(200)]
    profiles = draw_profiles(sites, seed=3)
    assert profiles == draw_profiles(sites, seed=3) != draw_profiles(sites, seed=4)
    assert all(10.0 <= p.bandwidth_mbit <= 1000.0 and p.speed > 0 for p in profiles.values())
    logs = [math.log(p.speed) for p in profiles.values()]
    assert abs(sum(logs) / len(logs)) < 0.15  # median 1x (sigma 0.5, 200 draws: standard error 0.035)
    assert {p.speed for p in draw_profiles(sites[:3], speed_sigma=0.0).values()} == {1.0}
    with pytest.raises(ValueError, match="`bandwidth_mbit`"):
        draw_profiles(sites, bandwidth_mbit=(100.0, 10.0))


def test_time_to_accuracy_by_hand() -> None:
    durations, dice = [2.0, 3.0, 1.0, 4.0], [0.3, 0.7, 0.79, 0.9]
    # target 0.95 * 0.8 = 0.76: first reached by round 3, which ends at 2 + 3 + 1 = 6
    assert reach(durations, dice, reference=0.8) == pytest.approx(6.0)
    assert reach(durations, dice, reference=0.8, fraction=0.25) == pytest.approx(2.0)  # 0.3 >= 0.2
    assert reach(durations, [0.1, None, NAN, 0.2], reference=0.8) is None
    with pytest.raises(ValueError, match="one duration per Dice"):
        reach([1.0], [0.5, 0.6], reference=0.8)


def test_convergence_score_by_hand() -> None:
    durations, dice = [2.0, 3.0, 1.0, 4.0], [0.3, 0.7, 0.6, 0.9]  # rounds end at 2, 5, 6, 10
    # horizon 10: 0*2 + 0.3*3 + 0.7*1 + 0.7*4 (0.6 does not lower the best) = 4.4
    assert convergence_score(durations, dice, horizon=10.0) == pytest.approx(0.44)
    # horizon 5.5: 0*2 + 0.3*3 + 0.7*0.5 = 1.25
    assert convergence_score(durations, dice, horizon=5.5) == pytest.approx(1.25 / 5.5)
    # horizon 12: the last model is kept 2 s past the last round: 4.4 + 0.9*2 = 6.2
    assert convergence_score(durations, dice, horizon=12.0) == pytest.approx(6.2 / 12)
    # nothing finished within the horizon
    assert convergence_score(durations, dice, horizon=1.0) == 0.0
    with pytest.raises(ValueError, match="`horizon`"):
        convergence_score(durations, dice, horizon=0.0)


def test_simulated_durations_of_run_records() -> None:
    fast = {"a": SiteProfile(2.0, 8.0), "b": SiteProfile(1.0, 8.0)}  # 1 MB: 1 s each way
    iil = {
        "mode": "iil",
        "model_bytes": 1_000_000,
        "rounds": [{"round": 0}, {"round": 1}, {"round": 2}],
        "site_seconds": [{"a": 4.0}, {"a": 4.0}, {"b": 1.0}],
    }
    # the model travels to a (2 s), stays for its second epoch, travels to b (2 s)
    assert simulated_durations(iil, fast) == pytest.approx([4.0, 2.0, 3.0])
    ciil = {**iil, "mode": "ciil", "rounds": [{"round": 0}], "site_seconds": [{"a": 4.0, "b": 1.0}]}
    assert simulated_durations(ciil, fast) == pytest.approx([(2 + 2) + (1 + 2)])
    fedavg = {**ciil, "mode": "fedavg"}
    assert simulated_durations(fedavg, fast) == pytest.approx([4.0])
    # a single site validated every 2nd epoch: its epochs summed, no transfer, its own speed; each
    # epoch at the site's median seconds (1 s; the one epoch of 2 s is a load spike)
    single = {
        "mode": "single_small",
        "site": "a",
        "model_bytes": 1_000_000,
        "rounds": [{"round": 1}, {"round": 3}],
        "site_seconds": [{"a": 1.0}, {"a": 1.0}, {"pooled": 2.0}, {"a": 2.0}],
    }
    assert simulated_durations(single, fast) == pytest.approx([0.5 + 0.5, 1.0 + 0.5])
    cds = {"mode": "cds", "model_bytes": 1_000_000, "rounds": [{"round": 0}], "site_seconds": [{"pooled": 5.0}]}
    assert simulated_durations(cds, {}) == pytest.approx([5.0])


# ---------------------------------------------------------------------------------- the benchmark
def _converge(tmp_path: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    env = {
        **os.environ,
        "LIGHTNING_FEDSEG_DATA": str(tmp_path / "data"),
        "LIGHTNING_FEDSEG_CACHE": str(tmp_path / "cache"),
        "PYTHONWARNINGS": "ignore",
        "OMP_NUM_THREADS": "1",
    }
    command = [
        sys.executable, "benchmarks/collaboration_modes.py", "--preset", "smoke", "--splits", "simulated",
        "--out", str(tmp_path / "out"), "--plots-dir", str(tmp_path / "plots"), "--converge", *extra,
    ]  # fmt: skip
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done


def _tables(tmp_path: Path) -> str:
    text = (tmp_path / "out" / "tables.md").read_text()
    return "\n".join(line for line in text.splitlines() if not line.startswith("Wall time"))


@pytest.mark.slow
def test_converge_smoke_keeps_each_run_and_resumes(tmp_path: Path) -> None:
    """One JSON per run with its rounds and stop reason; a second invocation trains nothing and
    rebuilds the same tables; other settings are new runs, kept apart."""
    first = _converge(tmp_path, "--patience", "1", "--max-rounds", "3")
    assert "4 of 4 runs to do" in first.stdout
    files = sorted((tmp_path / "out" / "runs").glob("*.json"))
    stems = sorted(p.stem.rsplit("-", 1)[0] for p in files)
    assert stems == ["sim4-cds-seed0", "sim4-ciil-seed0", "sim4-fedavg-seed0", "sim4-iil-seed0"]
    assert len({p.stem.rsplit("-", 1)[1] for p in files}) == 1  # one settings hash
    for path in files:
        run = json.loads(path.read_text())
        assert run["key"] == path.stem and run["settings"] == path.stem.rsplit("-", 1)[1]
        assert run["rounds_used"] == len(run["rounds"]) >= 1
        assert len(run["site_seconds"]) == run["max_epochs"] or run["stop_reason"] != "cap"
        assert all(s > 0 for epoch in run["site_seconds"] for s in epoch.values())
        if run["mode"] == "iil":
            assert run["stop_reason"] == "iil-done" and run["iil_completed"]
            continue
        stop = early_stop([r.get("val/dice") for r in run["rounds"]], patience=1, max_rounds=3)
        assert (run["rounds_used"], run["stop_reason"]) == (stop.rounds, str(stop.reason)), run["mode"]
        if run["mode"] != "ciil":  # CIIL tests every cycle
            assert run["selected_round"] == stop.best_round
    table = _tables(tmp_path)
    assert " patience]" in table or " cap]" in table
    assert "### Time to accuracy" in table and "| sim4 | fedavg |" in table

    second = _converge(tmp_path, "--patience", "1", "--max-rounds", "3")
    assert "runs to do" not in second.stdout
    assert _tables(tmp_path) == table

    third = _converge(tmp_path, "--patience", "2", "--max-rounds", "2", "--modes", "fedavg")
    assert "2 of 2 runs to do" in third.stdout  # CDS and FedAvg under the new settings
    assert len(list((tmp_path / "out" / "runs").glob("*.json"))) == 6
    result = json.loads((tmp_path / "out" / "results.json").read_text())
    assert sorted(r["mode"] for r in result["runs"]) == ["cds", "fedavg"]
    assert all(r["rounds_used"] <= 2 for r in result["runs"])
