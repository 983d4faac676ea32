"""The seed lesson's loops (Dive into Deep Learning, ch. 6), kept as readable ground truth.

Everything here is deliberately slow Python: one output element per loop iteration. The fast
engines are tested against these functions and against ``torch.nn.functional``.
"""

from __future__ import annotations

import torch

from ._args import conv2d_params, pair


def _result_dtype(*tensors: torch.Tensor) -> torch.dtype:
    # The seeds build Y with torch.zeros, so integer inputs give a float result.
    dtype = tensors[0].dtype
    for t in tensors[1:]:
        dtype = torch.promote_types(dtype, t.dtype)
    return dtype if dtype.is_floating_point else torch.get_default_dtype()


def corr2d(X: torch.Tensor, K: torch.Tensor) -> torch.Tensor:
    """2-D cross-correlation of ``X`` (H, W) with ``K`` (h, w); result (H-h+1, W-w+1)."""
    h, w = K.shape
    Y = torch.zeros((X.shape[0] - h + 1, X.shape[1] - w + 1), dtype=_result_dtype(X, K))
    for i in range(Y.shape[0]):
        for j in range(Y.shape[1]):
            Y[i, j] = (X[i:i + h, j:j + w] * K).sum()
    return Y


def corr2d_multi_in(X: torch.Tensor, K: torch.Tensor) -> torch.Tensor:
    """Sum over input channels: ``X`` (C_in, H, W), ``K`` (C_in, h, w) -> (H-h+1, W-w+1)."""
    return sum(corr2d(x, k) for x, k in zip(X, K))


def corr2d_multi_in_out(X: torch.Tensor, K: torch.Tensor) -> torch.Tensor:
    """One output channel per kernel: ``X`` (C_in, H, W), ``K`` (C_out, C_in, h, w)."""
    return torch.stack([corr2d_multi_in(X, k) for k in K], 0)


def corr2d_multi_in_out_1x1(X: torch.Tensor, K: torch.Tensor) -> torch.Tensor:
    """A 1x1 convolution is a matrix product over channels: ``K`` (C_out, C_in, 1, 1)."""
    c_i, h, w = X.shape
    c_o = K.shape[0]
    X = X.reshape((c_i, h * w))
    K = K.reshape((c_o, c_i))
    Y = torch.matmul(K, X)
    return Y.reshape((c_o, h, w))


def pool2d(X: torch.Tensor, pool_size, mode: str = "max", padding=0, stride=None) -> torch.Tensor:
    """The seed's pooling loop, grown to padding, stride and channels.

    ``X`` is (H, W), or (C, H, W) / (N, C, H, W) pooled per channel. Padding is -inf for max
    and zeros for avg (counted in the mean, as ``nn.AvgPool2d`` does by default); ``stride``
    defaults to 1 as in the seed (``nn`` layers default it to the window size).
    """
    p_h, p_w = pair(pool_size, "pool_size", "pool2d")
    (pad_h, pad_w), (s_h, s_w) = pair(padding, "padding", "pool2d"), pair(stride or 1, "stride",
                                                                          "pool2d")
    if mode not in ("max", "avg"):
        raise ValueError(f"pool2d: mode must be 'max' or 'avg', got {mode!r}")
    if X.dim() > 2:
        return torch.stack([pool2d(x, pool_size, mode, padding, stride) for x in X], 0)
    dtype = _result_dtype(X)
    fill = float("-inf") if mode == "max" else 0.0
    padded = torch.full((X.shape[0] + 2 * pad_h, X.shape[1] + 2 * pad_w), fill, dtype=dtype)
    padded[pad_h:pad_h + X.shape[0], pad_w:pad_w + X.shape[1]] = X
    Y = torch.zeros(((padded.shape[0] - p_h) // s_h + 1, (padded.shape[1] - p_w) // s_w + 1),
                    dtype=dtype)
    for i in range(Y.shape[0]):
        for j in range(Y.shape[1]):
            window = padded[i * s_h:i * s_h + p_h, j * s_w:j * s_w + p_w]
            Y[i, j] = window.max() if mode == "max" else window.mean()
    return Y


def corr2d_strided(X: torch.Tensor, K: torch.Tensor, stride=1, dilation=1) -> torch.Tensor:
    """``corr2d`` with stride and dilation (``X`` already padded)."""
    (s_h, s_w), (d_h, d_w) = pair(stride, "stride", "corr2d"), pair(dilation, "dilation", "corr2d")
    h, w = K.shape
    out_h = (X.shape[0] - d_h * (h - 1) - 1) // s_h + 1
    out_w = (X.shape[1] - d_w * (w - 1) - 1) // s_w + 1
    Y = torch.zeros((out_h, out_w), dtype=_result_dtype(X, K))
    for i in range(out_h):
        for j in range(out_w):
            window = X[i * s_h: i * s_h + d_h * (h - 1) + 1: d_h,
                       j * s_w: j * s_w + d_w * (w - 1) + 1: d_w]
            Y[i, j] = (window * K).sum()
    return Y


def conv2d(input: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
           stride=1, padding=0, dilation=1, groups: int = 1) -> torch.Tensor:
    """Loop reference of ``torch.nn.functional.conv2d`` (batched or unbatched input).

    input (N, C_in, H, W) or (C_in, H, W); weight (C_out, C_in/groups, kH, kW); bias (C_out,).
    Built from the seed pieces: zero-pad, then per group ``corr2d_multi_in_out`` with stride
    and dilation, plus bias.
    """
    params = conv2d_params(tuple(weight.shape[-2:]), stride, padding, dilation, groups)
    if input.dim() == 3:
        return conv2d(input[None], weight, bias, stride, padding, dilation, groups)[0]
    top, bottom, left, right = params.padding
    n, c_in, h, w = input.shape
    padded = torch.zeros((n, c_in, h + top + bottom, w + left + right), dtype=input.dtype)
    padded[:, :, top:top + h, left:left + w] = input
    c_in_g, c_out_g = c_in // groups, weight.shape[0] // groups
    outputs = []
    for x in padded:
        channels = []
        for g in range(groups):
            xg = x[g * c_in_g:(g + 1) * c_in_g]
            for k in weight[g * c_out_g:(g + 1) * c_out_g]:
                channels.append(sum(corr2d_strided(xc, kc, params.stride, params.dilation)
                                    for xc, kc in zip(xg, k)))
        y = torch.stack(channels, 0)
        if bias is not None:
            y = y + bias[:, None, None]
        outputs.append(y)
    return torch.stack(outputs, 0)
