"""The Byzantine injector: its seeded choice of sites, the omniscient attacks at the server, the
site-side attacks inside a real Trainer, and the same choice on two gloo processes."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import Callback

from lightning_fedseg import FedAvg, FederatedStrategy
from lightning_fedseg.federation import attacks
from lightning_fedseg.federation.byzantine import ByzantineServer, SiteAttack, byzantine_sites
from lightning_fedseg.federation.robust import Krum
from lightning_fedseg.federation.server import FedAvgStep
from tests.federation.toy import ToyClassifier, ToyDataModule, trainer_kwargs

ROOT = Path(__file__).resolve().parents[2]
SITES = tuple("abcdefghij")


def test_the_choice_is_a_pure_function_of_seed_sites_and_f():
    chosen = byzantine_sites(SITES, 3, seed=4)
    assert len(chosen) == 3 and chosen == byzantine_sites(list(SITES), 3, seed=4)
    assert list(chosen) == [s for s in SITES if s in chosen]  # in the federation's order
    assert len({byzantine_sites(SITES, 3, seed=s) for s in range(10)}) > 1
    assert byzantine_sites(SITES, 3, names=["j", "b"], seed=4) == ("b", "j")  # names win
    assert byzantine_sites(SITES, 0) == ()
    with pytest.raises(ValueError, match=r"`byzantine_sites` to name sites.*\['z'\]"):
        byzantine_sites(SITES, names=["z"])
    with pytest.raises(ValueError, match="`num_byzantine` to be at most the 10 sites, but got 11"):
        byzantine_sites(SITES, 11)


GLOBAL = {"w": torch.tensor([0.0, 0.0]), "n": torch.tensor(5)}
STATES = [
    {"w": torch.tensor([1.0, 2.0]), "n": torch.tensor(6)},
    {"w": torch.tensor([3.0, 0.0]), "n": torch.tensor(7)},
    {"w": torch.tensor([50.0, 50.0]), "n": torch.tensor(8)},  # the Byzantine site's own training
]
NAMES = ["a", "b", "c"]
HONEST = torch.tensor([[1.0, 2.0], [3.0, 0.0]], dtype=torch.float64)  # mu = (2, 1), sigma = (1, 1)


class _Recorder(FedAvgStep):
    needs_site_states = True

    def step_from_sites(self, global_state, site_states, weights, round_idx, sites=()):
        self.seen = [dict(s) for s in site_states]
        return super().step_from_sites(global_state, site_states, weights, round_idx, sites)


@pytest.mark.parametrize(
    "attack, kwargs, expected",
    [
        ("sign_flip", {}, [-2.0, -1.0]),
        ("alie", {"z": -2.0}, [0.0, -1.0]),
        ("ipm", {"epsilon": 3.0}, [-6.0, -3.0]),
        ("mimic", {"mimic_target": 1}, [3.0, 0.0]),
        ("min_max", {"tol": 1e-6}, attacks.min_max(HONEST, tol=1e-6)[0].tolist()),
        ("min_sum", {"perturbation": "sign", "tol": 1e-6}, attacks.min_sum(HONEST, "sign", tol=1e-6)[0].tolist()),
    ],
)
def test_omniscient_attacks_replace_the_byzantine_state(attack, kwargs, expected):
    inner = _Recorder()
    step = ByzantineServer(inner, attack, byzantine_sites=["c"], **kwargs)
    out = step.step_from_sites(GLOBAL, STATES, [1, 1, 2], round_idx=0, sites=NAMES)
    assert inner.seen[2]["w"].tolist() == pytest.approx(expected)
    assert inner.seen[2]["n"].item() == 8  # integer buffers untouched
    assert inner.seen[0] is not STATES[0] and torch.equal(inner.seen[0]["w"], STATES[0]["w"])
    assert out["w"].tolist() == pytest.approx(((HONEST.sum(0) + 2 * torch.tensor(expected).double()) / 4).tolist())
    assert step.metrics() == {"byzantine/count": 1.0, "byzantine/site/c": 1.0}
    assert STATES[2]["w"].tolist() == [50.0, 50.0]  # the inputs are left alone


def test_alie_defaults_to_the_papers_z_and_waits_for_from_round():
    inner = _Recorder()
    sites = [{"w": torch.tensor([float(i)])} for i in range(10)]
    step = ByzantineServer(inner, "alie", num_byzantine=3, seed=2, from_round=1)
    step.setup_federation(10, 1.0, 10)
    step.step_from_sites({"w": torch.zeros(1)}, sites, [1] * 10, round_idx=0, sites=SITES)
    assert step.metrics() == {"byzantine/count": 0.0}
    step.step_from_sites({"w": torch.zeros(1)}, sites, [1] * 10, round_idx=1, sites=SITES)
    chosen = byzantine_sites(SITES, 3, seed=2)
    honest = torch.tensor([[float(i)] for i, s in enumerate(SITES) if s not in chosen], dtype=torch.float64)
    expected = attacks.alie(honest, attacks.alie_z(10, 3)).item()
    assert [inner.seen[SITES.index(s)]["w"].item() for s in chosen] == pytest.approx([expected] * 3)
    assert step.metrics()["byzantine/count"] == 3.0 and step.state_dict()["sites"] == list(SITES)


def test_krum_selection_of_a_byzantine_site_is_reported():
    states = [{"w": torch.tensor([v])} for v in (0.0, 1.0, 2.0, 3.0, 1.5)]
    step = ByzantineServer(Krum(num_byzantine=1), None, byzantine_sites=["e"])  # reports only
    out = step.step_from_sites({"w": torch.zeros(1)}, states, [1] * 5, round_idx=0, sites=list("abcde"))
    assert out["w"].item() == 1.5 and step.metrics()["byzantine/selected"] == 1.0


def test_the_server_needs_every_site_to_draw_the_set():
    step = ByzantineServer(FedAvgStep(), "sign_flip", num_byzantine=1)
    step.setup_federation(3, 1.0, 2)
    with pytest.raises(ValueError, match="HINT: name them in `byzantine_sites`"):
        step.step_from_sites(GLOBAL, STATES[:2], [1, 1], round_idx=0, sites=NAMES[:2])
    with pytest.raises(ValueError, match="must be the outermost server step"):
        ByzantineServer(FedAvgStep(), "sign_flip", byzantine_sites=["a"]).step_from_sites(GLOBAL, STATES, [1] * 3, 0)
    with pytest.raises(ValueError, match="`attack` to be None or one of"):
        ByzantineServer(FedAvgStep(), "fang")
    with pytest.raises(TypeError, match="`inner`"):
        ByzantineServer("mean")


class _Snapshots(Callback):
    def __init__(self):
        self.start, self.end, self.labels = {}, {}, {}

    def on_site_start(self, trainer, pl_module, site, round_idx):
        self.start[site] = {k: v.clone() for k, v in pl_module.state_dict().items()}

    def on_site_end(self, trainer, pl_module, site, round_idx):
        self.end[site] = {k: v.clone() for k, v in pl_module.state_dict().items()}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        site = trainer.strategy.progress_info()["site"]
        self.labels.setdefault(site, []).append(batch[1].clone())


def _fit(tmp_path, callbacks, rounds=1):
    pl.seed_everything(0)
    model = ToyClassifier()
    strategy = FederatedStrategy(FedAvg())
    trainer = pl.Trainer(strategy=strategy, callbacks=callbacks, **trainer_kwargs(tmp_path, max_epochs=rounds))
    trainer.fit(model, datamodule=ToyDataModule(sites=("a", "b", "c"), sizes=(16, 16, 8), shuffle=False))
    return model


def test_site_side_sign_flip_and_scaling_change_only_what_the_byzantine_site_sends(tmp_path):
    honest, attack, sent = _Snapshots(), SiteAttack("scaling", byzantine_sites=["b"], gamma=-3.0), _Snapshots()
    _fit(tmp_path, [honest, attack, sent])
    assert attack.attacked == [(0, "b")] and attack.byzantine == ("b",)
    for key, start in sent.start["b"].items():
        trained, contributed = honest.end["b"][key], sent.end["b"][key]
        if start.is_floating_point():
            torch.testing.assert_close(contributed, start - 3.0 * (trained - start))
        else:
            assert torch.equal(contributed, trained)  # num_batches_tracked
    assert all(torch.equal(sent.end[s][k], honest.end[s][k]) for s in "ac" for k in sent.end[s])


def test_label_flipping_trains_on_erased_labels(tmp_path):
    seen = _Snapshots()
    _fit(tmp_path, [SiteAttack("label_flip", byzantine_sites=["c"], label_flip="erase", target_key=1), seen])
    assert all(not y.any() for y in seen.labels["c"])
    assert any(y.any() for y in seen.labels["a"])


def test_a_site_attack_and_a_server_that_disagree_are_refused(tmp_path):
    pl.seed_everything(0)
    strategy = FederatedStrategy(FedAvg(), server=ByzantineServer(FedAvgStep(), byzantine_sites=["a"]))
    trainer = pl.Trainer(strategy=strategy, callbacks=[SiteAttack(byzantine_sites=["b"])], **trainer_kwargs(tmp_path))
    with pytest.raises(ValueError, match="give both the same"):
        trainer.fit(ToyClassifier(), datamodule=ToyDataModule())


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_the_choice_is_the_same_on_two_gloo_processes(request):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port())}
    procs = []
    for rank in range(2):  # a different hash seed per process: nothing may depend on str hashing
        rank_env = {**env, "RANK": str(rank), "WORLD_SIZE": "2", "PYTHONHASHSEED": str(rank + 1)}
        procs.append(
            subprocess.Popen(
                [sys.executable, "-m", "tests.federation.byzantine_gloo"],
                cwd=ROOT,
                env=rank_env,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
            )
        )

    def stop() -> None:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()

    request.addfinalizer(stop)
    outputs = [proc.communicate(timeout=120)[0] for proc in procs]
    assert [proc.returncode for proc in procs] == [0, 0], outputs
    assert outputs[0].strip() == outputs[1].strip() and outputs[0].startswith("chosen")


def _launch(request, out: Path, world: int, *extra: str) -> dict:
    """``tests/federation/dist_run.py`` on ``world`` processes (Lightning starts the other ranks);
    the whole process group is stopped by its id when the test ends."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONWARNINGS": "ignore"}
    env.pop("MASTER_PORT", None)
    proc = subprocess.Popen(
        [sys.executable, "-m", "tests.federation.dist_run", "fedavg", str(world), str(out), *extra],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )

    def stop() -> None:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()

    request.addfinalizer(stop)
    output, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, output[-3000:]
    return torch.load(out, weights_only=False)


