"""A real FLARE federation on loopback: provisioned CA and certificates, a server, two FLARE clients,
two trainers running the real CLI, jobs submitted with the coordinator's admin kit.

Everything this module starts is stopped by process group id in a finalizer, whatever happens.
"""

from __future__ import annotations

import json
import os
import socket
import ssl
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

pytest.importorskip("nvflare")

from lightning_fedseg.deploy.controller import RECORD_PREFIX
from lightning_fedseg.deploy.local import LocalParties, free_ports
from lightning_fedseg.deploy.provision import provision

ROOT = Path(__file__).resolve().parents[2]
SITES = ("1", "2")
ROUNDS = 2
pytestmark = pytest.mark.timeout(600)


def env(tmp: Path) -> dict[str, str]:
    return {
        **os.environ,
        "PYTHONPATH": str(ROOT),
        "PYTHONWARNINGS": "ignore",
        "OMP_NUM_THREADS": "1",  # the same intra-op reduction order in every run
        "LIGHTNING_FEDSEG_CACHE": str(tmp / "cache"),
    }


@pytest.fixture(scope="module")
def federation(tmp_path_factory, request):
    """A provisioned project with its server and both FLARE clients running."""
    from lightning_fedseg.data.synthetic import write_synthetic_dataset

    tmp = tmp_path_factory.mktemp("flare")
    data = write_synthetic_dataset(tmp / "data", num_subjects=16, shape=(24, 24, 12), num_sites=2, seed=0).root
    fed, admin, *site_ports = free_ports(2 + len(SITES))
    kits = provision(tmp / "ws", SITES, fed_port=fed, admin_port=admin, site_ports=site_ports)
    environ = env(tmp)
    procs = LocalParties(environ, ROOT)
    request.addfinalizer(procs.stop)
    for name, kit in (("server", kits.server), *kits.sites.items()):
        cmd = [sys.executable, "-m", "lightning_fedseg", "deploy", "start", str(kit)]
        procs.start(cmd, tmp / f"party_{name}.log")
    return {"tmp": tmp, "data": data, "kits": kits, "procs": procs, "env": environ, "fed_port": fed}


def study(tmp: Path, name: str, masking: bool, base: str = "fedadam") -> Path:
    """By default FedAdam on the server and FedProx at the sites, from the shipped FedAdam config."""
    config = yaml.safe_load((ROOT / "configs" / f"{base}.yaml").read_text())
    args = config["trainer"]["strategy"]["init_args"]
    if base == "fedadam":
        args["client"] = {"class_path": "lightning_fedseg.federation.FedProx", "init_args": {"mu": 0.01}}
        args["masking"] = masking
    args["timeout"] = 300.0
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def fit_args(fed: dict, config: Path, out: Path, rounds: int = ROUNDS) -> list[str]:
    return [
        sys.executable, "-m", "lightning_fedseg", "fit", "--config", str(config),
        "--data.init_args.data_root", str(fed["data"]), "--data.init_args.batch_size", "32",
        "--model.init_args.compute_hd95", "false", "--model.init_args.log_images", "0",
        "--trainer.enable_progress_bar", "false", "--trainer.max_epochs", str(rounds),
        "--trainer.logger.init_args.save_dir", str(out),
    ]  # fmt: skip


def last_checkpoint(out: Path) -> dict:
    (last,) = out.rglob("last.ckpt")
    return torch.load(last, weights_only=False)


