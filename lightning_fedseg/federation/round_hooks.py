"""The callback through which a federated fit opens and closes its rounds around Lightning's hooks.

:class:`RoundHooks` is put first in ``trainer.callbacks`` by the strategy (Lightning runs
checkpoint callbacks last). A round's global model is made at ``on_validation_start`` (so
validation sees it) and the round is closed as a whole, mode decision, history and round counter
with it, at ``on_validation_end`` where the round is validated, else at ``on_train_epoch_end``:
before any ``ModelCheckpoint`` of that round saves, whatever the validation cadence. The round's
figures are logged at ``on_train_epoch_end``, where Lightning allows logging.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities.rank_zero import rank_zero_info
from typing_extensions import override

if TYPE_CHECKING:
    from lightning_fedseg.federation.engine import RoundEngine
    from lightning_fedseg.federation.rounds import RoundOutcome

__all__ = ["RoundHooks"]

_LOGGED = ("train_seconds", "handover_seconds", "comm_seconds", "bytes_sent", "bytes_received")


class RoundHooks(Callback):
    """Opens and closes the rounds of ``engine`` (or counts plain rounds where ``federated`` is false)."""

    def __init__(self, engine: RoundEngine, federated: bool) -> None:
        self.engine = engine
        self.federated = federated
        self._to_log: RoundOutcome | None = None

    @staticmethod
    def _fitting(trainer: pl.Trainer) -> bool:
        return not trainer.sanity_checking and trainer.state.fn == TrainerFn.FITTING

    @override
    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.federated and self._fitting(trainer):
            self.engine.finish_round()

    @override
    def on_validation_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int, dataloader_idx: int = 0
    ) -> None:
        self.engine.clients.validate_site(dataloader_idx)

    @override
    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.engine.clients.validate_site(None)
        if self._fitting(trainer):
            self._close(trainer, pl_module)

    @override
    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Any) -> None:
        self.engine.before_optimizer_step(optimizer)

    @override
    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._close(trainer, pl_module)
        outcome, self._to_log = self._to_log, None
        if outcome is None or trainer.barebones:  # barebones forbids logging; the history keeps the record
            return
        record = outcome.record
        for key in _LOGGED:
            pl_module.log(f"federation/{key}", float(record[key]), on_epoch=True, sync_dist=False)
        pl_module.log("federation/sites_succeeded", float(len(record["succeeded"])), on_epoch=True)
        for key, value in outcome.metrics.items():  # the server and client steps' figures
            pl_module.log(key, float(value), on_epoch=True, sync_dist=False)

    def _close(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self.federated:
            self.engine.count_plain_round(trainer.current_epoch)
            return
        outcome = self.engine.close_round(_float_metrics(trainer.callback_metrics))
        if outcome is None:
            return
        if outcome.weights is not None:
            pl_module.load_state_dict(outcome.weights)
        if outcome.stop_reason is not None:
            rank_zero_info(f"Round {outcome.record['round']}: {outcome.stop_reason}; training stops.")
        trainer.should_stop = trainer.should_stop or outcome.stop
        self._to_log = outcome


def _float_metrics(metrics: Mapping[str, Any]) -> dict[str, float]:
    out: dict[str, float] = {}
    for key, value in metrics.items():
        try:
            out[key] = float(value)
        except (TypeError, ValueError):
            continue
    return out
