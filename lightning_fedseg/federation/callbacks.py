"""Callbacks that show federation state: progress bars naming the round and the current site."""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import RichProgressBar, TQDMProgressBar
from typing_extensions import override

__all__ = ["FederatedProgressBar", "FederatedRichProgressBar", "federation_progress"]


def federation_progress(trainer: pl.Trainer) -> dict[str, str]:
    """``{"mode", "round", "site"}`` of the running FederatedStrategy, or ``{}`` under any other."""
    from lightning_fedseg.federation.strategy import FederatedStrategy

    strategy = trainer.strategy
    return strategy.progress_info() if isinstance(strategy, FederatedStrategy) else {}


class _FederatedMetricsMixin:
    @property
    def total_train_batches(self) -> int | float:
        trainer = self.trainer  # type: ignore[attr-defined]
        from lightning_fedseg.federation.strategy import FederatedStrategy

        if isinstance(trainer.strategy, FederatedStrategy):
            expected = trainer.strategy.expected_round_batches()
            if expected is not None:
                return expected
        return super().total_train_batches  # type: ignore[misc]

    def get_metrics(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict[str, Any]:
        metrics: dict[str, Any] = super().get_metrics(trainer, pl_module)  # type: ignore[misc]
        info = federation_progress(trainer)
        if "site" in info:
            metrics["site"] = info["site"]
        metrics.pop("v_num", None)
        return metrics


class FederatedProgressBar(_FederatedMetricsMixin, TQDMProgressBar):
    """Lightning's TQDM progress bar, titled by round and showing the site being trained."""

    @override
    def on_train_epoch_start(self, trainer: pl.Trainer, *_: Any) -> None:
        super().on_train_epoch_start(trainer)
        info = federation_progress(trainer)
        if info:
            self.train_progress_bar.set_description(f"{info['mode']} round {trainer.current_epoch}")


class FederatedRichProgressBar(_FederatedMetricsMixin, RichProgressBar):
    """Lightning's rich progress bar, titled by round and showing the site being trained."""

    @override
    def _get_train_description(self, current_epoch: int) -> str:  # private: see `lightning_compat`
        trainer = self.trainer
        info = federation_progress(trainer)
        if not info:
            return super()._get_train_description(current_epoch)
        return f"{info['mode']} round {current_epoch}"
