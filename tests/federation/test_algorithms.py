"""Server and client steps inside a real Trainer, against references computed by hand.

Each reference trains the sites alone with plain Lightning from the round's global weights and
combines them by hand (the update rules of ``shared/ALGORITHMS.md``); the reductions to FedAvg
are checked bit for bit, and the stateful steps resume exactly.
"""

from __future__ import annotations

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint

from lightning_fedseg import CIIL, FedAvg, FederatedStrategy
from lightning_fedseg.federation import UnsupportedFeatureError
from lightning_fedseg.federation.client_steps import SCAFFOLD, FedBN, FedProx
from lightning_fedseg.federation.privacy import DPFedAvg
from lightning_fedseg.federation.robust import (
    CoordinateMedian,
    Krum,
    TrimmedMean,
    coordinate_median,
    krum,
    trimmed_mean,
)
from lightning_fedseg.federation.server import FedAdam, FedAvgM
from tests.federation.toy import ToyClassifier, ToyDataModule, states_equal, trainer_kwargs

THREE = dict(sites=("a", "b", "c"), sizes=(24, 20, 12), batch_size=8, shuffle=False)  # 3, 3 and 2 batches
WEIGHTS = (24, 20, 12)


class SGDToy(ToyClassifier):
    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def federate(tmp_path, rounds=1, model=None, init=None, callbacks=(), ckpt_path=None, **strategy_kwargs):
    pl.seed_everything(0)
    model = model if model is not None else ToyClassifier()
    if init is not None:
        model.load_state_dict(init)
    strategy = FederatedStrategy(strategy_kwargs.pop("mode", FedAvg()), **strategy_kwargs)
    extra = {"enable_checkpointing": True} if any(isinstance(c, ModelCheckpoint) for c in callbacks) else {}
    trainer = pl.Trainer(
        strategy=strategy, callbacks=list(callbacks), **trainer_kwargs(tmp_path, max_epochs=rounds, **extra)
    )
    trainer.fit(model, datamodule=ToyDataModule(**THREE), ckpt_path=ckpt_path)
    return strategy, model


def initial(model_cls=ToyClassifier):
    pl.seed_everything(0)
    return {k: v.clone() for k, v in model_cls().state_dict().items()}


def alone(tmp_path, init, model_cls=ToyClassifier, callbacks_for=None):
    """Each site trained for one epoch by plain Lightning from ``init``: ``[state per site]``."""
    dm = ToyDataModule(**THREE)
    states = []
    for site in dm.site_names:
        pl.seed_everything(0)
        model = model_cls()
        model.load_state_dict(init)
        solo = ToyDataModule(sites=(site,), sizes=(len(dm.data[site][1]),), batch_size=8, shuffle=False)
        solo.data = {site: dm.data[site]}
        callbacks = callbacks_for(site) if callbacks_for else []
        pl.Trainer(callbacks=callbacks, **trainer_kwargs(tmp_path / site, max_epochs=1)).fit(model, datamodule=solo)
        states.append({k: v.clone() for k, v in model.state_dict().items()})
    return states


def weighted(states):
    total = sum(WEIGHTS)
    out = {}
    for key, value in states[0].items():
        mean = sum(w * s[key].double() for w, s in zip(WEIGHTS, states, strict=True)) / total
        out[key] = mean.to(value.dtype) if value.is_floating_point() else torch.round(mean).to(value.dtype)
    return out


def assert_states_close(actual, expected, atol=1e-6):
    assert actual.keys() == expected.keys()
    for key, value in expected.items():
        torch.testing.assert_close(actual[key], value, rtol=1e-5, atol=atol, msg=key)


@pytest.mark.parametrize(
    "kwargs",
    [{"server": FedAvgM(server_lr=1.0, momentum=0.0)}, {"client": FedProx(mu=0.0)}],
    ids=["FedAvgM(1, 0)", "FedProx(mu=0)"],
)
def test_reductions_to_fedavg_are_bit_exact(tmp_path, kwargs):
    _, fedavg = federate(tmp_path / "fedavg", rounds=2)
    _, other = federate(tmp_path / "other", rounds=2, **kwargs)
    assert states_equal(other.state_dict(), fedavg.state_dict())


