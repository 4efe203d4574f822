"""Smoke test of the benchmark scripts: their smallest preset on tiny synthetic data.

Each script runs as a user runs it (a subprocess from the repository root), with the synthetic
data and the volume cache in a temporary folder; the tests check that the JSON, markdown and PNG
outputs exist and hold sane values. The two scripts run side by side (one thread each), about
30 seconds on 2 idle cores. No measured time or ratio of times decides a test: timings are only
checked to be present, positive and finite (the figures themselves live in benchmarks/RESULTS.md).
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


SCRIPTS = ("collaboration_modes", "overhead")


def _start(script: str, tmp_path: Path) -> subprocess.Popen[str]:
    env = {
        **os.environ,
        "LIGHTNING_FEDSEG_DATA": str(tmp_path / script / "data"),
        "LIGHTNING_FEDSEG_CACHE": str(tmp_path / script / "cache"),
        "PYTHONWARNINGS": "ignore",
    }
    command = [
        sys.executable,
        f"benchmarks/{script}.py",
        "--preset",
        "smoke",
        "--out",
        str(tmp_path / script / "out"),
        "--plots-dir",
        str(tmp_path / script / "plots"),
    ]
    return subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


@pytest.fixture(scope="module")
def smoke(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[int, str, Path]]:
    """Both scripts' smoke presets, run side by side (each uses one thread)."""
    tmp_path = tmp_path_factory.mktemp("benchmarks")
    running = {script: _start(script, tmp_path) for script in SCRIPTS}
    done = {}
    for script, process in running.items():
        try:
            output, _ = process.communicate(timeout=1200)
        except subprocess.TimeoutExpired:
            process.kill()
            output, _ = process.communicate()
        done[script] = (process.returncode, output, tmp_path / script)
    return done


def _outputs(smoke: dict[str, tuple[int, str, Path]], script: str) -> tuple[dict, str, Path]:
    returncode, output, folder = smoke[script]
    assert returncode == 0, output[-5000:]
    result = json.loads((folder / "out" / "results.json").read_text())
    return result, (folder / "out" / "tables.md").read_text(), folder / "plots"


def _check_pngs(plots: Path, names: list[str]) -> None:
    for name in names:
        path = plots / name
        assert path.is_file(), f"missing plot {name}; have {sorted(p.name for p in plots.glob('*'))}"
        data = path.read_bytes()
        assert data.startswith(PNG_SIGNATURE) and len(data) > 10_000, name


def _dice(value: float) -> bool:
    return value is not None and 0.0 <= value <= 1.0


@pytest.mark.slow
def test_collaboration_modes_smoke(smoke: dict[str, tuple[int, str, Path]]) -> None:
    result, markdown, plots = _outputs(smoke, "collaboration_modes")
    real = result["tables"]["real"]
    assert set(real) == {"cds", "fedavg", "ciil", "iil", "single_large", "single_small"}
    for mode, summary in real.items():
        assert _dice(summary["mean"]), (mode, summary)
        assert math.isfinite(summary["percent_of_cds"]) and summary["percent_of_cds"] > 0, (mode, summary)
    assert real["cds"]["percent_of_cds"] == pytest.approx(100.0)
    assert real["single_large"]["site"] != real["single_small"]["site"]
    simulated = result["tables"]["simulated"]
    assert _dice(simulated["cds"]["mean"])
    assert set(simulated["4"]) == {"fedavg", "ciil", "iil"}

    runs = {(r["split"], r["mode"]): r for r in result["runs"]}
    assert len(result["runs"]) == 10  # 6 real-split runs, CDS + 3 modes on the 4-site split
    for run in result["runs"]:
        assert run["rounds"], run["mode"]
        assert all(_dice(r["val/dice"]) for r in run["rounds"])
    fedavg = runs[("real", "fedavg")]
    assert [r["round"] for r in fedavg["rounds"]] == [0, 1]
    assert len(fedavg["history"]) == 2 and fedavg["history"][0]["succeeded"] == 10
    ciil = runs[("real", "ciil")]
    assert len(ciil["heldout_per_cycle"]) == 2
    assert len(ciil["probe"]) == 2 * 10 and all(_dice(s["dice"]) for s in ciil["probe"])
    assert [s["site"] for s in ciil["probe"][:10]] == ciil["sites"]
    single = runs[("real", "single_small")]
    assert single["val_every_n_epochs"] >= 1 and single["max_epochs"] == 2 * single["val_every_n_epochs"]

    assert "| CDS |" in markdown and "0.862" in markdown and "| 4 |" in markdown
    assert "IIL patience 1 (paper: 8)" in markdown
    assert result["meta"]["commit"] and result["meta"]["machine"]["cpu_cores"]
    _check_pngs(
        plots, ["smoke-real-dice-per-round.png", "smoke-ciil-forgetting.png", "smoke-simulated-convergence.png"]
    )