def run_job(
    fed: dict, name: str, masking: bool, rounds: int = ROUNDS, resume: str | None = None, base: str = "fedadam"
) -> tuple[list[dict], list[int], list[dict]]:
    """Both trainers and the job (``resume``: each site from its last checkpoint of that job);
    returns the sites' last checkpoints, their pids and the hub's records."""
    tmp, kits = fed["tmp"], fed["kits"]
    config = study(tmp, name, masking, base)
    trainers = []
    for site in SITES:
        cmd = fit_args(fed, config, tmp / f"{name}_{site}", rounds)
        cmd += ["--trainer.strategy.init_args.flare_profile", str(kits.attach_profile(site))]
        if resume is not None:
            (last,) = (tmp / f"{resume}_{site}").rglob("last.ckpt")
            cmd += ["--ckpt_path", str(last)]
        trainers.append(fed["procs"].start(cmd, tmp / f"{name}_trainer_{site}.log"))
    server_log = tmp / "party_server.log"
    seen = server_log.read_text(errors="replace").count(RECORD_PREFIX)
    submit = [
        sys.executable, "-m", "lightning_fedseg", "deploy", "submit", "--config", str(config),
        "--startup-kit", str(kits.admin), "--job-dir", str(tmp / f"{name}_job"), "--wait", "420",
    ]  # fmt: skip
    result = subprocess.run(submit, cwd=ROOT, env=fed["env"], capture_output=True, text=True, timeout=480)
    logs = {s: (tmp / f"{name}_trainer_{s}.log").read_text(errors="replace")[-3000:] for s in SITES}
    assert result.returncode == 0 and "FINISHED:COMPLETED" in result.stdout, (result.stdout, result.stderr, logs)
    for proc, site in zip(trainers, SITES, strict=True):
        assert proc.wait(timeout=120) == 0, logs[site]
    lines = [x for x in server_log.read_text(errors="replace").splitlines() if RECORD_PREFIX in x]
    records = [json.loads(x.split(RECORD_PREFIX, 1)[1]) for x in lines[seen:]]
    ckpts = [last_checkpoint(tmp / f"{name}_{site}") for site in SITES]
    return ckpts, [p.pid for p in trainers], records


def simulate(fed: dict, name: str, base: str = "fedadam") -> dict:
    """The same YAML and seeds in one process (no FLARE): its last checkpoint."""
    tmp = fed["tmp"]
    out = tmp / name
    cmd = fit_args(fed, study(tmp, name, masking=False, base=base), out)
    proc = subprocess.run(cmd, cwd=ROOT, env=fed["env"], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return last_checkpoint(out)


@pytest.fixture(scope="module")
def simulated(federation):
    return simulate(federation, "simulated")


def site_weights(fed: dict) -> dict[str, float]:
    from lightning_fedseg import FederatedDataModule

    dm = FederatedDataModule(data_root=str(fed["data"]), modalities=["flair"], batch_size=32, num_workers=0)
    dm.setup("fit")
    return {site: float(dm.site_num_samples(site)) for site in SITES}


def assert_same(got: object, expected: object) -> None:
    if isinstance(expected, torch.Tensor):
        torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)
    elif isinstance(expected, dict):
        assert isinstance(got, dict) and got.keys() == expected.keys()
        for key in expected:
            assert_same(got[key], expected[key])
    else:
        assert got == expected


def test_fedadam_fedprox_over_flare_equals_the_simulation(federation, simulated):
    ckpts, pids, records = run_job(federation, "fedadam", masking=False)
    for ckpt in ckpts:  # (a) every site ends with the simulation's global weights
        assert ckpt["federation"]["completed_rounds"] == ROUNDS
        for key, value in simulated["state_dict"].items():
            torch.testing.assert_close(ckpt["state_dict"][key], value, rtol=0, atol=1e-6)
        assert_same(ckpt["federation"]["server"], simulated["federation"]["server"])  # FedAdam's moments
    # (b) one trainer process per site for the whole job: every exchange came from the pid we started
    assert {tuple(sorted(r["pids"].items())) for r in records} == {tuple(zip(SITES, pids, strict=True))}
    # (c) each round the hub saw every site's weighted contribution, with the site's sample count as weight
    contributions = [r for r in records if r["what"] == "weighted all-reduce"]
    assert [r["round"] for r in contributions] == list(range(ROUNDS))
    expected = site_weights(federation)
    for record in contributions:
        assert record["weights"] == pytest.approx(expected) and record["site_counts"] == dict.fromkeys(SITES, 1)
    assert records[-1]["op"] == "done"


def test_ciil_hand_overs_over_flare_equal_the_simulation(federation):
    ckpts, _, records = run_job(federation, "ciil", masking=False, base="ciil")
    expected = simulate(federation, "ciil_simulated", base="ciil")
    for ckpt in ckpts:
        assert ckpt["federation"]["completed_rounds"] == ROUNDS
        for key, value in expected["state_dict"].items():
            torch.testing.assert_close(ckpt["state_dict"][key], value, rtol=0, atol=1e-6)
    handovers = [r for r in records if r["op"] == "broadcast" and r["what"].startswith("hand-over")]
    assert len(handovers) == ROUNDS * len(SITES)  # each site's result relayed after it trained


