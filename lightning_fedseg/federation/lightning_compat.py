"""Every private Lightning name the federation touches, in one place, checked at setup.

Lightning has no public way to do the few things below; each is one named function with what it
changes and why. :func:`check_lightning` runs when a federated fit is set up: where an installed
Lightning lacks a name or a signature, it stops with an error that names the installed version and
the supported range, instead of letting a run change meaning or hang.

The supported range is :data:`SUPPORTED` (``setup.cfg`` states the same). The floor, 2.5.0, is the
first release whose ``LightningCLI`` runs a config with both a model and a data module given by
``class_path`` while a logger is on (2.4 fails merging their ``_class_path`` hyper-parameters), and
CI runs the federation and CLI tests on it; the ceiling is the newest minor release CI tests.

Protected members of ``DDPStrategy`` that :class:`~lightning_fedseg.federation.processes.FederatedProcesses`
overrides or reads (``_configure_launcher``, ``_setup_model``, ``_launcher``, ``_timeout``) are
checked here too, as is ``RichProgressBar._get_train_description``, which
:class:`~lightning_fedseg.federation.callbacks.FederatedRichProgressBar` overrides to title the bar by
round (the bar has no public hook for its title); reading a callback's configuration goes through
the readers below.
"""

from __future__ import annotations

import inspect
import re
import warnings
from collections.abc import Callable
from typing import Any

import lightning
from lightning.pytorch.callbacks import ModelCheckpoint, RichProgressBar, Timer
from lightning.pytorch.loops.optimization.automatic import _AutomaticOptimization
from lightning.pytorch.loops.training_epoch_loop import _TrainingEpochLoop
from lightning.pytorch.strategies import DDPStrategy, ParallelStrategy
from lightning.pytorch.trainer.connectors.accelerator_connector import _AcceleratorConnector
from lightning_utilities.core.imports import compare_version

__all__ = [
    "SUPPORTED",
    "LightningVersionError",
    "check_lightning",
    "checkpoint_saves_inside_epochs",
    "distributed_sampler_in_use",
    "in_supported_range",
    "patch_accumulation",
    "skip_per_batch_sigterm_broadcast",
    "sync_batchnorm_requested",
    "timer_interval",
    "unpatch_accumulation",
    "val_check_has_time_interval",
]

SUPPORTED = (">=2.5", "<2.7")
_FLOOR, _CEILING = "2.5.0", "2.7.0"

# (owner, name): what must exist for the functions below to keep their meaning.
_REQUIRED: tuple[tuple[type, str], ...] = (
    (_TrainingEpochLoop, "_should_accumulate"),
    (_AutomaticOptimization, "_make_zero_grad_fn"),
    (DDPStrategy, "_configure_launcher"),
    (DDPStrategy, "_setup_model"),
    (RichProgressBar, "_get_train_description"),
    (_AcceleratorConnector, "is_distributed"),
)


class LightningVersionError(RuntimeError):
    """The installed Lightning lacks a name the federation relies on."""


def _version() -> str:
    return str(lightning.__version__)


def check_lightning() -> None:
    """Raise :class:`LightningVersionError` where a private name or signature used here is missing."""
    problems = [f"`{owner.__name__}.{name}`" for owner, name in _REQUIRED if not hasattr(owner, name)]
    instance_attrs = (
        (Timer, "_interval"),
        (ModelCheckpoint, "_every_n_train_steps"),
        (ModelCheckpoint, "_train_time_interval"),
        (ParallelStrategy, "_layer_sync"),
        (_AcceleratorConnector, "use_distributed_sampler"),
        (DDPStrategy, "_timeout"),
        (DDPStrategy, "_launcher"),
    )
    for owner, attr in instance_attrs:
        if not re.search(rf"self\.{attr}\s*[:=]", _source(owner)):
            problems.append(f"`{owner.__name__}.{attr}`")
    if hasattr(_AutomaticOptimization, "_make_zero_grad_fn"):
        signature = inspect.signature(_AutomaticOptimization._make_zero_grad_fn)
        if list(signature.parameters)[:3] != ["self", "batch_idx", "optimizer"]:
            problems.append(f"`_AutomaticOptimization._make_zero_grad_fn{signature}`")
    if not in_supported_range():
        warnings.warn(
            f"lightning_fedseg is tested with Lightning {','.join(SUPPORTED)}; Lightning {_version()} is installed.",
            stacklevel=2,
        )
    if problems:
        raise LightningVersionError(
            f"lightning_fedseg supports Lightning {','.join(SUPPORTED)}, but Lightning {_version()} is installed"
            f" and lacks {', '.join(problems)}, which the federation needs to keep Lightning's meaning inside each"
            f" site. HINT: pip install 'lightning{','.join(SUPPORTED)}'."
        )


