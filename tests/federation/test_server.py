"""Server steps against updates computed by hand (Reddi et al. 2021, Algorithm 2; Hsu et al. 2019)."""

from __future__ import annotations

import io

import pytest
import torch
from torch import nn

from lightning_fedseg.federation.aggregate import IncompatibleStateError, weighted_average
from lightning_fedseg.federation.server import (
    FedAdagrad,
    FedAdam,
    FedAvgM,
    FedAvgStep,
    FedYogi,
    ServerStep,
    parameter_keys,
)


def _bn_state(w: list[float], running_var: float, tracked: int) -> dict[str, torch.Tensor]:
    return {
        "w": torch.tensor(w),
        "bn.running_var": torch.tensor([running_var]),
        "bn.num_batches_tracked": torch.tensor(tracked),
    }


def test_fedadam_one_step_two_sites_by_hand():
    x = _bn_state([1.0, -2.0], running_var=1.0, tracked=0)
    y1 = _bn_state([3.0, -2.0], running_var=2.0, tracked=4)
    y2 = _bn_state([1.0, 2.0], running_var=6.0, tracked=8)
    aggregate = weighted_average([(y1, 1), (y2, 3)])  # w = [1.5, 1.0], so Delta = [0.5, 3.0]
    step = FedAdam(server_lr=0.1, beta1=0.9, beta2=0.99, tau=1e-3)
    step.setup({"w"})
    out = step.step(x, aggregate, round_idx=0)
    # m = 0.1 * Delta = [0.05, 0.3]; v = 0.99 * 1e-6 + 0.01 * Delta^2; x + 0.1 * m / (sqrt(v) + 1e-3)
    assert out["w"].tolist() == pytest.approx([1.0980201901, -1.9003327723], rel=1e-6)
    assert step.state_dict()["exp_avg"]["w"].tolist() == pytest.approx([0.05, 0.3], rel=1e-6)
    assert step.state_dict()["exp_avg_sq"]["w"].tolist() == pytest.approx([0.99e-6 + 0.0025, 0.99e-6 + 0.09], rel=1e-6)
    # buffers come from the aggregate, not through the optimizer: (2 * 1 + 6 * 3) / 4 and round((4 + 24) / 4)
    assert out["bn.running_var"].item() == 5.0
    assert out["bn.num_batches_tracked"].item() == 7
    assert out["bn.num_batches_tracked"].dtype == torch.int64
    assert set(step.state_dict()["exp_avg"]) == {"w"}


def test_fedyogi_sign_rule():
    step = FedYogi(server_lr=1.0, beta1=0.0, beta2=0.99, tau=1.0)  # v_{-1} = tau^2 = 1
    step.setup({"w"})
    out = step.step({"w": torch.zeros(3)}, {"w": torch.tensor([0.5, 2.0, 1.0])}, round_idx=0)
    v = step.state_dict()["exp_avg_sq"]["w"]
    # Delta^2 = [0.25, 4, 1]: sign(1 - 0.25) = +1 shrinks v, sign(1 - 4) = -1 grows it, sign(0) = 0 keeps it
    assert v.tolist() == pytest.approx([1 - 0.01 * 0.25, 1 + 0.01 * 4, 1.0], rel=1e-6)
    # FedAdam would give 0.99 + 0.01 * Delta^2 = [0.9925, 1.03, 1.0] instead
    assert v[0].item() != pytest.approx(0.9925, rel=1e-6)
    expected = [0.5 / (0.9975**0.5 + 1), 2.0 / (1.04**0.5 + 1), 1.0 / 2]
    assert out["w"].tolist() == pytest.approx(expected, rel=1e-6)


def test_fedadagrad_accumulates_over_two_rounds():
    step = FedAdagrad(server_lr=1.0, beta1=0.9, tau=0.5)  # v_{-1} = 0.25
    step.setup({"w"})
    out = step.step({"w": torch.tensor([0.0])}, {"w": torch.tensor([1.0])}, round_idx=0)
    # m = 0.1, v = 0.25 + 1 = 1.25
    assert out["w"].item() == pytest.approx(0.1 / (1.25**0.5 + 0.5), rel=1e-6)
    out = step.step({"w": torch.tensor([1.0])}, {"w": torch.tensor([3.0])}, round_idx=1)
    # Delta = 2: m = 0.9 * 0.1 + 0.1 * 2 = 0.29, v = 1.25 + 4 = 5.25
    assert step.state_dict()["exp_avg_sq"]["w"].item() == pytest.approx(5.25, rel=1e-6)
    assert out["w"].item() == pytest.approx(1.1038946952, rel=1e-6)


def test_fedavgm_momentum_over_two_rounds():
    step = FedAvgM(server_lr=0.5, momentum=0.5)
    step.setup({"w"})
    out = step.step({"w": torch.tensor([1.0])}, {"w": torch.tensor([3.0])}, round_idx=0)
    assert out["w"].item() == 2.0  # Delta = 2, m = 2, 1 + 0.5 * 2
    out = step.step({"w": torch.tensor([2.0])}, {"w": torch.tensor([2.5])}, round_idx=1)
    assert out["w"].item() == 2.75  # Delta = 0.5, m = 0.5 * 2 + 0.5 = 1.5, 2 + 0.5 * 1.5 (2.25 without momentum)
    assert step.state_dict()["momentum_buffer"]["w"].item() == 1.5


