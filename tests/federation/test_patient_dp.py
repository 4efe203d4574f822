"""Patient-level DP-SGD: per-patient clipping against autograd by hand, sensitivity, the noise,
opacus's accountant per institution, the stop at the target, resume, and the refusals."""

from __future__ import annotations

import math
from pathlib import Path
from types import SimpleNamespace

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from opacus.accountants import RDPAccountant
from torch import nn

from lightning_fedseg import FedAvg, FederatedStrategy
from lightning_fedseg.data import FederatedDataModule
from lightning_fedseg.data.patient_sampling import PatientPoissonSampler
from lightning_fedseg.data.synthetic import write_synthetic_dataset
from lightning_fedseg.federation import DPFedAvg, FedBN, PatientDPSGD, UnsupportedFeatureError
from lightning_fedseg.federation.patient_dp import clipped_patient_sum
from lightning_fedseg.module import BrainTumorSegmentation
from tests.federation.toy import states_equal, trainer_kwargs


def small_net(width: int = 4, depth: int = 1) -> nn.Module:
    layers: list[nn.Module] = [nn.Conv2d(1, width, 3, padding=1), nn.GroupNorm(2, width), nn.ReLU()]
    for _ in range(depth - 1):
        layers += [nn.Conv2d(width, width, 3, padding=1), nn.GroupNorm(2, width), nn.ReLU()]
    return nn.Sequential(*layers, nn.Conv2d(width, 1, 1))


def module(unit: str = "patient", network: nn.Module | None = None) -> BrainTumorSegmentation:
    torch.manual_seed(0)
    net = small_net() if network is None else network
    return BrainTumorSegmentation(network=net, loss_unit=unit, compute_hd95=False, log_images=0)


def batch_of(slices: dict[str, int], seed: int = 0) -> dict:
    gen = torch.Generator().manual_seed(seed)
    cases = [case for case, n in slices.items() for _ in range(n)]
    return {
        "image": torch.randn(len(cases), 1, 8, 8, generator=gen),
        "target": (torch.rand(len(cases), 1, 8, 8, generator=gen) > 0.7).float(),
        "case_id": cases,
    }


def rows(batch: dict, case: str) -> dict:
    idx = [i for i, c in enumerate(batch["case_id"]) if c == case]
    return {"image": batch["image"][idx], "target": batch["target"][idx], "case_id": [case] * len(idx)}


def alone_gradient(model: BrainTumorSegmentation, batch: dict) -> list[torch.Tensor]:
    """The gradient of one patient's loss computed alone, by plain autograd."""
    loss = model.loss(model(batch["image"]), batch["target"], batch["case_id"])
    return list(torch.autograd.grad(loss, list(model.parameters())))


def flat(tensors) -> torch.Tensor:
    return torch.cat([t.flatten().double() for t in tensors])


SLICES = {"p1": 3, "p2": 1, "p3": 4}


@pytest.mark.parametrize("max_norm", [1e-3, 0.5, 1e6])  # every patient clipped, some, none
def test_clipped_sum_is_each_patients_own_gradient_clipped_and_summed_by_hand(max_norm):
    model = module()
    batch = batch_of(SLICES)
    expected = torch.zeros(sum(p.numel() for p in model.parameters()), dtype=torch.float64)
    norms = []
    for case in SLICES:
        g = flat(alone_gradient(model, rows(batch, case)))
        norms.append(g.norm().item())
        expected += g * min(1.0, max_norm / (g.norm().item() + 1e-6))
    got, got_norms = clipped_patient_sum(model, batch, max_norm)
    torch.testing.assert_close(flat(got), expected, rtol=1e-5, atol=1e-9)
    torch.testing.assert_close(got_norms.tolist(), norms, rtol=1e-5, atol=0)
    assert len(set(norms)) == 3


def test_the_patient_loss_decomposes_over_patients_and_the_batch_dice_does_not():
    """The batch's own gradient times P is the sum of the patients' gradients for the patient loss
    (so per-patient clipping bounds something); for smp's batch Dice it is not (why it is refused)."""
    batch = batch_of(SLICES)
    for unit, decomposes in (("patient", True), ("batch", False)):
        model = module(unit)
        whole = flat(alone_gradient(model, batch)) * (len(SLICES) if unit == "patient" else 1)
        reference = module("patient")  # the same weights (seeded): each patient's log Dice alone
        parts = sum(flat(alone_gradient(reference, rows(batch, case))) for case in SLICES)
        assert torch.allclose(whole, parts, rtol=1e-4, atol=1e-7) is decomposes


