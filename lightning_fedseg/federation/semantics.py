"""Lightning's training semantics under the federation: what is kept, adapted per site, or refused.

A site's local training keeps Lightning's own meaning: gradients are zeroed when a site starts,
accumulation windows (``accumulate_grad_batches``) restart at each site and a partial window is
stepped at the site's end, as Lightning steps one at an epoch's end; ``limit_train_batches``
limits each site's local epoch. Lightning decides accumulation from its epoch-wide batch count,
so :func:`~lightning_fedseg.federation.lightning_compat.patch_accumulation` points its two decisions
at the round engine's per-site count.

Settings that would cut a round in the middle (validation inside an epoch, a step or time
budget, checkpoints inside an epoch) have no sound federated meaning and are refused at setup by
:func:`check_trainer`, naming the flag and the federated alternative.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.pytorch.callbacks import ModelCheckpoint, Timer

from lightning_fedseg.federation import lightning_compat as compat
from lightning_fedseg.federation.lightning_features import FEATURES

if TYPE_CHECKING:
    import lightning.pytorch as pl

    from lightning_fedseg.federation.modes import CollaborationMode

__all__ = [
    "UnsupportedFeatureError",
    "check_algorithms",
    "check_sync_batchnorm",
    "check_trainer",
    "check_training_step",
]


class UnsupportedFeatureError(MisconfigurationException):
    """A Trainer or module feature that has no sound meaning under the federation."""


def check_trainer(trainer: pl.Trainer, mode: CollaborationMode) -> None:
    """Refuse every setting that would change meaning under ``mode``; one error lists them all."""
    problems: list[str] = []
    # Both are set on the Trainer by its debugging-flags setup (not declared attributes).
    fast_dev_run, overfit_batches = getattr(trainer, "fast_dev_run", 0), getattr(trainer, "overfit_batches", 0)
    if fast_dev_run:  # it sets `max_steps` too: name what the user set
        problems.append(f"`fast_dev_run={fast_dev_run}`: {FEATURES['fast_dev_run'][1]}.")
    elif trainer.max_steps not in (-1, None):
        problems.append(
            f"`max_steps={trainer.max_steps}` would stop training inside a round. HINT: `max_epochs` counts rounds."
        )
    if trainer.min_steps:
        problems.append(f"`min_steps={trainer.min_steps}`: {FEATURES['min_steps'][1]}.")
    if overfit_batches:
        problems.append(f"`overfit_batches={overfit_batches}`: {FEATURES['overfit_batches'][1]}.")
    if compat.val_check_has_time_interval(trainer) or trainer.val_check_interval != 1.0:
        problems.append(
            f"`val_check_interval={trainer.val_check_interval}` would validate (and close the round) inside a"
            " round. HINT: validation runs once per round; use `check_val_every_n_epoch` to validate every N rounds."
        )
    for callback in trainer.callbacks:  # type: ignore[attr-defined]
        if isinstance(callback, Timer) and compat.timer_interval(callback) == "step":
            problems.append(
                "`max_time` (a `Timer` with `interval='step'`) would stop training inside a round."
                " HINT: `Timer(duration=..., interval='epoch')` stops at a round's end."
            )
        if isinstance(callback, ModelCheckpoint) and compat.checkpoint_saves_inside_epochs(callback):
            problems.append(
                "`ModelCheckpoint(every_n_train_steps=...)` / `train_time_interval` would save one site's local"
                " weights inside a round. HINT: checkpoints are per round: `every_n_epochs`."
            )
        refused = _refused_callback(callback)
        if refused is not None:
            problems.append(f"the `{type(callback).__name__}` callback: {FEATURES[refused][1]}.")
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


def check_sync_batchnorm(requested: bool) -> None:
    """Refuse ``sync_batchnorm=True`` across a federation's processes."""
    if requested:
        raise UnsupportedFeatureError(
            "FederatedStrategy cannot keep the meaning of `sync_batchnorm=True`: it would synchronize"
            " BatchNorm statistics between the processes' sites inside a round, which trains them"
            " together. HINT: leave it off; the round's aggregate already combines the sites' statistics,"
            " and `FedBN` keeps them per site."
        )


def check_training_step(module: Any) -> None:
    """Refuse a ``training_step(self, dataloader_iter)``: the strategy must see each batch begin."""
    from lightning.pytorch.utilities.signature_utils import is_param_in_hook_signature

    if is_param_in_hook_signature(module.training_step, "dataloader_iter", explicit=True):
        raise UnsupportedFeatureError(
            "FederatedStrategy cannot train a `training_step(self, dataloader_iter)`: the step pulls batches"
            " itself, so the strategy never sees a batch begin and cannot switch sites between them."
            " HINT: take `batch` (and `batch_idx`) instead."
        )


def _refused_callback(callback: Any) -> str | None:
    """The entry of :data:`FEATURES` that refuses ``callback``'s kind, if any (subclasses included)."""
    from lightning.pytorch import callbacks

    for name in _REFUSED_CALLBACKS:
        cls = getattr(callbacks, name, None)  # `WeightAveraging` exists from Lightning 2.6
        if cls is not None and isinstance(callback, cls):
            return name
    return None


_REFUSED_CALLBACKS = (
    "BaseFinetuning",
    "BatchSizeFinder",
    "LearningRateFinder",
    "ModelPruning",
    "OnExceptionCheckpoint",
    "StochasticWeightAveraging",
    "WeightAveraging",
)


def check_algorithms(
    mode: CollaborationMode, server: Any, clients: Sequence[Any], module: Any, masking: bool = False
) -> None:
    """Refuse server and client steps where they have no sound meaning (one error lists them all)."""
    from lightning_fedseg.federation.modes import FedAvg

    problems: list[str] = []
    if not isinstance(mode, FedAvg):
        steps = ([server] if server.needs_mean_rounds else []) + list(clients)
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
    if server.differentially_private:
        for step in clients:
            if step.reference_sum() is not None:
                problems.append(
                    f"{step!r} sends a per-site sum that {type(server).__name__} does not privatize."
                    " HINT: drop one of the two."
                )
    if problems:
        raise UnsupportedFeatureError("FederatedStrategy cannot combine:\n- " + "\n- ".join(problems))


def _base_loss_term() -> Any:
    from lightning_fedseg.federation.client_steps import ClientStep

    return ClientStep.loss_term


def check_flare(mode: CollaborationMode, server: Any) -> None:
    """Refuse, over an NVIDIA FLARE hub, what has no sound meaning across institutions."""
    from lightning_fedseg.federation.byzantine import ByzantineServer
    from lightning_fedseg.federation.modes import CDS

    if isinstance(mode, CDS):
        raise ValueError(
            "`flare_profile` is set with the cds mode, which pools the institutions' data: it cannot run across"
            " institutions. HINT: fedavg, iil, ciil or single."
        )
    if isinstance(server, ByzantineServer):
        raise ValueError(
            f"`flare_profile` is set with {server!r}, an attack drill that makes sites Byzantine at the"
            " server; it has no meaning across real institutions. HINT: run the drill in one process."
        )
