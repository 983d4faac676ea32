"""``fastconv.convert``: swap torch.nn layers in a model for their fastconv drop-ins."""

from __future__ import annotations

from torch import nn

from .conv2d import Conv2D, ConvTranspose2D
from .pool2d import AvgPool2D, MaxPool2D

# Exact torch classes only: a user's subclass may override forward with other semantics.
_SWAPS: dict[type, type] = {nn.Conv2d: Conv2D, nn.ConvTranspose2d: ConvTranspose2D,
                            nn.MaxPool2d: MaxPool2D, nn.AvgPool2d: AvgPool2D}


def convert(model: nn.Module) -> nn.Module:
    """Make every ``nn.Conv2d``, ``nn.ConvTranspose2d``, ``nn.MaxPool2d`` and ``nn.AvgPool2d``
    in ``model`` (itself included) compute with fastconv, in place.

    The modules are changed to their fastconv class without being rebuilt, so parameters,
    buffers, hooks and references to them (an optimizer's, say) stay valid. Returns ``model``.
    """
    for module in model.modules():
        swap = _SWAPS.get(type(module))
        if swap is not None:
            module.__class__ = swap
    return model
