"""Smoke test of benchmarks/robustness.py: its smallest preset, run as a user runs it, on tiny
synthetic data in a temporary folder. Checks the tables' shape and sane values; no measured time
decides anything."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_robustness_smoke(tmp_path: Path) -> None:
    env = {
        **os.environ,
        "LIGHTNING_FEDSEG_DATA": str(tmp_path / "data"),
        "LIGHTNING_FEDSEG_CACHE": str(tmp_path / "cache"),
        "PYTHONWARNINGS": "ignore",
        "OMP_NUM_THREADS": "1",
    }
    rules = ["fedavg", "krum", "centered_clipping", "bucketing"]
    command = [sys.executable, "benchmarks/robustness.py", "--preset", "smoke", "--out", str(tmp_path / "out")]
    process = subprocess.Popen(
        [*command, "--rules", *rules], cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    try:
        output, _ = process.communicate(timeout=900)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert process.returncode == 0, output[-5000:]
    result = json.loads((tmp_path / "out" / "results.json").read_text())
    table = result["tables"]["sim6-f1"]
    assert set(table) == set(rules)  # bucketing ran with the radius chosen for centered clipping
    assert result["chosen"] == {"sim6/1/centered_clipping": 1.0}  # the smoke grid has one value
    for rule, row in table.items():
        values = [v for v in row["heldout"].values()]
        assert all(0.0 <= v <= 1.0 for v in values), rule
        assert row["worst"] == min(v for a, v in row["heldout"].items() if a != "none")
        assert math.isfinite(row["benign_cost"])
    assert table["fedavg"]["benign_cost"] == 0.0
    markdown = (tmp_path / "out" / "tables.md").read_text()
    assert "| worst case | benign cost |" in markdown and "centered clipping tau = 1 x norm" in markdown
    assert 0.0 <= table["krum"]["byzantine_selected"] <= 1.0  # how often Krum picked a Byzantine site
    runs = sorted((tmp_path / "out" / "runs").glob("*.json"))
    assert len(runs) == len(rules) * 4
    assert json.loads(runs[0].read_text())["seconds_per_round"] > 0
