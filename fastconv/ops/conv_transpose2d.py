"""conv_transpose2d: the functional API over ``fastconv::conv2d_backward_input``.

A transposed convolution is the input gradient of the convolution it transposes, so it runs
on the same kernels as that gradient (and its own gradients are conv2d and the weight
gradient, see ``ops.conv2d``).
"""

from __future__ import annotations

import torch

from .._args import check_conv_transpose2d, conv_transpose2d_params
from .conv2d import ops, options


def conv_transpose2d(input: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
                     stride=1, padding=0, output_padding=0, groups: int = 1,
                     dilation=1) -> torch.Tensor:
    """2-D transposed convolution with the semantics of
    ``torch.nn.functional.conv_transpose2d`` (note its argument order: groups before dilation).

    Args:
        input: (N, C_in, H, W), or unbatched (C_in, H, W).
        weight: (C_in, C_out / groups, kH, kW).
        bias: (C_out,) or None.
        stride, padding, dilation: int or (h, w) pairs, as for the conv2d this transposes.
        output_padding: extra rows/columns at the bottom/right of the output, each smaller
            than the stride or the dilation.
        groups: split channels into independent groups.

    Returns:
        (N, C_out, H_out, W_out), or (C_out, H_out, W_out) for unbatched input, where
        ``H_out = (H-1)*stride - 2*padding + dilation*(kH-1) + output_padding + 1``;
        channels_last if input or weight is.
    """
    params = conv_transpose2d_params(stride, padding, output_padding, groups, dilation)
    shape = check_conv_transpose2d(input, weight, bias, params)
    batched = input if input.dim() == 4 else input.unsqueeze(0)
    out = ops.conv2d_backward_input(batched, weight, list(shape[-2:]), *options(params.conv))
    if bias is not None:
        # .to: under autocast the operator ran in the autocast dtype, and so does the bias.
        out = out + bias.to(out.dtype).view(-1, 1, 1)
    return out if input.dim() == 4 else out.squeeze(0)
