"""Client-side math of FedProx, SCAFFOLD and FedBN: pure functions the round engine calls around local steps.

* FedProx (Li et al., "Federated Optimization in Heterogeneous Networks", MLSys 2020): each site
  adds ``mu / 2 ||w - x_t||^2`` to its local loss (:func:`proximal_term`).
* SCAFFOLD (Karimireddy et al., "SCAFFOLD: Stochastic Controlled Averaging for Federated
  Learning", ICML 2020, Algorithm 1 with option II): each local step uses the corrected gradient
  ``g_i(y) - c_i + c`` (:func:`scaffold_correct_gradients`); after ``K`` steps the site updates its
  control variate (:func:`scaffold_update_control`) and the server combines the sites'
  ``Delta y_i`` and ``Delta c_i`` (:func:`scaffold_server_update`).
* FedBN (Li et al., "FedBN: Federated Learning on Non-IID Features via Local Batch
  Normalization", ICLR 2021): normalization layers stay local (:func:`normalization_keys`,
  :func:`split_local`, :func:`merge_local`).

States are ``dict[str, Tensor]`` keyed by state-dict names. SCAFFOLD's states hold parameters only
(the control variates of buffers would be meaningless); its control variates are kept in the
parameter's dtype promoted to at least float32. SCAFFOLD's option II assumes plain SGD with a
constant local learning rate ``local_lr`` over the ``K`` steps; with momentum, weight decay or a
schedule the correction still applies but ``(x - y) / (K lr)`` is only an approximation of the
average corrected gradient.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence

import torch
from torch import Tensor, nn

from lightning_fedseg._validation import check_int

__all__ = [
    "NORMALIZATION_LAYERS",
    "is_normalization_layer",
    "merge_local",
    "normalization_keys",
    "proximal_term",
    "scaffold_correct_gradients",
    "scaffold_init_control",
    "scaffold_server_update",
    "scaffold_update_control",
    "split_local",
]

State = Mapping[str, Tensor]

NORMALIZATION_LAYERS: tuple[type[nn.Module], ...] = (
    nn.BatchNorm1d,
    nn.BatchNorm2d,
    nn.BatchNorm3d,
    nn.SyncBatchNorm,
    nn.InstanceNorm1d,
    nn.InstanceNorm2d,
    nn.InstanceNorm3d,
    nn.GroupNorm,
    nn.LayerNorm,
    nn.RMSNorm,
)
"""The layers FedBN keeps local (subclasses included)."""


def _get(mapping: State, key: str, what: str) -> Tensor:
    try:
        return mapping[key]
    except KeyError:
        raise KeyError(f"`{key}` is missing from {what}.") from None


def _check_same_shape(key: str, a: Tensor, b: Tensor, what: str) -> None:
    if a.shape != b.shape:
        raise ValueError(f"`{key}` has shape {tuple(a.shape)} but {what} has {tuple(b.shape)}.")


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.promote_types(dtype, torch.float32)


def proximal_term(params: Iterable[tuple[str, Tensor]], global_params: State, mu: float) -> Tensor:
    """FedProx's ``mu / 2 * sum ||w - w_global||^2`` over ``params``, a differentiable float32 scalar.

    The global weights are constants (no gradient flows into them); the gradient with respect to
    ``w`` is ``mu * (w - w_global)``. With ``mu = 0`` the result is an exact zero outside the graph,
    so adding it leaves every gradient bit for bit as it was.

    Args:
        params: ``(name, parameter)`` pairs, e.g. ``model.named_parameters()``.
        global_params: the round's global weights, by the same names.
        mu: the proximal coefficient (the paper's grid: 0.001, 0.01, 0.1, 1).

    Example:
        >>> w = nn.Parameter(torch.tensor([1.0, 2.0]))
        >>> term = proximal_term([("w", w)], {"w": torch.tensor([0.0, 4.0])}, mu=0.5)
        >>> term.backward()
        >>> term.item(), w.grad.tolist()  # 0.25 * (1 + 4); 0.5 * (w - w_global)
        (1.25, [0.5, -1.0])
    """
    if not (isinstance(mu, int | float) and mu >= 0 and math.isfinite(mu)):
        raise ValueError(f"Expected `mu` to be non-negative, but got {mu!r}.")
    params = list(params)
    device = params[0][1].device if params else torch.device("cpu")
    if mu == 0:
        return torch.zeros((), dtype=torch.float32, device=device)
    total = torch.zeros((), dtype=torch.float32, device=device)
    for name, w in params:
        w_global = _get(global_params, name, "the global parameters").detach()
        _check_same_shape(name, w, w_global, "its global parameter")
        diff = w - w_global.to(device=w.device, dtype=w.dtype)
        total = total + diff.square().sum().float()
    return (mu / 2) * total


def scaffold_init_control(params: State) -> dict[str, Tensor]:
    """Zero control variates shaped like ``params`` (SCAFFOLD initializes ``c`` and every ``c_i`` to 0).

    Example:
        >>> scaffold_init_control({"w": torch.ones(2, dtype=torch.bfloat16)})
        {'w': tensor([0., 0.])}
    """
    return {k: torch.zeros(v.shape, dtype=_compute_dtype(v.dtype), device=v.device) for k, v in params.items()}


@torch.no_grad()
def scaffold_correct_gradients(params: Iterable[tuple[str, Tensor]], c_global: State, c_site: State) -> None:
    """Turn each parameter's ``.grad`` into SCAFFOLD's corrected gradient ``g - c_i + c``, in place.

    Call between ``backward()`` and the optimizer step. Parameters without a gradient (frozen, or
    unused in this step) are left alone, so that the optimizer skips them as it would otherwise.

    Args:
        params: ``(name, parameter)`` pairs, e.g. ``model.named_parameters()``.
        c_global: the server control variate ``c``.
        c_site: this site's control variate ``c_i``.

    Example:
        >>> w = nn.Parameter(torch.zeros(2))
        >>> w.grad = torch.tensor([1.0, 1.0])
        >>> scaffold_correct_gradients([("w", w)], {"w": torch.tensor([0.5, 0.0])}, {"w": torch.tensor([0.0, 2.0])})
        >>> w.grad.tolist()
        [1.5, -1.0]
    """
    for name, w in params:
        if w.grad is None:
            continue
        c = _get(c_global, name, "the server control variate")
        c_i = _get(c_site, name, "the site control variate")
        _check_same_shape(name, w, c, "its control variate")
        w.grad.add_(c.to(device=w.grad.device, dtype=w.grad.dtype))
        w.grad.sub_(c_i.to(device=w.grad.device, dtype=w.grad.dtype))


@torch.no_grad()
def scaffold_update_control(
    c_site: State,
    c_global: State,
    global_params: State,
    local_params: State,
    num_steps: int,
    local_lr: float,
) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """Option II: ``c_i+ = c_i - c + (x - y_i) / (K lr)``; returns ``(c_i+, Delta c_i = c_i+ - c_i)``.

    Args:
        c_site: the site's control variate ``c_i`` before the round.
        c_global: the server control variate ``c`` of the round.
        global_params: the round's global weights ``x`` (the site's starting point).
        local_params: the site's weights ``y_i`` after its ``K`` local steps.
        num_steps: ``K``, the number of local optimizer steps taken.
        local_lr: ``eta_l``, the (constant) local SGD learning rate.

    Example:
        >>> zero = {"w": torch.zeros(1)}
        >>> new, delta = scaffold_update_control(zero, {"w": torch.ones(1)}, zero, {"w": torch.tensor([-4.0])}, 2, 0.5)
        >>> new["w"].item(), delta["w"].item()  # 0 - 1 + (0 + 4) / (2 * 0.5)
        (3.0, 3.0)
    """
    num_steps = check_int("num_steps", num_steps)
    if not (isinstance(local_lr, int | float) and local_lr > 0 and math.isfinite(local_lr)):
        raise ValueError(f"Expected `local_lr` to be positive, but got {local_lr!r}.")
    scale = 1.0 / (num_steps * local_lr)
    new_c_site: dict[str, Tensor] = {}
    delta_c: dict[str, Tensor] = {}
    for name, x in global_params.items():
        c_i = _get(c_site, name, "the site control variate")
        c = _get(c_global, name, "the server control variate")
        y = _get(local_params, name, "the local parameters")
        _check_same_shape(name, x, y, "its local parameter")
        dtype = _compute_dtype(c_i.dtype)
        delta = (x.to(dtype) - y.to(device=x.device, dtype=dtype)) * scale - c.to(device=x.device, dtype=dtype)
        delta_c[name] = delta
        new_c_site[name] = c_i.to(device=x.device, dtype=dtype) + delta
    return new_c_site, delta_c


@torch.no_grad()
def scaffold_server_update(
    global_params: State,
    c_global: State,
    delta_ys: Sequence[State],
    delta_cs: Sequence[State],
    num_sites_total: int,
    global_lr: float = 1.0,
) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """``x+ = x + eta_g / |S| sum_i Delta y_i`` and ``c+ = c + 1 / N sum_i Delta c_i``.

    ``Delta y_i = y_i - x`` are averaged uniformly over the ``|S|`` sites of the round (not by
    samples, as in the paper); ``Delta c_i`` are summed and divided by ``N``, the number of all
    sites, so that with a fraction of the sites per round ``c`` stays the mean of every ``c_i``.

    Args:
        global_params: the round's global weights ``x``.
        c_global: the server control variate ``c``.
        delta_ys: ``Delta y_i`` of each site of the round.
        delta_cs: ``Delta c_i`` of each site of the round, in the same order.
        num_sites_total: ``N``, the number of sites in the federation.
        global_lr: ``eta_g`` (1 in the paper's experiments).

    Example:
        >>> x, c = {"w": torch.zeros(1)}, {"w": torch.ones(1)}
        >>> dys, dcs = [{"w": torch.tensor([1.0])}, {"w": torch.tensor([3.0])}], [{"w": torch.tensor([2.0])}] * 2
        >>> new_x, new_c = scaffold_server_update(x, c, dys, dcs, num_sites_total=4)
        >>> new_x["w"].item(), new_c["w"].item()  # (1 + 3) / 2; 1 + (2 + 2) / 4
        (2.0, 2.0)
    """
    total = check_int("num_sites_total", num_sites_total)
    if not (isinstance(global_lr, int | float) and global_lr > 0 and math.isfinite(global_lr)):
        raise ValueError(f"Expected `global_lr` to be positive, but got {global_lr!r}.")
    if len(delta_ys) != len(delta_cs) or not delta_ys:
        raise ValueError(
            f"Expected one `delta_cs` per `delta_ys` and at least one site, but got {len(delta_ys)}"
            f" and {len(delta_cs)}."
        )
    if len(delta_ys) > total:
        raise ValueError(f"Got updates from {len(delta_ys)} sites, but `num_sites_total` is {total}.")
    new_x: dict[str, Tensor] = {}
    new_c: dict[str, Tensor] = {}
    for name, x in global_params.items():
        c = _get(c_global, name, "the server control variate")
        dy = torch.stack(
            [_get(d, name, f"`delta_ys[{i}]`").to(x.device, torch.float64) for i, d in enumerate(delta_ys)]
        )
        dc = torch.stack(
            [_get(d, name, f"`delta_cs[{i}]`").to(c.device, torch.float64) for i, d in enumerate(delta_cs)]
        )
        _check_same_shape(name, x, dy[0], "its update")
        new_x[name] = (x.to(torch.float64) + global_lr * dy.mean(dim=0)).to(x.dtype)
        new_c[name] = (c.to(torch.float64) + dc.sum(dim=0) / total).to(c.dtype)
    return new_x, new_c


def is_normalization_layer(module: nn.Module, extra: tuple[type[nn.Module], ...] = ()) -> bool:
    """Whether ``module`` is a normalization layer of :data:`NORMALIZATION_LAYERS` (or of ``extra``).

    Example:
        >>> is_normalization_layer(nn.GroupNorm(1, 4)), is_normalization_layer(nn.Conv2d(1, 1, 1))
        (True, False)
    """
    return isinstance(module, NORMALIZATION_LAYERS + tuple(extra))


def normalization_keys(module: nn.Module, extra: tuple[type[nn.Module], ...] = ()) -> set[str]:
    """The state-dict keys of ``module`` that belong to normalization layers (what FedBN keeps local).

    That is each normalization layer's ``weight`` and ``bias`` and its persistent buffers
    (``running_mean``, ``running_var``, ``num_batches_tracked``), under their full names.

    Args:
        module: the model.
        extra: further layer classes to keep local (e.g. a custom normalization).

    Example:
        >>> model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2))
        >>> sorted(normalization_keys(model))
        ['1.bias', '1.num_batches_tracked', '1.running_mean', '1.running_var', '1.weight']
    """
    all_keys = set(module.state_dict(keep_vars=True))
    keys: set[str] = set()
    for name, layer in module.named_modules(remove_duplicate=False):
        if is_normalization_layer(layer, extra):
            keys.update(layer.state_dict(prefix=f"{name}." if name else "", keep_vars=True))
    return keys & all_keys


def split_local(state: State, local_keys: Iterable[str]) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """Split ``state`` into ``(shared, local)``: what is sent for aggregation and what the site keeps.

    Example:
        >>> shared, local = split_local({"conv.w": torch.ones(1), "bn.w": torch.zeros(1)}, {"bn.w"})
        >>> sorted(shared), sorted(local)
        (['conv.w'], ['bn.w'])
    """
    local_keys = set(local_keys)
    missing = sorted(local_keys - set(state))
    if missing:
        raise KeyError(f"Local keys {missing} are not in the state.")
    shared = {k: v for k, v in state.items() if k not in local_keys}
    local = {k: v for k, v in state.items() if k in local_keys}
    return shared, local


def merge_local(global_state: State, site_local_state: State) -> dict[str, Tensor]:
    """The state a site loads: the global state with the site's own local entries put back.

    Example:
        >>> merged = merge_local({"conv.w": torch.ones(1), "bn.w": torch.zeros(1)}, {"bn.w": torch.full((1,), 7.0)})
        >>> merged["conv.w"].item(), merged["bn.w"].item()
        (1.0, 7.0)
    """
    for key, value in site_local_state.items():
        if key in global_state:
            reference = global_state[key]
            _check_same_shape(key, value, reference, "the global state's")
            if value.dtype != reference.dtype:
                raise ValueError(f"`{key}` has dtype {value.dtype} but the global state's has {reference.dtype}.")
    return {**global_state, **site_local_state}
