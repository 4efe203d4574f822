"""Client-side math (FedProx, SCAFFOLD, FedBN) against values computed by hand."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lightning_fedseg.federation.client import (
    is_normalization_layer,
    merge_local,
    normalization_keys,
    proximal_term,
    scaffold_correct_gradients,
    scaffold_init_control,
    scaffold_server_update,
    scaffold_update_control,
    split_local,
)

# ---------------------------------------------------------------- FedProx


def test_proximal_term_value_and_gradient():
    w = nn.Parameter(torch.tensor([1.0, 2.0]))
    b = nn.Parameter(torch.tensor(3.0))
    g = {"w": torch.tensor([0.0, 4.0], requires_grad=True), "b": torch.tensor(1.0)}
    term = proximal_term([("w", w), ("b", b)], g, mu=0.1)
    assert term.item() == pytest.approx(0.05 * (1 + 4 + 4))  # mu / 2 * (1^2 + 2^2 + 2^2)
    term.backward()
    assert w.grad.tolist() == pytest.approx([0.1 * 1, 0.1 * -2])  # mu * (w - w_global)
    assert b.grad.item() == pytest.approx(0.1 * 2)
    assert g["w"].grad is None  # the global weights are constants


def test_proximal_term_with_mu_zero_leaves_gradients_bit_identical():
    torch.manual_seed(0)
    model = nn.Linear(3, 2)
    global_params = {k: v.detach() + torch.randn_like(v) for k, v in model.named_parameters()}
    x = torch.randn(4, 3)
    model(x).square().mean().backward()
    plain = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    term = proximal_term(model.named_parameters(), global_params, mu=0.0)
    assert term.item() == 0.0 and not term.requires_grad
    (model(x).square().mean() + term).backward()
    assert all(torch.equal(a, p.grad) for a, p in zip(plain, model.parameters(), strict=True))
    model.zero_grad()
    (model(x).square().mean() + proximal_term(model.named_parameters(), global_params, mu=1e-3)).backward()
    assert not all(torch.equal(a, p.grad) for a, p in zip(plain, model.parameters(), strict=True))


def test_proximal_term_errors():
    w = nn.Parameter(torch.zeros(2))
    with pytest.raises(ValueError, match=r"^Expected `mu` to be non-negative, but got -1\.$"):
        proximal_term([("w", w)], {"w": torch.zeros(2)}, mu=-1)
    with pytest.raises(KeyError, match="`w` is missing from the global parameters"):
        proximal_term([("w", w)], {}, mu=0.1)
    with pytest.raises(ValueError, match="shape"):
        proximal_term([("w", w)], {"w": torch.zeros(3)}, mu=0.1)


# ---------------------------------------------------------------- SCAFFOLD


def _local_round(x: torch.Tensor, target: torch.Tensor, c: dict, c_i: dict, steps: int, lr: float) -> torch.Tensor:
    """K SGD steps on f_i(w) = 0.5 * ||w - target||^2 with SCAFFOLD's corrected gradients."""
    w = nn.Parameter(x.clone())
    optimizer = torch.optim.SGD([w], lr=lr)
    for _ in range(steps):
        optimizer.zero_grad()
        (0.5 * (w - target).square().sum()).backward()
        scaffold_correct_gradients([("w", w)], c, c_i)
        optimizer.step()
    return w.detach()


def test_scaffold_one_round_of_two_sgd_steps_by_hand():
    x = {"w": torch.tensor([0.0, 1.0])}
    target = torch.tensor([2.0, 1.0])
    c = {"w": torch.tensor([0.5, 0.0])}
    c_i = {"w": torch.tensor([0.25, -1.0])}
    y = _local_round(x["w"], target, c, c_i, steps=2, lr=0.5)
    # coordinate 0: g = -2, g - c_i + c = -1.75, y = 0.875; g = -1.125, corrected -0.875, y = 1.3125
    # coordinate 1: g = 0, corrected 1, y = 0.5; g = -0.5, corrected 0.5, y = 0.25
    assert y.tolist() == [1.3125, 0.25]
    new_c_i, delta_c = scaffold_update_control(c_i, c, x, {"w": y}, num_steps=2, local_lr=0.5)
    # c_i+ = c_i - c + (x - y) / (K lr) with K lr = 1
    assert new_c_i["w"].tolist() == [0.25 - 0.5 - 1.3125, -1.0 - 0.0 + 0.75]
    assert delta_c["w"].tolist() == [-0.5 - 1.3125, 0.75]
    # the server, with 2 of N = 4 sites; the second site's Delta y and Delta c are given
    delta_ys = [{"w": y - x["w"]}, {"w": torch.tensor([0.5, -0.25])}]
    delta_cs = [delta_c, {"w": torch.tensor([0.25, 0.25])}]
    new_x, new_c = scaffold_server_update(x, c, delta_ys, delta_cs, num_sites_total=4, global_lr=1.0)
    assert new_x["w"].tolist() == [(1.3125 + 0.5) / 2, 1.0 + (-0.75 - 0.25) / 2]
    assert new_c["w"].tolist() == [0.5 + (-1.8125 + 0.25) / 4, 0.0 + (0.75 + 0.25) / 4]
    half, _ = scaffold_server_update(x, c, delta_ys, delta_cs, num_sites_total=4, global_lr=0.5)
    assert half["w"].tolist() == [0.453125, 0.75]


