"""The same strategy on torch.distributed (gloo, CPU): one process per site, launched by Lightning.

Each run is a real multi-process launch of ``tests/federation/dist_run.py`` (Lightning starts
the other ranks itself, as it does for a user's script or the CLI).
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.distributed

ROOT = Path(__file__).resolve().parents[2]


def run(mode: str, world: int, out: Path, *extra: str, timeout: float = 900) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONWARNINGS": "ignore"}
    env.pop("MASTER_PORT", None)
    return subprocess.run(
        [sys.executable, "-m", "tests.federation.dist_run", mode, str(world), str(out), *extra],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def load(path: Path) -> dict:
    return torch.load(path, weights_only=False)


@pytest.fixture(scope="module")
def simulated(tmp_path_factory):
    cache: dict[str, dict] = {}

    def get(mode: str) -> dict:
        if mode not in cache:
            out = tmp_path_factory.mktemp(f"sim-{mode}") / "out.pt"
            proc = run(mode, 1, out)
            assert proc.returncode == 0, proc.stderr[-3000:]
            cache[mode] = load(out)
        return cache[mode]

    return get


@pytest.mark.parametrize("mode, world", [("fedavg", 2), ("fedavg", 3), ("ciil", 2), ("ciil", 3)])
def test_distributed_run_matches_the_simulation(tmp_path, simulated, mode, world):
    proc = run(mode, world, tmp_path / "out.pt")
    assert proc.returncode == 0, proc.stderr[-3000:]
    dist_result, sim_result = load(tmp_path / "out.pt"), simulated(mode)
    for key, value in sim_result["state"].items():
        torch.testing.assert_close(dist_result["state"][key], value, rtol=1e-5, atol=1e-5)
    assert [h["succeeded"] for h in dist_result["history"]] == [["a", "b", "c"]] * 3
    last = dist_result["history"][-1]
    assert last["bytes_sent"] > 0 and last["bytes_received"] > 0 and last["comm_seconds"] > 0


def test_killed_rank_stops_the_others_and_the_checkpoint_resumes(tmp_path, simulated):
    timeout = 45
    start = time.monotonic()
    proc = run(
        "fedavg",
        3,
        tmp_path / "out.pt",
        "--kill-rank",
        "2",
        "--kill-round",
        "1",
        "--timeout",
        str(timeout),
        "--ckpt-dir",
        str(tmp_path / "ckpt"),
    )
    elapsed = time.monotonic() - start
    assert proc.returncode != 0
    assert not (tmp_path / "out.pt").exists()
    # Either our collective names the round and the missing site, or Lightning's launcher saw the
    # child die first and ended the group; both within the collective timeout.
    assert "Round 1:" in proc.stderr or "terminated with code 17" in proc.stderr, proc.stderr[-3000:]
    # The collective timeout is the behaviour under test: the survivors stop long before the
    # default 30-minute timeout would let them hang. The margin covers start-up on a loaded machine.
    assert elapsed < timeout + 300
    last = torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=False)
    assert last["epoch"] == 0 and last["federation"]["completed_rounds"] == 1
    # Resume the interrupted collaboration (here simulated in one process): same result.
    proc = run("fedavg", 1, tmp_path / "resumed.pt", "--resume", str(tmp_path / "ckpt" / "last.ckpt"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    for key, value in simulated("fedavg")["state"].items():
        torch.testing.assert_close(load(tmp_path / "resumed.pt")["state"][key], value, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("mode", ["fedavg", "iil"])
def test_only_tensors_cross_processes_and_site_states_stay_home(tmp_path, simulated, mode):
    """Pickling collectives raise in every process; a whole 2-process run with checkpoints still
    matches the simulation, and each process wrote only its own site's optimizer state."""
    ckpt = tmp_path / "ckpt"
    proc = run(mode, 2, tmp_path / "out.pt", "--forbid-object-collectives", "--ckpt-dir", str(ckpt), "--sites", "2")
    assert proc.returncode == 0, proc.stderr[-3000:]
    reference = tmp_path / "sim.pt"
    assert run(mode, 1, reference, "--sites", "2").returncode == 0
    for key, value in load(reference)["state"].items():
        torch.testing.assert_close(load(tmp_path / "out.pt")["state"][key], value, rtol=1e-5, atol=1e-5)
    last = load(ckpt / "last.ckpt")
    assert last["federation"]["site_states"] == {}  # nothing of any site in the shared file
    assert all(o["state"] == {} for o in last["optimizer_states"])
    shards = {p.name: torch.load(p, weights_only=True) for p in (ckpt / "last.ckpt.sites").glob("*.pt")}
    if mode == "fedavg":  # keep: each site's own file, holding that site only
        assert {name: shard["site"] for name, shard in shards.items()} == {"site0.pt": "a", "site1.pt": "b"}
        assert all(shard["client"] == {} and shard["state"]["optimizers"] for shard in shards.values())


