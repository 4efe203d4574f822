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
from typing import Any, Literal, Protocol, runtime_checkable

import lightning.pytorch as pl
import torch
from lightning.fabric.plugins import CheckpointIO, ClusterEnvironment
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.overrides.distributed import _sync_module_states
from lightning.pytorch.plugins.precision import Precision
from lightning.pytorch.strategies import Strategy
from lightning.pytorch.trainer.states import TrainerFn

from lightning_fedseg._validation import check_int
from lightning_fedseg.federation.aggregate import IntegerPolicy
from lightning_fedseg.federation.checkpointing import FederatedCheckpointing
from lightning_fedseg.federation.client_steps import ClientStep
from lightning_fedseg.federation.engine import RoundEngine
from lightning_fedseg.federation.faults import FaultInjector
from lightning_fedseg.federation.modes import CDS, CollaborationMode, FedAvg
from lightning_fedseg.federation.placement import assign_sites
from lightning_fedseg.federation.processes import FederatedProcesses
from lightning_fedseg.federation.rounds import RoundFailedError, RoundIterable
from lightning_fedseg.federation.semantics import (
    check_algorithms,
    check_trainer,
    patch_accumulation,
    unpatch_accumulation,
)
from lightning_fedseg.federation.server import FedAvgStep, ServerStep, parameter_keys
from lightning_fedseg.federation.site_state import SiteStates

__all__ = ["FederatedStrategy", "OptimizerStatePolicy", "RoundFailedError", "SiteDataModule"]


@runtime_checkable
class SiteDataModule(Protocol):
    """What a DataModule offers so that the strategy can train sites one at a time.

    ``train_dataloader()`` (the pooled data) is used by the ``cds`` mode only. Optional:
    ``site_num_samples(site) -> int`` (the FedAvg weight; default ``len(loader.dataset)``) and
    ``restrict_sites(sites)`` (on torch.distributed, called with the sites of this rank before
    any dataloader is requested, so that a rank never materializes another site's samples).
    """

    site_names: Sequence[str]

    def site_train_dataloader(self, site: str) -> Any: ...


class OptimizerStatePolicy:
    """``reset``: a fresh optimizer state at every site visit (the paper's code);
    ``keep``: each site keeps its own state from visit to visit."""

    RESET = "reset"
    KEEP = "keep"
    ALL = (RESET, KEEP)


class _SkipStep(Exception):
    """Raised inside the optimizer closure of a batch that trains nothing, to skip the step."""


class _RoundHooks(Callback):
    """Internal callback the strategy puts first in ``trainer.callbacks``: it closes each round
    (before ``ModelCheckpoint`` saves) and logs the round's federation figures."""

    def __init__(self, strategy: FederatedStrategy) -> None:
        self.strategy = strategy

    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not trainer.sanity_checking and trainer.state.fn == TrainerFn.FITTING:
            self.strategy.engine.finish_round()

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Any) -> None:
        self.strategy.engine.before_optimizer_step(optimizer)

    def on_validation_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int, dataloader_idx: int = 0
    ) -> None:
        self.strategy.engine.clients.validate_site(dataloader_idx)

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.strategy.engine.clients.validate_site(None)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        strategy = self.strategy
        if strategy.engine.round is not None:
            strategy.engine.end_round(trainer, pl_module)
        elif isinstance(strategy.mode, CDS):  # plain Lightning training: count the round
            strategy.completed_rounds += 1