@pytest.mark.slow
@pytest.mark.distributed
def test_overhead_smoke(smoke: dict[str, tuple[int, str, Path]]) -> None:
    result, markdown, plots = _outputs(smoke, "overhead")
    strategy = result["strategy"]
    assert strategy["sites"] == 10
    # A measured ratio of times is reported, never judged: only its presence and sanity are checked.
    assert all(math.isfinite(v) and v > 0 for v in strategy["ratio_per_epoch"].values() if isinstance(v, float))
    assert strategy["steps_per_epoch"]["fedavg"] >= strategy["steps_per_epoch"]["plain"]

    configs = result["aggregation"]["configs"]
    mean = [c for c in configs if c["method"] == "WeightedMean"]
    keep = [c for c in configs if c["method"] == "keep every state"]
    assert [c["sites"] for c in mean] == [2, 4]
    # The accumulator holds one float64 sum whatever the number of sites; keeping states grows.
    assert mean[0]["held_mib"] == pytest.approx(mean[1]["held_mib"])
    assert mean[0]["held_mib"] == pytest.approx(2 * mean[0]["state_mib"], rel=0.01)
    assert keep[1]["held_mib"] == pytest.approx(2 * keep[0]["held_mib"])
    assert all(c["seconds"] > 0 and c["peak_mib"] >= 0 for c in configs)
    fused = [c for c in configs if c["method"] == "fused add"]
    assert [c["held_mib"] for c in fused] == [pytest.approx(2 * mean[0]["state_mib"], rel=0.05)] * 2
    # float32 accumulation of 2 and 4 sites stays within a few float32 ulps of the float64 mean
    assert all(0 <= c["max_rel_error"] < 1e-5 for c in configs if c["method"] == "float32 add")
    median = [c for c in configs if c["method"] == "median"]
    assert median[1]["held_mib"] == pytest.approx(2 * median[0]["held_mib"])  # every site's state is held
    assert not [c for c in configs if c["method"] == "Krum"]  # f = 1 needs more than 4 sites

    handover = result["handover"]
    assert (handover["sites"], handover["batches_per_epoch"]) == (10, 10)
    assert all(math.isfinite(v) and v > 0 for v in handover["timer_ms_per_site"].values() if isinstance(v, float))

    (work,) = result["masking"]  # the smoke preset measures the CPU model only
    assert work["model"] == "cpu" and work["values"] > 4e5 and work["mask_s"] > 0

    (loader,) = result["loader"]
    assert loader["loader_cached"] > 0 and loader["model_cpu"] > 0

    one, two, masked = result["processes"]
    assert (one["processes"], two["processes"], masked["processes"]) == (1, 2, 2)
    assert (two["masked"], masked["masked"]) == (False, True)
    # the masked round sends the fixed-point sum (int64, as many values) plus keys and flags
    assert masked["ranks"][0]["bytes_sent"] > two["ranks"][0]["bytes_sent"] > 0
    assert one["ranks"][0]["bytes_sent"] == 0  # simulated: nothing crosses a process boundary
    assert len(two["ranks"]) == 2 and all(r["bytes_sent"] > 0 and r["comm_seconds"] > 0 for r in two["ranks"])
    assert sorted(s for r in two["ranks"] for s in r["sites"]) == sorted(one["ranks"][0]["sites"])
    assert all(p["round_seconds"]["median"] > 0 for p in (one, two))

    assert "FedAvg round vs plain Lightning" in markdown and "WeightedMean" in markdown
    assert "Hand-over: FedAvg rounds of one batch per site" in markdown and "Rules that hold every" in markdown
    _check_pngs(plots, ["smoke-overhead-aggregation.png"])


