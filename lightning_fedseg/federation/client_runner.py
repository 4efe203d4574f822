"""How the round engine runs the client steps (:mod:`.client_steps`) of a federation.

Loss terms are added to each training step's loss; per-site states are filed after a site trains
and handed back at its next visit; the client steps' per-site sums are added up over all
processes at the round's end (through the transport); FedBN's layers are swapped in for each
site's validation loader and for the global model's test layers.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

if TYPE_CHECKING:
    from lightning_fedseg.federation.client_steps import ClientStep
    from lightning_fedseg.federation.rounds import Round
    from lightning_fedseg.federation.site_state import SiteStates
    from lightning_fedseg.federation.transport import Transport

__all__ = ["ClientRunner"]


class ClientRunner:
    """The client steps of a federation, called by the round engine.

    Args:
        clients: the client steps.
        site_states: where each site's client-step state is kept.
        module: returns the live module.
        transport: what crosses process boundaries.
        sites: the federation's sites, in order (validation loader ``i`` is site ``i``).
    """

    def __init__(
        self,
        clients: Sequence[ClientStep],
        site_states: SiteStates,
        module: Callable[[], nn.Module],
        transport: Transport,
        sites: Sequence[str],
    ) -> None:
        self.clients = tuple(clients)
        self.site_states = site_states
        self._module = module
        self.transport = transport
        self.sites = tuple(sites)
        self._val_backup: dict[str, Tensor] | None = None
        self._val_site: str | None = None

    def on_batch(self, batch: Any) -> None:
        module = self._module()
        for client in self.clients:
            client.on_batch(module, batch)

    def metrics(self) -> dict[str, float]:
        out: dict[str, float] = {}
        for client in self.clients:
            out.update(client.metrics())
        return out

    def with_loss_terms(self, output: Any) -> Any:
        """Add the client steps' loss terms (FedProx) to the training step's loss."""
        module = self._module()
        terms = [t for t in (c.loss_term(module) for c in self.clients) if t is not None]
        if not terms:
            return output
        extra = torch.stack([t.reshape(()) for t in terms]).sum()
        if isinstance(output, Tensor):
            return output + extra
        if isinstance(output, Mapping) and "loss" in output:
            return {**output, "loss": output["loss"] + extra}
        raise TypeError(
            "A client step adds a term to the loss, but `training_step` returned neither a tensor nor a dict"
            f" with 'loss' ({type(output).__name__})."
        )

    def begin_site(self, rnd: Round, site: str) -> None:
        module = self._module()
        for client in self.clients:
            state = self.site_states.client_state(site, client.name)
            client.begin_site(site, module, rnd.global_state or {}, state)

    def before_optimizer_step(self, optimizer: Any) -> None:
        module = self._module()
        for client in self.clients:
            client.before_optimizer_step(module, optimizer)

    def end_site(self, rnd: Round, site: str) -> None:
        """Keep each client step's site state; add its contribution to the round's sum."""
        module = self._module()
        for client in self.clients:
            state, contribution = client.end_site(site, module)
            if state is not None:
                self.site_states.set_client_state(site, client.name, state)
            if contribution is not None:
                total = rnd.client_sums.get(client.name)
                rnd.client_sums[client.name] = (
                    contribution if total is None else {k: v + contribution[k] for k, v in total.items()}
                )

    def end_round(self, rnd: Round, succeeded: int) -> None:
        """Sum the client steps' contributions over all processes; FedBN's test layers."""
        for client in self.clients:
            reference = client.reference_sum()
            if reference is None:
                continue
            summed, _, _ = self.transport.all_reduce_sums(
                rnd.client_sums.get(client.name, reference), 0.0, 0, reference, rnd.comm, rnd.index
            )
            client.end_round(summed, succeeded)
        self._keep_test_layers(rnd)

    def _keep_test_layers(self, rnd: Round) -> None:
        """FedBN with a named site: the global model carries that site's own normalization layers."""
        module = self._module()
        for client in self.clients:
            site = getattr(client, "test_layers", "aggregate")
            if site == "aggregate":
                continue
            keys = client.local_keys()
            current = {k: v for k, v in module.state_dict().items() if k in keys}
            own = self.site_states.client_state(site, client.name)
            transport = self.transport
            if transport.active:
                received, ok = transport.broadcast_state(
                    own if own is not None else current,
                    own is not None,
                    transport.placement[site],
                    rnd.comm,
                    rnd.index,
                    f"normalization layers of site {site!r}",
                )
                own = (received if received is not None else own) if ok else None
            if own is not None:
                module.load_state_dict(own, strict=False)

    def validate_site(self, dataloader_idx: int | None) -> None:
        """FedBN: each site's validation loader runs with that site's own normalization layers;
        ``None`` (validation ended) puts the global model's back."""
        for client in self.clients:
            keys = client.local_keys()
            if not keys:
                continue
            module = self._module()
            if dataloader_idx is None:
                if self._val_backup is not None:
                    module.load_state_dict(self._val_backup, strict=False)
                self._val_backup, self._val_site = None, None
                return
            site = self.sites[dataloader_idx] if dataloader_idx < len(self.sites) else None
            if site == self._val_site:
                return
            own = self.site_states.client_state(site, client.name) if site is not None else None
            if own is not None and self._val_backup is None:
                self._val_backup = {k: v.detach().clone() for k, v in module.state_dict().items() if k in keys}
            target = own if own is not None else self._val_backup
            if target is not None:
                module.load_state_dict(target, strict=False)
            self._val_site = site
