"""Normalization layers of a network, chosen when it is built: batch, group or instance norm.

smp and timm build their networks with ``nn.BatchNorm2d``. Batch norm mixes the samples of a
batch (its statistics are computed over them, and its running statistics are buffers learnt from
the data), so a per-sample or per-patient gradient does not exist: differentially private
training refuses it. :func:`replace_batch_norm` swaps every batch-norm layer for a per-sample one.

Decisions:
    * The swap happens when the network is built (in ``BrainTumorSegmentation.__init__``), so the
      server, every site and every checkpoint have the same state keys (``weight`` and ``bias``;
      no running statistics).
    * Group norm takes the largest divisor of the channel count that is at most ``max_groups``
      (32, Wu and He, ECCV 2018): 32 groups for 64 or 128 channels, 24 for 24, 8 for 8 (one channel
      per group, which is instance norm). opacus's ``ModuleValidator.fix`` takes ``min(32, C)``,
      which fails for channel counts such as 48.
    * Instance norm is ``GroupNorm(C, C)`` (one group per channel, with an affine weight and bias):
      the same normalization as ``InstanceNorm2d(affine=True)``, with the keys and the per-sample
      gradients of group norm.
    * The new layers start as batch norm does (weight 1, bias 0) and keep its ``eps``. Only exact
      ``BatchNorm2d`` layers are swapped; a subclass (timm's ``BatchNormAct2d`` folds an
      activation in) is refused, naming it, rather than silently losing what it adds.
"""

from __future__ import annotations

from enum import StrEnum

from torch import nn

__all__ = ["Normalization", "group_count", "replace_batch_norm"]


class Normalization(StrEnum):
    """Which normalization the network's batch-norm layers become."""

    BATCH = "batch"
    GROUP = "group"
    INSTANCE = "instance"


def group_count(channels: int, max_groups: int = 32) -> int:
    """The largest divisor of ``channels`` that is at most ``max_groups``.

    Example:
        >>> [group_count(c) for c in (8, 24, 48, 64, 128)]
        [8, 24, 24, 32, 32]
    """
    return max(g for g in range(1, min(channels, max_groups) + 1) if channels % g == 0)


def replace_batch_norm(module: nn.Module, kind: Normalization | str) -> nn.Module:
    """Swap every ``nn.BatchNorm2d`` of ``module`` (in place) for group or instance norm.

    Args:
        module: the network.
        kind: ``"batch"`` (leave it as it is), ``"group"`` or ``"instance"``.

    Returns:
        ``module`` itself.

    Raises:
        TypeError: the module holds a subclass of batch norm, which cannot be swapped safely.

    Example:
        >>> net = replace_batch_norm(nn.Sequential(nn.Conv2d(1, 8, 3), nn.BatchNorm2d(8)), "group")
        >>> type(net[1]).__name__, net[1].num_groups, net[1].num_channels
        ('GroupNorm', 8, 8)
    """
    kind = Normalization(kind)
    if kind is Normalization.BATCH:
        return module
    odd = sorted(
        f"{name} ({type(m).__name__})"
        for name, m in module.named_modules()
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and type(m) is not nn.BatchNorm2d
    )
    if odd:
        raise TypeError(
            f"Expected only `torch.nn.BatchNorm2d` layers to replace with {kind.value} norm, but got {odd}."
            " HINT: build the network with plain BatchNorm2d, or pass a `network` that has the normalization you want."
        )
    for parent in list(module.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is nn.BatchNorm2d:
                channels = child.num_features
                groups = channels if kind is Normalization.INSTANCE else group_count(channels)
                setattr(parent, name, nn.GroupNorm(groups, channels, eps=child.eps, affine=True))
    return module
