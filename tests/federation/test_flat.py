"""The fused state operations against their tensor-by-tensor definitions."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lightning_fedseg import BrainTumorSegmentation
from lightning_fedseg.federation.aggregate import (
    IncompatibleStateError,
    NonFiniteStateError,
    WeightedMean,
    check_finite,
)
from lightning_fedseg.federation.flat import (
    FlatLayout,
    add_scaled,
    all_finite,
    block_buffer,
    divide_into,
    first_nonfinite,
    load_by_copy,
    loads_by_copy,
)

DEVICES = [
    "cpu",
    pytest.param(
        "cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]
    ),
]


def _state(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "conv.weight": torch.randn(4, 3, 3, 3, generator=g),
        "bn.running_mean": torch.randn(4, generator=g),
        "bn.num_batches_tracked": torch.tensor(seed + 3),
        "head.weight": torch.randn(2, 4, generator=g, dtype=torch.float64),
        "half": torch.randn(5, generator=g).half(),
        "flag": torch.tensor(True),
    }


def test_layout_groups_by_dtype_and_views_round_trip():
    state = _state(0)
    layout = FlatLayout(state)
    assert set(layout.groups) == {torch.float32, torch.float64, torch.float16, torch.int64, torch.bool}
    assert layout.groups[torch.int64] == ("bn.num_batches_tracked",) and layout.matches(state)
    assert not layout.matches({**state, "flag": torch.tensor([True, False])})
    buffers = layout.buffers()
    views = layout.views(buffers)
    layout.gather(state, views)
    assert buffers[torch.float32].numel() == 4 * 27 + 4
    for key, view in views.items():
        assert torch.equal(view, state[key]) and view.dtype == state[key].dtype


def test_flat_mean_equals_the_per_tensor_float64_mean():
    """Bit for bit for float32 and float16 tensors (with integer weights every product is exact in
    float64); float64 tensors to an ulp (the fused add may round ``sum + w * x`` once, not twice)."""
    states = [_state(i) for i in range(5)]
    weights = [70.0, 27.0, 17.0, 3.0, 1.0]
    acc = WeightedMean()
    for i, (s, w) in enumerate(zip(states, weights, strict=True)):
        acc.add(s, w, site=str(i))
    out = acc.compute()
    total = sum(weights)
    for key, ref in states[0].items():
        if ref.is_floating_point():
            expected = sum(s[key].double() * w for s, w in zip(states, weights, strict=True))
            if ref.dtype == torch.float64:
                torch.testing.assert_close(out[key], expected / total, rtol=1e-15, atol=0)
            else:
                assert torch.equal(out[key], (expected / total).to(ref.dtype)), key
    assert out["bn.num_batches_tracked"].item() == round(sum((i + 3) * w for i, w in enumerate(weights)) / total)
    assert out["flag"].item() is True


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.float64])
def test_blocked_division_equals_the_whole_tensor_division_bit_for_bit(dtype):
    """Through a 7-element block (the last block partial), dividing a float64 sum into the model's
    dtype gives exactly what one whole-tensor division and cast gives."""
    g = torch.Generator().manual_seed(0)
    total = torch.randn(5, 9, generator=g, dtype=torch.float64) * 100
    out = torch.empty(5, 9, dtype=dtype)
    divided = divide_into(total, 3.1, out, torch.empty(7, dtype=torch.float64))
    assert divided is out and torch.equal(out, (total / 3.1).to(dtype))


@pytest.mark.parametrize("block", [None, 7], ids=["whole", "blocked"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.int64])
def test_scaled_add_equals_the_float64_add_of_the_cast_operand_bit_for_bit(dtype, block):
    """With a weight that is not exact in float32, ``acc = w * x`` then ``acc += w * y`` (through a
    7-element block, the last one partial, or whole) is what the same float64 operations on
    ``x.double()`` and ``y.double()`` give: the product is never formed in the operand's dtype."""
    g = torch.Generator().manual_seed(1)
    x, y = ((torch.randn(45, generator=g) * 100).to(dtype) for _ in range(2))
    buffer = None if block is None else torch.empty(block, dtype=torch.float64)
    acc = torch.full((45,), float("nan"), dtype=torch.float64)
    assert add_scaled(acc, x, 1234.567, buffer, overwrite=True) is acc
    assert torch.equal(acc, x.double() * 1234.567)
    add_scaled(acc, y, 0.1, buffer)
    assert torch.equal(acc, (x.double() * 1234.567).add_(y.double(), alpha=0.1))


def test_the_cast_buffer_is_only_made_on_a_cpu():
    assert block_buffer(torch.zeros(1)).dtype == torch.float64
    assert block_buffer(torch.zeros(1, device="meta")) is None


@pytest.mark.parametrize("device", DEVICES)
def test_the_running_sum_lives_on_the_device_of_the_states(device):
    """A model on a GPU is averaged on that GPU, to the same mean as on the CPU."""
    states = [{k: v for k, v in _state(i).items() if k != "half"} for i in range(3)]
    on_cpu, on_device = WeightedMean(), WeightedMean()
    for i, state in enumerate(states):
        on_cpu.add(state, float(i + 1), site=str(i))
        on_device.add({k: v.to(device) for k, v in state.items()}, float(i + 1), site=str(i))
    sums, _ = on_device.sums()
    assert {v.device.type for v in sums.values()} == {device}
    for key, value in on_device.compute().items():
        assert value.device.type == device
        torch.testing.assert_close(value.cpu(), on_cpu.compute()[key])  # a GPU may fuse multiply-adds