@pytest.mark.distributed
@pytest.mark.parametrize(
    "extra, masked",
    [(("--attack", "scaling"), True), (("--server", "alie_median"), False)],
    ids=["site_scaling_masked", "server_alie_median"],
)
def test_attacks_on_two_processes_equal_the_simulation(request, tmp_path, extra, masked):
    """A site-side attack under masked aggregation, and an omniscient one on the all-gathered states:
    3 sites over 2 processes give the one-process simulation's weights."""
    simulated = _launch(request, tmp_path / "sim.pt", 1, *extra)
    distributed = _launch(request, tmp_path / "dist.pt", 2, *extra, *(("--masking",) if masked else ()))
    for key, value in simulated["state"].items():
        torch.testing.assert_close(distributed["state"][key], value, rtol=1e-5, atol=1e-5)
    if not masked:
        assert [h["byzantine/count"] for h in distributed["history"]] == [1.0] * len(distributed["history"])


def test_the_strategy_names_every_site_at_setup_so_the_choice_needs_no_full_round():
    from lightning_fedseg.federation.robust import CoordinateMedian

    step = ByzantineServer(CoordinateMedian(), num_byzantine=2, seed=4)
    sites = [f"s{i}" for i in range(6)]
    step.setup_federation(6, 0.5, 3, sites=sites)
    assert step.byzantine == byzantine_sites(sites, num_byzantine=2, seed=4) and len(step.byzantine) == 2