def test_a_robust_rule_runs_at_the_hub_and_equals_the_simulation(federation):
    ckpts, _, records = run_job(federation, "median", masking=False, base="median")
    expected = simulate(federation, "median_simulated", base="median")
    for ckpt in ckpts:
        for key, value in expected["state_dict"].items():
            torch.testing.assert_close(ckpt["state_dict"][key], value, rtol=0, atol=1e-6)
    assert [r["round"] for r in records if r["op"] == "aggregate"] == list(range(ROUNDS))
    assert not [r for r in records if r["op"] == "gather"]  # no site ever receives another site's state


def test_a_job_stopped_after_a_round_and_resumed_equals_an_uninterrupted_one(federation, simulated):
    run_job(federation, "first", masking=False, rounds=1)
    ckpts, _, records = run_job(federation, "resumed", masking=False, rounds=ROUNDS, resume="first")
    assert [r["round"] for r in records if r["what"] == "weighted all-reduce"] == list(range(1, ROUNDS))
    for ckpt in ckpts:
        assert ckpt["federation"]["completed_rounds"] == ROUNDS
        for key, value in simulated["state_dict"].items():
            torch.testing.assert_close(ckpt["state_dict"][key], value, rtol=0, atol=1e-6)
        assert_same(ckpt["federation"]["server"], simulated["federation"]["server"])


def test_masked_aggregation_over_flare_equals_unmasked_within_the_fixed_point_bound(federation, simulated):
    from lightning_fedseg.federation.masking import quantization_bound
    from lightning_fedseg.federation.signed_keys import BLOB_SIZE

    ckpts, _, records = run_job(federation, "masked", masking=True)
    bound = quantization_bound(len(SITES))
    for ckpt in ckpts:
        for key, value in simulated["state_dict"].items():
            if value.is_floating_point():
                # a FedAdam step moves each weight by at most about server_lr per round
                torch.testing.assert_close(ckpt["state_dict"][key], value, rtol=0, atol=max(1e-5, 100 * bound))
    keys = [r for r in records if r["op"] == "gather"]
    assert keys and all(r["bytes"] == dict.fromkeys(SITES, BLOB_SIZE) for r in keys)  # signed public keys only
    masked = [r for r in records if r["what"] == "masked all-reduce"]
    assert len(masked) == ROUNDS and all("weights" not in r for r in masked)


def _connect(port: int, ca: Path, cert: Path | None = None, key: Path | None = None) -> str:
    """``"open"`` if the server keeps a TLS connection from this client, ``"refused"`` if it ends it."""
    context = ssl.create_default_context(cafile=str(ca))
    if cert is not None:
        context.load_cert_chain(str(cert), str(key))
    with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
        try:
            with context.wrap_socket(raw, server_hostname="localhost") as tls:
                tls.sendall(b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n")
                tls.settimeout(5)
                # TLS 1.3 reports a refused client certificate on the first read (an alert or a close)
                return "open" if tls.recv(64) else "refused"
        except TimeoutError:
            return "open"
        except (ssl.SSLError, ConnectionResetError, BrokenPipeError):
            return "refused"


def test_the_server_refuses_clients_without_a_certificate_of_the_project_ca(federation, tmp_path):
    kits, port = federation["kits"], federation["fed_port"]
    startup = kits.sites["1"] / "startup"
    ca = startup / "rootCA.pem"
    deadline = time.monotonic() + 60
    while True:  # the positive control: the site's own certificate is accepted
        try:
            assert _connect(port, ca, startup / "client.crt", startup / "client.key") == "open"
            break
        except (ConnectionRefusedError, TimeoutError):
            assert time.monotonic() < deadline, "the FLARE server never listened"
            time.sleep(1)
    assert _connect(port, ca) == "refused"  # no client certificate
    other = provision(tmp_path / "other", SITES, fed_port=port, admin_port=port + 1, site_ports=[1, 2])
    rogue = other.sites["1"] / "startup"
    assert _connect(port, ca, rogue / "client.crt", rogue / "client.key") == "refused"  # same name, another CA
