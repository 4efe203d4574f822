"""Lightning's training semantics under the federation: what is kept, adapted per site, or refused.

A site's local training keeps Lightning's own meaning: gradients are zeroed when a site starts,
accumulation windows (``accumulate_grad_batches``) restart at each site and a partial window is
stepped at the site's end, as Lightning steps one at an epoch's end; ``limit_train_batches``
limits each site's local epoch. Lightning decides accumulation from its epoch-wide batch count,
so :func:`patch_accumulation` points its two decisions at the round engine's per-site count.

Settings that would cut a round in the middle (validation inside an epoch, a step or time
budget, checkpoints inside an epoch) have no sound federated meaning and are refused at setup by
:func:`check_trainer`, naming the flag and the federated alternative.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence, Sized
from typing import TYPE_CHECKING, Any

from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.pytorch.callbacks import ModelCheckpoint, Timer

if TYPE_CHECKING:
    import lightning.pytorch as pl

    from lightning_fedseg.federation.modes import CollaborationMode

__all__ = ["UnsupportedFeatureError", "check_algorithms", "check_trainer", "patch_accumulation", "site_batch_limit"]


class UnsupportedFeatureError(MisconfigurationException):
    """A Trainer or module feature that has no sound meaning under the federation."""


def check_trainer(trainer: pl.Trainer, mode: CollaborationMode) -> None:
    """Refuse every setting that would change meaning under ``mode``; one error lists them all."""
    problems: list[str] = []
    if trainer.max_steps not in (-1, None):
        problems.append(
            f"`max_steps={trainer.max_steps}` would stop training inside a round. HINT: `max_epochs` counts rounds."
        )
    if getattr(trainer, "_val_check_time_interval", None) is not None or trainer.val_check_interval != 1.0:
        problems.append(
            f"`val_check_interval={trainer.val_check_interval}` would validate (and close the round) inside a"
            " round. HINT: validation runs once per round; use `check_val_every_n_epoch` to validate every N rounds."
        )
    for callback in trainer.callbacks:  # type: ignore[attr-defined]
        if isinstance(callback, Timer) and callback._interval == "step":
            problems.append(
                "`max_time` (a `Timer` with `interval='step'`) would stop training inside a round."
                " HINT: `Timer(duration=..., interval='epoch')` stops at a round's end."
            )
        if isinstance(callback, ModelCheckpoint) and (callback._every_n_train_steps or callback._train_time_interval):
            problems.append(
                "`ModelCheckpoint(every_n_train_steps=...)` / `train_time_interval` would save one site's local"
                " weights inside a round. HINT: checkpoints are per round: `every_n_epochs`."
            )
    if mode.decides_on_metrics and trainer.check_val_every_n_epoch != 1:
        problems.append(
            f"`check_val_every_n_epoch={trainer.check_val_every_n_epoch}`: the {mode.name} mode decides after every"
            " round on that round's validation metrics, so it needs validation every round. HINT: leave it at 1."
        )
    module = trainer.lightning_module
    if module.automatic_optimization:
        step_optimizers = {id(c.scheduler.optimizer) for c in trainer.lr_scheduler_configs if c.interval == "step"}
        epoch_optimizers = {id(c.scheduler.optimizer) for c in trainer.lr_scheduler_configs if c.interval != "step"}
        if step_optimizers & epoch_optimizers:
            problems.append(
                "An optimizer has both a step-interval and an epoch-interval LR scheduler: a step schedule is local"
                " to each site, an epoch schedule belongs to the federation, and together they have no single"
                " federated meaning. HINT: use one of the two per optimizer."
            )
    if problems:
        raise UnsupportedFeatureError(
            "FederatedStrategy cannot keep the meaning of these settings:\n- " + "\n- ".join(problems)
        )


def check_algorithms(
    mode: CollaborationMode, server: Any, clients: Sequence[Any], module: Any, masking: bool = False
) -> None:
    """Refuse server and client steps where they have no sound meaning (one error lists them all)."""
    from lightning_fedseg.federation.modes import FedAvg
    from lightning_fedseg.federation.server import FedAvgStep

    problems: list[str] = []
    if not isinstance(mode, FedAvg):
        steps = ([server] if not isinstance(server, FedAvgStep) else []) + list(clients)
        for step in steps:
            problems.append(
                f"{step!r} works on sites that all start a round from the same global weights; the {mode.name}"
                " mode has no such round. HINT: use it with the `fedavg` mode."
            )
    if not module.automatic_optimization:
        for step in clients:
            if type(step).loss_term is not _base_loss_term():
                problems.append(
                    f"{step!r} adds a term to the training loss, which manual optimization computes and"
                    " back-propagates itself. HINT: use automatic optimization."
                )
    if masking and getattr(server, "needs_site_states", False):
        problems.append(
            f"masking hides each process's sum, but {server!r} needs every site's own state."
            " HINT: a robust rule or masked aggregation, not both."
        )
    if masking and not isinstance(mode, FedAvg):
        problems.append(f"masking applies to the FedAvg all-reduce; the {mode.name} mode has none.")
    from lightning_fedseg.federation.privacy import DPFedAvg

    if isinstance(server, DPFedAvg):
        for step in clients:
            if step.reference_sum() is not None:
                problems.append(
                    f"{step!r} sends a per-site sum that DP-FedAvg does not privatize. HINT: drop one of the two."
                )
    if problems:
        raise UnsupportedFeatureError("FederatedStrategy cannot combine:\n- " + "\n- ".join(problems))


def _base_loss_term() -> Any:
    from lightning_fedseg.federation.client_steps import ClientStep

    return ClientStep.loss_term


def site_batch_limit(limit: int | float, loader: Any, site: str) -> int | None:
    """The number of batches ``limit_train_batches`` allows a site per local epoch (``None``: all).

    Example:
        >>> [site_batch_limit(limit, range(5), "a") for limit in (2, 0.5, 1.0)]
        [2, 2, None]
    """
    if isinstance(limit, int):
        return limit
    if limit >= 1.0:
        return None
    if not isinstance(loader, Sized):
        raise MisconfigurationException(
            f"`limit_train_batches={limit}` is a fraction, but site {site!r}'s loader has no length."
            " HINT: give an integer number of batches."
        )
    count = int(len(loader) * limit)
    if count == 0 and limit > 0 and len(loader) > 0:
        raise MisconfigurationException(
            f"`limit_train_batches={limit}` leaves site {site!r} no batch of its {len(loader)}."
            f" HINT: use at least {math.ceil(1 / len(loader) * 1000) / 1000}."
        )
    return count


def patch_accumulation(trainer: pl.Trainer, local_batch: Callable[[], tuple[int, bool]]) -> None:
    """Make Lightning's accumulation decisions per site.

    ``local_batch()`` returns (index of the current batch within its site's local epoch, whether it
    is that local epoch's last batch). Lightning zeroes gradients at the first batch of a window
    and steps at the last one or at the end of the epoch; here both count within the site.
    """
    epoch_loop = trainer.fit_loop.epoch_loop
    automatic = epoch_loop.automatic_optimization

    def should_accumulate() -> bool:
        index, last = local_batch()
        return not ((index + 1) % trainer.accumulate_grad_batches == 0 or last)

    make_zero_grad_fn = type(automatic)._make_zero_grad_fn

    def zero_grad_fn(batch_idx: int, optimizer: Any) -> Any:
        return make_zero_grad_fn(automatic, local_batch()[0], optimizer)

    epoch_loop._should_accumulate = should_accumulate  # type: ignore[method-assign]
    automatic._make_zero_grad_fn = zero_grad_fn  # type: ignore[method-assign]


def unpatch_accumulation(trainer: pl.Trainer) -> None:
    """Undo :func:`patch_accumulation` (the Trainer may be reused without the federation)."""
    epoch_loop = trainer.fit_loop.epoch_loop
    for obj, name in ((epoch_loop, "_should_accumulate"), (epoch_loop.automatic_optimization, "_make_zero_grad_fn")):
        obj.__dict__.pop(name, None)