def test_scaffold_correction_only_touches_parameters_with_gradients():
    w, frozen = nn.Parameter(torch.zeros(1)), nn.Parameter(torch.zeros(1))
    w.grad = torch.tensor([1.0])
    c, c_i = {"w": torch.tensor([2.0]), "f": torch.tensor([2.0])}, {"w": torch.tensor([0.5]), "f": torch.zeros(1)}
    scaffold_correct_gradients([("w", w), ("f", frozen)], c, c_i)
    assert w.grad.tolist() == [2.5] and frozen.grad is None
    with pytest.raises(KeyError, match="site control variate"):
        scaffold_correct_gradients([("w", w)], c, {})


def test_scaffold_full_participation_keeps_c_the_mean_of_the_site_variates():
    torch.manual_seed(0)
    x = {"w": torch.randn(3)}
    c = scaffold_init_control(x)
    sites = [scaffold_init_control(x) for _ in range(3)]
    for _ in range(2):
        delta_ys, delta_cs = [], []
        for index, c_i in enumerate(sites):
            y = _local_round(x["w"], torch.full((3,), float(index)), c, c_i, steps=3, lr=0.1)
            sites[index], delta_c = scaffold_update_control(c_i, c, x, {"w": y}, num_steps=3, local_lr=0.1)
            delta_ys.append({"w": y - x["w"]})
            delta_cs.append(delta_c)
        x, c = scaffold_server_update(x, c, delta_ys, delta_cs, num_sites_total=3)
        mean = torch.stack([s["w"] for s in sites]).mean(dim=0)
        assert torch.allclose(c["w"], mean, atol=1e-6)
        assert not torch.allclose(c["w"], torch.zeros(3))


def test_scaffold_errors():
    x = {"w": torch.zeros(1)}
    with pytest.raises(ValueError, match=r"Expected `num_steps` to be a positive integer, but got 0\."):
        scaffold_update_control(x, x, x, x, num_steps=0, local_lr=0.1)
    with pytest.raises(ValueError, match=r"Expected `local_lr` to be positive, but got 0\."):
        scaffold_update_control(x, x, x, x, num_steps=1, local_lr=0)
    with pytest.raises(ValueError, match="from 3 sites, but `num_sites_total` is 2"):
        scaffold_server_update(x, x, [x] * 3, [x] * 3, num_sites_total=2)
    with pytest.raises(ValueError, match="one `delta_cs` per `delta_ys`"):
        scaffold_server_update(x, x, [x, x], [x], num_sites_total=2)
    with pytest.raises(KeyError, match=r"`delta_ys\[0\]`"):
        scaffold_server_update(x, x, [{}], [x], num_sites_total=2)


# ---------------------------------------------------------------- FedBN


class _Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.encoder = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU())
        self.block = nn.ModuleDict({"conv": nn.Conv2d(4, 4, 1), "norm": nn.GroupNorm(2, 4)})
        self.plain_instance = nn.InstanceNorm2d(4)  # no affine, no running stats: no state at all
        self.instance = nn.InstanceNorm2d(4, affine=True, track_running_stats=True)
        self.head = nn.Linear(4, 2)
        self.head_norm = nn.LayerNorm(2)


def test_normalization_keys_of_a_conv_bn_groupnorm_model():
    model = _Net()
    keys = normalization_keys(model)
    bn = {f"encoder.1.{k}" for k in ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")}
    instance = {f"instance.{k}" for k in ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")}
    assert keys == bn | instance | {"block.norm.weight", "block.norm.bias", "head_norm.weight", "head_norm.bias"}
    assert keys < set(model.state_dict())
    assert normalization_keys(nn.BatchNorm1d(3)) == {
        "weight",
        "bias",
        "running_mean",
        "running_var",
        "num_batches_tracked",
    }
    assert normalization_keys(model, extra=(nn.Linear,)) == keys | {"head.weight", "head.bias"}
    assert is_normalization_layer(nn.SyncBatchNorm(2)) and not is_normalization_layer(nn.ReLU())


def test_split_and_merge_local_state():
    torch.manual_seed(0)
    site, other = _Net(), _Net()
    local_keys = normalization_keys(site)
    shared, local = split_local(site.state_dict(), local_keys)
    assert set(local) == local_keys and not set(shared) & local_keys
    assert set(shared) | set(local) == set(site.state_dict())
    merged = merge_local(other.state_dict(), local)
    other.load_state_dict(merged)
    for key, value in other.state_dict().items():
        source = site.state_dict() if key in local_keys else merged
        assert torch.equal(value, source[key]), key
    assert not torch.equal(other.state_dict()["head.weight"], site.state_dict()["head.weight"])
    with pytest.raises(KeyError, match="not in the state"):
        split_local(shared, local_keys)
    with pytest.raises(ValueError, match="shape"):
        merge_local({"bn.w": torch.zeros(2)}, {"bn.w": torch.zeros(3)})
    with pytest.raises(ValueError, match="dtype"):
        merge_local({"bn.n": torch.tensor(1)}, {"bn.n": torch.tensor(1.0)})