def test_fedavgm_without_momentum_is_fedavg_bit_for_bit():
    torch.manual_seed(0)
    x = {
        "w": torch.tensor([1e8, -3e-7, 0.1, 7.0]),
        "h": torch.randn(5).half(),
        "d": torch.randn(3, dtype=torch.float64),
        "n": torch.tensor(3),
    }
    agg = {"w": torch.tensor([1.0, 2e7, 0.3, -0.0]), "h": torch.randn(5).half(), "d": torch.randn(3).double()}
    agg["n"] = torch.tensor(5)
    assert not torch.equal(x["w"] + (agg["w"] - x["w"]), agg["w"])  # the naive x + (agg - x) would differ
    step = FedAvgM(server_lr=1.0, momentum=0.0)
    step.setup({"w", "h", "d"})
    reference = FedAvgStep().step(x, agg, round_idx=0)
    for round_idx in range(2):
        out = step.step(x, agg, round_idx)
        assert set(out) == set(reference)
        for key in reference:
            assert out[key].dtype == reference[key].dtype
            assert torch.equal(out[key], reference[key]), key
    assert step.state_dict()["momentum_buffer"] == {}


@pytest.mark.parametrize(
    "make", [lambda: FedAdam(0.1), lambda: FedYogi(0.1), lambda: FedAdagrad(0.1), lambda: FedAvgM(0.7, 0.9)]
)
def test_state_dict_round_trip_resumes_identically(make):
    torch.manual_seed(1)
    states = [{"w": torch.randn(4), "b": torch.randn(2), "bn.running_mean": torch.randn(2)} for _ in range(4)]
    step = make()
    step.setup({"w", "b"})
    global_state = states[0]
    for round_idx in range(2):
        global_state = step.step(global_state, states[round_idx + 1], round_idx)
    buffer = io.BytesIO()
    torch.save(step.state_dict(), buffer)  # as a Lightning checkpoint would
    saved = {
        k: ({kk: vv.clone() for kk, vv in v.items()} if isinstance(v, dict) else v)
        for k, v in step.state_dict().items()
    }
    buffer.seek(0)
    resumed = make()
    resumed.setup({"w", "b"})
    resumed.load_state_dict(torch.load(buffer, weights_only=True))
    expected = step.step(global_state, states[3], round_idx=2)
    got = resumed.step(global_state, states[3], round_idx=2)
    for key in expected:
        assert torch.equal(expected[key], got[key])
    assert resumed.num_steps == 3
    for name, value in saved.items():  # out-of-place updates: an earlier state_dict is never modified
        if isinstance(value, dict):
            assert value and all(not torch.equal(value[k], step.state_dict()[name][k]) for k in value)


def test_state_dict_holds_only_tensors_and_numbers():
    step = FedAdam()
    step.setup({"w"})
    step.step({"w": torch.zeros(2)}, {"w": torch.ones(2)}, round_idx=0)
    for value in step.state_dict().values():
        assert isinstance(value, int) or all(isinstance(t, torch.Tensor) for t in value.values())


def test_half_precision_parameters_keep_float32_state():
    step = FedAdam(server_lr=0.1)
    step.setup({"w"})
    out = step.step({"w": torch.zeros(2, dtype=torch.bfloat16)}, {"w": torch.ones(2, dtype=torch.bfloat16)}, 0)
    assert out["w"].dtype == torch.bfloat16
    assert step.state_dict()["exp_avg_sq"]["w"].dtype == torch.float32
    step = FedAdam()
    step.setup({"w"})
    step.step({"w": torch.zeros(2, dtype=torch.float64)}, {"w": torch.ones(2, dtype=torch.float64)}, 0)
    assert step.state_dict()["exp_avg"]["w"].dtype == torch.float64


def test_parameter_keys_of_a_model():
    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2))
    assert parameter_keys(model) == {"0.weight", "0.bias", "1.weight", "1.bias"}
    assert parameter_keys(model) < set(model.state_dict())


def test_default_step_from_sites_is_the_weighted_mean():
    a, b = {"w": torch.tensor([0.0])}, {"w": torch.tensor([4.0])}
    out = FedAvgStep().step_from_sites({"w": torch.tensor([9.0])}, [a, b], [3, 1], round_idx=0)
    assert out["w"].item() == 1.0
    assert not FedAvgStep.needs_site_states
    with pytest.raises(ValueError, match="one weight per site"):
        FedAvgStep().step_from_sites(a, [a, b], [1], round_idx=0)


def test_argument_errors():
    with pytest.raises(ValueError, match=r"^Expected `server_lr` to be positive, but got 0\.$"):
        FedAvgM(server_lr=0)
    with pytest.raises(ValueError, match=r"Expected `momentum` to be in \[0, 1\), but got 1"):
        FedAvgM(momentum=1)
    with pytest.raises(ValueError, match="`beta2`"):
        FedAdam(beta2=-0.1)
    with pytest.raises(ValueError, match="`tau`"):
        FedYogi(tau=0.0)
    with pytest.raises(ValueError, match="`server_lr`"):
        FedAdagrad(server_lr=float("nan"))


def test_step_errors():
    state = {"w": torch.zeros(2), "n": torch.tensor(1)}
    with pytest.raises(RuntimeError, match=r"setup\(param_keys\)"):
        FedAdam().step(state, state, 0)
    step = FedAdam()
    step.setup({"n"})
    with pytest.raises(TypeError, match="not floating point"):
        step.step(state, state, 0)
    step.setup({"w", "missing"})
    with pytest.raises(KeyError, match="missing"):
        step.step(state, state, 0)
    step.setup({"w"})
    with pytest.raises(IncompatibleStateError, match="shape"):
        step.step(state, {"w": torch.zeros(3), "n": torch.tensor(1)}, 0)
    with pytest.raises(KeyError, match="exp_avg_sq"):
        step.load_state_dict({"num_steps": 0, "exp_avg": {}})
    with pytest.raises(TypeError):
        ServerStep()  # type: ignore[abstract]
