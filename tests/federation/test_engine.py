"""The round engine alone, driven by a fake host: no Trainer, no Lightning, milliseconds per test.

Each site's "training" sets the module's weight to a value of its own, so every global model can be
computed by hand: the sample-weighted mean for ``mean`` plans, the last site's for ``chain`` plans.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch import nn

from lightning_fedseg.federation.engine import RoundEngine
from lightning_fedseg.federation.faults import FaultInjector
from lightning_fedseg.federation.modes import CIIL, FedAvg
from lightning_fedseg.federation.robust import CoordinateMedian
from lightning_fedseg.federation.rounds import RoundFailedError, RoundIterable
from lightning_fedseg.federation.server import FedAdam, FedAvgStep, ServerStep
from lightning_fedseg.federation.site_state import SiteStates
from lightning_fedseg.federation.transport import LocalTransport

SITES = ("a", "b", "c")
SIZES = {"a": 3, "b": 2, "c": 1}  # batches of one sample: the FedAvg weights
VALUE = {"a": 1.0, "b": 4.0, "c": 10.0}


class FakeHost:
    """What Lightning would do for the engine: the live module, loaders, sample counts, site hooks."""

    def __init__(self) -> None:
        self._module = nn.Linear(1, 1, bias=False)
        with torch.no_grad():
            self._module.weight.fill_(0.5)
        self.calls: list[tuple[str, str, int]] = []
        self.requested: list[str] = []

    @property
    def module(self) -> nn.Module:
        return self._module

    @property
    def device(self) -> torch.device:
        return torch.device("cpu")

    def site_train_dataloader(self, site: str) -> Any:
        self.requested.append(site)
        return [torch.tensor([[float(i)]]) for i in range(SIZES[site])]

    def site_weight(self, site: str, loader: Any) -> float:
        return float(len(loader))

    def call_site_hook(self, name: str, site: str, round_idx: int) -> None:
        self.calls.append((name, site, round_idx))


def make_engine(mode=None, server: ServerStep | None = None, host=None, **kwargs) -> tuple[RoundEngine, FakeHost]:
    host = host or FakeHost()
    mode = mode or FedAvg()
    mode.setup(SITES)
    server = server or FedAvgStep()
    server.setup({"weight"})
    engine = RoundEngine(
        mode=mode,
        server=server,
        clients=(),
        sites=SITES,
        placement=dict.fromkeys(SITES, 0),
        site_states=SiteStates([], [], keep=False),
        transport=LocalTransport(dict.fromkeys(SITES, 0)),
        host=host,
        **kwargs,
    )
    return engine, host


def run_round(engine: RoundEngine, train=None, metrics=None):
    """Iterate the round as Lightning would; ``train(site, module)`` is each batch's step."""

    def step(site: str) -> torch.Tensor:
        if train is not None:
            train(site, engine.host.module)
        else:
            with torch.no_grad():
                engine.host.module.weight.fill_(VALUE[site])
        return torch.zeros((), requires_grad=True)

    for batch in RoundIterable(engine):
        engine.on_batch()
        rnd = engine.round
        site = rnd.plan.tasks[rnd.active].site
        engine.training_step(lambda site=site: step(site), batch)
    return engine.close_round(metrics or {})


def weight(engine: RoundEngine) -> float:
    return float(engine.host.module.weight)


def test_mean_round_is_the_sample_weighted_mean_and_closes_as_a_whole():
    engine, host = make_engine()
    outcome = run_round(engine)
    expected = (3 * 1.0 + 2 * 4.0 + 1 * 10.0) / 6
    assert weight(engine) == pytest.approx(expected)
    assert engine.completed_rounds == 1
    assert outcome is not None and outcome.record["round"] == 0 and outcome.record["succeeded"] == list(SITES)
    assert engine.history == [outcome.record]
    assert [c for c in host.calls] == [(hook, s, 0) for s in SITES for hook in ("on_site_start", "on_site_end")]