@pytest.mark.slow
def test_collaboration_modes_replot(smoke: dict[str, tuple[int, str, Path]], tmp_path: Path) -> None:
    """``--replot`` rebuilds the tables and plots of a results.json without training."""
    results = tmp_path / "results.json"
    results.write_text((smoke["collaboration_modes"][2] / "out" / "results.json").read_text())
    command = [
        sys.executable,
        "benchmarks/collaboration_modes.py",
        "--replot",
        str(results),
        "--plots-dir",
        str(tmp_path),
    ]
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert (tmp_path / "tables.md").read_text() == (smoke["collaboration_modes"][2] / "out" / "tables.md").read_text()
    _check_pngs(tmp_path, ["smoke-real-dice-per-round.png", "smoke-ciil-forgetting.png"])


def _isolated_env(tmp_path: Path) -> dict[str, str]:
    """The environment of a benchmark subprocess with its own data and cache folders."""
    return {
        **os.environ,
        "LIGHTNING_FEDSEG_DATA": str(tmp_path / "data"),
        "LIGHTNING_FEDSEG_CACHE": str(tmp_path / "cache"),
        "PYTHONWARNINGS": "ignore",
    }


@pytest.mark.slow
def test_algorithms_smoke_resumes_from_finished_runs(tmp_path: Path) -> None:
    """Each finished run is kept; a second invocation trains nothing and rebuilds the same table."""
    env = _isolated_env(tmp_path)
    command = [
        sys.executable, "benchmarks/algorithms.py", "--preset", "smoke", "--out", str(tmp_path / "out"),
        "--plots-dir", str(tmp_path / "plots"), "--algorithms", "cds", "fedavg", "fedadam", "median", "fedbn",
    ]  # fmt: skip
    first = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=1200)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    runs = sorted(p.name for p in (tmp_path / "out" / "runs").glob("*.json"))
    assert runs == [f"sim4-{a}-seed0.json" for a in sorted(("cds", "fedavg", "fedadam", "median", "fedbn"))]
    table = (tmp_path / "out" / "tables.md").read_text()
    second = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert second.returncode == 0 and "runs to do" not in second.stdout
    assert (tmp_path / "out" / "tables.md").read_text() == table
    result = json.loads((tmp_path / "out" / "results.json").read_text())
    assert set(result["tables"]["sim4"]) == {"cds", "fedavg", "fedadam", "median", "fedbn"}
    assert all(_dice(r["heldout"]) and len(r["val_dice"]) == 2 for r in result["runs"])
    _check_pngs(tmp_path / "plots", ["smoke-algorithms-sim4.png"])


@pytest.mark.slow
def test_privacy_smoke_spends_each_target_epsilon(tmp_path: Path) -> None:
    """Each epsilon run's noise multiplier keeps all its rounds within the target, and spends it."""
    from opacus.accountants import RDPAccountant

    env = _isolated_env(tmp_path)
    reused = tmp_path / "algorithms-runs"
    reused.mkdir()
    fedavg = {"split": "sim4", "algorithm": "fedavg", "seed": 0, "sites": 4, "val_dice": [0.1, 0.2],
              "selected_round": 1, "selected_val": 0.2, "heldout": 0.25, "wall_seconds": 1.0}  # fmt: skip
    (reused / "sim4-fedavg-seed0.json").write_text(json.dumps(fedavg))
    command = [
        sys.executable, "benchmarks/privacy.py", "--preset", "smoke", "--out", str(tmp_path / "out"),
        "--plots-dir", str(tmp_path / "plots"), "--algorithms-runs", str(reused),
        "--settings", "nodp", "eps8", "eps3", "eps1", "clip",
    ]  # fmt: skip
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=1200)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "4 of 5 runs to do" in done.stdout  # the FedAvg run is the algorithms benchmark's
    runs = {r["setting"]: r for r in json.loads((tmp_path / "out" / "results.json").read_text())["runs"]}
    assert sorted(runs) == ["clip", "eps1", "eps3", "eps8", "nodp"]
    assert runs["nodp"]["heldout"] == 0.25 and runs["clip"]["noise_multiplier"] == 0.0
    sigmas = [runs[f"eps{e}"]["noise_multiplier"] for e in (8, 3, 1)]
    assert sigmas == sorted(sigmas) and sigmas[0] > 0
    for target in (1, 3, 8):
        run = runs[f"eps{target}"]
        accountant = RDPAccountant()
        accountant.history = [(run["noise_multiplier"], 1.0, len(run["val_dice"]))]
        spent = accountant.get_epsilon(delta=1e-5)
        assert run["privacy"][-1]["privacy/epsilon"] == pytest.approx(spent, rel=1e-5)
        assert 0.97 * target <= spent <= target
        assert _dice(run["heldout"])
    _check_pngs(tmp_path / "plots", ["smoke-privacy-epsilon.png"])


