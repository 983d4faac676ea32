"""The CUDA engine on a real GPU, against cuDNN and PyTorch's CUDA pooling.

Every test here is marked ``cuda`` and skipped without a GPU and CuPy. Correctness bar (issue
4): forward and every gradient within 2x cuDNN's own error against a float64 result (plus
8 units of roundoff of the condition scale), with TF32 off (tests/conftest.py). bench/gpu_check.py runs this file,
compute-sanitizer and the GPU benchmark in one go.
"""

import copy

import pytest
import torch
import torch.nn.functional as F
from conftest import cuda_only
from helpers import assert_matches_torch

import fastconv
from fastconv import ArgumentError, DeviceError, DTypeError

pytestmark = [pytest.mark.cuda, cuda_only]
DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]


def _leaves(dtype, *tensors):
    return [None if t is None else t.to("cuda", dtype).requires_grad_() for t in tensors]


CONV = [  # ResNet-50-like layers at small batch, plus every option and odd shapes
    ((4, 3, 57, 61), (16, 3, 7, 7), dict(stride=2, padding=3)),
    ((4, 64, 28, 28), (64, 64, 3, 3), dict(padding=1)),
    ((4, 256, 14, 14), (64, 256, 1, 1), {}),
    ((4, 128, 15, 15), (128, 128, 3, 3), dict(stride=2, padding=1)),
    ((3, 12, 17, 19), (18, 4, 3, 2), dict(stride=(2, 1), padding=(1, 2), dilation=(2, 3),
                                          groups=3)),
    ((4, 32, 20, 20), (64, 1, 3, 3), dict(padding=1, groups=32)),
    ((2, 1, 28, 28), (6, 1, 5, 5), dict(padding=2)),
    ((1, 130, 5, 5), (140, 130, 3, 3), dict(padding="same")),
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shapes", CONV, ids=lambda s: f"{s[0]}x{s[1]}")
def test_conv2d_matches_cudnn(dtype, shapes):
    xs, ws, opts = shapes
    gen = torch.Generator().manual_seed(0)
    x, w, b = torch.randn(xs, generator=gen), torch.randn(ws, generator=gen) / ws[1] ** 0.5, \
        torch.randn(ws[0], generator=gen)
    assert_matches_torch(fastconv.conv2d, F.conv2d, _leaves(dtype, x, w, b), opts, k=2)


POOL = [dict(kernel_size=3, stride=2, padding=1), dict(kernel_size=2),
        dict(kernel_size=(3, 2), stride=(1, 2), padding=(1, 1), ceil_mode=True)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("opts", POOL)
def test_pooling_matches_torch_cuda(dtype, opts):
    x = torch.randn(4, 8, 33, 30, generator=torch.Generator().manual_seed(1))
    x[0, 0, 3, 3] = float("nan")
    xc = x.to("cuda", dtype)
    ours, ours_idx = fastconv.max_pool2d(xc, return_indices=True, **opts)
    theirs, theirs_idx = F.max_pool2d(xc, return_indices=True, **opts)
    assert torch.equal(ours_idx, theirs_idx)
    assert torch.equal(ours.nan_to_num(), theirs.nan_to_num())
    clean = x.nan_to_num()
    assert_matches_torch(fastconv.max_pool2d, F.max_pool2d, _leaves(dtype, clean), opts, k=2)
    for extra in ({}, dict(count_include_pad=False), dict(divisor_override=5)):
        assert_matches_torch(fastconv.avg_pool2d, F.avg_pool2d, _leaves(dtype, clean),
                             dict(opts, **extra), k=2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_bitwise_identical_run_to_run(dtype):
    """Split-K weight gradients, bias sums and pooling gathers: no atomics, fixed order."""
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(16, 64, 28, 28, generator=gen).to("cuda", dtype)
    w = torch.randn(64, 64, 3, 3, generator=gen).to("cuda", dtype)
    b = torch.randn(64, generator=gen).to("cuda", dtype)

    def grads():
        xs, ws, bs = (t.clone().requires_grad_() for t in (x, w, b))
        y = fastconv.max_pool2d(fastconv.conv2d(xs, ws, bs, padding=1), 3, 2, 1)
        y = fastconv.avg_pool2d(y, 2)
        return torch.autograd.grad(y, (xs, ws, bs), torch.ones_like(y))

    first = grads()
    for _ in range(3):
        for a, c in zip(first, grads()):
            assert torch.equal(a, c)


def test_runs_on_the_current_stream():
    x = torch.randn(8, 16, 32, 32, device="cuda")
    w = torch.randn(32, 16, 3, 3, device="cuda")
    expected = F.conv2d(x, w, padding=1)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        got = fastconv.conv2d(x, w, padding=1)
        pooled = fastconv.max_pool2d(got, 2)
    torch.cuda.current_stream().wait_stream(side)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(pooled, F.max_pool2d(expected, 2), rtol=1e-4, atol=1e-4)


def test_module_trains_end_to_end():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.ReLU(),
                                torch.nn.MaxPool2d(2), torch.nn.Conv2d(8, 4, 1),
                                torch.nn.AvgPool2d(2)).cuda()
    ours = fastconv.convert(copy.deepcopy(model))
    x = torch.randn(4, 3, 16, 16, device="cuda")
    for net in (model, ours):
        opt = torch.optim.SGD(net.parameters(), lr=0.1)
        for _ in range(3):
            opt.zero_grad()
            net(x).square().mean().backward()
            opt.step()
    for a, b in zip(model.parameters(), ours.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_bad_input_on_the_gpu():
    x = torch.randn(1, 2, 8, 8, device="cuda")
    with pytest.raises(DeviceError, match="weight is on cpu"):
        fastconv.conv2d(x, torch.randn(2, 2, 3, 3))
    with pytest.raises(DeviceError, match="bias is on cpu"):
        fastconv.conv2d(x, torch.randn(2, 2, 3, 3, device="cuda"), torch.randn(2))
    with pytest.raises(DTypeError, match="integer input only on the CPU"):
        fastconv.max_pool2d(torch.zeros(1, 1, 4, 4, dtype=torch.int64, device="cuda"), 2)
    with pytest.raises(ArgumentError, match="padding must be at most half"):
        fastconv.max_pool2d(x, 2, padding=2)
    if torch.cuda.device_count() > 1:
        with pytest.raises(DeviceError, match="same device"):
            fastconv.conv2d(x, torch.randn(2, 2, 3, 3, device="cuda:1"))


@pytest.mark.slow
def test_64bit_indexing():
    """A pooling input of more than 2^31 elements takes the long long instantiations."""
    free, _ = torch.cuda.mem_get_info()
    if free < 12 * 2**30:
        pytest.skip("needs 12 GiB of free GPU memory")
    x = torch.randn(1, 2, 2**15, 2**15 + 8, device="cuda", dtype=torch.float16)
    assert x.numel() > 2**31
    y = fastconv.avg_pool2d(x, 2)
    torch.testing.assert_close(y, F.avg_pool2d(x, 2))
    del y
    y, idx = fastconv.max_pool2d(x, 2, return_indices=True)
    assert torch.equal(idx, F.max_pool2d(x, 2, return_indices=True)[1])
