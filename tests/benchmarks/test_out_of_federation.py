"""The leave-one-institution-out benchmark on its smoke preset: run files, resumption, table."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from benchmarks import out_of_federation
from benchmarks.collaboration_modes import Job, data_kwargs
from benchmarks.convergence import settings_hash
from lightning_fedseg.data.datamodule import FederatedDataModule


@pytest.fixture(autouse=True)
def _tmp_data(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("LIGHTNING_FEDSEG_DATA", str(tmp_path / "data"))
    monkeypatch.setenv("LIGHTNING_FEDSEG_CACHE", str(tmp_path / "cache"))


@pytest.mark.slow
def test_leave_one_out_smoke_trains_the_others_and_resumes(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["--preset", "smoke", "--left-out", "10", "--seeds", "0", "--jobs", "1", "--out", str(tmp_path / "out")]
    rows = out_of_federation.main(argv)
    preset = out_of_federation.benchmark_preset("smoke", 1)
    files = sorted((tmp_path / "out" / "runs").glob("*.json"))
    settings = settings_hash(preset)
    assert [p.name for p in files] == [f"real-without-10-{m}-seed0-{settings}.json" for m in ("cds", "fedavg")]
    runs = {json.loads(p.read_text())["mode"]: json.loads(p.read_text()) for p in files}
    dm = FederatedDataModule(**data_kwargs(preset, Job("real", "cds", 0), None))
    dm.setup("fit")
    assert "10" in dm.site_names
    for run in runs.values():
        assert run["leave_out"] == "10" and run["sites"] == [s for s in dm.site_names if s != "10"]
        assert run["rounds_used"] >= 1 and run["stop_reason"] in ("patience", "cap")
    (row,) = rows
    assert row["left_out"] == "10" and row["trained_sites"] == len(dm.site_names) - 1
    for mode in ("fedavg", "cds"):
        assert row[mode]["mean"] == pytest.approx(runs[mode]["heldout"]) and row[mode]["n"] == 1
    assert row["percent_of_cds"] == pytest.approx(100 * runs["fedavg"]["heldout"] / runs["cds"]["heldout"])
    table = (tmp_path / "out" / "tables.md").read_text()
    assert table.splitlines()[2].startswith("| 10 | ")

    capsys.readouterr()
    assert out_of_federation.main(argv) == rows  # resumed: nothing trains
    assert "runs to do" not in capsys.readouterr().out
    assert (tmp_path / "out" / "tables.md").read_text() == table
