"""``fastconv.MaxPool2D`` and ``fastconv.AvgPool2D``: the torch.nn pooling layers, computed by
fastconv."""

from __future__ import annotations

from torch import nn

from ..ops.pool2d import avg_pool2d, max_pool2d


class MaxPool2D(nn.MaxPool2d):
    """Drop-in for ``torch.nn.MaxPool2d`` (``kernel_size, stride=None, padding=0, dilation=1,
    return_indices=False, ceil_mode=False``).

    Shape: (N, C, H, W) or (C, H, W) -> (N, C, Ho, Wo) or (C, Ho, Wo).
    """

    def forward(self, input):
        return max_pool2d(input, self.kernel_size, self.stride, self.padding, self.dilation,
                          ceil_mode=self.ceil_mode, return_indices=self.return_indices)


class AvgPool2D(nn.AvgPool2d):
    """Drop-in for ``torch.nn.AvgPool2d`` (``kernel_size, stride=None, padding=0,
    ceil_mode=False, count_include_pad=True, divisor_override=None``).

    Shape: (N, C, H, W) or (C, H, W) -> (N, C, Ho, Wo) or (C, Ho, Wo).
    """

    def forward(self, input):
        return avg_pool2d(input, self.kernel_size, self.stride, self.padding, self.ceil_mode,
                          self.count_include_pad, self.divisor_override)
