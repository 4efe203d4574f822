"""Normalization chosen when the network is built, and the loss units: by hand, against smp."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lightning_fedseg.module import BrainTumorSegmentation
from lightning_fedseg.normalization import group_count, replace_batch_norm

SMALL = dict(encoder_name="resnet18", encoder_depth=3, decoder_channels=[16, 8, 8], compute_hd95=False)


@pytest.mark.parametrize("kind", ["group", "instance"])
def test_batch_norm_becomes_group_or_instance_norm_with_the_same_keys_everywhere(kind):
    torch.manual_seed(0)
    server = BrainTumorSegmentation(normalization=kind, **SMALL)
    site = BrainTumorSegmentation(normalization=kind, **SMALL)
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in server.modules())
    assert server.state_dict().keys() == site.state_dict().keys()
    assert not any("running_" in k or "num_batches_tracked" in k for k in server.state_dict())
    norms = [m for m in server.modules() if isinstance(m, nn.GroupNorm)]
    assert norms and all(torch.equal(m.weight, torch.ones_like(m.weight)) for m in norms)
    for m in norms:  # instance norm: one channel per group; group norm: the largest divisor up to 32
        assert m.num_groups == (m.num_channels if kind == "instance" else group_count(m.num_channels))
    site.load_state_dict(server.state_dict())  # strict: a site loads the global weights as they are
    # A sample's output does not depend on the rest of the batch (it does with batch norm).
    x = torch.randn(3, 1, 32, 32)
    torch.testing.assert_close(server(x)[:1], server(x[:1]))


def test_default_keeps_batch_norm_and_odd_subclasses_are_refused():
    assert any(isinstance(m, nn.BatchNorm2d) for m in BrainTumorSegmentation(**SMALL).modules())

    class BatchNormAct(nn.BatchNorm2d):
        pass

    with pytest.raises(TypeError, match=r"0 \(BatchNormAct\)"):
        replace_batch_norm(nn.Sequential(BatchNormAct(4)), "group")
    with pytest.raises(ValueError, match="`normalization`"):
        BrainTumorSegmentation(normalization="layer", **SMALL)


def _module(unit, loss="dice"):
    return BrainTumorSegmentation(network=nn.Conv2d(1, 1, 1), loss=loss, loss_unit=unit, compute_hd95=False)


@pytest.mark.parametrize("loss", ["dice", "dice_bce"])
def test_patient_and_slice_losses_are_means_of_each_units_own_loss(loss):
    """`patient`: the mean over patients of smp's loss on that patient's slices alone; `slice`: per slice."""
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(5, 1, 8, 8, generator=gen)
    target = (torch.rand(5, 1, 8, 8, generator=gen) > 0.6).float()
    cases = ["p1", "p2", "p1", "p3", "p2"]
    batch_loss = _module("batch", loss)
    reference = _module("batch", loss).loss
    assert batch_loss.loss(logits, target, cases) == reference(logits, target)
    by_patient = {c: [i for i, x in enumerate(cases) if x == c] for c in ("p1", "p2", "p3")}
    expected = torch.stack([reference(logits[idx], target[idx]) for idx in by_patient.values()]).mean()
    torch.testing.assert_close(_module("patient", loss).loss(logits, target, cases), expected)
    per_slice = torch.stack([reference(logits[i : i + 1], target[i : i + 1]) for i in range(5)]).mean()
    torch.testing.assert_close(_module("slice", loss).loss(logits, target, cases), per_slice)
    assert not torch.allclose(expected, reference(logits, target))  # the batch Dice is another quantity
    with pytest.raises(ValueError, match="case_id"):
        _module("patient").loss(logits, target)


def test_an_empty_batch_gives_a_zero_loss_connected_to_every_parameter():
    module = _module("patient")
    batch = {"image": torch.zeros(0, 1, 8, 8), "target": torch.zeros(0, 1, 8, 8), "case_id": []}
    loss = module.training_step(batch, 0)
    loss.backward()
    assert loss.item() == 0.0
    assert all(p.grad is not None and not p.grad.any() for p in module.parameters())