def test_one_whole_patient_moves_the_clipped_sum_by_at_most_c():
    """Neighbouring batches (one patient added, its image scaled by 1e6) differ by at most C."""
    model, max_norm = module(), 0.25
    base = batch_of(SLICES)
    extra = batch_of({"p4": 2}, seed=1)
    extra["image"] = extra["image"] * 1e6
    neighbour = {
        "image": torch.cat([base["image"], extra["image"]]),
        "target": torch.cat([base["target"], extra["target"]]),
        "case_id": base["case_id"] + extra["case_id"],
    }
    without, _ = clipped_patient_sum(model, base, max_norm)
    with_p4, norms = clipped_patient_sum(model, neighbour, max_norm)
    assert norms[-1] > max_norm  # the added patient was clipped (group norm undoes most of the 1e6)
    assert (flat(with_p4) - flat(without)).norm().item() <= max_norm * (1 + 1e-6)


# ---------------------------------------------------------------- the step, outside a Trainer


def attach(model, step, num_patients=50, q=0.2, sampling=True, **trainer):
    sampler = PatientPoissonSampler([[i] for i in range(num_patients)], None, q, 1, seed=0)
    datamodule = SimpleNamespace(patient_sample_rate=q if sampling else None, site_patient_sampler=lambda site: sampler)
    strategy = SimpleNamespace(clients=(step, *trainer.pop("clients", ())), mode=FedAvg(local_epochs=1))
    defaults = dict(accumulate_grad_batches=1, precision="32-true", max_epochs=4)
    model._trainer = SimpleNamespace(datamodule=datamodule, strategy=strategy, **(defaults | trainer))
    step.setup(model, ["s"])


def test_with_no_patient_the_update_is_noise_of_std_sigma_c_over_qn_and_the_step_counts():
    model = module(network=small_net(width=48, depth=3))  # ~42k coordinates
    sigma, clip, q, n = 1.5, 2.0, 0.2, 50
    step = PatientDPSGD(max_grad_norm=clip, noise_multiplier=sigma, noise_seed=0)
    attach(model, step, num_patients=n, q=q)
    step.begin_site("s", model, {}, None)
    empty = batch_of({})
    model.training_step(empty, 0).backward()  # the empty batch's zero loss: zero gradient
    step.on_batch(model, empty)
    step.before_optimizer_step(model, torch.optim.SGD(model.parameters(), lr=1.0))
    noise = flat(p.grad for p in model.parameters())
    assert noise.numel() > 40000
    assert noise.std().item() == pytest.approx(sigma * clip / (q * n), rel=0.02)
    assert abs(noise.mean().item()) < 5 * sigma * clip / (q * n) / math.sqrt(noise.numel())
    assert step.steps("s") == 1
    reference = RDPAccountant()
    reference.step(noise_multiplier=sigma, sample_rate=q)
    assert step.epsilon("s") == pytest.approx(reference.get_epsilon(delta=1e-5), rel=1e-12)
    state, contribution = step.end_site("s", model)
    assert contribution is None and state == {"history": [[sigma, q, 1]], "stopped": False}


def test_the_prv_accountant_is_opacus_prv_over_every_step_empty_ones_included():
    from opacus.accountants import PRVAccountant

    model, step = module(), PatientDPSGD(noise_multiplier=1.1, accountant="prv", noise_seed=0)
    attach(model, step, num_patients=20, q=0.25)
    step.begin_site("s", model, {}, None)
    for batch in (batch_of(SLICES), batch_of({}), batch_of({"p9": 2})):  # the step replaces any gradient
        step.on_batch(model, batch)
        step.before_optimizer_step(model, torch.optim.SGD(model.parameters(), lr=0.1))
    reference = PRVAccountant()
    for _ in range(3):
        reference.step(noise_multiplier=1.1, sample_rate=0.25)
    assert step.steps("s") == 3
    assert step.epsilon("s") == pytest.approx(reference.get_epsilon(delta=1e-5), rel=1e-9)


def test_the_noise_multiplier_is_calibrated_to_the_target_over_the_planned_steps():
    from opacus.accountants.utils import get_noise_multiplier

    step = PatientDPSGD(target_epsilon=3.0)
    attach(module(), step, q=0.25, max_epochs=6)
    expected = get_noise_multiplier(target_epsilon=3.0, target_delta=1e-5, sample_rate=0.25, steps=6 * 4)
    assert step.noise_multiplier == pytest.approx(expected)


def test_refusals_name_every_problem_at_once():
    bn = BrainTumorSegmentation(network=nn.Sequential(nn.Conv2d(1, 2, 1), nn.BatchNorm2d(2)), compute_hd95=False)
    step = PatientDPSGD(noise_multiplier=1.0)
    with pytest.raises(UnsupportedFeatureError) as err:
        attach(bn, step, sampling=False, clients=(FedBN(),), accumulate_grad_batches=2, precision="16-mixed")
    message = str(err.value)
    for words in ("FedBN", "accumulate_grad_batches=2", "16-mixed", "batch norm", "'batch'", "patient_sample_rate"):
        assert words in message, words
    with pytest.raises(ValueError, match="`noise_multiplier` or a `target_epsilon`"):
        PatientDPSGD()
    with pytest.raises(ValueError, match="max_epochs"):
        attach(module(), PatientDPSGD(target_epsilon=1.0), max_epochs=-1)


