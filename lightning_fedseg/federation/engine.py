"""The round engine: one collaboration round inside one Lightning training epoch. No Lightning import.

A round runs as: the mode plans it (site tasks, ``mean`` or ``chain``); for each task of this
process the engine puts the round's global weights into the module (``mean``) or takes the
previous site's result (``chain``), restores the site's own state (:mod:`.site_state`), and lets
the host (Lightning) train the site's local epochs with its ordinary semantics; the site's result
goes to the server step's :class:`~lightning_fedseg.federation.aggregators.Aggregator` as it
arrives, so memory grows with the model and not with the number of sites; the aggregator combines
the round's results across processes through the :class:`~lightning_fedseg.federation.transport.Transport`
into the next global model, before validation.

The engine gets everything explicitly (mode, server step, client steps, sites and placement, site
states, transport) plus a narrow :class:`RoundHost` for what only the training framework can do
(the live module, its device, a site's loader and sample count, the site start and end
callbacks). It owns the round counter and the history, and :meth:`RoundEngine.close_round`
returns what the host must apply (the mode's decision, stop, the round's record to log).

The training 'dataloader' of a federated fit is a :class:`~lightning_fedseg.federation.rounds.RoundIterable`
over the local sites' loaders. It records, for every batch it yields, which task and which local
batch it is; the host hands each record to :meth:`RoundEngine.on_batch` before any callback sees
the batch, and the engine switches sites when the task changes. So callbacks and the module see a
site's own weights and optimizer from its first batch on.

Extension points are the steps, not this module: client steps (:mod:`.client_steps`) act inside a
site's local training; server steps (:mod:`.server`) choose how the round's results combine.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from lightning_fedseg.federation.aggregate import (
    IntegerPolicy,
    NonFiniteStateError,
    check_finite,
    state_clone,
    state_to_cpu,
)
from lightning_fedseg.federation.client_runner import ClientRunner
from lightning_fedseg.federation.client_steps import ClientStep
from lightning_fedseg.federation.faults import FaultInjector, FaultKind
from lightning_fedseg.federation.flat import load_by_copy, loads_by_copy
from lightning_fedseg.federation.modes import Aggregation, CollaborationMode, derive_seed, seed_torch
from lightning_fedseg.federation.rounds import IDLE, Round, RoundFailedError, RoundHost, RoundOutcome
from lightning_fedseg.federation.server import ServerStep
from lightning_fedseg.federation.site_loaders import SiteLoaders
from lightning_fedseg.federation.site_state import SiteStates
from lightning_fedseg.federation.transport import Transport

__all__ = ["RoundEngine", "RoundHost", "RoundOutcome"]


class RoundEngine:
    """Runs the rounds of a federation on one process.

    Args:
        mode: the collaboration mode (plans each round, decides after it).
        server: the server step; its aggregator collects the round's site results.
        clients: the client steps.
        sites: the federation's sites, in order.
        placement: ``{site: rank}``; this process trains the sites placed on ``transport.rank``.
        site_states: each local site's optimizer and client-step state.
        transport: what crosses process boundaries.
        host: the training framework's side.
        seed: base of the (round, site) seeds of data order and dropout.
        faults: fault injection (tests and drills).
        min_sites: fewest sites that must finish a round.
        integer_policy: how integer buffers combine in a mean.
        masking: pairwise-mask each process's sum.
        batch_limit: Lightning's ``limit_train_batches``, per site and local epoch.
    """

    def __init__(
        self,
        *,
        mode: CollaborationMode,
        server: ServerStep,
        clients: Sequence[ClientStep],
        sites: Sequence[str],
        placement: Mapping[str, int],
        site_states: SiteStates,
        transport: Transport,
        host: RoundHost,
        seed: int = 0,
        faults: FaultInjector | None = None,
        min_sites: int = 1,
        integer_policy: IntegerPolicy | str = IntegerPolicy.MEAN,
        masking: bool = False,
        batch_limit: int | float = 1.0,
    ) -> None:
        self.mode = mode
        self.server = server
        self.sites = tuple(sites)
        self.placement = dict(placement)
        self.site_states = site_states
        self.transport = transport
        self.host = host
        self.seed = seed
        self.faults = faults if faults is not None else FaultInjector(None)
        self.min_sites = min_sites
        self.loaders = SiteLoaders(host.site_train_dataloader, seed, batch_limit)
        self.clients = ClientRunner(clients, site_states, lambda: host.module, transport, self.sites)
        self.aggregator = server.aggregator(integer_policy, masking, self.sites)
        self.round: Round | None = None
        self.completed_rounds = 0
        self.history: list[dict[str, Any]] = []

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        """The round counter and the history (the server step's and mode's state are their own)."""
        return {"completed_rounds": self.completed_rounds, "history": list(self.history)}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.completed_rounds = int(state["completed_rounds"])
        self.history = list(state.get("history", []))

    def site_index(self, site: str) -> int:
        return self.sites.index(site) if site in self.sites else len(self.sites)

    # ------------------------------------------------------------------ data
    def clear(self) -> None:
        self.loaders.clear()
        self.round = None

    def _site_index(self, task_idx: int) -> int:
        assert self.round is not None
        return self.site_index(self.round.plan.tasks[task_idx].site)

    def expected_batches(self) -> int | None:
        """Training batches this process will see in the coming (or current) round."""
        rnd = self.round
        plan = rnd.plan if rnd is not None and not rnd.finished else self.mode.plan(self.completed_rounds)
        rank = self.transport.rank
        return self.loaders.count_batches(t for t in plan.tasks if self.placement.get(t.site, 0) == rank)

    # ------------------------------------------------------------------ batches
    def start_round(self) -> Round:
        # Not the host's epoch: while a resumed fit sets up its dataloader, Lightning still reports
        # the epoch of the checkpoint.
        index = self.completed_rounds
        plan = self.mode.plan(index)
        rank = self.transport.rank
        local = tuple(i for i, task in enumerate(plan.tasks) if self.placement.get(task.site, 0) == rank)
        rnd = Round(index=index, plan=plan, local_tasks=local)
        if plan.aggregation is Aggregation.MEAN:
            module = self.host.module
            rnd.global_state = state_clone(module.state_dict())  # on the module's device
            if loads_by_copy(module):
                rnd.live = module.state_dict(keep_vars=True)
            self.aggregator.start(rnd.global_state)
        self.round = rnd
        return rnd

    def on_batch(self) -> None:
        """A training batch is about to be used: take its record and switch sites if it moved on."""
        rnd = self.round
        if rnd is None or rnd.finished or not rnd.records:
            return
        record = rnd.records.popleft()
        rnd.current = record
        rnd.batches += 1
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
            faults = self.faults
            if faults.kind is FaultKind.RAISE and faults.due(site, rnd.index, self._site_index(rnd.active)):
                raise RuntimeError(f"injected fault at site {site!r} in round {rnd.index}")
            self.clients.on_batch(batch)
            return self.clients.with_loss_terms(step())
        except Exception as err:  # a site's failure must not stop the federation
            rnd.failed[rnd.active] = f"{type(err).__name__}: {err}"
            warnings.warn(
                f"Round {rnd.index}: site {site!r} failed and is dropped from the round ({err}).", stacklevel=2
            )
            return self._no_op_loss()

    def before_optimizer_step(self, optimizer: Any) -> None:
        """After backward and unscaling, before clipping: the client steps' gradient corrections."""
        rnd = self.round
        if rnd is None or rnd.active is None or rnd.active in rnd.failed:
            return
        self.clients.before_optimizer_step(optimizer)

    def _no_op_loss(self) -> Tensor:
        """A loss connected to no parameter. (Lightning refuses `None` when several processes run.)"""
        return torch.zeros((), device=self.host.device, requires_grad=True)

    # ------------------------------------------------------------------ site tasks
    def _begin_task(self, task_idx: int) -> None:
        started = time.perf_counter()
        rnd = self.round
        assert rnd is not None
        module = self.host.module
        task = rnd.plan.tasks[task_idx]
        if rnd.plan.aggregation is Aggregation.MEAN:
            assert rnd.global_state is not None
            load_by_copy(module, rnd.live, rnd.global_state)
        else:
            self.sync_chain(rnd, task_idx)
            rnd.start_state = state_clone(module.state_dict())
        self.site_states.enter(task.site)
        self.clients.begin_site(rnd, task.site)
        seed_torch(derive_seed(self.seed, rnd.index, self._site_index(task_idx), 0, 2))
        rnd.active = task_idx
        self.host.call_site_hook("on_site_start", task.site, rnd.index)
        rnd.task_started_at = time.perf_counter()
        rnd.handover_seconds += rnd.task_started_at - started

    def _end_task(self) -> None:
        rnd = self.round
        if rnd is None or rnd.active is None:
            return
        module = self.host.module
        started = time.perf_counter()
        rnd.train_seconds += started - rnd.task_started_at
        task_idx = rnd.active
        site = rnd.plan.tasks[task_idx].site
        if task_idx not in rnd.failed:
            self.host.call_site_hook("on_site_end", site, rnd.index)
        rnd.active = None
        if task_idx not in rnd.failed:
            try:
                self._collect(rnd, module.state_dict(), site)
            except NonFiniteStateError as err:
                rnd.failed[task_idx] = str(err)
                warnings.warn(f"Round {rnd.index}: {err} The site is dropped from the round.", stacklevel=2)
            else:
                self.clients.end_site(rnd, site)
        if task_idx in rnd.failed:
            self.site_states.forget(site)
            if rnd.start_state is not None and rnd.plan.aggregation is Aggregation.CHAIN:
                module.load_state_dict(rnd.start_state)
        else:
            rnd.succeeded.append(site)
        if rnd.plan.aggregation is Aggregation.CHAIN:
            self.sync_chain(rnd, task_idx + 1)
        rnd.handover_seconds += time.perf_counter() - started

    def _collect(self, rnd: Round, state: dict[str, Tensor], site: str) -> None:
        """File one site's result (raises :class:`NonFiniteStateError` for NaN/Inf weights)."""
        faults = self.faults
        if faults.kind is FaultKind.NAN and faults.due(site, rnd.index, self.site_index(site)):
            state = {k: v.float().fill_(float("nan")) if v.is_floating_point() else v for k, v in state.items()}
        if rnd.plan.aggregation is not Aggregation.MEAN:
            check_finite(state, site)  # chained modes hand the weights on; nothing to file
            return
        weight = self.host.site_weight(site, self.loaders.get(site))
        self.aggregator.add(site, self.site_index(site), state, weight)

    def sync_chain(self, rnd: Round, upto: int) -> None:
        """Hand the results of tasks ``rnd.synced_tasks .. upto-1`` over from their sites' processes."""
        transport = self.transport
        module = self.host.module
        while rnd.synced_tasks < upto:
            task_idx = rnd.synced_tasks
            rnd.synced_tasks += 1
            if not transport.active:
                continue
            site = rnd.plan.tasks[task_idx].site
            received, ok = transport.broadcast_state(
                module.state_dict(),
                ok=task_idx not in rnd.failed,
                src=self.placement[site],
                stats=rnd.comm,
                round_idx=rnd.index,
                what=f"hand-over of the weights after site {site!r}",
            )
            if received is not None:
                module.load_state_dict(received)
                if ok:
                    rnd.succeeded.append(site)

    # ------------------------------------------------------------------ the round's end
    def finish_round(self) -> None:
        """The round's results become the global model (idempotent); before validation.

        A round in which no batch was taken is one whose epoch Lightning replays on resume after
        the round was closed and checkpointed: it is dropped, not combined.
        """
        rnd = self.round
        if rnd is None or rnd.finished:
            return
        if rnd.batches == 0:
            self.round = None
            return
        self._end_task()
        rnd.current = None
        started = time.perf_counter()
        succeeded = self._combine(rnd)
        rnd.handover_seconds += time.perf_counter() - started
        rnd.finished = True
        if succeeded < self.min_sites:
            tasks = rnd.plan.tasks
            failures = "; ".join(f"{tasks[i].site}: {msg}" for i, msg in sorted(rnd.failed.items()))
            raise RoundFailedError(
                f"Round {rnd.index}: only {succeeded} of {len(tasks)} sites finished, fewer than"
                f" `min_sites`={self.min_sites} ({failures or 'no site trained'}). The run stops;"
                " the last checkpoint is intact and `fit(ckpt_path='last')` resumes from it."
            )

    def _combine(self, rnd: Round) -> int:
        """Make the round's global model; returns how many sites contributed (over all processes)."""
        if rnd.plan.aggregation is not Aggregation.MEAN:
            self.sync_chain(rnd, len(rnd.plan.tasks))
            return len(rnd.succeeded)
        new, succeeded = self.aggregator.combine(self.transport, rnd.comm, rnd.index, self.min_sites)
        # Too few sites: the module goes back to the round's global weights, not the last site's.
        assert rnd.global_state is not None
        load_by_copy(self.host.module, rnd.live, new if new is not None else rnd.global_state)
        self.clients.end_round(rnd, succeeded)
        return succeeded

    def close_round(self, metrics: Mapping[str, float]) -> RoundOutcome | None:
        """Close the round as a whole: its global model, the mode's decision on ``metrics`` (the
        round's validation, where it ran), the record, the counter. ``None`` where no round is open."""
        self.finish_round()
        rnd = self.round
        if rnd is None:
            return None
        transport, mode = self.transport, self.mode
        merged = transport.merged_metrics(metrics, mode.metric_keys(rnd.index))
        module = self.host.module
        decision = mode.end_round(rnd.index, merged, lambda: state_to_cpu(module.state_dict()))
        failed_here = {rnd.plan.tasks[i].site: msg for i, msg in rnd.failed.items()}
        failed = {s: failed_here.get(s, "failed on another process") for s in transport.union(self.sites, failed_here)}
        record: dict[str, Any] = {
            "round": rnd.index,
            "sites": list(rnd.plan.sites),
            "succeeded": sorted(transport.union(self.sites, rnd.succeeded)),
            "failed": failed,
            "train_seconds": rnd.train_seconds,
            "handover_seconds": rnd.handover_seconds,
            "comm_seconds": rnd.comm.seconds,
            "bytes_sent": rnd.comm.bytes_sent,
            "bytes_received": rnd.comm.bytes_received,
        }
        step_metrics = {**self.server.metrics(), **self.clients.metrics()}
        record.update(step_metrics)
        self.history.append(record)
        self.completed_rounds += 1
        self.round = None
        reason = self.server.stop_reason()
        return RoundOutcome(record, decision.weights, decision.stop or reason is not None, reason, step_metrics)

    def count_plain_round(self, epoch: int) -> None:
        """A round of plain training (``cds``) ended at the host's ``epoch`` (idempotent)."""
        self.completed_rounds = max(self.completed_rounds, epoch + 1)

    @property
    def in_round(self) -> bool:
        """Whether a round is under way and its global model not yet made."""
        return self.round is not None and not self.round.finished