@pytest.mark.slow
def test_patient_level_privacy_smoke_accounts_each_institution(tmp_path: Path) -> None:
    """Patient-level rows: each institution spends at most its target, as opacus rebuilt from
    (sigma, q, steps) says; clipping alone spends nothing finite; the table shows every row."""
    from opacus.accountants import RDPAccountant

    env = _isolated_env(tmp_path)
    command = [
        sys.executable, "benchmarks/privacy.py", "--preset", "smoke", "--out", str(tmp_path / "out"),
        "--plots-dir", str(tmp_path / "plots"), "--algorithms-runs", str(tmp_path / "none"),
        "--settings", "p-eps8", "p-clip",
    ]  # fmt: skip
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=1200)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    document = json.loads((tmp_path / "out" / "results.json").read_text())
    runs = {r["setting"]: r for r in document["runs"]}
    assert runs["p-clip"]["noise_multiplier"] == 0.0 and runs["p-clip"]["peak_rss_mib"] > 0
    run = runs["p-eps8"]
    steps = len(run["val_dice"]) * round(1 / run["patient_sample_rate"])  # every site trains every round
    accountant = RDPAccountant()
    accountant.history = [(run["noise_multiplier"], run["patient_sample_rate"], steps)]
    spent = accountant.get_epsilon(delta=1e-5)
    per_site = {k: v for k, v in run["privacy"][-1].items() if k.endswith("/epsilon")}
    assert len(per_site) == 4 and all(v == pytest.approx(spent, rel=1e-5) for v in per_site.values())
    assert 0.97 * 8 <= spent <= 8
    assert len(run["site_val_dice"]) == 4 and len(run["round_seconds"]) == len(run["val_dice"])
    table = (tmp_path / "out" / "tables.md").read_text()
    assert "patient-level DP-SGD, epsilon 8" in table and "patient-level: clip only" in table
    _check_pngs(tmp_path / "plots", ["smoke-privacy-epsilon.png"])


@pytest.mark.slow
def test_device_overhead_smoke_runs_the_gpu_code_on_the_cpu(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The GPU benchmark's code path, on the CPU with tiny data: a lent GPU runs it unchanged."""
    monkeypatch.setenv("LIGHTNING_FEDSEG_DATA", str(tmp_path / "data"))
    monkeypatch.setenv("LIGHTNING_FEDSEG_CACHE", str(tmp_path / "cache"))
    from benchmarks import device_overhead

    report = device_overhead.main(["--preset", "smoke", "--out", str(tmp_path / "out")])
    (rounds,) = report["rounds"]
    assert rounds["sites"] == 4 and rounds["slices_per_epoch"] > 0
    assert len(rounds["throughput_ratios"]) == 1 and math.isfinite(rounds["throughput_ratio"])
    aggregation = report["aggregation"]
    assert aggregation["on_device"] and aggregation["sites"] == 3
    assert 0 <= aggregation["float32_max_rel_error"] < 1e-5
    written = json.loads((tmp_path / "out" / "results.json").read_text())
    assert written["rounds"][0]["sites"] == 4
    assert "throughput ratio" in (tmp_path / "out" / "tables.md").read_text()
