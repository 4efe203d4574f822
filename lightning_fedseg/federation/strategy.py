"""FederatedStrategy: multi-institution training as a property of the Lightning Trainer.

One Trainer epoch is one collaboration round. The strategy replaces the training dataloader with a
round iterable that walks the round's site tasks (asked from the :mod:`~.modes` object) and, in
``on_train_batch_start``, notices when the batches move from one site to the next: it then files
the finished site's weights with the aggregator and prepares the next site (global weights, its
own optimizer state, a seed derived from round and site). Before the round's validation, the
aggregate becomes the global model, so validation, logging, ``ModelCheckpoint`` and
``EarlyStopping`` see the global weights only.

The same class runs every site in one process (a simulation) or, launched like DDP with several
processes, one rank per site (or several sites per rank) on torch.distributed: FedAvg then sums
the sites' weighted states with one all-reduce, and IIL/CIIL broadcast the weights from the rank
of the site that just trained. Samples, labels and gradients never cross a process boundary.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from typing import TYPE_CHECKING, Any, Literal, Protocol, runtime_checkable

import lightning.pytorch as pl
import torch
import torch.distributed as dist
from lightning.fabric.plugins import CheckpointIO, ClusterEnvironment
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.overrides.distributed import _sync_module_states
from lightning.pytorch.plugins.precision import Precision
from lightning.pytorch.strategies import DDPStrategy, Strategy, StrategyRegistry
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities.rank_zero import rank_zero_warn
from torch import Tensor

from lightning_fedseg._validation import check_int
from lightning_fedseg.federation.aggregate import (
    IntegerPolicy,
    NonFiniteStateError,
    WeightedMean,
    check_finite,
    finalize_mean,
    state_to_cpu,
)
from lightning_fedseg.federation.comm import CommStats, SiteComm
from lightning_fedseg.federation.modes import (
    CDS,
    Aggregation,
    CollaborationMode,
    RoundPlan,
    derive_seed,
)
from lightning_fedseg.federation.placement import assign_sites

if TYPE_CHECKING:
    pass

__all__ = ["FederatedStrategy", "OptimizerStatePolicy", "RoundFailedError", "SiteDataModule"]

log = logging.getLogger(__name__)

FEDERATION_KEY = "federation"
_STATE_VERSION = 1


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


class RoundFailedError(RuntimeError):
    """Too few sites finished a round; the run stops and the last checkpoint stays as it was."""


class OptimizerStatePolicy:
    """``reset``: a fresh optimizer (and LR scheduler) state at every site visit (the paper's code);
    ``keep``: each site keeps its own state from visit to visit."""

    RESET = "reset"
    KEEP = "keep"
    ALL = (RESET, KEEP)


class _IdleBatch:
    """Yielded once by a rank that trains no site this round, so that its epoch still validates."""

    def __repr__(self) -> str:
        return "<idle federated rank>"


_IDLE = _IdleBatch()


@dataclass
class _Round:
    index: int
    plan: RoundPlan
    local_tasks: tuple[int, ...]
    global_state: dict[str, Tensor] | None = None
    schedule: deque[int] = field(default_factory=deque)
    active: int | None = None
    start_state: dict[str, Tensor] | None = None
    accumulator: WeightedMean | None = None
    succeeded: list[str] = field(default_factory=list)
    failed: dict[int, str] = field(default_factory=dict)
    synced_tasks: int = 0
    finished: bool = False
    train_seconds: float = 0.0
    comm: CommStats = field(default_factory=CommStats)
    task_started_at: float = 0.0


class _RoundIterable:
    """The training 'dataloader' of a federated fit: one pass is one round's site tasks."""

    def __init__(self, strategy: FederatedStrategy) -> None:
        self.strategy = strategy

    def __iter__(self) -> Iterator[Any]:
        strategy = self.strategy
        rnd = strategy._start_round()
        yielded = False
        for task_idx in rnd.local_tasks:
            task = rnd.plan.tasks[task_idx]
            loader = strategy._site_loader(task.site)
            for epoch in range(task.epochs):
                strategy._seed_loader(loader, rnd.index, task_idx, epoch)
                for batch in loader:
                    if task_idx in rnd.failed:
                        break
                    rnd.schedule.append(task_idx)
                    yielded = True
                    yield batch
        if not yielded:
            rnd.schedule.append(-1)
            yield _IDLE


class _RoundHooks(Callback):
    """Internal callback the strategy puts first in ``trainer.callbacks``: it closes each round
    (before ``ModelCheckpoint`` saves) and logs the round's federation figures."""

    def __init__(self, strategy: FederatedStrategy) -> None:
        self.strategy = strategy

    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not trainer.sanity_checking and trainer.state.fn == TrainerFn.FITTING:
            self.strategy._finish_round()

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.strategy._end_round(trainer, pl_module)


class FederatedStrategy(DDPStrategy):
    """Run a collaboration mode (``cds``, ``fedavg``, ``iil``, ``ciil``, ``single``) inside ``fit``.

    With one process every site is simulated in turn; launched with several processes (``devices``,
    ``num_nodes``, ``torchrun``, SLURM) each rank trains its own sites and the weights travel over
    torch.distributed.

    Args:
        mode: the collaboration mode (see :mod:`lightning_fedseg.federation.modes`).
        optimizer_state: ``"reset"`` (default for FedAvg/CIIL, the paper's code) or ``"keep"``.
            Modes that do not start a new visit each round (cds, single, iil) keep the state of
            the site they stay at under either policy.
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
        if optimizer_state not in OptimizerStatePolicy.ALL:
            raise ValueError(
                f"Expected `optimizer_state` to be one of {OptimizerStatePolicy.ALL}, but got {optimizer_state!r}."
            )
        check_int("min_sites", min_sites)
        if not 0.0 <= fault_probability <= 1.0:
            raise ValueError(f"Expected `fault_probability` to be in [0, 1], but got {fault_probability}.")
        if fault_kind not in ("raise", "nan"):
            raise ValueError(f"Expected `fault_kind` to be 'raise' or 'nan', but got {fault_kind!r}.")
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
        from lightning_fedseg.federation.modes import FedAvg

        self.mode = mode if mode is not None else FedAvg()
        self.optimizer_state_policy = optimizer_state
        self.min_sites = min_sites
        self.seed = seed
        self.integer_policy = IntegerPolicy(integer_policy)
        self.fault_schedule = {str(k): {int(r) for r in v} for k, v in (fault_schedule or {}).items()}
        self.fault_probability = fault_probability
        self.fault_kind = fault_kind
        self.allow_remote = allow_remote
        self._sites: tuple[str, ...] = ()
        self._placement: dict[str, int] = {}
        self._ready = False
        self._pending_state: dict[str, Any] | None = None
        self._round: _Round | None = None
        self._loaders: dict[str, Any] = {}
        self._initial_optimizer_states: list[dict[str, Any]] = []
        self._initial_scheduler_states: list[dict[str, Any]] = []
        self._site_optimizer_states: dict[str, list[dict[str, Any]]] = {}
        self._site_scheduler_states: dict[str, list[dict[str, Any]]] = {}
        self.history: list[dict[str, Any]] = []
        self.completed_rounds = 0

    # ------------------------------------------------------------------ processes and devices
    @property
    def is_multiprocess(self) -> bool:
        """Whether sites are spread over several processes (otherwise they are simulated)."""
        return self.num_nodes * self.num_processes > 1

    @property
    def is_distributed(self) -> bool:
        return self.is_multiprocess

    def _configure_launcher(self) -> None:
        if self.is_multiprocess:
            super()._configure_launcher()
        else:
            self._launcher = None

    def setup_distributed(self) -> None:
        self.set_world_ranks()
        if not self.is_multiprocess:
            return
        self._check_address()
        super().setup_distributed()

    def _check_address(self) -> None:
        import ipaddress
        import socket

        assert self.cluster_environment is not None
        address = self.cluster_environment.main_address
        try:
            loopback = all(ipaddress.ip_address(info[4][0]).is_loopback for info in socket.getaddrinfo(address, None))
        except (OSError, ValueError):
            loopback = False
        if not loopback and not self.allow_remote:
            raise RuntimeError(
                f"FederatedStrategy refuses to bind the non-loopback address {address!r}:"
                " torch.distributed traffic is neither encrypted nor authenticated."
                " HINT: run the sites over a private network, a VPN or an SSH tunnel, then set"
                " `allow_remote=True` to acknowledge this."
            )

    @property
    def distributed_sampler_kwargs(self) -> dict[str, Any]:
        # Only centralized training shards its pooled data over ranks; a federated rank evaluates
        # exactly the sites it owns, so Lightning's sampler must leave their loaders whole.
        if isinstance(self.mode, CDS):
            return super().distributed_sampler_kwargs
        return {"num_replicas": 1, "rank": 0}

    def configure_ddp(self) -> None:
        # No gradient synchronization between sites: only CDS on several ranks is plain DDP.
        if isinstance(self.mode, CDS) and self.is_multiprocess:
            super().configure_ddp()

    def _setup_model(self, model: Any) -> Any:
        if isinstance(self.mode, CDS) and self.is_multiprocess:
            return super()._setup_model(model)
        return model

    def setup(self, trainer: pl.Trainer) -> None:
        if self.is_multiprocess:
            super().setup(trainer)
        else:  # one process: the single-device path (no process group to synchronize over)
            Strategy.setup(self, trainer)
        if trainer.state.fn != TrainerFn.FITTING:
            return
        self._initial_optimizer_states = [_clone(opt.state_dict()) for opt in self.optimizers]
        self._initial_scheduler_states = [_clone(c.scheduler.state_dict()) for c in self.lr_scheduler_configs]
        callbacks: list[Callback] = trainer.callbacks  # type: ignore[attr-defined]
        if not any(isinstance(cb, _RoundHooks) for cb in callbacks):
            callbacks.insert(0, _RoundHooks(self))
        if self.is_multiprocess and not isinstance(self.mode, CDS):
            # Every site starts from rank 0's initial weights, as DDP would ensure.
            _sync_module_states(self.lightning_module)  # type: ignore[arg-type]
            # A rank evaluates only its own sites: its loaders for other sites are empty.
            assert self.lightning_module is not None
            self.lightning_module.allow_zero_length_dataloader_with_multiple_devices = True
            # Ranks train different numbers of batches per round, so Lightning's per-batch SIGTERM
            # broadcast would pair up unrelated collectives. Sites synchronize at round ends only.
            trainer.fit_loop.epoch_loop._broadcast_sigterm_tensor = lambda: None  # type: ignore[method-assign]
        self._ensure_ready()

    # ------------------------------------------------------------------ data
    def _datamodule(self) -> Any:
        trainer = self.lightning_module.trainer if self.lightning_module is not None else None
        datamodule = getattr(trainer, "datamodule", None)
        if datamodule is None or not isinstance(datamodule, SiteDataModule):
            raise TypeError(
                "FederatedStrategy needs a DataModule with `site_names` and"
                " `site_train_dataloader(site)`, passed as `trainer.fit(model, datamodule=...)`;"
                f" got {type(datamodule).__name__}. HINT: see `SiteDataModule` in the README."
            )
        return datamodule

    def _ensure_ready(self) -> None:
        if self._ready:
            return
        datamodule = self._datamodule()
        sites = tuple(str(s) for s in datamodule.site_names)
        if not isinstance(self.mode, CDS) and not sites:
            raise ValueError("The DataModule reports no sites (`site_names` is empty).")
        self.mode.setup(sites)
        self._sites = sites
        if self.is_multiprocess:
            # Place sites by a size every process knows without reading any site's data.
            sizer = getattr(datamodule, "site_num_subjects", None)
            sizes = {s: float(sizer(s)) if sizer is not None else 1.0 for s in sites}
            self._placement = assign_sites(sites, sizes, self.world_size)
        else:
            self._placement = dict.fromkeys(sites, 0)
        if self.is_multiprocess and hasattr(datamodule, "restrict_sites"):
            datamodule.restrict_sites(self.local_sites)
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
        rank = self.global_rank if self.is_multiprocess else 0
        return tuple(s for s in self._sites if self._placement.get(s, 0) == rank)

    def _site_weight(self, datamodule: Any, site: str) -> float:
        if hasattr(datamodule, "site_num_samples"):
            return float(datamodule.site_num_samples(site))
        loader = self._site_loader(site)
        dataset = getattr(loader, "dataset", None)
        try:
            return float(len(dataset))  # type: ignore[arg-type]
        except TypeError:
            raise TypeError(
                f"Cannot tell how many samples site {site!r} has: its loader's dataset has no length."
                " HINT: implement `site_num_samples(site)` on the DataModule."
            ) from None

    def _site_loader(self, site: str) -> Any:
        if site not in self._loaders:
            self._loaders[site] = self._datamodule().site_train_dataloader(site)
        return self._loaders[site]

    def _seed_loader(self, loader: Any, round_idx: int, task_idx: int, epoch: int) -> None:
        """Seed shuffling from (seed, round, site, epoch) instead of the global RNG."""
        from torch.utils.data import RandomSampler

        seed = derive_seed(self.seed, round_idx, self._site_index(task_idx, round_idx), epoch, 1)
        if hasattr(loader, "generator"):
            loader.generator = torch.Generator().manual_seed(seed)
        sampler = getattr(loader, "sampler", None)
        if isinstance(sampler, RandomSampler):
            sampler.generator = torch.Generator().manual_seed(seed + 1)

    def _site_index(self, task_idx: int, round_idx: int) -> int:
        assert self._round is not None
        site = self._round.plan.tasks[task_idx].site
        return self._sites.index(site) if site in self._sites else len(self._sites)

    def process_dataloader(self, dataloader: object) -> object:
        dataloader = super().process_dataloader(dataloader)
        trainer = self.lightning_module.trainer if self.lightning_module is not None else None
        if trainer is None or not trainer.training or isinstance(self.mode, CDS):
            return dataloader
        return _RoundIterable(self)

    # ------------------------------------------------------------------ rounds
    def _start_round(self) -> _Round:
        self._ensure_ready()
        # Not `trainer.current_epoch`: while a resumed fit sets up its dataloader, Lightning still
        # reports the epoch of the checkpoint.
        index = self.completed_rounds
        plan = self.mode.plan(index)
        rank = self.global_rank if self.is_multiprocess else 0
        local = tuple(i for i, task in enumerate(plan.tasks) if self._placement.get(task.site, 0) == rank)
        rnd = _Round(index=index, plan=plan, local_tasks=local)
        if plan.aggregation is Aggregation.MEAN:
            rnd.global_state = state_to_cpu(self.lightning_module.state_dict())  # type: ignore[union-attr]
            rnd.accumulator = WeightedMean(self.integer_policy)
        self._round = rnd
        return rnd

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        super().on_train_batch_start(batch, batch_idx)
        rnd = self._round
        if rnd is None or rnd.finished or not rnd.schedule:
            return
        task_idx = rnd.schedule.popleft()
        if task_idx != rnd.active and task_idx >= 0:
            self._end_task()
            self._begin_task(task_idx)

    def training_step(self, *args: Any, **kwargs: Any) -> Any:
        rnd = self._round
        batch = args[0] if args else kwargs.get("batch")
        if batch is _IDLE:
            return self._no_op_loss()
        if rnd is None or rnd.active is None:
            return super().training_step(*args, **kwargs)
        if rnd.active in rnd.failed:
            return self._no_op_loss()
        site = rnd.plan.tasks[rnd.active].site
        try:
            if self.fault_kind == "raise" and self._fault_due(site, rnd.index):
                raise RuntimeError(f"injected fault at site {site!r} in round {rnd.index}")
            return super().training_step(*args, **kwargs)
        except Exception as err:  # a site's failure must not stop the federation
            rnd.failed[rnd.active] = f"{type(err).__name__}: {err}"
            rank_zero_warn(f"Round {rnd.index}: site {site!r} failed and is dropped from the round ({err}).")
            return self._no_op_loss()

    def _no_op_loss(self) -> Tensor:
        """A loss connected to no parameter: the optimizer step changes nothing. (Lightning
        refuses `None` from `training_step` when several processes run.)"""
        return torch.zeros((), device=self.root_device, requires_grad=True)

    def _fault_due(self, site: str, round_idx: int) -> bool:
        if round_idx in self.fault_schedule.get(site, ()):
            return True
        if self.fault_probability > 0.0:
            site_idx = self._sites.index(site) if site in self._sites else -1
            draw = derive_seed(self.seed, round_idx, site_idx, 7) / 2**32
            return draw < self.fault_probability
        return False

    def _begin_task(self, task_idx: int) -> None:
        rnd = self._round
        module = self.lightning_module
        assert rnd is not None and module is not None
        task = rnd.plan.tasks[task_idx]
        if rnd.plan.aggregation is Aggregation.MEAN:
            assert rnd.global_state is not None
            module.load_state_dict(rnd.global_state)
        else:
            self._sync_chain(rnd, task_idx)
            rnd.start_state = state_to_cpu(module.state_dict())
        self._restore_optimizer(task.site)
        torch.manual_seed(derive_seed(self.seed, rnd.index, self._site_index(task_idx, rnd.index), 0, 2))
        rnd.active = task_idx
        self._call_site_hook("on_site_start", task.site, rnd.index)
        rnd.task_started_at = time.perf_counter()

    def _end_task(self) -> None:
        rnd = self._round
        module = self.lightning_module
        if rnd is None or rnd.active is None or module is None:
            return
        rnd.train_seconds += time.perf_counter() - rnd.task_started_at
        site = rnd.plan.tasks[task_idx := rnd.active].site
        if task_idx not in rnd.failed:
            self._call_site_hook("on_site_end", site, rnd.index)
        rnd.active = None
        state = module.state_dict()
        if task_idx not in rnd.failed:
            if self.fault_kind == "nan" and self._fault_due(site, rnd.index):
                state = {k: v.float().fill_(float("nan")) if v.is_floating_point() else v for k, v in state.items()}
            try:
                check_finite(state, site)
                if rnd.accumulator is not None:
                    rnd.accumulator.add(state, self._site_weight(self._datamodule(), site), site)
            except NonFiniteStateError as err:
                rnd.failed[task_idx] = str(err)
                rank_zero_warn(f"Round {rnd.index}: {err} The site is dropped from the round.")
        if task_idx in rnd.failed:
            if rnd.start_state is not None and rnd.plan.aggregation is Aggregation.CHAIN:
                module.load_state_dict(rnd.start_state)
        else:
            rnd.succeeded.append(site)
            self._store_optimizer(site)
        if rnd.plan.aggregation is Aggregation.CHAIN:
            self._sync_chain(rnd, task_idx + 1)

    def _call_site_hook(self, name: str, site: str, round_idx: int) -> None:
        """Call ``on_site_start`` / ``on_site_end(trainer, pl_module, site, round_idx)`` on the
        callbacks that define them: at ``on_site_end`` the module holds the site's trained weights."""
        module = self.lightning_module
        assert module is not None
        trainer = module.trainer
        for callback in trainer.callbacks:  # type: ignore[attr-defined]
            hook = getattr(callback, name, None)
            if callable(hook):
                hook(trainer, module, site, round_idx)

    def _finish_round(self) -> None:
        """Close the round: the aggregate becomes the global model (idempotent)."""
        rnd = self._round
        module = self.lightning_module
        if rnd is None or rnd.finished or module is None:
            return
        self._end_task()
        tasks = rnd.plan.tasks
        if rnd.plan.aggregation is Aggregation.MEAN:
            assert rnd.accumulator is not None and rnd.global_state is not None
            if self.is_multiprocess and self.integer_policy is not IntegerPolicy.MEAN:
                raise ValueError("`integer_policy='max'` is not supported on several processes; use 'mean'.")
            sums, total = rnd.accumulator.sums()
            sums, total, succeeded = self.comm.all_reduce_sums(
                sums, total, len(rnd.succeeded), rnd.global_state, rnd.comm, rnd.index
            )
            if succeeded >= self.min_sites and total > 0:
                module.load_state_dict(finalize_mean(sums, total, rnd.global_state, self.integer_policy))
        else:
            self._sync_chain(rnd, len(tasks))
            succeeded = len(rnd.succeeded)
        rnd.finished = True
        if succeeded < self.min_sites:
            failures = "; ".join(f"{tasks[i].site}: {msg}" for i, msg in sorted(rnd.failed.items()))
            raise RoundFailedError(
                f"Round {rnd.index}: only {succeeded} of {len(tasks)} sites finished, fewer than"
                f" `min_sites`={self.min_sites} ({failures or 'no site trained'}). The run stops;"
                " the last checkpoint is intact and `fit(ckpt_path='last')` resumes from it."
            )

    def _end_round(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        rnd = self._round
        if rnd is None:  # cds: plain Lightning training, no site hand-overs
            metrics = _float_metrics(trainer.callback_metrics)
            decision = self.mode.end_round(self.completed_rounds, metrics, lambda: state_to_cpu(pl_module.state_dict()))
            self.completed_rounds += 1
            trainer.should_stop = trainer.should_stop or decision.stop
            return
        self._finish_round()
        metrics = self.comm.merged_metrics(_float_metrics(trainer.callback_metrics))
        decision = self.mode.end_round(rnd.index, metrics, lambda: state_to_cpu(pl_module.state_dict()))
        if decision.weights is not None:
            pl_module.load_state_dict(decision.weights)
        trainer.should_stop = trainer.should_stop or decision.stop
        record = {
            "round": rnd.index,
            "sites": list(rnd.plan.sites),
            "succeeded": sorted(self.comm.gather_union(set(rnd.succeeded))),
            "failed": self.comm.gather_union({rnd.plan.tasks[i].site: msg for i, msg in rnd.failed.items()}),
            "train_seconds": rnd.train_seconds,
            "comm_seconds": rnd.comm.seconds,
            "bytes_sent": rnd.comm.bytes_sent,
            "bytes_received": rnd.comm.bytes_received,
        }
        self.history.append(record)
        self.completed_rounds += 1
        for key in ("train_seconds", "comm_seconds", "bytes_sent", "bytes_received"):
            pl_module.log(f"federation/{key}", float(record[key]), on_epoch=True, sync_dist=False)
        pl_module.log("federation/sites_succeeded", float(len(record["succeeded"])), on_epoch=True)
        self._round = None

    # ------------------------------------------------------------------ optimizer state per site
    def _store_optimizer(self, site: str) -> None:
        self._site_optimizer_states[site] = [_clone(opt.state_dict(), cpu=True) for opt in self.optimizers]
        self._site_scheduler_states[site] = [_clone(c.scheduler.state_dict()) for c in self.lr_scheduler_configs]

    def _restore_optimizer(self, site: str) -> None:
        fresh = self.optimizer_state_policy == OptimizerStatePolicy.RESET and self.mode.resets_each_round
        opt_states = None if fresh else self._site_optimizer_states.get(site)
        sched_states = None if fresh else self._site_scheduler_states.get(site)
        for opt, state in zip(self.optimizers, opt_states or self._initial_optimizer_states, strict=True):
            opt.load_state_dict(state)
        for config, state in zip(
            self.lr_scheduler_configs, sched_states or self._initial_scheduler_states, strict=True
        ):
            config.scheduler.load_state_dict(state)

    # ------------------------------------------------------------------ communication
    @property
    def comm(self) -> SiteComm:
        """Collectives between this process and the others (a no-op in one process)."""
        world = self.world_size if self.is_multiprocess else 1
        backend = dist.get_backend() if dist.is_available() and dist.is_initialized() else "gloo"
        device = self.root_device if backend == "nccl" else torch.device("cpu")
        return SiteComm(self._placement, self.global_rank if world > 1 else 0, world, self._timeout, device)

    def _sync_chain(self, rnd: _Round, upto: int) -> None:
        """Hand the results of tasks ``rnd.synced_tasks .. upto-1`` over from their sites' processes."""
        module = self.lightning_module
        assert module is not None
        comm = self.comm
        while rnd.synced_tasks < upto:
            task_idx = rnd.synced_tasks
            rnd.synced_tasks += 1
            if not comm.active:
                continue
            site = rnd.plan.tasks[task_idx].site
            received, ok = comm.broadcast_state(
                module.state_dict(),
                ok=task_idx not in rnd.failed,
                src=self._placement[site],
                stats=rnd.comm,
                round_idx=rnd.index,
                what=f"hand-over of the weights after site {site!r}",
            )
            if received is not None:
                module.load_state_dict(received)
                if ok:
                    rnd.succeeded.append(site)

    # ------------------------------------------------------------------ checkpoints
    def federation_state_dict(self) -> dict[str, Any]:
        """Everything needed to continue: mode state and each site's optimizer/scheduler state."""
        opt_states, sched_states = self._site_optimizer_states, self._site_scheduler_states
        if self.is_multiprocess and dist.is_initialized():
            gathered: list[Any] = [None] * self.world_size
            dist.all_gather_object(gathered, (opt_states, sched_states))
            opt_states, sched_states = {}, {}
            for o, s in gathered:
                opt_states.update(o)
                sched_states.update(s)
        return {
            "version": _STATE_VERSION,
            "mode": type(self.mode).__name__,
            "mode_state": self.mode.state_dict(),
            "optimizer_state": self.optimizer_state_policy,
            "site_optimizer_states": opt_states,
            "site_scheduler_states": sched_states,
            "history": self.history,
            "completed_rounds": self.completed_rounds,
        }

    def _load_federation_state(self, state: Mapping[str, Any]) -> None:
        if state.get("mode") != type(self.mode).__name__:
            raise ValueError(
                f"The checkpoint was written by the {state.get('mode')} mode, but this run uses"
                f" {type(self.mode).__name__}."
            )
        self.mode.load_state_dict(state["mode_state"])
        local = set(self.local_sites) if self.is_multiprocess else None
        self._site_optimizer_states = {
            k: v for k, v in state["site_optimizer_states"].items() if local is None or k in local
        }
        self._site_scheduler_states = {
            k: v for k, v in state["site_scheduler_states"].items() if local is None or k in local
        }
        self.history = list(state.get("history", []))
        self.completed_rounds = int(state["completed_rounds"])

    def save_checkpoint(self, checkpoint: dict[str, Any], filepath: Any, storage_options: Any | None = None) -> None:
        if self._ready:
            checkpoint[FEDERATION_KEY] = self.federation_state_dict()
        super().save_checkpoint(checkpoint, filepath, storage_options=storage_options)

    def load_checkpoint(self, checkpoint_path: Any, weights_only: bool | None = None) -> dict[str, Any]:
        checkpoint = super().load_checkpoint(checkpoint_path, weights_only=weights_only)
        if FEDERATION_KEY in checkpoint:
            self._pending_state = checkpoint[FEDERATION_KEY]
            self._ready = False
        return checkpoint

    # ------------------------------------------------------------------ display
    def expected_round_batches(self) -> int | None:
        """Training batches this process will see in the coming round (for progress bars)."""
        if isinstance(self.mode, CDS) or not self._ready:
            return None
        if self._round is not None and not self._round.finished:
            plan, index = self._round.plan, self._round.index
        else:
            index = self.completed_rounds
            plan = self.mode.plan(index)
        rank = self.global_rank if self.is_multiprocess else 0
        total = 0
        for task in plan.tasks:
            if self._placement.get(task.site, 0) != rank:
                continue
            try:
                total += len(self._site_loader(task.site)) * task.epochs
            except TypeError:
                return None
        return max(total, 1)

    def progress_info(self) -> dict[str, str]:
        """Round and current site, for progress bars."""
        trainer = self.lightning_module.trainer if self.lightning_module is not None else None
        rnd = self._round
        info = {"mode": self.mode.name}
        if trainer is not None:
            info["round"] = str(trainer.current_epoch)
        if rnd is not None and rnd.active is not None:
            info["site"] = rnd.plan.tasks[rnd.active].site
        return info

    def teardown(self) -> None:
        self._loaders.clear()
        super().teardown()

    @classmethod
    def register_strategies(cls, strategy_registry: Any) -> None:  # no DDP aliases for this class
        return


def _clone(obj: Any, cpu: bool = False) -> Any:
    if isinstance(obj, Tensor):
        return obj.detach().to("cpu", copy=True) if cpu else obj.detach().clone()
    if isinstance(obj, dict):
        return {k: _clone(v, cpu) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_clone(v, cpu) for v in obj]
    if isinstance(obj, tuple):
        return tuple(_clone(v, cpu) for v in obj)
    return obj


def _float_metrics(metrics: Mapping[str, Any]) -> dict[str, float]:
    out: dict[str, float] = {}
    for key, value in metrics.items():
        try:
            out[key] = float(value)
        except (TypeError, ValueError):
            continue
    return out


def register_strategies() -> None:
    """Register the short names ``federated``, ``fedavg``, ``cds``, ``iil``, ``ciil``, ``single``."""
    from lightning_fedseg.federation.modes import CIIL, IIL, FedAvg, SingleSite

    entries: dict[str, tuple[str, Any]] = {
        "federated": ("Federated training (FedAvg by default) over the DataModule's sites", None),
        "fedavg": ("Federated averaging over the DataModule's sites", FedAvg),
        "cds": ("Centralized data sharing (pooled training) through FederatedStrategy", CDS),
        "iil": ("Institutional incremental learning over the DataModule's sites", IIL),
        "ciil": ("Cyclic institutional incremental learning over the DataModule's sites", CIIL),
        "single": ("The first site alone (institution-only baseline)", SingleSite),
    }
    for name, (description, mode_cls) in entries.items():
        if name in StrategyRegistry:
            continue
        if mode_cls is None:
            StrategyRegistry.register(name, FederatedStrategy, description=description)
        else:
            StrategyRegistry.register(name, _NamedModeStrategy.factory(mode_cls), description=description)


class _NamedModeStrategy:
    """Builds a FederatedStrategy with a fresh default mode each time a short name is used."""

    @staticmethod
    def factory(mode_cls: type[CollaborationMode]) -> Any:
        def build(**kwargs: Any) -> FederatedStrategy:
            return FederatedStrategy(mode=mode_cls(), **kwargs)

        build.__name__ = f"FederatedStrategy_{mode_cls.name}"
        return build