def test_fedadam_one_round_by_hand(tmp_path):
    init = initial()
    aggregate = weighted(alone(tmp_path / "alone", init))
    _, fed = federate(tmp_path / "fed", init=init, server=FedAdam(server_lr=0.1, beta1=0.9, beta2=0.99, tau=1e-3))
    params = {n for n, _ in ToyClassifier().named_parameters()}
    expected = {}
    for key, x in init.items():
        if key not in params:  # buffers (BatchNorm statistics, counts) come from the aggregate
            expected[key] = aggregate[key]
            continue
        delta = aggregate[key].double() - x.double()
        m = 0.1 * delta
        v = 0.99 * 1e-3**2 + 0.01 * delta**2
        expected[key] = (x.double() + 0.1 * m / (v.sqrt() + 1e-3)).float()
    assert_states_close(fed.state_dict(), expected)


def test_fedprox_round_equals_sites_trained_alone_with_the_term(tmp_path):
    init = initial()
    mu = 0.5

    class ProxToy(ToyClassifier):
        def training_step(self, batch, batch_idx):
            loss = super().training_step(batch, batch_idx)
            return loss + mu / 2 * sum(((p - init[n]) ** 2).sum() for n, p in self.named_parameters())

    expected = weighted(alone(tmp_path / "alone", init, ProxToy))
    _, fed = federate(tmp_path / "fed", init=init, client=FedProx(mu=mu))
    assert_states_close(fed.state_dict(), expected)


def test_scaffold_two_rounds_by_hand(tmp_path):
    init = initial(SGDToy)
    names = [n for n, _ in SGDToy().named_parameters()]
    steps = {"a": 3, "b": 3, "c": 2}
    # Round 0: c = c_i = 0, so the sites train as plain FedAvg.
    round0 = alone(tmp_path / "r0", init, SGDToy)
    x1 = weighted(round0)
    c_i = {
        site: {n: (init[n].double() - s[n].double()) / (steps[site] * 0.1) for n in names}
        for site, s in zip("abc", round0, strict=True)
    }
    c = {n: sum(c_i[site][n] for site in "abc") / 3 for n in names}

    class Correct(Callback):
        def __init__(self, site):
            self.site = site

        def on_before_optimizer_step(self, trainer, pl_module, optimizer):
            for n, p in pl_module.named_parameters():
                p.grad += (c[n] - c_i[self.site][n]).to(p.dtype)

    round1 = alone(tmp_path / "r1", x1, SGDToy, callbacks_for=lambda site: [Correct(site)])
    expected = weighted(round1)
    scaffold = SCAFFOLD()
    strategy, fed = federate(tmp_path / "fed", rounds=2, model=SGDToy(), init=init, client=scaffold)
    assert_states_close(fed.state_dict(), expected, atol=1e-5)
    new_c_i = {
        site: {n: c_i[site][n] - c[n] + (x1[n].double() - s[n].double()) / (steps[site] * 0.1) for n in names}
        for site, s in zip("abc", round1, strict=True)
    }
    for site in "abc":
        kept = strategy.site_states.client_state(site, "scaffold")
        for n in names:
            torch.testing.assert_close(kept[n].double(), new_c_i[site][n], rtol=1e-4, atol=1e-5)
    for n in names:
        expected_c = c[n] + sum(new_c_i[s][n] - c_i[s][n] for s in "abc") / 3
        torch.testing.assert_close(scaffold.c[n].double(), expected_c, rtol=1e-4, atol=1e-5)


class NormWatch(Callback):
    """BatchNorm running mean at each site's start and end, and per validation loader."""

    def __init__(self):
        self.starts, self.ends, self.val = {}, {}, {}

    def on_site_start(self, trainer, pl_module, site, round_idx):
        self.starts[site, round_idx] = pl_module.net[1].running_mean.clone()

    def on_site_end(self, trainer, pl_module, site, round_idx):
        self.ends[site, round_idx] = pl_module.net[1].running_mean.clone()

    def on_validation_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0):
        self.val[trainer.current_epoch, dataloader_idx] = pl_module.net[1].running_mean.clone()