# ---------------------------------------------------------------- in a federated fit


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("patient_dp") / "data"
    write_synthetic_dataset(out, num_subjects=20, shape=(24, 24, 12), num_sites=4, seed=0)
    return out


def fit(tmp_path, data, rounds, step, q=0.3, m=2, mode=None, server=None, callbacks=(), ckpt_path=None):
    pl.seed_everything(0)
    model = module()
    dm = FederatedDataModule(
        data_root=str(data),
        cache_dir=str(data.parent / "cache"),
        patient_sample_rate=q,
        slices_per_patient=m,
        sampling_seed=0,
    )
    kwargs = {"server": server} if server is not None else {}
    strategy = FederatedStrategy(mode or FedAvg(), client=step, seed=0, **kwargs)
    extra = {"enable_checkpointing": True} if callbacks else {}
    trainer = pl.Trainer(
        strategy=strategy, callbacks=list(callbacks), **trainer_kwargs(tmp_path, max_epochs=rounds, **extra)
    )
    trainer.fit(model, datamodule=dm, ckpt_path=ckpt_path)
    return strategy, model


def rdp_epsilon(sigma, q, steps, delta=1e-5):
    accountant = RDPAccountant()
    for _ in range(steps):
        accountant.step(noise_multiplier=sigma, sample_rate=q)
    return accountant.get_epsilon(delta=delta)


def test_each_institution_is_accounted_apart_and_absent_sites_gain_no_steps(tmp_path, synthetic):
    """Half the sites per round: a site's steps are round(1/q) per round it trained in, its epsilon
    opacus's accountant rebuilt from (sigma, q, steps); DP-FedAvg on top keeps its own account."""
    sigma, q, rounds = 1.0, 0.3, 3
    step = PatientDPSGD(max_grad_norm=1.0, noise_multiplier=sigma, noise_seed=0)
    server = DPFedAvg(clip_norm=1.0, noise_multiplier=0.8, noise_seed=0)
    strategy, _ = fit(tmp_path, synthetic, rounds, step, q=q, mode=FedAvg(fraction=0.5, seed=1), server=server)
    last = strategy.history[-1]
    trained = {site: sum(site in h["succeeded"] for h in strategy.history) for site in strategy.sites}
    assert 0 in trained.values() or len(set(trained.values())) > 1  # some site sat rounds out
    for site, visits in trained.items():
        assert step.steps(site) == 3 * visits
        if visits:
            assert last[f"privacy/{site}/epsilon"] == pytest.approx(rdp_epsilon(sigma, q, 3 * visits), rel=1e-9)
        else:
            assert f"privacy/{site}/epsilon" not in last
    assert last["privacy/epsilon"] == pytest.approx(rdp_epsilon(0.8, 0.5, rounds), rel=1e-9)


def test_a_site_stops_before_exceeding_its_target(tmp_path, synthetic):
    sigma, q = 1.0, 0.5  # 2 steps per round; the target lies between 3 and 4 steps
    target = (rdp_epsilon(sigma, q, 3) + rdp_epsilon(sigma, q, 4)) / 2
    step = PatientDPSGD(noise_multiplier=sigma, target_epsilon=target, noise_seed=0)
    with pytest.warns(UserWarning, match="stops training"):
        strategy, _ = fit(tmp_path, synthetic, 3, step, q=q)
    for site in strategy.sites:
        assert step.steps(site) == 3 and step.epsilon(site) <= target
        assert site in step.stopped


def test_resume_continues_the_accountant_and_the_training_exactly(tmp_path, synthetic):
    """Every patient every step (q = 1, every slice): a fit resumed after 2 rounds is the 4-round fit, bit for bit."""

    def make():
        return PatientDPSGD(max_grad_norm=0.5, noise_multiplier=1.2, noise_seed=7)

    full_step = make()
    full_strategy, full = fit(tmp_path / "full", synthetic, 4, full_step, q=1.0, m=12)
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    fit(tmp_path / "part", synthetic, 2, make(), q=1.0, m=12, callbacks=[ckpt])
    resumed_step = make()
    resumed_strategy, resumed = fit(
        tmp_path / "part", synthetic, 4, resumed_step, q=1.0, m=12,
        callbacks=[ModelCheckpoint(dirpath=tmp_path / "ckpt2", save_last=True)],
        ckpt_path=str(tmp_path / "ckpt" / "last.ckpt"),
    )  # fmt: skip
    assert resumed_step.histories == full_step.histories == {s: [[1.2, 1.0, 4]] for s in full_strategy.sites}
    for key in (f"privacy/{s}/epsilon" for s in full_strategy.sites):
        assert resumed_strategy.history[-1][key] == full_strategy.history[-1][key]
    assert states_equal(resumed.state_dict(), full.state_dict())