def test_every_site_starts_from_the_rounds_global_weights():
    engine, _ = make_engine()
    seen = []

    def train(site, module):
        seen.append((site, float(module.weight)))
        with torch.no_grad():
            module.weight.add_(1.0)

    run_round(engine, train)
    firsts = {}
    for site, value in seen:
        firsts.setdefault(site, value)
    assert firsts == dict.fromkeys(SITES, 0.5)
    # each site took SIZES[site] steps of +1 from 0.5
    assert weight(engine) == pytest.approx(sum(SIZES[s] * (0.5 + SIZES[s]) for s in SITES) / 6)


def test_chain_round_hands_the_weights_from_site_to_site():
    engine, _ = make_engine(mode=CIIL())

    def train(site, module):
        with torch.no_grad():
            module.weight.add_(1.0)

    run_round(engine, train)
    assert weight(engine) == pytest.approx(0.5 + 6)  # every batch of every site, one after another


def test_a_failing_site_is_dropped_and_min_sites_stops_the_run():
    def train(site, module):
        if site == "b":
            raise RuntimeError("disk full")
        with torch.no_grad():
            module.weight.fill_(VALUE[site])

    engine, _ = make_engine(min_sites=2)
    with pytest.warns(UserWarning, match="site 'b' failed"):
        outcome = run_round(engine, train)
    assert weight(engine) == pytest.approx((3 * 1.0 + 1 * 10.0) / 4)
    assert outcome.record["failed"] == {"b": "RuntimeError: disk full"}

    engine, _ = make_engine(min_sites=3)
    with pytest.warns(UserWarning), pytest.raises(RoundFailedError, match=r"only 2 of 3 sites.*b: RuntimeError"):
        run_round(engine, train)
    assert weight(engine) == 0.5  # the global model is unchanged
    assert engine.completed_rounds == 0


def test_a_site_returning_nan_weights_is_dropped():
    engine, _ = make_engine(faults=FaultInjector({"c": [0]}, kind="nan"))
    with pytest.warns(UserWarning, match="'c'"):
        run_round(engine)
    assert weight(engine) == pytest.approx((3 * 1.0 + 2 * 4.0) / 5)


def test_the_server_step_gets_the_mean_through_its_aggregator():
    engine, _ = make_engine(server=FedAdam(server_lr=0.1))
    run_round(engine)
    reference = FedAdam(server_lr=0.1)
    reference.setup({"weight"})
    mean = torch.tensor([[(3 * 1.0 + 2 * 4.0 + 1 * 10.0) / 6]])
    expected = reference.step({"weight": torch.tensor([[0.5]])}, {"weight": mean}, 0)["weight"]
    assert weight(engine) == pytest.approx(float(expected))


def test_rules_on_site_states_get_every_state_with_its_site():
    received = {}

    class Recording(CoordinateMedian):
        def step_from_sites(self, global_state, site_states, weights, round_idx, sites=()):
            received.update(sites=list(sites), weights=list(weights))
            return super().step_from_sites(global_state, site_states, weights, round_idx, sites)

    engine, _ = make_engine(server=Recording())
    run_round(engine)
    assert received == {"sites": list(SITES), "weights": [3.0, 2.0, 1.0]}
    assert weight(engine) == pytest.approx(4.0)  # the median of 1, 4 and 10


def test_state_resumes_the_round_counter_and_history():
    engine, _ = make_engine()
    run_round(engine)
    run_round(engine)
    resumed, _ = make_engine()
    resumed.load_state_dict(engine.state_dict())
    assert resumed.completed_rounds == 2 and resumed.history == engine.history
    assert resumed.start_round().index == 2


def test_a_replayed_epoch_end_without_batches_closes_nothing():
    engine, _ = make_engine()
    run_round(engine)
    iter(RoundIterable(engine))  # Lightning sets up the finished epoch's loader again on resume ...
    engine.start_round()
    assert engine.close_round({}) is None  # ... and calls its end hooks without taking a batch
    assert engine.completed_rounds == 1 and len(engine.history) == 1


def test_loaders_are_requested_once_until_cleared():
    engine, host = make_engine()
    run_round(engine)
    run_round(engine)
    assert sorted(host.requested) == sorted(SITES)
    engine.loaders.clear()
    run_round(engine)
    assert sorted(host.requested) == sorted(SITES * 2)
