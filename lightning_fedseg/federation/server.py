"""Server steps: how the global model moves once a round's site states are in. Pure, no Lightning.

The round engine computes the sample-weighted FedAvg mean of the round's site states (the
*aggregate*, possibly after an all-reduce) and hands it to a :class:`ServerStep` together with the
round's global state. With the notation of ``ALGORITHMS.md`` the pseudo-gradient is
``Delta_t = aggregate - x_t``: FedAvg takes ``x_{t+1} = x_t + Delta_t`` (the aggregate itself);
the server optimizers of Reddi et al. (ICLR 2021, "Adaptive Federated Optimization", Algorithm 2)
and FedAvgM (Hsu et al. 2019, "Measuring the Effects of Non-Identical Data Distribution") apply
momentum and adaptive step sizes to ``Delta_t``.

Decisions, the same for every step here:

* **Parameters vs buffers.** Only the keys named by :meth:`ServerStep.setup` (``param_keys``,
  e.g. :func:`parameter_keys` of the model) go through the server optimizer. Every other key
  (BatchNorm ``running_mean``/``running_var``, ``num_batches_tracked``) is taken from the aggregate
  as it is: running statistics are statistics of the data, not a descent direction, and momentum
  or an adaptive step on them would give a variance estimate no site ever measured. Integer
  buffers come from the aggregate too (the engine's integer policy has already been applied).
* **Dtypes.** The optimizer state (``m``, ``v``) and the arithmetic use the parameter's dtype
  promoted to at least float32 (float32 for float32/float16/bfloat16 parameters, float64 for
  float64 ones); the result is cast back to the parameter's dtype. float32 keeps ``v`` (which
  starts at ``tau**2``) well inside its range at half the memory of float64.
* **Checkpoints.** :meth:`ServerStep.state_dict` holds only tensors (in dicts keyed by state key)
  and plain numbers. Updates are out of place, so a returned state dict is never modified by
  later steps.
* Inputs are never modified; the returned dict may share tensors with ``aggregate_state``.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from lightning_fedseg.federation.aggregate import IntegerPolicy, check_compatible, weighted_average
from lightning_fedseg.federation.aggregators import Aggregator, MeanAggregator, SiteStatesAggregator

__all__ = [
    "FedAdagrad",
    "FedAdam",
    "FedAvgM",
    "FedAvgStep",
    "FedYogi",
    "ServerStep",
    "parameter_keys",
]

State = Mapping[str, Tensor]


def parameter_keys(module: nn.Module) -> set[str]:
    """The state-dict keys of ``module`` that are parameters (tied parameters under every name).

    Example:
        >>> sorted(parameter_keys(nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2))))
        ['0.bias', '0.weight', '1.bias', '1.weight']
    """
    return {name for name, _ in module.named_parameters(remove_duplicate=False)}


def _check_fraction(name: str, value: float) -> float:
    if not (isinstance(value, int | float) and 0.0 <= value < 1.0):
        raise ValueError(f"Expected `{name}` to be in [0, 1), but got {value!r}.")
    return float(value)


def _check_positive(name: str, value: float) -> float:
    if not (isinstance(value, int | float) and value > 0 and math.isfinite(value)):
        raise ValueError(f"Expected `{name}` to be positive, but got {value!r}.")
    return float(value)


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.promote_types(dtype, torch.float32)


class ServerStep(ABC):
    """Base class: one server update per round, ``step(global, aggregate, round) -> new global``.

    How the round's site results reach the step is the step's :meth:`aggregator`: by default the
    running weighted mean (then :meth:`step`), or, for steps with ``needs_site_states = True``
    (robust aggregation), every site's own state (then :meth:`step_from_sites`).
    """

    needs_site_states: ClassVar[bool] = False
    needs_mean_rounds: ClassVar[bool] = True
    """Whether the step needs rounds in which every site starts from the same global weights (``fedavg``)."""
    differentially_private: ClassVar[bool] = False
    """Whether the step releases a differentially private aggregate (per-site sums that bypass it are refused)."""

    def __init__(self) -> None:
        self.param_keys: frozenset[str] | None = None

    def setup(self, param_keys: Iterable[str]) -> None:
        """Name the state-dict keys that are parameters (called once the model is known).

        Keys not named here are buffers and are taken from the aggregate unchanged.
        """
        self.param_keys = frozenset(param_keys)

    def setup_federation(  # noqa: B027 (no precondition by default)
        self, num_sites: int, sample_rate: float, sites_per_round: int, sites: Sequence[str] = ()
    ) -> None:
        """Check preconditions that depend on the federation, once its sites are known and before
        any site trains: ``num_sites`` sites (named ``sites``, in order), a fraction ``sample_rate``
        of them (``sites_per_round``) planned per round. Does nothing by default.

        Raise ``ValueError`` naming the argument (e.g. Krum's ``n > 2f + 2``) where they fail.
        """

    @abstractmethod
    def step(self, global_state: State, aggregate_state: State, round_idx: int) -> dict[str, Tensor]:
        """The global state of round ``round_idx + 1`` from round ``round_idx``'s global and aggregate."""

    def step_from_sites(
        self,
        global_state: State,
        site_states: Sequence[State],
        weights: Sequence[float],
        round_idx: int,
        sites: Sequence[str] = (),
    ) -> dict[str, Tensor]:
        """The same step from every site's state: the weighted mean, then :meth:`step`.

        ``sites`` names the site of each state (in the federation's site order; empty where unknown).
        """
        if len(site_states) != len(weights) or not site_states:
            raise ValueError(
                f"Expected one weight per site state and at least one site, but got {len(site_states)} states"
                f" and {len(weights)} weights."
            )
        return self.step(global_state, weighted_average(zip(site_states, weights, strict=True)), round_idx)

    def aggregator(self, integer_policy: IntegerPolicy | str, masked: bool, site_names: Sequence[str]) -> Aggregator:
        """How this step collects a round's site results (made once per fit; see :mod:`.aggregators`).

        Args:
            integer_policy: how integer buffers combine in a mean.
            masked: whether each process's sum is pairwise-masked before it is added up.
            site_names: the federation's sites, in order.
        """
        if self.needs_site_states:
            return SiteStatesAggregator(self, tuple(site_names))
        return MeanAggregator(self, integer_policy, masked)

    def stop_reason(self) -> str | None:
        """Why the federation must stop after this round (e.g. a privacy budget), or ``None``."""
        return None

    def metrics(self) -> dict[str, float]:
        """Figures the engine logs each round (e.g. ``privacy/epsilon``)."""
        return {}

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:  # noqa: B027 (stateless by default)
        """Restore what :meth:`state_dict` returned."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class FedAvgStep(ServerStep):
    """FedAvg (McMahan et al., AISTATS 2017): the new global state is the aggregate.

    The default step of every mode: where a mode forms no mean (``iil``, ``ciil``, ``single``) it is
    never called, so it needs no ``fedavg`` rounds.

    Example:
        >>> FedAvgStep().step({"w": torch.zeros(1)}, {"w": torch.ones(1)}, round_idx=0)
        {'w': tensor([1.])}
    """

    needs_mean_rounds = False

    def step(self, global_state: State, aggregate_state: State, round_idx: int) -> dict[str, Tensor]:
        check_compatible(global_state, aggregate_state, site="aggregate")
        return dict(aggregate_state)


class _ServerOptimizer(ServerStep):
    """Shared loop: parameters through :meth:`_update`, everything else from the aggregate."""

    _slots: ClassVar[tuple[str, ...]] = ()

    def __init__(self, server_lr: float) -> None:
        super().__init__()
        self.server_lr = _check_positive("server_lr", server_lr)
        self.num_steps = 0
        self.slots: dict[str, dict[str, Tensor]] = {name: {} for name in self._slots}

    def _checked_param_keys(self, global_state: State) -> frozenset[str]:
        if self.param_keys is None:
            raise RuntimeError(
                f"{type(self).__name__} needs to know which keys are parameters, but `setup(param_keys)` was not"
                " called. HINT: `step.setup(parameter_keys(model))`."
            )
        missing = sorted(self.param_keys - set(global_state))
        if missing:
            raise KeyError(f"Parameter keys {missing} are not in the global state.")
        not_float = sorted(k for k in self.param_keys if not global_state[k].is_floating_point())
        if not_float:
            raise TypeError(f"Parameter keys {not_float} are not floating point tensors.")
        return self.param_keys

    def _slot(self, name: str, key: str, like: Tensor, fill: float) -> Tensor:
        value = self.slots[name].get(key)
        if value is None:
            return torch.full_like(like, fill)
        return value.to(device=like.device, dtype=like.dtype)

    @abstractmethod
    def _update(self, key: str, x: Tensor, aggregate: Tensor) -> Tensor:
        """The new value of parameter ``key`` (in the compute dtype); stores the new slots."""

    def step(self, global_state: State, aggregate_state: State, round_idx: int) -> dict[str, Tensor]:
        check_compatible(global_state, aggregate_state, site="aggregate")
        keys = self._checked_param_keys(global_state)
        out: dict[str, Tensor] = {}
        for key, aggregate in aggregate_state.items():
            if key not in keys:
                out[key] = aggregate
                continue
            x = global_state[key].detach()
            dtype = _compute_dtype(x.dtype)
            out[key] = self._update(key, x.to(dtype), aggregate.detach().to(device=x.device, dtype=dtype)).to(x.dtype)
        self.num_steps += 1
        return out

    def state_dict(self) -> dict[str, Any]:
        return {"num_steps": self.num_steps, **{name: dict(values) for name, values in self.slots.items()}}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        missing = sorted({"num_steps", *self._slots} - set(state))
        if missing:
            raise KeyError(f"{type(self).__name__} state is missing {missing}.")
        self.num_steps = int(state["num_steps"])
        self.slots = {name: dict(state[name]) for name in self._slots}


class FedAvgM(_ServerOptimizer):
    """FedAvgM (Hsu et al. 2019): server momentum on the pseudo-gradient.

    ``m_t = momentum * m_{t-1} + Delta_t`` and ``x_{t+1} = x_t + server_lr * m_t``, computed as
    ``aggregate + (server_lr - 1) * Delta_t + server_lr * momentum * m_{t-1}`` (the same value) so
    that ``server_lr=1, momentum=0`` returns the aggregate bit for bit. With ``momentum=0`` no
    momentum buffer is kept.

    Args:
        server_lr: server learning rate ``eta``.
        momentum: momentum ``beta`` in [0, 1).

    Example:
        >>> step = FedAvgM(server_lr=0.5, momentum=0.5)
        >>> step.setup({"w"})
        >>> step.step({"w": torch.tensor([0.0])}, {"w": torch.tensor([2.0])}, round_idx=0)  # 0 + 0.5 * 2
        {'w': tensor([1.])}
        >>> step.step({"w": torch.tensor([1.0])}, {"w": torch.tensor([2.0])}, round_idx=1)  # 1 + 0.5 * (0.5 * 2 + 1)
        {'w': tensor([2.])}
    """

    _slots = ("momentum_buffer",)

    def __init__(self, server_lr: float = 1.0, momentum: float = 0.0) -> None:
        super().__init__(server_lr)
        self.momentum = _check_fraction("momentum", momentum)

    def _update(self, key: str, x: Tensor, aggregate: Tensor) -> Tensor:
        delta = aggregate - x
        if self.momentum == 0.0:
            return aggregate + (self.server_lr - 1.0) * delta
        previous = self._slot("momentum_buffer", key, delta, 0.0)
        self.slots["momentum_buffer"][key] = self.momentum * previous + delta
        return aggregate + (self.server_lr - 1.0) * delta + (self.server_lr * self.momentum) * previous

    def __repr__(self) -> str:
        return f"FedAvgM(server_lr={self.server_lr}, momentum={self.momentum})"


class _AdaptiveServerOptimizer(_ServerOptimizer):
    """Reddi et al. (ICLR 2021), Algorithm 2: ``x_{t+1} = x_t + eta m_t / (sqrt(v_t) + tau)``.

    ``m_{-1} = 0``, ``v_{-1} = tau**2``, no bias correction.
    """

    _slots = ("exp_avg", "exp_avg_sq")

    def __init__(self, server_lr: float, beta1: float, beta2: float, tau: float) -> None:
        super().__init__(server_lr)
        self.beta1 = _check_fraction("beta1", beta1)
        self.beta2 = _check_fraction("beta2", beta2)
        self.tau = _check_positive("tau", tau)

    @abstractmethod
    def _second_moment(self, v: Tensor, delta_sq: Tensor) -> Tensor:
        """``v_t`` from ``v_{t-1}`` and ``Delta_t**2``."""

    def _update(self, key: str, x: Tensor, aggregate: Tensor) -> Tensor:
        delta = aggregate - x
        m = self.beta1 * self._slot("exp_avg", key, delta, 0.0) + (1.0 - self.beta1) * delta
        v = self._second_moment(self._slot("exp_avg_sq", key, delta, self.tau**2), delta * delta)
        self.slots["exp_avg"][key] = m
        self.slots["exp_avg_sq"][key] = v
        return x + self.server_lr * m / (v.sqrt() + self.tau)

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(server_lr={self.server_lr}, beta1={self.beta1}, beta2={self.beta2}, tau={self.tau})"
        )


class FedAdam(_AdaptiveServerOptimizer):
    """FedAdam: ``v_t = beta2 v_{t-1} + (1 - beta2) Delta_t**2`` (Reddi et al., ICLR 2021, Algorithm 2).

    Args:
        server_lr: server learning rate ``eta`` (the paper tunes it on a grid).
        beta1: first-moment decay (the paper fixes 0.9).
        beta2: second-moment decay (the paper fixes 0.99).
        tau: adaptivity ``tau``; ``v`` starts at ``tau**2``.

    Example:
        >>> step = FedAdam(server_lr=0.1, tau=1.0)
        >>> step.setup({"w"})
        >>> out = step.step({"w": torch.tensor([0.0])}, {"w": torch.tensor([1.0])}, round_idx=0)
        >>> round(out["w"].item(), 6)  # 0.1 * 0.1 / (sqrt(0.99 + 0.01) + 1)
        0.005
    """

    def __init__(self, server_lr: float = 1e-2, beta1: float = 0.9, beta2: float = 0.99, tau: float = 1e-3) -> None:
        super().__init__(server_lr, beta1, beta2, tau)

    def _second_moment(self, v: Tensor, delta_sq: Tensor) -> Tensor:
        return self.beta2 * v + (1.0 - self.beta2) * delta_sq


class FedYogi(_AdaptiveServerOptimizer):
    """FedYogi: ``v_t = v_{t-1} - (1 - beta2) Delta_t**2 sign(v_{t-1} - Delta_t**2)`` (Reddi et al. 2021).

    Arguments as :class:`FedAdam`.

    Example:
        >>> step = FedYogi(server_lr=0.1, tau=1.0)
        >>> step.setup({"w"})
        >>> _ = step.step({"w": torch.tensor([0.0])}, {"w": torch.tensor([1.0])}, round_idx=0)
        >>> step.state_dict()["exp_avg_sq"]["w"].item()  # 1 - 0.01 * 1 * sign(1 - 1) = 1
        1.0
    """

    def __init__(self, server_lr: float = 1e-2, beta1: float = 0.9, beta2: float = 0.99, tau: float = 1e-3) -> None:
        super().__init__(server_lr, beta1, beta2, tau)

    def _second_moment(self, v: Tensor, delta_sq: Tensor) -> Tensor:
        return v - (1.0 - self.beta2) * delta_sq * torch.sign(v - delta_sq)


class FedAdagrad(_AdaptiveServerOptimizer):
    """FedAdagrad: ``v_t = v_{t-1} + Delta_t**2`` (Reddi et al., ICLR 2021, Algorithm 2).

    Args:
        server_lr: server learning rate ``eta``.
        beta1: first-moment decay (0.9 in the paper).
        tau: adaptivity ``tau``; ``v`` starts at ``tau**2``.

    Example:
        >>> step = FedAdagrad(server_lr=1.0, beta1=0.0, tau=1.0)
        >>> step.setup({"w"})
        >>> step.step({"w": torch.tensor([0.0])}, {"w": torch.tensor([3.0])}, round_idx=0)  # 3 / (sqrt(1 + 9) + 1)
        {'w': tensor([0.7208])}
    """

    def __init__(self, server_lr: float = 1e-2, beta1: float = 0.9, tau: float = 1e-3) -> None:
        super().__init__(server_lr, beta1, 0.0, tau)

    def _second_moment(self, v: Tensor, delta_sq: Tensor) -> Tensor:
        return v + delta_sq

    def __repr__(self) -> str:
        return f"FedAdagrad(server_lr={self.server_lr}, beta1={self.beta1}, tau={self.tau})"
