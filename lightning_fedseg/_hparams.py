"""Hyperparameters a checkpoint can hold: plain values, and whether LightningCLI builds the module.

A module built in Python may be given objects (an ``nn.Module`` network, a function optimizer)
that a checkpoint loaded with ``weights_only=True`` cannot restore; LightningCLI hands over the
config as given (``class_path`` dicts), which rebuilds everything.
"""

from __future__ import annotations

from typing import Any

__all__ = ["built_by_lightning_cli", "is_plain"]

_PLAIN_TYPES = (type(None), bool, int, float, str)


def is_plain(value: Any) -> bool:
    """Whether ``value`` is ``None``, a bool, number or string, or lists and string-keyed dicts of them:
    what a checkpoint loaded with ``weights_only=True`` can hold."""
    if isinstance(value, _PLAIN_TYPES):
        return True
    if isinstance(value, list | tuple):
        return all(is_plain(v) for v in value)
    if isinstance(value, dict):
        return all(isinstance(k, str) and is_plain(v) for k, v in value.items())
    return False


def built_by_lightning_cli() -> bool:
    """Whether LightningCLI is instantiating the module (it then hands over the config as given)."""
    try:
        from lightning.pytorch.core.mixins.hparams_mixin import _given_hyperparameters
    except ImportError:  # pragma: no cover - a Lightning without it
        return False
    return _given_hyperparameters.get() is not None
