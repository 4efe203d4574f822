"""FederatedStrategy: multi-institution training as a property of the Lightning Trainer.

One Trainer epoch is one collaboration round, run by the :mod:`.engine`; inside each site,
Lightning's own semantics hold (:mod:`.semantics`), and each site's optimizer state stays with
the site (:mod:`.site_state`). Validation, logging, ``ModelCheckpoint`` and ``EarlyStopping``
see the global weights only.

The same class runs every site in one process (a simulation) or, launched like DDP with several
processes, one rank per site (or several sites per rank) on torch.distributed: FedAvg then sums
the sites' weighted states with one all-reduce, and IIL/CIIL broadcast the weights from the rank
of the site that just trained. Only weights, sample counts and metrics cross a process boundary,
as tensors; nothing is pickled between processes. ``cds`` on several processes is plain DDP.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from datetime import timedelta
from typing import Any, Literal

import lightning.pytorch as pl
import torch
from lightning.fabric.plugins import CheckpointIO, ClusterEnvironment
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.plugins.precision import Precision
from lightning.pytorch.strategies import Strategy
from lightning.pytorch.trainer.states import TrainerFn
from typing_extensions import override

from lightning_fedseg._validation import check_int
from lightning_fedseg.federation import lightning_compat as compat
from lightning_fedseg.federation.aggregate import IntegerPolicy
from lightning_fedseg.federation.checkpointing import FEDERATION_KEY, FederationCheckpoint
from lightning_fedseg.federation.client_steps import ClientStep
from lightning_fedseg.federation.engine import RoundEngine
from lightning_fedseg.federation.faults import FaultInjector
from lightning_fedseg.federation.lightning_host import LightningHost
from lightning_fedseg.federation.modes import CDS, CollaborationMode, FedAvg
from lightning_fedseg.federation.processes import FederatedProcesses
from lightning_fedseg.federation.round_hooks import RoundHooks
from lightning_fedseg.federation.rounds import RoundFailedError, RoundIterable
from lightning_fedseg.federation.semantics import (
    check_algorithms,
    check_flare,
    check_sync_batchnorm,
    check_trainer,
    check_training_step,
)
from lightning_fedseg.federation.server import FedAvgStep, ServerStep, parameter_keys
from lightning_fedseg.federation.site_data import SiteDataModule
from lightning_fedseg.federation.site_state import SiteStates

__all__ = ["FederatedStrategy", "OptimizerStatePolicy", "RoundFailedError", "SiteDataModule"]


class OptimizerStatePolicy:
    """``reset``: a fresh optimizer state at every site visit (the paper's code);
    ``keep``: each site keeps its own state from visit to visit."""

    RESET = "reset"
    KEEP = "keep"
    ALL = (RESET, KEEP)


class _SkipStep(Exception):
    """Raised inside the optimizer closure of a batch that trains nothing, to skip the step."""


class FederatedStrategy(LightningHost, FederatedProcesses):
    """Run a collaboration mode (``cds``, ``fedavg``, ``iil``, ``ciil``, ``single``) inside ``fit``.

    With one process every site is simulated in turn; launched with several processes (``devices``,
    ``num_nodes``, ``torchrun``, SLURM) each rank trains its own sites and the weights travel over
    torch.distributed.

    Args:
        mode: the collaboration mode (see :mod:`lightning_fedseg.federation.modes`).
        server: the server step that makes the global model from the round's sites (default: the
            FedAvg mean; FedAvgM, FedAdam, FedYogi, FedAdagrad, CoordinateMedian, TrimmedMean, Krum);
            see :mod:`.server` and :mod:`.robust`. Steps other than the mean need the ``fedavg`` mode.
        client: client steps that change each site's local training (FedProx, SCAFFOLD, FedBN; one
            or a list); see :mod:`.client_steps`. They need the ``fedavg`` mode.
        masking: on several processes, pairwise-mask each process's weighted sum before the
            all-reduce (:mod:`.masking`), so that no peer sees another process's sum in the clear.
        optimizer_state: ``"reset"`` (default, the paper's code) or ``"keep"``. Modes that do not
            start a new visit each round (single, iil) keep the state of the site they stay at
            under either policy.
        min_sites: fewest sites that must finish a round; with fewer the run stops with
            :class:`RoundFailedError`. A site that raises or returns NaN/Inf weights is dropped from
            its round with a warning.
        seed: base of the seeds derived for each (round, site): data order and dropout do not
            depend on which process trains a site, so a distributed run matches the simulation.
        integer_policy: how integer buffers (``num_batches_tracked``) combine: ``"mean"`` or ``"max"``.
        fault_schedule: fault injection for tests and drills: ``{site: [rounds]}`` in which the site fails.
        fault_probability: additionally, each site fails each round with this seeded probability.
        fault_kind: ``"raise"`` (the site's training raises) or ``"nan"`` (it returns NaN weights).
        allow_remote: acknowledge that torch.distributed traffic is neither encrypted nor
            authenticated; without it, a multi-process run refuses a non-loopback ``MASTER_ADDR``.
        flare_profile: this process is one institution of a federation whose hub is an NVIDIA FLARE
            server: the path of its attach profile (``lightning-fedseg deploy provision`` writes it
            into the site's startup kit). One process and one Trainer for the whole job; see
            :mod:`lightning_fedseg.federation.flare_transport` and docs/deployment.md.
        timeout: timeout of every collective operation (seconds or ``timedelta``); a dead or hung
            rank makes the others stop with an error after this long.
        process_group_backend: ``"gloo"`` (CPU) or ``"nccl"`` (GPU); default by device.
        start_method, cluster_environment, checkpoint_io, precision_plugin: as for ``DDPStrategy``.
    """

    strategy_name = "federated"

    def __init__(
        self,
        mode: CollaborationMode | None = None,
        server: ServerStep | None = None,
        client: ClientStep | Sequence[ClientStep] | None = None,
        masking: bool = False,
        optimizer_state: str = OptimizerStatePolicy.RESET,
        min_sites: int = 1,
        seed: int = 0,
        integer_policy: str = "mean",
        fault_schedule: Mapping[str, Sequence[int]] | None = None,
        fault_probability: float = 0.0,
        fault_kind: str = "raise",
        allow_remote: bool = False,
        flare_profile: str | None = None,
        timeout: float | timedelta = 1800.0,
        process_group_backend: str | None = None,
        start_method: Literal["popen", "spawn", "fork", "forkserver"] = "popen",
        cluster_environment: ClusterEnvironment | None = None,
        checkpoint_io: CheckpointIO | None = None,
        precision_plugin: Precision | None = None,
    ) -> None:
        if mode is not None and not isinstance(mode, CollaborationMode):
            raise TypeError(f"Expected `mode` to be a CollaborationMode, but got {type(mode).__name__}.")
        if server is not None and not isinstance(server, ServerStep):
            raise TypeError(f"Expected `server` to be a ServerStep, but got {type(server).__name__}.")
        clients = (client,) if isinstance(client, ClientStep) else tuple(client or ())
        for step in clients:
            if not isinstance(step, ClientStep):
                raise TypeError(f"Expected `client` to be ClientStep(s), but got {type(step).__name__}.")
        if len({step.name for step in clients}) != len(clients):
            raise ValueError(f"Expected distinct client steps, but got {list(clients)}.")
        if optimizer_state not in OptimizerStatePolicy.ALL:
            raise ValueError(
                f"Expected `optimizer_state` to be one of {OptimizerStatePolicy.ALL}, but got {optimizer_state!r}."
            )
        check_int("min_sites", min_sites)
        self.faults = FaultInjector(fault_schedule, fault_probability, fault_kind, seed)
        if not isinstance(timeout, timedelta):
            if timeout <= 0:
                raise ValueError(f"Expected `timeout` to be positive, but got {timeout}.")
            timeout = timedelta(seconds=float(timeout))
        super().__init__(
            allow_remote=allow_remote,
            flare_profile=flare_profile,
            timeout=timeout,
            process_group_backend=process_group_backend,
            start_method=start_method,
            cluster_environment=cluster_environment,
            checkpoint_io=checkpoint_io,
            precision_plugin=precision_plugin,
        )
        self.mode = mode if mode is not None else FedAvg()
        self.server = server if server is not None else FedAvgStep()
        self.clients = clients
        self.masking = bool(masking)
        self.optimizer_state_policy = optimizer_state
        self.min_sites = min_sites
        self.seed = seed
        self.integer_policy = IntegerPolicy(integer_policy)
        self.engine: RoundEngine | None = None
        self.site_states = SiteStates([], [], keep=False)
        self._checkpoint: FederationCheckpoint | None = None
        self._sites: tuple[str, ...] = ()
        self.placement: dict[str, int] = {}
        self._pending: tuple[Mapping[str, Any], str] | None = None
        self._user_batch_limit: int | float | None = None

    @property
    def history(self) -> list[dict[str, Any]]:
        """One record per closed round (sites, failures, seconds, bytes, the steps' figures)."""
        return self.engine.history if self.engine is not None else []

    @property
    def completed_rounds(self) -> int:
        """Rounds closed so far (resumed ones included)."""
        return self.engine.completed_rounds if self.engine is not None else 0

    @property
    @override
    def federated(self) -> bool:
        """Whether rounds run site by site (every mode but ``cds``, which is plain training)."""
        return not isinstance(self.mode, CDS)

    @override
    def setup(self, trainer: pl.Trainer) -> None:
        compat.check_lightning()
        if self.is_multiprocess:
            if self.federated:
                check_sync_batchnorm(compat.sync_batchnorm_requested(self))
            super().setup(trainer)
        else:  # one process: the single-device path (no process group; `sync_batchnorm` has no effect)
            Strategy.setup(self, trainer)
        if trainer.state.fn != TrainerFn.FITTING:
            return
        if self.federated:
            check_trainer(trainer, self.mode)
            check_training_step(self.module)
            check_algorithms(self.mode, self.server, self.clients, self.module, self.masking)
            keep = self.optimizer_state_policy == OptimizerStatePolicy.KEEP or not self.mode.resets_each_round
            self.site_states = SiteStates(self.optimizers, self.lr_scheduler_configs, keep=keep)
            # `limit_train_batches` limits each site's local epoch, not the round.
            self._user_batch_limit = trainer.limit_train_batches
            trainer.limit_train_batches = 1.0
        self.ensure_ready()
        assert self.engine is not None
        callbacks: list[Callback] = trainer.callbacks  # type: ignore[attr-defined]
        callbacks[:] = [cb for cb in callbacks if not isinstance(cb, RoundHooks)]
        callbacks.insert(0, RoundHooks(self.engine, self.federated))
        if self.federated:
            compat.patch_accumulation(trainer, self.engine.local_batch)
        if self.spread and self.federated:
            self.sync_initial_weights(self.module, self.engine.transport)
            # A rank evaluates only its own sites: its loaders for other sites are empty.
            self.module.allow_zero_length_dataloader_with_multiple_devices = True
        if self.is_multiprocess and self.federated:
            compat.skip_per_batch_sigterm_broadcast(trainer)

    # ------------------------------------------------------------------ sites and data
    def ensure_ready(self) -> None:
        """Place the sites and build the fit's engine, transport and checkpoint part (once per fit)."""
        if self.engine is not None:
            return
        datamodule = self.datamodule()
        if self.over_flare:
            check_flare(self.mode, self.server)
        sites = self.federation_sites(datamodule)
        if self.federated and not sites:
            raise ValueError("The DataModule reports no sites (`site_names` is empty).")
        self.mode.setup(sites)
        self._sites = sites
        if self.federated:
            self.server.setup(parameter_keys(self.module))
            per_round = len(self.mode.plan(0).tasks)
            fraction = float(getattr(self.mode, "fraction", 1.0))
            self.server.setup_federation(len(sites), fraction, per_round, sites=sites)
            for step in self.clients:
                step.setup(self.module, sites)
        self.placement = self.place_sites(sites, datamodule) if self.federated else dict.fromkeys(sites, 0)
        if hasattr(datamodule, "set_training_sites"):  # e.g. `single`: only its site's cases are read
            datamodule.set_training_sites(self.mode.training_sites)
        transport = self.make_transport(self.placement)
        self._transport = transport
        self.engine = RoundEngine(
            mode=self.mode,
            server=self.server,
            clients=self.clients,
            sites=sites,
            placement=self.placement,
            site_states=self.site_states,
            transport=transport,
            host=self,
            seed=self.seed,
            faults=self.faults,
            min_sites=self.min_sites,
            integer_policy=self.integer_policy,
            masking=self.masking,
            batch_limit=self._user_batch_limit if self._user_batch_limit is not None else 1.0,
        )
        self._checkpoint = FederationCheckpoint(
            self.mode,
            self.server,
            self.clients,
            self.engine,
            self.site_states,
            self.local_sites,
            {s: i for i, s in enumerate(sites)},
            sharded=self.spread,
        )
        if self._pending is not None:
            state, path = self._pending
            self._pending = None
            self._checkpoint.load_state_dict(state, path)

    @property
    def sites(self) -> tuple[str, ...]:
        return self._sites

    @property
    def local_sites(self) -> tuple[str, ...]:
        """The sites this process trains."""
        return tuple(s for s in self._sites if self.placement.get(s, 0) == self.federation_rank)

    # ------------------------------------------------------------------ training hooks
    @override
    def process_dataloader(self, dataloader: object) -> object:
        dataloader = super().process_dataloader(dataloader)
        trainer = self.lightning_module.trainer if self.lightning_module is not None else None
        if trainer is None or not trainer.training or not self.federated or self.engine is None:
            return dataloader
        # Lightning asks again every `reload_dataloaders_every_n_epochs`: so does each site.
        self.engine.loaders.clear()
        return RoundIterable(self.engine)

    @override
    def batch_to_device(self, batch: Any, device: torch.device | None = None, dataloader_idx: int = 0) -> Any:
        trainer = self.lightning_module.trainer if self.lightning_module is not None else None
        if trainer is not None and trainer.training and self.engine is not None and self.engine.in_round:
            # Before any `on_train_batch_start`: callbacks see the site's own weights and optimizer.
            self.engine.on_batch()
        return super().batch_to_device(batch, device, dataloader_idx)

    @override
    def training_step(self, *args: Any, **kwargs: Any) -> Any:
        if self.engine is None:
            return super().training_step(*args, **kwargs)
        batch = args[0] if args else kwargs.get("batch")
        return self.engine.training_step(lambda: super(FederatedStrategy, self).training_step(*args, **kwargs), batch)

    @override
    def optimizer_step(self, optimizer: Any, closure: Callable[[], Any], model: Any = None, **kwargs: Any) -> Any:
        # A batch that trains nothing (an idle rank, a failed site) skips the step entirely, so a
        # GradScaler never sees an optimizer without gradients.
        engine = self.engine

        def guarded() -> Any:
            result = closure()
            if engine is not None and engine.skips_step:
                raise _SkipStep
            return result

        try:
            return super().optimizer_step(optimizer, guarded, model, **kwargs)
        except _SkipStep:
            return None

    # ------------------------------------------------------------------ checkpoints
    @override
    def optimizer_state(self, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
        if not self.federated or self.engine is None:  # plain training, or a fit that failed to set up
            return super().optimizer_state(optimizer)
        return self.site_states.optimizer_state(optimizer)

    @override
    def save_checkpoint(self, checkpoint: dict[str, Any], filepath: Any, storage_options: Any | None = None) -> None:
        if self._checkpoint is not None:
            self._checkpoint.save(checkpoint, filepath)
        super().save_checkpoint(checkpoint, filepath, storage_options=storage_options)

    @override
    def remove_checkpoint(self, filepath: Any) -> None:
        if self._checkpoint is not None:
            self._checkpoint.remove(filepath)
        super().remove_checkpoint(filepath)

    @override
    def load_checkpoint(self, checkpoint_path: Any, *args: Any, **kwargs: Any) -> dict[str, Any]:
        checkpoint = super().load_checkpoint(checkpoint_path, *args, **kwargs)
        if FEDERATION_KEY in checkpoint:
            state, path = checkpoint[FEDERATION_KEY], str(checkpoint_path)
            if self._checkpoint is not None:
                self._checkpoint.load_state_dict(state, path)
            else:
                self._pending = (state, path)
        return checkpoint

    # ------------------------------------------------------------------ display
    def expected_round_batches(self) -> int | None:
        """Training batches this process will see in the coming round (for progress bars)."""
        if not self.federated or self.engine is None:
            return None
        return self.engine.expected_batches()

    def progress_info(self) -> dict[str, str]:
        """Round and current site, for progress bars."""
        trainer = self.lightning_module.trainer if self.lightning_module is not None else None
        rnd = self.engine.round if self.engine is not None else None
        info = {"mode": self.mode.name}
        if trainer is not None:
            info["round"] = str(trainer.current_epoch)
        if rnd is not None and rnd.active is not None:
            info["site"] = rnd.plan.tasks[rnd.active].site
        return info

    @override
    def teardown(self) -> None:
        trainer = self.lightning_module.trainer if self.lightning_module is not None else None
        if trainer is not None and self._user_batch_limit is not None:
            trainer.limit_train_batches = self._user_batch_limit
            self._user_batch_limit = None
            compat.unpatch_accumulation(trainer)
        if self.engine is not None:
            self.engine.clear()
        self.close_flare()
        super().teardown()

    @classmethod
    @override
    def register_strategies(cls, strategy_registry: Any) -> None:  # no DDP aliases for this class
        return