class FederatedStrategy(FederatedCheckpointing, FederatedProcesses):
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
        self.allow_remote = allow_remote
        self.engine = RoundEngine(self)
        self.site_states = SiteStates([], [], keep=False)
        self._sites: tuple[str, ...] = ()
        self.placement: dict[str, int] = {}
        self._ready = False
        self._pending_state: dict[str, Any] | None = None
        self._pending_path: str | None = None
        self._user_batch_limit: int | float | None = None
        self.history: list[dict[str, Any]] = []
        self.completed_rounds = 0

    @property
    def federated(self) -> bool:
        """Whether rounds run site by site (every mode but ``cds``, which is plain training)."""
        return not isinstance(self.mode, CDS)

    def setup(self, trainer: pl.Trainer) -> None:
        if self.is_multiprocess:
            super().setup(trainer)
        else:  # one process: the single-device path (no process group to synchronize over)
            Strategy.setup(self, trainer)
        if trainer.state.fn != TrainerFn.FITTING:
            return
        callbacks: list[Callback] = trainer.callbacks  # type: ignore[attr-defined]
        if not any(isinstance(cb, _RoundHooks) for cb in callbacks):
            callbacks.insert(0, _RoundHooks(self))
        if self.federated:
            check_trainer(trainer, self.mode)
            check_algorithms(self.mode, self.server, self.clients, self.module, self.masking)
            keep = self.optimizer_state_policy == OptimizerStatePolicy.KEEP or not self.mode.resets_each_round
            self.site_states = SiteStates(self.optimizers, self.lr_scheduler_configs, keep=keep)
            # `limit_train_batches` limits each site's local epoch, not the round.
            self._user_batch_limit = trainer.limit_train_batches
            self.engine.batch_limit = trainer.limit_train_batches
            trainer.limit_train_batches = 1.0
            patch_accumulation(trainer, self.engine.local_batch)
        if self.is_multiprocess and self.federated:
            # Every site starts from rank 0's initial weights, as DDP would ensure.
            _sync_module_states(self.module)
            # A rank evaluates only its own sites: its loaders for other sites are empty.
            self.module.allow_zero_length_dataloader_with_multiple_devices = True
            # Ranks train different numbers of batches per round, so Lightning's per-batch SIGTERM
            # broadcast would pair up unrelated collectives. Sites synchronize at round ends only.
            trainer.fit_loop.epoch_loop._broadcast_sigterm_tensor = lambda: None  # type: ignore[method-assign]
        self.ensure_ready()

    # ------------------------------------------------------------------ sites and data
    @property
    def module(self) -> pl.LightningModule:
        assert self.lightning_module is not None
        return self.lightning_module

    def datamodule(self) -> Any:
        trainer = self.lightning_module.trainer if self.lightning_module is not None else None
        datamodule = getattr(trainer, "datamodule", None)
        if datamodule is None or not isinstance(datamodule, SiteDataModule):
            raise TypeError(
                "FederatedStrategy needs a DataModule with `site_names` and"
                " `site_train_dataloader(site)`, passed as `trainer.fit(model, datamodule=...)`;"
                f" got {type(datamodule).__name__}. HINT: see `SiteDataModule` in the README."
            )
        return datamodule

    def ensure_ready(self) -> None:
        if self._ready:
            return
        datamodule = self.datamodule()
        sites = tuple(str(s) for s in datamodule.site_names)
        if self.federated and not sites:
            raise ValueError("The DataModule reports no sites (`site_names` is empty).")
        self.mode.setup(sites)
        self._sites = sites
        if self.federated:
            self.server.setup(parameter_keys(self.module))
            per_round = len(self.mode.plan(self.completed_rounds).tasks)
            self.server.setup_federation(len(sites), float(getattr(self.mode, "fraction", 1.0)), per_round)
            for step in self.clients:
                step.setup(self.module, sites)
        if self.is_multiprocess and self.federated:
            # Place sites by a size every process knows without reading any site's data.
            sizer = getattr(datamodule, "site_num_subjects", None)
            sizes = {s: float(sizer(s)) if sizer is not None else 1.0 for s in sites}
            self.placement = assign_sites(sites, sizes, self.world_size)
            if hasattr(datamodule, "restrict_sites"):
                datamodule.restrict_sites(self.local_sites)
        else:
            self.placement = dict.fromkeys(sites, 0)
        if self._pending_state is not None:
            self._load_federation_state(self._pending_state)
            self._pending_state = None
        self._ready = True

    @property
    def sites(self) -> tuple[str, ...]:
        return self._sites

    @property
    def local_sites(self) -> tuple[str, ...]:
        """The sites this process trains."""
        return tuple(s for s in self._sites if self.placement.get(s, 0) == self.federation_rank)

    def site_index(self, site: str) -> int:
        return self._sites.index(site) if site in self._sites else len(self._sites)

    def site_weight(self, site: str) -> float:
        datamodule = self.datamodule()
        if hasattr(datamodule, "site_num_samples"):
            return float(datamodule.site_num_samples(site))
        dataset = getattr(self.engine.site_loader(site), "dataset", None)
        try:
            return float(len(dataset))  # type: ignore[arg-type]
        except TypeError:
            raise TypeError(
                f"Cannot tell how many samples site {site!r} has: its loader's dataset has no length."
                " HINT: implement `site_num_samples(site)` on the DataModule."
            ) from None

    def process_dataloader(self, dataloader: object) -> object:
        dataloader = super().process_dataloader(dataloader)
        trainer = self.lightning_module.trainer if self.lightning_module is not None else None
        if trainer is None or not trainer.training or not self.federated:
            return dataloader
        return RoundIterable(self.engine)

    # ------------------------------------------------------------------ training hooks
    def batch_to_device(self, batch: Any, device: torch.device | None = None, dataloader_idx: int = 0) -> Any:
        trainer = self.lightning_module.trainer if self.lightning_module is not None else None
        if trainer is not None and trainer.training and self.engine.in_round:
            # Before any `on_train_batch_start`: callbacks see the site's own weights and optimizer.
            self.engine.on_batch()
        return super().batch_to_device(batch, device, dataloader_idx)

    def training_step(self, *args: Any, **kwargs: Any) -> Any:
        batch = args[0] if args else kwargs.get("batch")
        return self.engine.training_step(lambda: super(FederatedStrategy, self).training_step(*args, **kwargs), batch)

    def optimizer_step(self, optimizer: Any, closure: Callable[[], Any], model: Any = None, **kwargs: Any) -> Any:
        # A batch that trains nothing (an idle rank, a failed site) skips the step entirely, so a
        # GradScaler never sees an optimizer without gradients.
        def guarded() -> Any:
            result = closure()
            if self.engine.skips_step:
                raise _SkipStep
            return result

        try:
            return super().optimizer_step(optimizer, guarded, model, **kwargs)
        except _SkipStep:
            return None

    def call_site_hook(self, name: str, site: str, round_idx: int) -> None:
        """Call ``on_site_start`` / ``on_site_end(trainer, pl_module, site, round_idx)`` on the
        callbacks that define them: at ``on_site_end`` the module holds the site's trained weights."""
        trainer = self.module.trainer
        for callback in trainer.callbacks:  # type: ignore[attr-defined]
            hook = getattr(callback, name, None)
            if callable(hook):
                hook(trainer, self.module, site, round_idx)

    # ------------------------------------------------------------------ display
    def expected_round_batches(self) -> int | None:
        """Training batches this process will see in the coming round (for progress bars)."""
        from lightning_fedseg.federation.semantics import site_batch_limit

        if not self.federated or not self._ready:
            return None
        rnd = self.engine.round
        plan = rnd.plan if rnd is not None and not rnd.finished else self.mode.plan(self.completed_rounds)
        total = 0
        for task in plan.tasks:
            if self.placement.get(task.site, 0) != self.federation_rank:
                continue
            loader = self.engine.site_loader(task.site)
            try:
                count = len(loader)
            except TypeError:
                return None
            limit = site_batch_limit(self.engine.batch_limit, loader, task.site)
            total += (count if limit is None else min(count, limit)) * task.epochs
        return max(total, 1)

    def progress_info(self) -> dict[str, str]:
        """Round and current site, for progress bars."""
        trainer = self.lightning_module.trainer if self.lightning_module is not None else None
        rnd = self.engine.round
        info = {"mode": self.mode.name}
        if trainer is not None:
            info["round"] = str(trainer.current_epoch)
        if rnd is not None and rnd.active is not None:
            info["site"] = rnd.plan.tasks[rnd.active].site
        return info

    def teardown(self) -> None:
        trainer = self.lightning_module.trainer if self.lightning_module is not None else None
        if trainer is not None and self._user_batch_limit is not None:
            trainer.limit_train_batches = self._user_batch_limit
            self._user_batch_limit = None
            unpatch_accumulation(trainer)
        self.engine.clear()
        super().teardown()

    @classmethod
    def register_strategies(cls, strategy_registry: Any) -> None:  # no DDP aliases for this class
        return