def test_fedbn_keeps_each_sites_normalization_layers(tmp_path):
    watch = NormWatch()
    _, fed = federate(tmp_path, rounds=2, callbacks=[watch], client=FedBN())
    for site in "bc":  # round 1 starts from the site's own statistics, not the aggregate
        assert torch.equal(watch.starts[site, 1], watch.ends[site, 0])
        assert not torch.equal(watch.starts[site, 1], watch.starts["a", 1])
    for index, site in enumerate("abc"):  # each site validates with its own layers
        assert torch.equal(watch.val[1, index], watch.ends[site, 1])
    # The global model (test, predict) carries the aggregate of the sites' layers.
    total = sum(WEIGHTS)
    aggregate = sum(w * watch.ends[s, 1].double() for w, s in zip(WEIGHTS, "abc", strict=True)) / total
    torch.testing.assert_close(fed.net[1].running_mean, aggregate.float())


def test_fedbn_test_layers_of_a_named_site(tmp_path):
    watch = NormWatch()
    _, fed = federate(tmp_path, rounds=2, callbacks=[watch], client=FedBN(test_layers="b"))
    assert torch.equal(fed.net[1].running_mean, watch.ends["b", 1])


@pytest.mark.parametrize(
    "server, rule",
    [
        (CoordinateMedian(), coordinate_median),
        (TrimmedMean(beta=0.34), lambda states: trimmed_mean(states, beta=0.34)),
        (Krum(num_byzantine=0), lambda states: krum(states, num_byzantine=0)),
    ],
    ids=["median", "trimmed_mean", "krum"],
)
def test_robust_rules_equal_the_rule_applied_to_sites_trained_alone(tmp_path, server, rule):
    init = initial()
    expected = rule(alone(tmp_path / "alone", init))
    strategy, fed = federate(tmp_path / "fed", init=init, server=server)
    assert_states_close(fed.state_dict(), expected)
    assert strategy.history[0]["succeeded"] == ["a", "b", "c"]


def test_algorithms_without_a_federated_meaning_are_refused(tmp_path):
    with pytest.raises(UnsupportedFeatureError, match=r"FedAdam.*the ciil mode.*`fedavg` mode"):
        federate(tmp_path / "a", mode=CIIL(), server=FedAdam())
    with pytest.raises(UnsupportedFeatureError, match="manual optimization"):
        federate(tmp_path / "b", model=ToyClassifier(manual=True), client=FedProx(mu=0.1))
    with pytest.raises(ValueError, match="has none"):
        federate(tmp_path / "c", model=ToyClassifier(batchnorm=False), client=FedBN())


class _CountSteps(Callback):
    def __init__(self) -> None:
        self.steps = 0

    def on_train_batch_end(self, *args, **kwargs) -> None:
        self.steps += 1


def test_krum_with_too_few_sites_is_refused_before_any_site_trains(tmp_path):
    counter = _CountSteps()
    with pytest.raises(ValueError, match=r"`num_byzantine`=1 needs more than 2 \* 1 \+ 2 = 4 sites, but got 3"):
        federate(tmp_path, server=Krum(num_byzantine=1), callbacks=[counter])
    assert counter.steps == 0


@pytest.mark.parametrize(
    "make",
    [
        lambda: {"server": FedAdam(server_lr=0.05)},
        lambda: {"client": SCAFFOLD()},
        lambda: {"client": FedBN()},
        lambda: {"server": DPFedAvg(noise_multiplier=0.2, noise_seed=5, optimizer=FedAdam(server_lr=0.01))},
    ],
    ids=["FedAdam", "SCAFFOLD", "FedBN", "DPFedAvg+FedAdam"],
)
def test_stateful_steps_resume_exactly(tmp_path, make):
    _, full = federate(tmp_path / "full", rounds=4, **make())
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    federate(tmp_path / "part", rounds=2, callbacks=[ckpt], **make())
    resumed_ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt2", save_last=True)
    _, resumed = federate(
        tmp_path / "part", rounds=4, callbacks=[resumed_ckpt], ckpt_path=str(tmp_path / "ckpt" / "last.ckpt"), **make()
    )
    assert states_equal(resumed.state_dict(), full.state_dict())
