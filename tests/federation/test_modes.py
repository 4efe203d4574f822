"""Collaboration modes as pure policies."""

from __future__ import annotations

import pytest
import torch

from lightning_fedseg.federation.modes import (
    CDS,
    CIIL,
    IIL,
    POOLED,
    Aggregation,
    FedAvg,
    SingleSite,
    mode_from_name,
)
from lightning_fedseg.federation.placement import assign_sites

SITES = ("s1", "s2", "s3", "s4")


def test_fedavg_plans_every_site_from_the_global_weights():
    mode = FedAvg(local_epochs=2)
    mode.setup(SITES)
    plan = mode.plan(0)
    assert plan.sites == SITES and plan.aggregation is Aggregation.MEAN
    assert {t.epochs for t in plan.tasks} == {2}


def test_fedavg_fraction_is_seeded_and_varies_by_round():
    mode = FedAvg(fraction=0.5, seed=3)
    mode.setup(SITES)
    rounds = [mode.plan(r).sites for r in range(6)]
    assert all(len(sites) == 2 for sites in rounds)
    again = FedAvg(fraction=0.5, seed=3)
    again.setup(SITES)
    assert [again.plan(r).sites for r in range(6)] == rounds
    assert len(set(rounds)) > 1


def test_ciil_cycles_in_order_and_respects_a_custom_order():
    mode = CIIL(epochs_per_site=1)
    mode.setup(SITES)
    assert mode.plan(5).sites == SITES and mode.plan(0).aggregation is Aggregation.CHAIN
    custom = CIIL(order=("s3", "s1", "s2", "s4"))
    custom.setup(SITES)
    assert custom.plan(0).sites == ("s3", "s1", "s2", "s4")
    with pytest.raises(ValueError, match="`order`"):
        CIIL(order=("s9",)).setup(SITES)


def _weights(value: float):
    return lambda: {"w": torch.tensor([value])}


def test_iil_moves_on_after_exactly_patience_epochs_and_passes_its_best_weights():
    mode = IIL(patience=3, monitor="val/{site}/dice")
    mode.setup(SITES[:2])
    scores = [0.5, 0.7, 0.6, 0.69, 0.65]  # best at epoch 2, then 3 epochs without improvement
    decisions = []
    for r, score in enumerate(scores):
        assert mode.plan(r).sites == ("s1",)
        decisions.append(mode.end_round(r, {"val/s1/dice": score}, _weights(score)))
    assert [d.weights is None for d in decisions] == [True, True, True, True, False]
    assert decisions[-1].weights["w"].item() == pytest.approx(0.7)  # best, not last
    assert not decisions[-1].stop
    assert mode.plan(5).sites == ("s2",)
    for r in range(5, 9):
        decision = mode.end_round(r, {"val/s2/dice": 0.1}, _weights(0.1))
    assert decision.stop and decision.weights["w"].item() == pytest.approx(0.1)


def test_iil_state_round_trips():
    mode = IIL(patience=2)
    mode.setup(SITES)
    mode.end_round(0, {"val/s1/dice": 0.4}, _weights(0.4))
    clone = IIL(patience=2)
    clone.setup(SITES)
    clone.load_state_dict(mode.state_dict())
    assert (clone.position, clone.wait, clone.best) == (0, 0, 0.4)
    assert torch.equal(clone.best_weights["w"], torch.tensor([0.4]))


def test_iil_names_the_missing_metric():
    mode = IIL(monitor="val/{site}/acc")
    mode.setup(SITES)
    with pytest.raises(ValueError, match=r"val/s1/acc.*site 's1'|site 's1'.*val/s1/acc"):
        mode.end_round(0, {"val/loss": 1.0}, _weights(0))


def test_single_and_cds():
    single = SingleSite("s3")
    single.setup(SITES)
    assert single.plan(0).sites == ("s3",)
    by_index = SingleSite(1)
    by_index.setup(SITES)
    assert by_index.plan(0).sites == ("s2",)
    with pytest.raises(ValueError, match="`site`"):
        SingleSite("nope").setup(SITES)
    cds = CDS()
    cds.setup(SITES)
    assert cds.plan(0).sites == (POOLED,)


def test_mode_names_and_validation():
    assert isinstance(mode_from_name("ciil"), CIIL)
    with pytest.raises(KeyError, match="valid modes"):
        mode_from_name("gossip")
    with pytest.raises(ValueError, match="Expected `local_epochs` to be a positive integer, but got 0"):
        FedAvg(local_epochs=0)
    with pytest.raises(ValueError, match="`fraction`"):
        FedAvg(fraction=0)
    with pytest.raises(ValueError, match="`patience`"):
        IIL(patience=0)


def test_assign_sites_balances_samples():
    sizes = {"a": 70, "b": 27, "c": 17, "d": 12, "e": 11}
    placement = assign_sites(list(sizes), sizes, 2)
    load = [sum(sizes[s] for s, r in placement.items() if r == rank) for rank in range(2)]
    assert placement["a"] == 0 and load == [70, 67]
    assert assign_sites(["x", "y", "z"], {}, 3) == {"x": 0, "y": 1, "z": 2}
    with pytest.raises(ValueError, match="only 2 sites"):
        assign_sites(["x", "y"], {}, 3)
