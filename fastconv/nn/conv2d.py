"""``fastconv.Conv2D``: ``nn.Conv2d`` with fastconv computing it."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from ..ops.conv2d import conv2d


class Conv2D(nn.Conv2d):
    """Drop-in for ``torch.nn.Conv2d``.

    Same constructor arguments (``in_channels, out_channels, kernel_size, stride=1, padding=0,
    dilation=1, groups=1, bias=True, padding_mode='zeros', device=None, dtype=None``), parameter
    shapes, initialisation and ``state_dict`` keys, so ``load_state_dict`` works both ways and
    ``isinstance(m, nn.Conv2d)`` holds. Non-zero ``padding_mode`` pads with ``F.pad`` first,
    exactly as ``nn.Conv2d`` does.

    Shape: input (N, C_in, H, W) or (C_in, H, W) -> (N, C_out, Ho, Wo) or (C_out, Ho, Wo).
    """

    def _conv_forward(self, input: torch.Tensor, weight: torch.Tensor,
                      bias: torch.Tensor | None) -> torch.Tensor:
        if self.padding_mode != "zeros":
            input = F.pad(input, self._reversed_padding_repeated_twice, mode=self.padding_mode)
            return conv2d(input, weight, bias, self.stride, 0, self.dilation, self.groups)
        return conv2d(input, weight, bias, self.stride, self.padding, self.dilation, self.groups)
