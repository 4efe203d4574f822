"""Robust rules inside a real federation: a Byzantine site ruins FedAvg but not the robust rules,
and the stateful rules resume exactly from a checkpoint."""

from __future__ import annotations

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

import tests.federation.test_algorithms as algorithms
from lightning_fedseg import FedAvg, FederatedStrategy
from lightning_fedseg.federation.byzantine import ByzantineServer, SiteAttack
from lightning_fedseg.federation.preaggregation import Bucketing
from lightning_fedseg.federation.robust import CoordinateMedian
from lightning_fedseg.federation.robust_updates import CenteredClipping, GeometricMedian
from tests.federation.toy import ToyClassifier, ToyDataModule, states_equal, trainer_kwargs

SITES = tuple("abcde")


def _fit(tmp_path, server, attack):
    """Five sites holding the same data (so that every honest update agrees), six rounds."""
    pl.seed_everything(0)
    model = ToyClassifier()
    trainer = pl.Trainer(
        strategy=FederatedStrategy(FedAvg(), server=server),
        callbacks=[attack] if attack else [],
        **trainer_kwargs(tmp_path, max_epochs=6),
    )
    datamodule = ToyDataModule(sites=SITES, sizes=(16,) * 5, identical=True)
    trainer.fit(model, datamodule=datamodule)
    x, y = datamodule.data["a"]
    model.eval()
    with torch.no_grad():
        return (model.net(x).argmax(1) == y).float().mean().item()


def _sign_flipper():  # site b sends -10 times its update: the sign flip, scaled
    return SiteAttack("scaling", byzantine_sites=["b"], gamma=-10.0)


def test_a_sign_flipping_site_ruins_fedavg(tmp_path):
    clean = _fit(tmp_path / "clean", None, None)
    attacked = _fit(tmp_path / "attacked", None, _sign_flipper())
    assert clean >= 0.9 and attacked <= 0.6


@pytest.mark.parametrize(
    "make",
    [CoordinateMedian, lambda: CenteredClipping(radius=1.0), GeometricMedian],
    ids=["median", "centered_clipping", "geometric_median"],
)
def test_robust_rules_stay_near_the_clean_run(tmp_path, make):
    clean = _fit(tmp_path / "clean", make(), None)
    attacked = _fit(tmp_path / "attacked", make(), _sign_flipper())
    assert clean >= 0.9 and attacked >= clean - 0.1


@pytest.mark.parametrize(
    "make",
    [
        lambda: {"server": CenteredClipping(radius=0.05)},
        lambda: {"server": ByzantineServer(Bucketing(CenteredClipping(radius=0.05), 1), "ipm", epsilon=0.5)},
    ],
    ids=["centered_clipping", "ipm_on_bucketed_centered_clipping"],
)
def test_centered_clipping_resumes_exactly(tmp_path, make):
    _, full = algorithms.federate(tmp_path / "full", rounds=4, **make())
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    strategy, _ = algorithms.federate(tmp_path / "part", rounds=2, callbacks=[ckpt], **make())
    assert strategy.server.state_dict()  # the centre (and the learnt sites) are in the checkpoint
    resumed_ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt2", save_last=True)
    _, resumed = algorithms.federate(
        tmp_path / "part", rounds=4, callbacks=[resumed_ckpt], ckpt_path=str(tmp_path / "ckpt" / "last.ckpt"), **make()
    )
    assert states_equal(resumed.state_dict(), full.state_dict())
