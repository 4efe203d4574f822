"""Client steps: what changes inside a site's local training (FedProx, SCAFFOLD, FedBN).

A client step is a small object chosen in YAML beside the mode (``client: {class_path: ...}``);
the round engine calls its hooks around each site's local training, and the user's
LightningModule stays unchanged. The math lives in :mod:`.client` (pure functions); state that
belongs to a site (SCAFFOLD's control variate, FedBN's normalization layers) is returned by
:meth:`ClientStep.end_site` and kept by the engine on the site's own process, beside its optimizer
state, in its own part of the checkpoint. State of the federation (SCAFFOLD's server control
variate) is in :meth:`ClientStep.state_dict`, in the checkpoint's federation part.

Every client step here works with ``mean`` modes (FedAvg) only: each needs the round's global
weights as the common starting point of the sites.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from lightning_fedseg.federation.client import (
    normalization_keys,
    proximal_term,
    scaffold_correct_gradients,
    scaffold_init_control,
    scaffold_update_control,
)

__all__ = ["SCAFFOLD", "ClientStep", "FedBN", "FedProx"]

State = Mapping[str, Tensor]


class ClientStep:
    """Base class: hooks around one site's local training; each does nothing by default."""

    name: ClassVar[str] = "client"

    def setup(self, module: nn.Module, sites: Sequence[str]) -> None:
        """Bind to the model and the federation's sites, once, before the first round."""

    def begin_site(self, site: str, module: nn.Module, global_state: State, site_state: Any | None) -> None:
        """Before the site trains: the module holds the round's global weights; ``site_state`` is
        what :meth:`end_site` returned at the site's previous visit (``None`` at the first)."""

    def on_batch(self, module: nn.Module, batch: Any) -> None:
        """Before every training step of the site, with the batch it trains on (on its device)."""

    def loss_term(self, module: nn.Module) -> Tensor | None:
        """An extra term added to the loss of every training step (before backward)."""
        return None

    def before_optimizer_step(self, module: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        """After backward (and AMP unscaling), before clipping and the optimizer step."""

    def end_site(self, site: str, module: nn.Module) -> tuple[Any | None, dict[str, Tensor] | None]:
        """After the site trained: (its state to keep until its next visit, its contribution to the
        round's sum over sites, or ``None``)."""
        return None, None

    def reference_sum(self) -> dict[str, Tensor] | None:
        """Zeros shaped like :meth:`end_site`'s contribution (what a process without sites adds)."""
        return None

    def end_round(self, summed: Mapping[str, Tensor] | None, num_sites: int) -> None:
        """After the round: the sum of every site's contribution (over all processes)."""

    def metrics(self) -> dict[str, float]:
        """Figures the engine logs at each round's end (e.g. ``privacy/<site>/epsilon`` of this
        process's sites)."""
        return {}

    def local_keys(self) -> frozenset[str]:
        """State keys that belong to each site, not to the global model during training."""
        return frozenset()

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class FedProx(ClientStep):
    """FedProx (Li et al., MLSys 2020): each site minimizes ``F_i(w) + mu/2 ||w - x_t||^2``.

    Args:
        mu: the proximal coefficient (the paper's grid: 0.001, 0.01, 0.1, 1); ``mu=0`` is FedAvg.
    """

    name = "fedprox"

    def __init__(self, mu: float = 0.01) -> None:
        if not (isinstance(mu, int | float) and mu >= 0):
            raise ValueError(f"Expected `mu` to be non-negative, but got {mu!r}.")
        self.mu = float(mu)
        self._global: dict[str, Tensor] = {}

    def begin_site(self, site: str, module: nn.Module, global_state: State, site_state: Any | None) -> None:
        self._global = {name: p.detach().clone() for name, p in module.named_parameters()}

    def loss_term(self, module: nn.Module) -> Tensor | None:
        if self.mu == 0:
            return None
        return proximal_term(module.named_parameters(), self._global, self.mu)

    def __repr__(self) -> str:
        return f"FedProx(mu={self.mu})"


class SCAFFOLD(ClientStep):
    """SCAFFOLD (Karimireddy et al., ICML 2020, Algorithm 1, option II control variates).

    Each local step uses ``g_i(y) - c_i + c``; after ``K`` steps at local LR ``eta_l`` the site's
    control variate becomes ``c_i - c + (x - y_i) / (K eta_l)``; the server's moves by ``1/N`` times
    the sum of the round's changes (``N`` all sites, so ``fraction < 1`` works as in the paper).
    The global weights take the server step's update (FedAvg: ``x + mean(y_i - x)``; the paper's
    global step size ``eta_g`` is ``FedAvgM(server_lr=eta_g)``). Option II assumes plain SGD at a
    constant LR; with other optimizers ``eta_l`` is the first parameter group's LR at the site's end.
    """

    name = "scaffold"

    def __init__(self) -> None:
        self.c: dict[str, Tensor] = {}
        self.num_sites = 0
        self._c_i: dict[str, Tensor] = {}
        self._start: dict[str, Tensor] = {}
        self._steps = 0
        self._lr = 0.0

    def setup(self, module: nn.Module, sites: Sequence[str]) -> None:
        self.num_sites = len(sites)
        if not self.c:
            self.c = scaffold_init_control({n: p.detach() for n, p in module.named_parameters()})

    def begin_site(self, site: str, module: nn.Module, global_state: State, site_state: Any | None) -> None:
        params = {n: p.detach() for n, p in module.named_parameters()}
        self._start = {n: p.clone() for n, p in params.items()}
        self._c_i = dict(site_state) if site_state is not None else scaffold_init_control(params)
        self._c_dev = {n: v.to(p.device) for (n, v), p in zip(self.c.items(), params.values(), strict=True)}
        self._c_i = {n: v.to(params[n].device) for n, v in self._c_i.items()}
        self._steps = 0

    def before_optimizer_step(self, module: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        scaffold_correct_gradients(module.named_parameters(), self._c_dev, self._c_i)
        self._steps += 1
        self._lr = float(optimizer.param_groups[0]["lr"])

    def end_site(self, site: str, module: nn.Module) -> tuple[Any | None, dict[str, Tensor] | None]:
        if self._steps == 0:  # nothing trained: the control variate stays
            return {n: v.cpu() for n, v in self._c_i.items()}, self.reference_sum()
        local = {n: p.detach() for n, p in module.named_parameters()}
        new_c_i, delta = scaffold_update_control(self._c_i, self._c_dev, self._start, local, self._steps, self._lr)
        return {n: v.cpu() for n, v in new_c_i.items()}, {n: v.cpu().double() for n, v in delta.items()}

    def reference_sum(self) -> dict[str, Tensor] | None:
        return {n: torch.zeros(v.shape, dtype=torch.float64) for n, v in self.c.items()}

    def end_round(self, summed: Mapping[str, Tensor] | None, num_sites: int) -> None:
        if summed is None:
            return
        self.c = {n: (v.double() + summed[n].to(v.device) / self.num_sites).to(v.dtype) for n, v in self.c.items()}

    def state_dict(self) -> dict[str, Any]:
        return {"c": {n: v.cpu() for n, v in self.c.items()}}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.c = dict(state["c"])


class FedBN(ClientStep):
    """FedBN (Li et al., ICLR 2021): normalization layers stay local to each site.

    Each site trains and validates with its own normalization layers (parameters and running
    statistics); they are never loaded from another site. The global model carries, for the
    held-out test and ``predict``, the layers named by ``test_layers``: ``"aggregate"`` (their
    sample-weighted mean over sites, which means they are sent for averaging) or a site's name
    (that site's own layers).

    Args:
        test_layers: ``"aggregate"`` or the name of the site whose layers the global model keeps.
    """

    name = "fedbn"

    def __init__(self, test_layers: str = "aggregate") -> None:
        self.test_layers = str(test_layers)
        self._keys: frozenset[str] = frozenset()

    def setup(self, module: nn.Module, sites: Sequence[str]) -> None:
        self._keys = frozenset(normalization_keys(module))
        if not self._keys:
            raise ValueError("FedBN keeps normalization layers local, but the model has none.")
        if self.test_layers != "aggregate" and self.test_layers not in sites:
            raise ValueError(
                f"Expected `test_layers` to be 'aggregate' or one of the sites {list(sites)}, but got"
                f" {self.test_layers!r}."
            )

    def local_keys(self) -> frozenset[str]:
        return self._keys

    def begin_site(self, site: str, module: nn.Module, global_state: State, site_state: Any | None) -> None:
        if site_state is not None:
            module.load_state_dict(site_state, strict=False)

    def end_site(self, site: str, module: nn.Module) -> tuple[Any | None, dict[str, Tensor] | None]:
        state = module.state_dict()
        return {k: state[k].detach().to("cpu", copy=True) for k in self._keys}, None

    def __repr__(self) -> str:
        return f"FedBN(test_layers={self.test_layers!r})"