def _source(cls: type) -> str:
    """The source of ``cls`` (where its instance attributes are assigned)."""
    try:
        return inspect.getsource(cls)
    except (OSError, TypeError):
        return ""


def in_supported_range() -> bool:
    """Whether the installed Lightning is in :data:`SUPPORTED`."""
    return compare_version("lightning", lambda a, b: a >= b, _FLOOR) and not compare_version(
        "lightning", lambda a, b: a >= b, _CEILING
    )


# ---------------------------------------------------------------------- accumulation per site
def patch_accumulation(trainer: Any, local_batch: Callable[[], tuple[int, bool]]) -> None:
    """Make Lightning's two accumulation decisions count batches within the current site.

    Lightning decides "step now?" (``_TrainingEpochLoop._should_accumulate``) and "zero the
    gradients now?" (``_AutomaticOptimization._make_zero_grad_fn``) from the epoch-wide batch
    index; a federated epoch (a round) holds several sites' local epochs, and a window must never
    span two sites. No public hook decides either, so both are replaced on this trainer's instances
    (not on the classes), and :func:`unpatch_accumulation` restores them. ``local_batch()`` gives
    (index within the site's local epoch, whether it is its last batch).
    """
    epoch_loop = trainer.fit_loop.epoch_loop
    automatic = epoch_loop.automatic_optimization

    def should_accumulate() -> bool:
        index, last = local_batch()
        return not ((index + 1) % trainer.accumulate_grad_batches == 0 or last)

    make_zero_grad_fn = type(automatic)._make_zero_grad_fn

    def zero_grad_fn(batch_idx: int, optimizer: Any) -> Any:
        return make_zero_grad_fn(automatic, local_batch()[0], optimizer)

    epoch_loop._should_accumulate = should_accumulate
    automatic._make_zero_grad_fn = zero_grad_fn


def unpatch_accumulation(trainer: Any) -> None:
    """Undo :func:`patch_accumulation` (the Trainer may be reused without the federation)."""
    epoch_loop = trainer.fit_loop.epoch_loop
    for obj, name in ((epoch_loop, "_should_accumulate"), (epoch_loop.automatic_optimization, "_make_zero_grad_fn")):
        obj.__dict__.pop(name, None)


# ---------------------------------------------------------------------- several processes
def skip_per_batch_sigterm_broadcast(trainer: Any) -> None:
    """Stop Lightning (2.5.x and newer) broadcasting a SIGTERM flag from rank 0 after every batch.

    Federated ranks train different numbers of batches per round, so a per-batch collective would
    pair up with unrelated ones and hang. Each rank still sees its own SIGTERM, at its epoch's
    (round's) end, where Lightning checks ``trainer.received_sigterm``; a SLURM requeue therefore
    happens at a round's end. Where Lightning has no such broadcast there is nothing to do.
    """
    epoch_loop = trainer.fit_loop.epoch_loop
    if hasattr(type(epoch_loop), "_broadcast_sigterm_tensor"):
        epoch_loop._broadcast_sigterm_tensor = lambda: None


def distributed_sampler_in_use(trainer: Any) -> bool:
    """Whether Lightning would inject a ``DistributedSampler`` (``use_distributed_sampler`` and a
    distributed strategy): the connector's two flags have no public reader."""
    connector = getattr(trainer, "_accelerator_connector", None)
    return bool(getattr(connector, "use_distributed_sampler", True) and getattr(connector, "is_distributed", False))


# ---------------------------------------------------------------------- reading configurations
def timer_interval(timer: Timer) -> str:
    """A ``Timer``'s ``interval`` (``"step"`` or ``"epoch"``), which it keeps privately."""
    return str(timer._interval)


def checkpoint_saves_inside_epochs(callback: ModelCheckpoint) -> bool:
    """Whether a ``ModelCheckpoint`` saves by training steps or time (inside an epoch)."""
    return bool(callback._every_n_train_steps or callback._train_time_interval)


def val_check_has_time_interval(trainer: Any) -> bool:
    """Whether ``val_check_interval`` was given as a time (Lightning 2.6 keeps it privately)."""
    return getattr(trainer, "_val_check_time_interval", None) is not None


def sync_batchnorm_requested(strategy: ParallelStrategy) -> bool:
    """Whether ``Trainer(sync_batchnorm=True)`` gave the strategy a layer-sync plugin (kept privately)."""
    return getattr(strategy, "_layer_sync", None) is not None