@pytest.mark.parametrize(
    "algorithms",
    [("--server", "fedadam", "--client", "scaffold"), ("--server", "median", "--client", "fedbn", "fedprox")],
    ids=["fedadam+scaffold", "median+fedbn+fedprox"],
)
def test_algorithms_on_two_processes_match_the_simulation(tmp_path, algorithms):
    """Server and client steps on 3 sites over 2 processes (site states in per-process shards, the
    robust rule's states all-gathered as tensors) equal the one-process simulation."""
    common = (*algorithms, "--forbid-object-collectives")
    proc = run("fedavg", 1, tmp_path / "sim.pt", *common)
    assert proc.returncode == 0, proc.stderr[-3000:]
    proc = run("fedavg", 2, tmp_path / "dist.pt", *common, "--ckpt-dir", str(tmp_path / "ckpt"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    for key, value in load(tmp_path / "sim.pt")["state"].items():
        torch.testing.assert_close(load(tmp_path / "dist.pt")["state"][key], value, rtol=1e-5, atol=1e-5)
    shards = [torch.load(p, weights_only=True) for p in (tmp_path / "ckpt" / "last.ckpt.sites").glob("*.pt")]
    assert sorted(s["site"] for s in shards) == ["a", "b", "c"]
    assert all(set(s["client"]) == {algorithms[3]} | set(algorithms[4:]) - {"fedprox"} for s in shards)


@pytest.mark.parametrize("world", [2, 3])
def test_masked_aggregation_equals_the_simulation(tmp_path, simulated, world):
    """Pairwise-masked fixed-point sums: the result equals the one-process simulation within the
    quantization bound (far below 1e-5), with pickling collectives forbidden."""
    proc = run("fedavg", world, tmp_path / "out.pt", "--masking", "--forbid-object-collectives")
    assert proc.returncode == 0, proc.stderr[-3000:]
    for key, value in simulated("fedavg")["state"].items():
        torch.testing.assert_close(load(tmp_path / "out.pt")["state"][key], value, rtol=1e-5, atol=1e-5)
    assert all(h["bytes_sent"] > 0 for h in load(tmp_path / "out.pt")["history"])


def test_dp_composes_with_masking_on_two_processes(tmp_path):
    proc = run("fedavg", 2, tmp_path / "out.pt", "--masking", "--server", "dp", "--forbid-object-collectives")
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = load(tmp_path / "out.pt")
    epsilons = [h["privacy/epsilon"] for h in result["history"]]
    assert len(epsilons) == 3 and epsilons == sorted(epsilons) and epsilons[0] > 0
    assert all(torch.isfinite(v).all() for v in result["state"].values() if v.is_floating_point())


def test_adaptive_clipping_on_two_masked_processes_equals_one(tmp_path):
    """The count of unclipped sites crosses the all-reduce with the sums: the clipping norms and the
    weights of 2 masked processes equal one process's (no noise, so the runs are deterministic)."""
    results = []
    for world in (1, 2):
        out = tmp_path / f"out{world}.pt"
        proc = run("fedavg", world, out, "--masking", "--server", "dp_adaptive", "--forbid-object-collectives")
        assert proc.returncode == 0, proc.stderr[-3000:]
        results.append(load(out))
    one, two = results
    norms = [h["privacy/clip_norm"] for h in one["history"]]
    assert len(set(norms)) == 3  # the norm moved every round
    assert [h["privacy/clip_norm"] for h in two["history"]] == pytest.approx(norms, rel=1e-9)
    for key, value in one["state"].items():
        torch.testing.assert_close(two["state"][key], value, rtol=1e-5, atol=1e-5)


def test_cds_on_two_processes_is_plain_ddp(tmp_path):
    """Two processes of batch 4 (DDP over the pooled data) equal one process of batch 8."""
    common = ("--no-batchnorm", "--no-shuffle", "--rounds", "2")
    one, two = tmp_path / "one.pt", tmp_path / "two.pt"
    proc = run("cds", 1, one, *common, "--batch-size", "8")
    assert proc.returncode == 0, proc.stderr[-3000:]
    proc = run("cds", 2, two, *common, "--batch-size", "4", "--forbid-object-collectives", "--ckpt-dir", str(tmp_path))
    assert proc.returncode == 0, proc.stderr[-3000:]
    for key, value in load(one)["state"].items():
        torch.testing.assert_close(load(two)["state"][key], value, rtol=1e-5, atol=1e-6)
    assert load(tmp_path / "last.ckpt")["federation"]["completed_rounds"] == 2


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="NCCL needs one GPU per rank: at least 2 GPUs")
def test_nccl_run_matches_the_simulation(tmp_path, simulated):
    proc = run("fedavg", 2, tmp_path / "out.pt", "--accelerator", "gpu")
    assert proc.returncode == 0, proc.stderr[-3000:]
    for key, value in simulated("fedavg")["state"].items():
        torch.testing.assert_close(load(tmp_path / "out.pt")["state"][key], value, rtol=1e-4, atol=1e-4)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_simulation_on_one_gpu_matches_cpu(tmp_path, simulated):
    proc = run("fedavg", 1, tmp_path / "out.pt", "--accelerator", "gpu")
    assert proc.returncode == 0, proc.stderr[-3000:]
    for key, value in simulated("fedavg")["state"].items():
        torch.testing.assert_close(load(tmp_path / "out.pt")["state"][key], value, rtol=1e-4, atol=1e-4)


@pytest.mark.slow
def test_cli_fedavg_config_on_two_processes_matches_the_simulation(tmp_path):
    """`lightning-fedseg fit --config configs/fedavg.yaml --trainer.devices 2` on the real module."""
    from lightning_fedseg.data.synthetic import write_synthetic_dataset

    data = write_synthetic_dataset(tmp_path / "synth", num_subjects=36, shape=(24, 24, 12), num_sites=3, seed=0).root
    env = {
        **os.environ,
        "PYTHONPATH": str(ROOT),
        "PYTHONWARNINGS": "ignore",
        "OMP_NUM_THREADS": "1",  # the same intra-op reduction order in both runs
        "LIGHTNING_FEDSEG_CACHE": str(tmp_path / "cache"),
    }
    env.pop("MASTER_PORT", None)

    def fit(devices: int) -> dict:
        out = tmp_path / f"runs{devices}"
        cmd = [
            sys.executable, "-m", "lightning_fedseg", "fit", "--config", "configs/fedavg.yaml",
            "--trainer.devices", str(devices), "--trainer.max_epochs", "2",
            "--trainer.enable_progress_bar", "false", "--trainer.logger.init_args.save_dir", str(out),
            "--data.init_args.data_root", str(data), "--model.init_args.compute_hd95", "false",
        ]  # fmt: skip
        proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
        assert proc.returncode == 0, proc.stderr[-3000:]
        (last,) = out.rglob("last.ckpt")
        return torch.load(last, weights_only=False)

    simulated, distributed = fit(1), fit(2)
    assert distributed["federation"]["completed_rounds"] == 2
    for key, value in simulated["state_dict"].items():
        torch.testing.assert_close(distributed["state_dict"][key], value, rtol=1e-5, atol=1e-5)
    history = distributed["federation"]["history"][-1]
    assert history["succeeded"] == ["1", "2", "3"] and history["bytes_sent"] > 0