def test_a_reset_accumulator_reuses_its_buffers_and_equals_a_fresh_one():
    """The engine keeps one accumulator for the whole fit: the next round's first state overwrites
    the buffers (no zeroing, no allocation), and a state of another layout rebuilds them."""
    reused = WeightedMean()
    for i in range(3):
        reused.add(_state(i), float(i + 1), site=str(i))
    pointers = {dtype: acc.data_ptr() for dtype, acc in reused._acc.items()}
    reused.reset()
    assert len(reused) == 0 and reused.sums() == ({}, 0.0)
    fresh = WeightedMean()
    for i in (5, 6):
        reused.add(_state(i), float(i), site=str(i))
        fresh.add(_state(i), float(i), site=str(i))
    assert {dtype: acc.data_ptr() for dtype, acc in reused._acc.items()} == pointers
    for key, value in fresh.compute().items():
        assert torch.equal(reused.compute()[key], value), key
    reused.reset()
    reused.add({"w": torch.ones(3)}, 2.0, site="other layout")
    assert reused.compute()["w"].tolist() == [1.0, 1.0, 1.0]


def test_a_refused_state_leaves_the_running_sum_as_it_was():
    acc = WeightedMean()
    acc.add(_state(0), 2.0, site="a")
    before = {k: v.clone() for k, v in acc.sums()[0].items()}
    bad = _state(1)
    bad["head.weight"][1, 2] = float("nan")
    with pytest.raises(NonFiniteStateError, match=r"Site 'b'.*`head.weight`"):
        acc.add(bad, 1.0, site="b")
    flipped = _state(2)
    flipped["flag"] = torch.tensor(False)
    with pytest.raises(IncompatibleStateError, match="boolean buffer `flag` differs"):
        acc.add(flipped, 1.0, site="c")
    after, total = acc.sums()
    assert total == 2.0 and acc.sites == ["a"]
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_huge_finite_values_overflowing_the_fused_sum_are_still_accepted():
    big = {"w": torch.full((8,), 3e38), "v": torch.ones(2)}
    assert not all_finite(big["w"])  # the one reduction overflows: only a hint
    assert first_nonfinite(big) is None
    check_finite(big, "a")
    acc = WeightedMean()
    acc.add(big, 1.0, site="a")
    assert torch.equal(acc.compute()["w"], big["w"])


def test_a_half_precision_sum_beyond_its_range_is_decided_in_float32():
    """Four float16 values of 60000 sum to 240000, beyond float16's 65504: the one reduction is
    taken in float32, so a finite half state is decided finite without the tensor-by-tensor look."""
    assert all_finite(torch.full((4,), 60000.0, dtype=torch.float16))
    assert not all_finite(torch.tensor([1.0, float("inf")], dtype=torch.float16))
    assert not all_finite(torch.tensor([1.0, float("nan")], dtype=torch.bfloat16))


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_first_nonfinite_names_the_tensor(bad):
    state = _state(0)
    state["half"][3] = bad
    assert first_nonfinite(state) == "half"
    with pytest.raises(NonFiniteStateError, match="`half`"):
        check_finite(state, "x")


def test_load_by_copy_equals_load_state_dict_for_the_segmentation_module():
    kwargs = {"arch": "unet", "encoder_name": "tu-resnet10t", "encoder_depth": 3, "decoder_channels": [8, 8, 8]}
    module = BrainTumorSegmentation(**kwargs)
    assert loads_by_copy(module)  # so the fast path is the one the engine takes for it
    other = BrainTumorSegmentation(**kwargs)
    for p in other.parameters():
        p.data.normal_()
    state = {k: v.clone() for k, v in other.state_dict().items()}
    params = list(module.parameters())
    load_by_copy(module, module.state_dict(keep_vars=True), state)
    assert all(torch.equal(v, state[k]) for k, v in module.state_dict().items())
    assert list(module.parameters()) == params  # the same Parameter objects: optimizers still hold them


class _Hooked(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(2, 2)
        self._register_load_state_dict_pre_hook(self._double)

    @staticmethod
    def _double(state, prefix, *args):
        state[prefix + "lin.bias"] = state[prefix + "lin.bias"] * 2


class _CustomLoad(nn.Linear):
    def _load_from_state_dict(self, state_dict, prefix, *args):
        state_dict = {k: v + 1 for k, v in state_dict.items()}
        super()._load_from_state_dict(state_dict, prefix, *args)


def test_modules_whose_loading_is_not_a_copy_keep_load_state_dict():
    for module in (_Hooked(), nn.Sequential(_CustomLoad(2, 2))):
        assert not loads_by_copy(module)
        state = {k: torch.ones_like(v) for k, v in module.state_dict().items()}
        reference = type(module)() if isinstance(module, _Hooked) else nn.Sequential(_CustomLoad(2, 2))
        reference.load_state_dict(state)
        load_by_copy(module, None, state)  # the engine passes no live tensors for such a module
        pairs = zip(module.state_dict().values(), reference.state_dict().values(), strict=True)
        assert all(torch.equal(a, b) for a, b in pairs)


def test_load_by_copy_falls_back_when_keys_or_shapes_differ():
    module = nn.Linear(2, 2)
    live = module.state_dict(keep_vars=True)
    with pytest.raises(RuntimeError, match="size mismatch"):
        load_by_copy(module, live, {"weight": torch.zeros(3, 2), "bias": torch.zeros(2)})
    with pytest.raises(RuntimeError, match="Missing key"):
        load_by_copy(module, live, {"weight": torch.zeros(2, 2)})
