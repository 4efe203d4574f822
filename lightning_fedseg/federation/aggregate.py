"""Aggregation of model states: pure functions over state dicts, no Lightning.

The federated average of Sheller et al. (and of FedAvg, McMahan et al. 2017) weights each site's
state by its number of training samples. States are checked before they are combined: the same
keys, shapes and dtypes as the reference, finite values, a positive finite weight. The running
accumulator keeps one float64 sum the size of the model, so memory does not grow with the number of
sites.

Integer buffers (BatchNorm's ``num_batches_tracked``) cannot be averaged as floats and stay
integers: they get the weighted mean rounded to the nearest integer (``integer_policy="mean"``) or
the maximum over sites (``"max"``). Boolean buffers must agree across sites.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from enum import StrEnum

import torch
from torch import Tensor

from lightning_fedseg.federation.flat import (
    FlatLayout,
    add_scaled,
    all_finite,
    block_buffer,
    divide_into,
    first_nonfinite,
    flat_span,
)

__all__ = [
    "IncompatibleStateError",
    "IntegerPolicy",
    "NonFiniteStateError",
    "WeightedMean",
    "check_compatible",
    "check_finite",
    "state_clone",
    "state_to_cpu",
    "weighted_average",
]

State = Mapping[str, Tensor]


class IntegerPolicy(StrEnum):
    """How integer buffers are combined."""

    MEAN = "mean"
    MAX = "max"


class IncompatibleStateError(ValueError):
    """A site's state does not match the global model's keys, shapes or dtypes."""


class NonFiniteStateError(ValueError):
    """A site's state holds NaN or Inf values."""

    def __init__(self, site: str, tensor: str) -> None:
        super().__init__(f"Site {site!r} returned non-finite values (NaN or Inf) in `{tensor}`.")
        self.site = site
        self.tensor = tensor


def state_to_cpu(state: State) -> dict[str, Tensor]:
    """Detached CPU copies of every tensor of ``state`` (never views of the live model)."""
    return {k: v.detach().to("cpu", copy=True) for k, v in state.items()}


def state_clone(state: State) -> dict[str, Tensor]:
    """Detached copies of every tensor of ``state`` on its own device (never views of the live model)."""
    return {k: v.detach().clone() for k, v in state.items()}


def check_compatible(reference: State, state: State, site: str) -> None:
    """Raise :class:`IncompatibleStateError` unless ``state`` has the keys, shapes, dtypes of ``reference``.

    Example:
        >>> ref = {"w": torch.zeros(2)}
        >>> check_compatible(ref, {"w": torch.ones(2)}, site="a")
        >>> try:
        ...     check_compatible(ref, {"w": torch.ones(3)}, site="b")
        ... except IncompatibleStateError as err:
        ...     print(err)
        Site 'b': `w` has shape (3,), expected (2,).
    """
    missing = sorted(set(reference) - set(state))
    unexpected = sorted(set(state) - set(reference))
    if missing or unexpected:
        raise IncompatibleStateError(
            f"Site {site!r}: state keys differ from the global model's"
            f" (missing: {missing or 'none'}; unexpected: {unexpected or 'none'})."
        )
    for key, ref in reference.items():
        value = state[key]
        if value.shape != ref.shape:
            raise IncompatibleStateError(
                f"Site {site!r}: `{key}` has shape {tuple(value.shape)}, expected {tuple(ref.shape)}."
            )
        if value.dtype != ref.dtype:
            raise IncompatibleStateError(f"Site {site!r}: `{key}` has dtype {value.dtype}, expected {ref.dtype}.")


def check_finite(state: State, site: str) -> None:
    """Raise :class:`NonFiniteStateError` naming the first floating tensor holding NaN or Inf
    (one fused reduction decides; see :func:`~lightning_fedseg.federation.flat.first_nonfinite`)."""
    key = first_nonfinite(state)
    if key is not None:
        raise NonFiniteStateError(site, key)


def _check_weight(weight: float, site: str) -> float:
    weight = float(weight)
    if not (weight > 0 and weight != float("inf")):
        raise ValueError(f"Expected the weight of site {site!r} to be positive and finite, got {weight}.")
    return weight


