"""The segmentation networks: any architecture and encoder of smp's registry, raw logits out.

:func:`build_network` is what :class:`~lightning_fedseg.module.BrainTumorSegmentation` builds
when it is given no ``network``: ``smp.create_model`` with the names checked first, so that an
unknown name raises a ``KeyError`` listing the valid ones (timm backbones as ``"tu-<name>"``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import segmentation_models_pytorch as smp
from torch import nn

__all__ = ["build_network"]


def build_network(
    arch: str,
    encoder_name: str,
    in_channels: int,
    classes: int,
    encoder_depth: int = 5,
    decoder_channels: Sequence[int] | None = (256, 128, 64, 32, 16),
    encoder_weights: str | None = None,
    **kwargs: Any,
) -> nn.Module:
    """Build a network from smp's registry (``smp.create_model``), raw logits out.

    Args:
        arch: an smp architecture (``"unet"``, ``"unetplusplus"``, ``"fpn"``, ...).
        encoder_name: an smp encoder, or ``"tu-<timm model>"`` for any timm backbone.
        in_channels: input channels (modalities).
        classes: output channels (regions).
        encoder_depth: number of encoder stages (downsamplings).
        decoder_channels: decoder widths, one per stage; ``None`` for architectures without it.
        encoder_weights: pretrained weights to download (e.g. ``"imagenet"``); ``None`` for none.
        kwargs: passed to the architecture (e.g. ``decoder_attention_type``).

    Raises:
        KeyError: for an unknown architecture or encoder, listing the valid names.

    Example:
        >>> import torch
        >>> net = build_network("unet", "resnet18", 1, 1, encoder_depth=3, decoder_channels=[8] * 3)
        >>> net(torch.zeros(1, 1, 32, 32)).shape
        torch.Size([1, 1, 32, 32])
    """
    if arch.lower() not in smp.MODEL_ARCHITECTURES_MAPPING:
        raise KeyError(f"Unknown `arch` {arch!r}; smp's registry has {sorted(smp.MODEL_ARCHITECTURES_MAPPING)}.")
    if encoder_name.startswith("tu-"):
        import timm

        if not timm.is_model(encoder_name[3:]):
            raise KeyError(
                f"Unknown `encoder_name` {encoder_name!r}: {encoder_name[3:]!r} is not a timm "
                "model."
                " HINT: `timm.list_models()` lists the names usable after 'tu-'."
            )
    elif encoder_name not in smp.encoders.get_encoder_names():
        raise KeyError(
            f"Unknown `encoder_name` {encoder_name!r}; smp's registry has "
            f"{smp.encoders.get_encoder_names()}, or 'tu-<name>' for any timm model."
        )
    if decoder_channels is not None:
        kwargs["decoder_channels"] = list(decoder_channels)
    return smp.create_model(
        arch,
        encoder_name=encoder_name,
        encoder_weights=encoder_weights,
        in_channels=in_channels,
        classes=classes,
        encoder_depth=encoder_depth,
        **kwargs,
    )
