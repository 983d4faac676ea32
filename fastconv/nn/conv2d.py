"""``fastconv.Conv2D`` and ``ConvTranspose2D``: ``nn.Conv2d`` and ``nn.ConvTranspose2d`` with
fastconv computing them."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from ..ops.conv2d import conv2d
from ..ops.conv_transpose2d import conv_transpose2d


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


class ConvTranspose2D(nn.ConvTranspose2d):
    """Drop-in for ``torch.nn.ConvTranspose2d``.

    Same constructor arguments (``in_channels, out_channels, kernel_size, stride=1, padding=0,
    output_padding=0, groups=1, bias=True, dilation=1, padding_mode='zeros', device=None,
    dtype=None``), parameters and ``state_dict``; ``forward(input, output_size=None)`` picks
    the output_padding that gives ``output_size``, as ``nn.ConvTranspose2d`` does.

    Shape: input (N, C_in, H, W) or (C_in, H, W) -> (N, C_out, H_out, W_out) or
    (C_out, H_out, W_out).
    """

    def forward(self, input: torch.Tensor, output_size: list[int] | None = None) -> torch.Tensor:
        if self.padding_mode != "zeros":  # nn.ConvTranspose2d's own rule and message
            raise ValueError("Only `zeros` padding mode is supported for ConvTranspose2d")
        output_padding = self._output_padding(input, output_size, self.stride, self.padding,
                                              self.kernel_size, 2, self.dilation)
        return conv_transpose2d(input, self.weight, self.bias, self.stride, self.padding,
                                output_padding, self.groups, self.dilation)
