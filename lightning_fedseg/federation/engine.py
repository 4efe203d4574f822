"""The round engine: one collaboration round inside one Lightning training epoch.

A round runs as: the mode plans it (site tasks, ``mean`` or ``chain``); for each task of this
process the engine puts the round's global weights into the module (``mean``) or takes the
previous site's result (``chain``), restores the site's own state (:mod:`.site_state`), and lets
Lightning train the site's local epochs with its ordinary semantics (:mod:`.semantics`); the
site's result goes to the aggregator as it arrives, so memory grows with the model and not with
the number of sites; before validation the aggregate becomes the global model.

The training 'dataloader' of a federated fit is a :class:`RoundIterable` over the local sites'
loaders. It records, for every batch it yields, which task and which local batch it is; the
strategy's ``batch_to_device`` hook, which Lightning calls before any ``on_train_batch_start``,
hands that record to :meth:`RoundEngine.on_batch`, which switches sites when the task changes.
So callbacks and the module see a site's own weights and optimizer from its first batch on.

Client-side steps (what changes inside a site's local training) act between
:meth:`RoundEngine._begin_task` and :meth:`RoundEngine._end_task`; server-side steps (how the
sites' results become the global weights) act in :meth:`RoundEngine._collect` and
:meth:`RoundEngine._combine`.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import torch
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_warn
from torch import Tensor

from lightning_fedseg.federation.aggregate import (
    NonFiniteStateError,
    WeightedMean,
    check_finite,
    finalize_mean,
    state_clone,
    state_to_cpu,
)
from lightning_fedseg.federation.client_runner import ClientRunner
from lightning_fedseg.federation.faults import FaultKind
from lightning_fedseg.federation.flat import load_by_copy, loads_by_copy
from lightning_fedseg.federation.modes import Aggregation, derive_seed, seed_torch
from lightning_fedseg.federation.privacy import DPFedAvg
from lightning_fedseg.federation.rounds import IDLE, Round, RoundFailedError

if TYPE_CHECKING:
    from lightning_fedseg.federation.strategy import FederatedStrategy

__all__ = ["RoundEngine"]


class RoundEngine:
    """Runs the rounds of a :class:`~lightning_fedseg.federation.strategy.FederatedStrategy`."""

    def __init__(self, strategy: FederatedStrategy) -> None:
        self.strategy = strategy
        self.round: Round | None = None
        self.batch_limit: int | float = 1.0
        self._loaders: dict[str, Any] = {}
        self.clients = ClientRunner(strategy)
        self._accumulator: WeightedMean | None = None  # its buffers are reused from round to round

    # ------------------------------------------------------------------ data
    def site_loader(self, site: str) -> Any:
        if site not in self._loaders:
            self._loaders[site] = self.strategy.datamodule().site_train_dataloader(site)
        return self._loaders[site]

    def clear(self) -> None:
        self._loaders.clear()
        self.round = None
        self._accumulator = None

    def seed_loader(self, loader: Any, round_idx: int, task_idx: int, epoch: int) -> None:
        """Seed shuffling from (seed, round, site, epoch) instead of the global RNG."""
        from torch.utils.data import RandomSampler

        seed = derive_seed(self.strategy.seed, round_idx, self._site_index(task_idx), epoch, 1)
        if hasattr(loader, "generator"):
            loader.generator = torch.Generator().manual_seed(seed)
        sampler = getattr(loader, "sampler", None)
        if isinstance(sampler, RandomSampler):
            sampler.generator = torch.Generator().manual_seed(seed + 1)

    def _site_index(self, task_idx: int) -> int:
        assert self.round is not None
        return self.strategy.site_index(self.round.plan.tasks[task_idx].site)

    # ------------------------------------------------------------------ batches
    def start_round(self) -> Round:
        strategy = self.strategy
        strategy.ensure_ready()
        # Not `trainer.current_epoch`: while a resumed fit sets up its dataloader, Lightning still
        # reports the epoch of the checkpoint.
        index = strategy.completed_rounds
        plan = strategy.mode.plan(index)
        rank = strategy.federation_rank
        local = tuple(i for i, task in enumerate(plan.tasks) if strategy.placement.get(task.site, 0) == rank)
        rnd = Round(index=index, plan=plan, local_tasks=local)
        if plan.aggregation is Aggregation.MEAN:
            rnd.global_state = state_clone(strategy.module.state_dict())  # on the module's device
            if loads_by_copy(strategy.module):
                rnd.live = strategy.module.state_dict(keep_vars=True)
            if not strategy.server.needs_site_states:
                policy = strategy.integer_policy
                if self._accumulator is None or self._accumulator.integer_policy != policy:
                    self._accumulator = WeightedMean(policy)
                self._accumulator.reset()
                rnd.accumulator = self._accumulator
        self.round = rnd
        return rnd

    def on_batch(self) -> None:
        """A training batch is about to be used: take its record and switch sites if it moved on."""
        rnd = self.round
        if rnd is None or rnd.finished or not rnd.records:
            return
        record = rnd.records.popleft()
        rnd.current = record
        if record.task >= 0 and record.task != rnd.active:
            self._end_task()
            self._begin_task(record.task)

    def local_batch(self) -> tuple[int, bool]:
        """(index in the site's local epoch, whether last) of the current batch, for accumulation."""
        record = self.round.current if self.round is not None else None
        return (record.index, record.last) if record is not None else (0, True)

    @property
    def skips_step(self) -> bool:
        """Whether the current batch trains nothing (an idle process or a failed site)."""
        rnd = self.round
        if rnd is None or rnd.current is None:
            return False
        return rnd.current.task < 0 or rnd.current.task in rnd.failed

    def training_step(self, step: Any, batch: Any) -> Any:
        """Run ``step()`` for the current site; a site's failure is recorded, not raised."""
        rnd = self.round
        if batch is IDLE:
            return self._no_op_loss()
        if rnd is None or rnd.active is None:
            return step()
        if rnd.active in rnd.failed:
            return self._no_op_loss()
        site = rnd.plan.tasks[rnd.active].site
        try:
            faults = self.strategy.faults
            if faults.kind is FaultKind.RAISE and faults.due(site, rnd.index, self._site_index(rnd.active)):
                raise RuntimeError(f"injected fault at site {site!r} in round {rnd.index}")
            self.clients.on_batch(batch)
            return self.clients.with_loss_terms(step())
        except Exception as err:  # a site's failure must not stop the federation
            rnd.failed[rnd.active] = f"{type(err).__name__}: {err}"
            rank_zero_warn(f"Round {rnd.index}: site {site!r} failed and is dropped from the round ({err}).")
            return self._no_op_loss()

    def before_optimizer_step(self, optimizer: Any) -> None:
        """After backward and unscaling, before clipping: the client steps' gradient corrections."""
        rnd = self.round
        if rnd is None or rnd.active is None or rnd.active in rnd.failed:
            return
        self.clients.before_optimizer_step(optimizer)

    def _no_op_loss(self) -> Tensor:
        """A loss connected to no parameter. (Lightning refuses `None` when several processes run.)"""
        return torch.zeros((), device=self.strategy.root_device, requires_grad=True)

    # ------------------------------------------------------------------ site tasks
    def _begin_task(self, task_idx: int) -> None:
        started = time.perf_counter()
        rnd, strategy = self.round, self.strategy
        assert rnd is not None
        module = strategy.module
        task = rnd.plan.tasks[task_idx]
        if rnd.plan.aggregation is Aggregation.MEAN:
            assert rnd.global_state is not None
            load_by_copy(module, rnd.live, rnd.global_state)
        else:
            self.sync_chain(rnd, task_idx)
            rnd.start_state = state_clone(module.state_dict())
        strategy.site_states.enter(task.site)
        self.clients.begin_site(rnd, task.site)
        seed_torch(derive_seed(strategy.seed, rnd.index, self._site_index(task_idx), 0, 2))
        rnd.active = task_idx
        strategy.call_site_hook("on_site_start", task.site, rnd.index)
        rnd.task_started_at = time.perf_counter()
        rnd.handover_seconds += rnd.task_started_at - started

    def _end_task(self) -> None:
        rnd, strategy = self.round, self.strategy
        if rnd is None or rnd.active is None:
            return
        module = strategy.module
        started = time.perf_counter()
        rnd.train_seconds += started - rnd.task_started_at
        task_idx = rnd.active
        site = rnd.plan.tasks[task_idx].site
        if task_idx not in rnd.failed:
            strategy.call_site_hook("on_site_end", site, rnd.index)
        rnd.active = None
        if task_idx not in rnd.failed:
            state = module.state_dict()
            faults = strategy.faults
            if faults.kind is FaultKind.NAN and faults.due(site, rnd.index, self._site_index(task_idx)):
                state = {k: v.float().fill_(float("nan")) if v.is_floating_point() else v for k, v in state.items()}
            try:
                self._collect(rnd, state, site)
            except NonFiniteStateError as err:
                rnd.failed[task_idx] = str(err)
                rank_zero_warn(f"Round {rnd.index}: {err} The site is dropped from the round.")
            else:
                self.clients.end_site(rnd, site)
        if task_idx in rnd.failed:
            strategy.site_states.forget(site)
            if rnd.start_state is not None and rnd.plan.aggregation is Aggregation.CHAIN:
                module.load_state_dict(rnd.start_state)
        else:
            rnd.succeeded.append(site)
        if rnd.plan.aggregation is Aggregation.CHAIN:
            self.sync_chain(rnd, task_idx + 1)
        rnd.handover_seconds += time.perf_counter() - started

    def sync_chain(self, rnd: Round, upto: int) -> None:
        """Hand the results of tasks ``rnd.synced_tasks .. upto-1`` over from their sites' processes."""
        strategy = self.strategy
        comm = strategy.comm
        while rnd.synced_tasks < upto:
            task_idx = rnd.synced_tasks
            rnd.synced_tasks += 1
            if not comm.active:
                continue
            site = rnd.plan.tasks[task_idx].site
            received, ok = comm.broadcast_state(
                strategy.module.state_dict(),
                ok=task_idx not in rnd.failed,
                src=strategy.placement[site],
                stats=rnd.comm,
                round_idx=rnd.index,
                what=f"hand-over of the weights after site {site!r}",
            )
            if received is not None:
                strategy.module.load_state_dict(received)
                if ok:
                    rnd.succeeded.append(site)

    # ------------------------------------------------------------------ server side
    def _collect(self, rnd: Round, state: dict[str, Tensor], site: str) -> None:
        """File one site's result (raises :class:`NonFiniteStateError` for NaN/Inf weights)."""
        server = self.strategy.server
        if rnd.plan.aggregation is not Aggregation.MEAN or rnd.global_state is None:
            check_finite(state, site)  # chained modes hand the weights on; nothing to file
        elif isinstance(server, DPFedAvg):  # the clipped update, with weight 1 (a fixed denominator)
            check_finite(state, site)
            assert rnd.accumulator is not None
            rnd.accumulator.add(server.clip(state, rnd.global_state), 1.0, site)
        elif rnd.accumulator is not None:  # add() checks finiteness
            rnd.accumulator.add(state, self.strategy.site_weight(site), site)
        else:  # a server step that needs every site's state
            check_finite(state, site)
            rnd.site_results.append((state_clone(state), self.strategy.site_weight(site), site))

    def _combine(self, rnd: Round) -> int:
        """Make the round's global model; returns how many sites contributed (over all processes)."""
        strategy = self.strategy
        module = strategy.module
        if rnd.plan.aggregation is not Aggregation.MEAN:
            self.sync_chain(rnd, len(rnd.plan.tasks))
            return len(rnd.succeeded)
        assert rnd.global_state is not None
        comm, server = strategy.comm, strategy.server
        if rnd.accumulator is None:  # robust rules: every site's state, in site order on every process
            ordered = [(strategy.site_index(site), weight, state) for state, weight, site in rnd.site_results]
            gathered = comm.gather_states(ordered, rnd.global_state, rnd.comm, rnd.index)
            succeeded = len(gathered)
            if succeeded >= strategy.min_sites:
                states, weights = [g[2] for g in gathered], [g[1] for g in gathered]
                names = [strategy.sites[g[0]] for g in gathered]
                new = server.step_from_sites(rnd.global_state, states, weights, rnd.index, sites=names)
                load_by_copy(module, rnd.live, new)
        else:
            sums, total = rnd.accumulator.sums()
            reference = rnd.global_state
            if isinstance(server, DPFedAvg):  # each process adds its share of the noise to its own sum
                reference = {**rnd.global_state, **server.extra_sums()}  # and the count of unclipped sites
                zeros = {k: torch.zeros(v.shape, dtype=torch.float64, device=v.device) for k, v in reference.items()}
                sums = server.noise_share({**zeros, **sums}, rnd.global_state, comm.world_size, comm.rank, rnd.index)
            sums, total, succeeded = comm.all_reduce_sums(
                sums, total, len(rnd.succeeded), reference, rnd.comm, rnd.index, masked=strategy.masking
            )
            if isinstance(server, DPFedAvg) and succeeded >= strategy.min_sites:
                load_by_copy(module, rnd.live, server.step_from_sum(rnd.global_state, sums, rnd.index))
            elif succeeded >= strategy.min_sites and total > 0:
                mean = finalize_mean(sums, total, rnd.global_state, strategy.integer_policy)
                load_by_copy(module, rnd.live, server.step(rnd.global_state, mean, rnd.index))
        self.clients.end_round(rnd, succeeded)
        return succeeded

    def finish_round(self) -> None:
        """Close the round: the aggregate becomes the global model (idempotent)."""
        rnd = self.round
        if rnd is None or rnd.finished:
            return
        self._end_task()
        rnd.current = None
        started = time.perf_counter()
        succeeded = self._combine(rnd)
        rnd.handover_seconds += time.perf_counter() - started
        rnd.finished = True
        if succeeded < self.strategy.min_sites:
            tasks = rnd.plan.tasks
            failures = "; ".join(f"{tasks[i].site}: {msg}" for i, msg in sorted(rnd.failed.items()))
            raise RoundFailedError(
                f"Round {rnd.index}: only {succeeded} of {len(tasks)} sites finished, fewer than"
                f" `min_sites`={self.strategy.min_sites} ({failures or 'no site trained'}). The run stops;"
                " the last checkpoint is intact and `fit(ckpt_path='last')` resumes from it."
            )

    def end_round(self, trainer: Any, module: Any) -> None:
        """After the round's validation: the mode decides, the round is recorded and logged."""
        rnd, strategy = self.round, self.strategy
        if rnd is None:
            return
        self.finish_round()
        comm = strategy.comm
        metrics = comm.merged_metrics(_float_metrics(trainer.callback_metrics), strategy.mode.metric_keys(rnd.index))
        decision = strategy.mode.end_round(rnd.index, metrics, lambda: state_to_cpu(module.state_dict()))
        if decision.weights is not None:
            module.load_state_dict(decision.weights)
        trainer.should_stop = trainer.should_stop or decision.stop
        server_metrics = {**strategy.server.metrics(), **self.clients.metrics()}
        if isinstance(strategy.server, DPFedAvg) and strategy.server.would_exceed():
            rank_zero_info(f"Round {rnd.index}: one more round would exceed the privacy budget; training stops.")
            trainer.should_stop = True
        failed_here = {rnd.plan.tasks[i].site: msg for i, msg in rnd.failed.items()}
        failed = {s: failed_here.get(s, "failed on another process") for s in comm.union(strategy.sites, failed_here)}
        succeeded = sorted(comm.union(strategy.sites, rnd.succeeded))
        record: dict[str, Any] = {
            "round": rnd.index,
            "sites": list(rnd.plan.sites),
            "succeeded": succeeded,
            "failed": failed,
            "train_seconds": rnd.train_seconds,
            "handover_seconds": rnd.handover_seconds,
            "comm_seconds": rnd.comm.seconds,
            "bytes_sent": rnd.comm.bytes_sent,
            "bytes_received": rnd.comm.bytes_received,
        }
        record.update(server_metrics)
        strategy.history.append(record)
        strategy.completed_rounds += 1
        for key in ("train_seconds", "handover_seconds", "comm_seconds", "bytes_sent", "bytes_received"):
            module.log(f"federation/{key}", float(record[key]), on_epoch=True, sync_dist=False)
        module.log("federation/sites_succeeded", float(len(succeeded)), on_epoch=True)
        for key, value in server_metrics.items():
            module.log(key, float(value), on_epoch=True, sync_dist=False)
        self.round = None

    @property
    def in_round(self) -> bool:
        """Whether a round is under way and its global model not yet made."""
        return self.round is not None and not self.round.finished


def _float_metrics(metrics: Mapping[str, Any]) -> dict[str, float]:
    out: dict[str, float] = {}
    for key, value in metrics.items():
        try:
            out[key] = float(value)
        except (TypeError, ValueError):
            continue
    return out