class WeightedMean:
    """Running weighted mean of state dicts: ``sum_i w_i * state_i / sum_i w_i``.

    Add one site at a time; only one float64 sum (plus one integer maximum where asked) is held.
    Tensors are kept as one flat buffer per dtype (:class:`.FlatLayout`) on the device of the first
    state added: each site's state is copied into a flat staging buffer of its own dtype (one fused
    copy per dtype), checked for finiteness by one reduction over it, and added to the float64 sum
    times its weight (:func:`.add_scaled`: on a CPU cast block by block through one reused buffer,
    since a mixed-dtype ``add_`` would first copy the whole operand to float64).

    Example:
        >>> acc = WeightedMean()
        >>> acc.add({"w": torch.tensor([1.0, 3.0])}, weight=1, site="a")
        >>> acc.add({"w": torch.tensor([4.0, 0.0])}, weight=2, site="b")
        >>> acc.compute()["w"].tolist()  # (1*1 + 4*2) / 3, (3*1 + 0*2) / 3
        [3.0, 1.0]
    """

    def __init__(self, integer_policy: IntegerPolicy | str = IntegerPolicy.MEAN) -> None:
        self.integer_policy = IntegerPolicy(integer_policy)
        self._reference: dict[str, Tensor] | None = None
        self._layout: FlatLayout | None = None
        self._stage: dict[torch.dtype, Tensor] = {}  # one site's tensors, flat, in their own dtypes
        self._block: Tensor | None = None  # the float64 cast buffer of add_scaled and divide_into (CPU)
        self._stage_views: dict[str, Tensor] = {}
        self._acc: dict[torch.dtype, Tensor] = {}  # float64 sums; own-dtype maxima and booleans
        self.reset()

    def reset(self) -> None:
        """Forget every site added; the buffers are kept for the next round's states of the same
        layout (the first state added overwrites them: nothing is zeroed or allocated again)."""
        self.total_weight = 0.0
        self.sites: list[str] = []

    def __len__(self) -> int:
        return len(self.sites)

    def _summed(self, dtype: torch.dtype) -> bool:
        """Whether a dtype group is summed in float64 (else kept: booleans, integer maxima)."""
        return dtype.is_floating_point or (dtype != torch.bool and self.integer_policy is IntegerPolicy.MEAN)

    def _start(self, state: State) -> FlatLayout:
        """Build the layout and buffers of ``state`` (the first state, or one of a new layout)."""
        self._reference = {k: torch.empty(v.shape, dtype=v.dtype, device="meta") for k, v in state.items()}
        layout = self._layout = FlatLayout(state)
        device = next(iter(state.values())).device if state else torch.device("cpu")
        self._stage = {dtype: torch.zeros(layout.numel(dtype), dtype=dtype, device=device) for dtype in layout.groups}
        self._block = block_buffer(torch.empty(0, device=device))
        self._stage_views = layout.views(self._stage)
        self._acc = {}
        return layout

    def add(self, state: State, weight: float, site: str) -> None:
        """Check ``state`` (keys, shapes, dtypes, finiteness, agreeing booleans) and add
        ``weight * state`` to the running sum; a refused state leaves the sum as it was."""
        weight = _check_weight(weight, site)
        layout = self._layout
        if layout is None or (not self.sites and not layout.matches(state)):
            layout = self._start(state)
        assert self._reference is not None
        if not layout.matches(state):
            check_compatible(self._reference, state, site)  # names the difference
            state = {k: state[k] for k in layout.keys}  # the same tensors in the reference's order
        layout.gather(state, self._stage_views)
        if not all(all_finite(flat) for dtype, flat in self._stage.items() if dtype.is_floating_point):
            check_finite(state, site)  # names the tensor (a sum can overflow where no value is Inf)
        for dtype, staged in self._stage.items():
            if dtype == torch.bool and self.sites and not torch.equal(self._acc[dtype], staged):
                keys = layout.groups[dtype]
                key = next(k for k in keys if not torch.equal(state[k].to(staged.device), self._bool(k)))
                raise IncompatibleStateError(f"Site {site!r}: boolean buffer `{key}` differs between sites.")
        first = not self.sites
        for dtype, staged in self._stage.items():
            acc = self._acc.get(dtype)
            if acc is None:
                acc = self._acc[dtype] = torch.empty_like(staged, dtype=torch.float64 if self._summed(dtype) else dtype)
            if self._summed(dtype):
                add_scaled(acc, staged, weight, self._block, overwrite=first)
            elif first:  # booleans, integer maxima
                acc.copy_(staged)
            elif dtype != torch.bool:
                torch.maximum(acc, staged, out=acc)
        self.total_weight += weight
        self.sites.append(site)

    def _bool(self, key: str) -> Tensor:
        assert self._layout is not None
        return self._layout.views({torch.bool: self._acc[torch.bool]})[key]

    def sums(self) -> tuple[dict[str, Tensor], float]:
        """The raw weighted sums (views of the flat buffers) and total weight (what a distributed
        all-reduce adds up); empty before the first site."""
        if self._layout is None or not self.sites:
            return {}, self.total_weight
        views = self._layout.views(self._acc)
        return {k: views[k] for k in self._layout.keys}, self.total_weight

    def compute(self) -> dict[str, Tensor]:
        """The weighted mean, in each tensor's original dtype (one division per dtype group)."""
        if self._layout is None or not self.sites:
            raise ValueError("Cannot average zero sites: no state was added.")
        means = {}
        for dtype, acc in self._acc.items():
            if dtype.is_floating_point:  # divided in float64, rounded once
                out = torch.empty(acc.numel(), dtype=dtype, device=acc.device)
                means[dtype] = divide_into(acc, self.total_weight, out, self._block)
            elif self._summed(dtype):
                means[dtype] = torch.round(acc / self.total_weight).to(dtype)
            else:
                means[dtype] = acc.clone()
        views = self._layout.views(means)
        return {k: views[k] for k in self._layout.keys}


