"""Gradients of gradients: every backward is made of fastconv's own differentiable operators,
so gradgradcheck passes in float64 and second derivatives match PyTorch's."""

import pytest
import torch
import torch.nn.functional as F
from conftest import DEVICES
from torch.autograd import gradcheck, gradgradcheck

import fastconv


def _t(device, *shape, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=gen, dtype=torch.float64).to(device).requires_grad_()


CONV_OPTIONS = [
    dict(),
    dict(stride=(2, 1), padding=(1, 2), dilation=(2, 1)),
    dict(padding="same", groups=2),
    dict(stride=2, groups=4),  # depthwise, strided rows
    dict(padding=(2, 3), dilation=2, groups=4),  # depthwise, stride 1: flat plane loops
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("opts", CONV_OPTIONS)
def test_conv2d_gradgradcheck(device, opts):
    x, w, b = _t(device, 2, 4, 6, 5), _t(device, 4, 4 // opts.get("groups", 1), 3, 2, seed=1), \
        _t(device, 4, seed=2)
    f = lambda x, w, b: fastconv.conv2d(x, w, b, **opts)
    assert gradcheck(f, (x, w, b))
    assert gradgradcheck(f, (x, w, b))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("opts", [dict(stride=2, output_padding=1),
                                  dict(stride=1, dilation=2, output_padding=1, groups=2)])
def test_conv_transpose2d_gradgradcheck(device, opts):
    """The second case has output_padding >= stride: the last output row has no source, and
    the gradient of the gradient must crop it."""
    x, w = _t(device, 1, 4, 4, 3), _t(device, 4, 2, 3, 2, seed=1)
    f = lambda x, w: fastconv.conv_transpose2d(x, w, **opts)
    assert gradgradcheck(f, (x, w))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("opts", [dict(kernel_size=2), dict(kernel_size=3, stride=2, padding=1),
                                  dict(kernel_size=(3, 2), dilation=(1, 2), ceil_mode=True)])
def test_max_pool2d_gradgradcheck(device, opts):
    # Distinct values: a tie would make the max non-differentiable (gradcheck's finite
    # differences would straddle it).
    gen = torch.Generator().manual_seed(0)
    x = torch.randperm(2 * 3 * 7 * 6, generator=gen).reshape(2, 3, 7, 6).to(device, torch.float64)
    x.requires_grad_()
    f = lambda x: fastconv.max_pool2d(x, **opts)
    assert gradcheck(f, (x,))
    assert gradgradcheck(f, (x,))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("opts", [dict(kernel_size=2),
                                  dict(kernel_size=3, stride=2, padding=1, ceil_mode=True,
                                       count_include_pad=False),
                                  dict(kernel_size=2, divisor_override=3)])
def test_avg_pool2d_gradgradcheck(device, opts):
    x = _t(device, 2, 3, 7, 6)
    f = lambda x: fastconv.avg_pool2d(x, **opts)
    assert gradcheck(f, (x,))
    assert gradgradcheck(f, (x,))


@pytest.mark.parametrize("device", DEVICES)
def test_second_derivatives_match_torch(device):
    """A gradient penalty (the WGAN-GP pattern): d/dparams of |d loss / d input|^2, through
    conv, max pool and avg pool, against torch.nn.functional."""
    def net(conv, maxp, avgp, x, w1, w2):
        h = torch.tanh(conv(x, w1, None, padding=1))
        h = maxp(h, 2)
        h = torch.tanh(conv(h, w2, None, stride=2))
        return avgp(h, 2, ceil_mode=True).sum()

    def penalty_grads(conv, maxp, avgp):
        x = _t(device, 2, 3, 12, 12)
        w1, w2 = _t(device, 4, 3, 3, 3, seed=1), _t(device, 5, 4, 2, 2, seed=2)
        (gx,) = torch.autograd.grad(net(conv, maxp, avgp, x, w1, w2), x, create_graph=True)
        return torch.autograd.grad(gx.square().sum(), (x, w1, w2))

    ours = penalty_grads(fastconv.conv2d, fastconv.max_pool2d, fastconv.avg_pool2d)
    theirs = penalty_grads(F.conv2d, F.max_pool2d, F.avg_pool2d)
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)
