"""The ablation table from hand-made run records: which runs count, and the arithmetic."""

from __future__ import annotations

import pytest

from benchmarks import ablations
from benchmarks.collaboration_modes import PRESETS
from benchmarks.convergence import settings_hash


def _run(split: str, mode: str, seed: int, heldout: float, settings: str, val: float = 0.5) -> dict:
    return {
        "split": split,
        "mode": mode,
        "seed": seed,
        "heldout": heldout,
        "selected_val": val,
        "settings": settings,
        "rounds_used": 10,
        "stop_reason": "patience",
    }


def test_summarize_counts_sim32_fedavg_and_the_sim4_cds_only() -> None:
    base = PRESETS["table3"]
    baseline = settings_hash(base)
    lr = settings_hash(ablations.factor_preset(base, "lr1e-3", base.jobs, base.threads))
    runs = [
        _run("sim32", "fedavg", 0, 0.70, baseline),
        _run("sim32", "fedavg", 1, 0.80, baseline),
        _run("sim8", "fedavg", 0, 0.10, baseline),  # the table3 benchmark's, same settings: not the ablation's
        _run("sim4", "cds", 0, 0.90, baseline, val=0.6),
        _run("sim4", "cds", 1, 0.50, baseline, val=0.4),  # CDS: the best seed by validation Dice
        _run("sim32", "fedavg", 0, 0.60, lr),
        _run("sim4", "cds", 0, 0.75, lr),
    ]
    rows = {r["factor"]: r for r in ablations.summarize(runs, base, ["baseline", "keep", "lr1e-3"])}
    assert set(rows) == {"baseline", "lr1e-3"}  # no finished `keep` run
    assert rows["baseline"]["fedavg"]["mean"] == pytest.approx(0.75) and rows["baseline"]["fedavg"]["n"] == 2
    assert rows["baseline"]["cds"]["mean"] == pytest.approx(0.90)
    assert rows["baseline"]["percent_of_cds"] == pytest.approx(100 * 0.75 / 0.90)
    assert rows["lr1e-3"]["percent_of_cds"] == pytest.approx(100 * 0.60 / 0.75)  # its own CDS
    text = ablations.table(list(rows.values()))
    assert "| -0.150 |" in text  # lr1e-3 against the baseline's mean