def finalize_mean(
    sums: Mapping[str, Tensor],
    total_weight: float,
    reference: State,
    integer_policy: IntegerPolicy | str = IntegerPolicy.MEAN,
) -> dict[str, Tensor]:
    """Divide weighted sums by the total weight and cast back to each reference tensor's dtype.

    The floating tensors of one dtype whose sums tile one flat buffer (the views
    :meth:`WeightedMean.sums` returns) are divided in one pass into one flat output, of which the
    means are views; other sums are divided tensor by tensor, with the same result.
    """
    policy = IntegerPolicy(integer_policy)
    out: dict[str, Tensor] = {}
    block: Tensor | None = None
    floating: dict[torch.dtype, list[str]] = {}
    for key, ref in reference.items():
        value = sums[key]
        if ref.dtype == torch.bool or (not ref.is_floating_point() and policy is IntegerPolicy.MAX):
            out[key] = value.to(ref.dtype)
        elif ref.is_floating_point():
            floating.setdefault(ref.dtype, []).append(key)
        else:
            out[key] = torch.round(value / total_weight).to(ref.dtype)
    for dtype, keys in floating.items():
        ordered = sorted(keys, key=lambda k: sums[k].storage_offset())
        span = flat_span([sums[k] for k in ordered])
        pieces = [(ordered, span)] if span is not None else [([k], sums[k]) for k in keys]
        for group, value in pieces:
            if block is None and value.dtype != dtype:
                block = block_buffer(value, value.dtype)
            mean = divide_into(value, total_weight, torch.empty(value.numel(), dtype=dtype, device=value.device), block)
            for key, part in zip(group, mean.split([sums[k].numel() for k in group]), strict=True):
                shape = reference[key].shape
                out[key] = part if len(shape) == 1 else part.view(shape)  # a split is already 1-D
    return {key: out[key] for key in reference}


def weighted_average(
    results: Iterable[tuple[State, float]] | Sequence[tuple[State, float]],
    integer_policy: IntegerPolicy | str = IntegerPolicy.MEAN,
) -> dict[str, Tensor]:
    """Flower-style aggregate: ``[(state, n_examples), ...] -> weighted mean state``.

    Example:
        >>> a = {"w": torch.tensor([0.0]), "n": torch.tensor(2)}
        >>> b = {"w": torch.tensor([3.0]), "n": torch.tensor(5)}
        >>> out = weighted_average([(a, 1), (b, 2)])
        >>> out["w"].item(), out["n"].item()  # (0*1 + 3*2) / 3 = 2; round((2*1 + 5*2) / 3) = 4
        (2.0, 4)
    """
    acc = WeightedMean(integer_policy)
    for index, (state, weight) in enumerate(results):
        acc.add(state, weight, site=f"result{index}")
    return acc.compute()
