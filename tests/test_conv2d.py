"""fastconv.conv2d against torch.nn.functional.conv2d and the loop reference."""

import subprocess
import sys
import textwrap
from concurrent.futures import ThreadPoolExecutor
from unittest import mock

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import DEVICES
from helpers import assert_matches_torch, prefer_candidate
from hypothesis import given
from hypothesis import strategies as st

import fastconv
from fastconv import reference


@st.composite
def conv_cases(draw, max_size=9):
    """Random conv2d operands and options, odd sizes included; always a valid output."""
    groups = draw(st.integers(1, 3))
    cin, cout = groups * draw(st.integers(1, 3)), groups * draw(st.integers(1, 3))
    kh, kw = draw(st.integers(1, 4)), draw(st.integers(1, 4))
    stride = (draw(st.integers(1, 3)), draw(st.integers(1, 3)))
    dilation = (draw(st.integers(1, 3)), draw(st.integers(1, 3)))
    options = [st.integers(0, 2), st.tuples(st.integers(0, 3), st.integers(0, 3)),
               st.just("valid")]
    if stride == (1, 1):
        options.append(st.just("same"))
    padding = draw(st.one_of(*options))
    pads = {"valid": (0, 0), "same": (9, 9)}.get(padding, padding) if isinstance(padding, str) \
        else (padding, padding) if isinstance(padding, int) else padding
    min_h = max(1, dilation[0] * (kh - 1) + 1 - 2 * pads[0])
    min_w = max(1, dilation[1] * (kw - 1) + 1 - 2 * pads[1])
    h = draw(st.integers(min_h, min_h + max_size))
    w = draw(st.integers(min_w, min_w + max_size))
    batch = draw(st.sampled_from([None, 1, 2, 3]))  # None: unbatched (C, H, W)
    shape = (cin, h, w) if batch is None else (batch, cin, h, w)
    seed = draw(st.integers(0, 2**31 - 1))
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=gen)
    weight = torch.randn((cout, cin // groups, kh, kw), generator=gen)
    bias = torch.randn(cout, generator=gen) if draw(st.booleans()) else None
    return x, weight, bias, dict(stride=stride, padding=padding, dilation=dilation, groups=groups)


def _on(device, dtype, *tensors, grad=True):
    return [None if t is None else t.to(device, dtype).requires_grad_(grad) for t in tensors]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@given(case=conv_cases())
def test_matches_torch(device, dtype, case):
    x, weight, bias, opts = case
    assert_matches_torch(fastconv.conv2d, F.conv2d, _on(device, dtype, x, weight, bias), opts)


@st.composite
def tile_cases(draw):
    """Random layers wide enough for the CPU engine's tiles: output channels a group that fill
    at least half a float32 vector (forward and weight-gradient tiles), input channels a group
    either few or a full vector (input-gradient tiles), any kernel, stride, dilation, padding
    and size; 3x3 stride-1 layers go to Winograd only on planes of 12x12 and up, so most of
    them here run as tiles too."""
    groups = draw(st.integers(1, 2))
    cin_g = draw(st.sampled_from([1, 2, 3, 5, 16, 17]))
    cout_g = draw(st.integers(8, 20))
    kh, kw = draw(st.integers(1, 5)), draw(st.integers(1, 5))
    stride = (draw(st.integers(1, 3)), draw(st.integers(1, 3)))
    dilation = (draw(st.integers(1, 2)), draw(st.integers(1, 2)))
    options = [st.integers(0, 2), st.tuples(st.integers(0, 3), st.integers(0, 3))]
    if stride == (1, 1):
        options.append(st.just("same"))
    padding = draw(st.one_of(*options))
    pads = (9, 9) if padding == "same" else \
        (padding, padding) if isinstance(padding, int) else padding
    min_h = max(1, dilation[0] * (kh - 1) + 1 - 2 * pads[0])
    min_w = max(1, dilation[1] * (kw - 1) + 1 - 2 * pads[1])
    h, w = draw(st.integers(min_h, min_h + 11)), draw(st.integers(min_w, min_w + 11))
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    x = torch.randn((draw(st.integers(1, 3)), groups * cin_g, h, w), generator=gen)
    weight = torch.randn((groups * cout_g, cin_g, kh, kw), generator=gen)
    bias = torch.randn(groups * cout_g, generator=gen)
    return x, weight, bias, dict(stride=stride, padding=padding, dilation=dilation, groups=groups)


@given(case=tile_cases())
def test_tile_paths_match_torch(case):
    """Forward and both gradients on random layers of the tile paths (the targeted lists
    above pin their edge cases; these are fresh shapes every run)."""
    from fastconv._args import conv2d_params
    from fastconv.cpu.conv2d import _is_winograd

    x, weight, bias, opts = case
    params = conv2d_params(weight.shape[2:], **opts)
    winograd = _is_winograd(params, weight.shape, params.output_hw(x.shape[2:], weight.shape[2:]))
    assert_matches_torch(fastconv.conv2d, F.conv2d, _on("cpu", torch.float32, x, weight, bias),
                         opts, scale="tensor" if winograd else "element")


@given(case=conv_cases(max_size=4))
def test_matches_loop_reference(case):
    x, weight, bias, opts = case
    x, weight, bias = _on("cpu", torch.float64, x, weight, bias, grad=False)
    expected = reference.conv2d(x, weight, bias, **opts)
    torch.testing.assert_close(fastconv.conv2d(x, weight, bias, **opts), expected,
                               rtol=1e-12, atol=1e-12)


GRADCHECK_CASES = [
    dict(stride=1, padding=1, dilation=1, groups=1),
    dict(stride=2, padding=(2, 0), dilation=(1, 2), groups=2),
    dict(stride=1, padding="same", dilation=(2, 1), groups=1),
    dict(stride=1, padding=0, dilation=1, groups=1),  # 1x1 direct path when kernel is 1x1
    dict(stride=(2, 1), padding=1, dilation=2, groups=4),  # depthwise
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("opts", GRADCHECK_CASES)
@pytest.mark.parametrize("kernel", [(3, 2), (1, 1)])
def test_gradcheck(device, opts, kernel):
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(2, 4, 7, 6, generator=gen, dtype=torch.float64)
    weight = torch.randn(8, 4 // opts["groups"], *kernel, generator=gen, dtype=torch.float64)
    bias = torch.randn(8, generator=gen, dtype=torch.float64)
    x, weight, bias = _on(device, torch.float64, x, weight, bias)
    assert torch.autograd.gradcheck(lambda a, b, c: fastconv.conv2d(a, b, c, **opts),
                                    (x, weight, bias))


@pytest.mark.parametrize("needs", [(True, False), (False, True), (True, True)])
def test_saves_only_what_backward_needs(needs):
    x = torch.randn(2, 3, 6, 6, requires_grad=needs[0])
    weight = torch.randn(4, 3, 3, 3, requires_grad=needs[1])
    y = fastconv.conv2d(x, weight, padding=1)
    saved_input, saved_weight = y.grad_fn.saved_tensors
    # grad_input needs only the weight, grad_weight only the input.
    assert (saved_input is not None) == needs[1]
    assert (saved_weight is not None) == needs[0]
    y.sum().backward()
    assert (x.grad is not None) == needs[0] and (weight.grad is not None) == needs[1]


def test_bias_only_gradient():
    x, weight = torch.randn(3, 2, 5, 5), torch.randn(4, 2, 3, 3)
    bias = torch.randn(4, requires_grad=True)
    grad_out = torch.randn(3, 4, 3, 3, dtype=torch.float64)
    fastconv.conv2d(x, weight, bias).backward(grad_out.float())
    torch.testing.assert_close(bias.grad.double(), grad_out.sum((0, 2, 3)), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("layout", ["channels_last", "transposed", "sliced"])
def test_non_contiguous_inputs(layout):
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(2, 6, 9, 11, generator=gen)
    weight = torch.randn(4, 3, 3, 3, generator=gen)
    if layout == "channels_last":
        x = x.to(memory_format=torch.channels_last)
        weight = weight.to(memory_format=torch.channels_last)
    elif layout == "transposed":
        x = x.transpose(2, 3).contiguous().transpose(2, 3)
    else:
        x = torch.randn(2, 12, 9, 22, generator=gen)[:, ::2, :, ::2]
    assert not x.is_contiguous()
    bias = torch.randn(4, generator=gen)
    assert_matches_torch(fastconv.conv2d, F.conv2d, _on("cpu", torch.float32, x, weight, bias),
                         dict(stride=(1, 2), padding=1, groups=2))


def test_expanded_grad_output():
    # sum().backward() hands backward a stride-0 gradient.
    x = torch.randn(2, 3, 6, 6, requires_grad=True)
    weight = torch.randn(4, 3, 3, 3, requires_grad=True)
    fastconv.conv2d(x, weight).sum().backward()
    x2, w2 = x.detach().clone().requires_grad_(), weight.detach().clone().requires_grad_()
    F.conv2d(x2, w2).sum().backward()
    torch.testing.assert_close(x.grad, x2.grad)
    torch.testing.assert_close(weight.grad, w2.grad, rtol=1e-5, atol=1e-4)


def test_empty_batch():
    x = torch.randn(0, 3, 5, 5, requires_grad=True)
    weight = torch.randn(4, 3, 3, 3, requires_grad=True)
    bias = torch.randn(4, requires_grad=True)
    y = fastconv.conv2d(x, weight, bias)
    assert y.shape == (0, 4, 3, 3)
    y.sum().backward()
    assert x.grad.shape == x.shape
    assert torch.equal(weight.grad, torch.zeros_like(weight))
    assert torch.equal(bias.grad, torch.zeros_like(bias))


def test_deterministic_run_to_run():
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(5, 4, 12, 12, generator=gen, requires_grad=True)
    weight = torch.randn(6, 2, 3, 3, generator=gen, requires_grad=True)
    grad_out = torch.randn(5, 6, 12, 12, generator=gen)
    results = []
    for _ in range(3):
        y = fastconv.conv2d(x, weight, padding=1, groups=2)
        gx, gw = torch.autograd.grad(y, (x, weight), grad_out)
        results.append((y, gx, gw))
    for other in results[1:]:
        assert all(torch.equal(a, b) for a, b in zip(results[0], other))


@pytest.mark.parametrize("threads", [1, 2])
def test_keeps_torch_thread_count(threads):
    torch.set_num_threads(threads)
    x = torch.randn(8, 4, 10, 10, requires_grad=True)
    weight = torch.randn(4, 4, 3, 3, requires_grad=True)
    fastconv.conv2d(x, weight, padding=1).sum().backward()
    fastconv.conv2d(x[:1], weight).sum().backward()  # fewer items than threads: BLAS path
    assert torch.get_num_threads() == threads


def test_concurrent_python_threads():
    gen = torch.Generator().manual_seed(4)
    xs = [torch.randn(3, 4, 9, 9, generator=gen) for _ in range(8)]
    weight = torch.randn(5, 4, 3, 3, generator=gen)
    expected = [F.conv2d(x, weight, padding=1) for x in xs]
    with ThreadPoolExecutor(4) as pool:
        got = list(pool.map(lambda x: fastconv.conv2d(x, weight, padding=1), xs * 5))
    for i, y in enumerate(got):
        torch.testing.assert_close(y, expected[i % len(xs)], rtol=1e-5, atol=1e-5)


def test_concurrent_threads_with_workqueue_layer():
    """Numba's workqueue layer aborts on concurrent parallel calls; fastconv serialises them."""
    code = textwrap.dedent("""
        from concurrent.futures import ThreadPoolExecutor
        import numba, torch, fastconv
        x, w = torch.randn(4, 3, 16, 16), torch.randn(4, 3, 3, 3)
        with ThreadPoolExecutor(4) as pool:
            list(pool.map(lambda _: fastconv.conv2d(x, w).sum().item(), range(40)))
        print(numba.threading_layer())
    """)
    env = {**__import__("os").environ, "NUMBA_THREADING_LAYER": "workqueue"}
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == "workqueue"


DEPTHWISE = [  # (input, weight, options): the direct kernels' paths and edges
    ((2, 4, 9, 8), (8, 1, 3, 3), dict(padding=1, groups=4)),                 # multiplier 2
    ((2, 3, 7, 9), (3, 1, 5, 3), dict(padding=(3, 0), dilation=(1, 2), groups=3)),
    ((1, 2, 11, 10), (4, 1, 3, 2), dict(stride=(2, 3), padding=1, groups=2)),  # strided
    ((3, 1, 12, 12), (6, 1, 5, 5), dict(padding=2)),                         # C_in == 1
    ((2, 2, 5, 5), (2, 1, 2, 2), dict(padding=1, stride=3, groups=2)),       # skipped rows
    # stride 1, multiplier 1: the input gradient as a flipped-filter forward
    ((2, 5, 9, 8), (5, 1, 3, 3), dict(padding=1, groups=5)),
    ((2, 4, 8, 7), (4, 1, 4, 2), dict(padding="same", dilation=(1, 2), groups=4)),
    ((1, 2, 6, 6), (2, 1, 3, 3), dict(padding=3, groups=2)),  # padding past the reach: scatter
    # stride 1, output as wide as the input: flat planes (_depthwise_flat and its weight
    # gradient; the first two stride-1 cases above are flat too)
    ((2, 3, 10, 9), (3, 1, 3, 3), dict(padding=2, dilation=2, groups=3)),  # fused, dilated
    ((2, 3, 9, 11), (6, 1, 3, 3), dict(padding=(3, 1), groups=3)),  # rows of padding only
    ((1, 4, 8, 10), (4, 1, 3, 3), dict(padding=(0, 1), groups=4)),  # no rows of padding
    ((2, 2, 7, 9), (2, 1, 2, 4), dict(padding="same", groups=2)),   # even: one-sided columns
    ((2, 3, 6, 5), (3, 1, 3, 1), dict(padding=(1, 0), groups=3)),   # one tap column
    # 5x5 fused (the C_in == 1 case above is one too): dilated, and uneven padding
    ((2, 3, 13, 12), (3, 1, 5, 5), dict(padding=4, dilation=2, groups=3)),
    ((1, 2, 9, 11), (4, 1, 5, 5), dict(padding=(1, 2), groups=2)),
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shapes", DEPTHWISE, ids=lambda s: f"{s[0]}x{s[1]}")
def test_depthwise_paths(device, dtype, shapes):
    xs, ws, opts = shapes
    gen = torch.Generator().manual_seed(0)
    x, w, b = (torch.randn(s, generator=gen, dtype=torch.float64) for s in (xs, ws, ws[:1]))
    assert_matches_torch(fastconv.conv2d, F.conv2d, _on(device, dtype, x, w, b), opts)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("channels,mult,k", [(3, 1, 3), (3, 1, 5), (1, 6, 5)],
                         ids=["3x3", "5x5", "5x5-cin1"])
def test_depthwise_flat_planes_keep_inf_in_its_windows(dtype, channels, mult, k):
    """A flat plane's tap column past a row's end reads the next row's first element (and
    the other way round); an Inf there must not reach the outputs (or weight-gradient taps)
    whose windows lack it: no 0 * Inf NaN where PyTorch has an Inf or a finite value."""
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(2, channels, 7, 6, generator=gen, dtype=dtype)
    x[:, :, 2, 0] = float("inf")
    x[:, :, 4, 5] = -float("inf")
    w = torch.rand(channels * mult, 1, k, k, generator=gen, dtype=dtype) + 0.5  # no 0 * Inf
    gy = torch.rand(2, channels * mult, 7, 6, generator=gen, dtype=dtype) + 0.5
    gy[:, :, 3, 0] = float("inf")
    opts = dict(padding=k // 2, groups=channels)
    y = fastconv.conv2d(x, w, **opts)
    expected = F.conv2d(x, w, **opts)
    torch.testing.assert_close(y, expected)
    assert expected.isfinite().any() and expected.isinf().any()
    xr, wr = x.clone().requires_grad_(), w.clone().requires_grad_()
    gx = torch.autograd.grad(fastconv.conv2d(xr, wr, **opts), xr, gy)[0]
    expected_gx = torch.autograd.grad(F.conv2d(xr, wr, **opts), xr, gy)[0]
    torch.testing.assert_close(gx, expected_gx)
    # The weight gradient with a finite grad_out (an Inf there meets the padding's zeros,
    # which PyTorch's float32 and float64 kernels treat differently). Every tap meets an Inf
    # of x in some window: PyTorch's taps are +-Inf, or NaN where one meets both signs; a
    # masked-out tap's 0 * Inf would turn an Inf into a NaN.
    gy[:, :, 3, 0] = 1.0
    gw = torch.autograd.grad(fastconv.conv2d(xr, wr, **opts), wr, gy)[0]
    expected_gw = torch.autograd.grad(F.conv2d(xr, wr, **opts), wr, gy)[0]
    assert expected_gw.isinf().any()
    torch.testing.assert_close(gw, expected_gw, equal_nan=True)


TILED = [  # (input, weight, options): the CPU forward's register tiles (_tile_forward) and edges
    ((3, 6, 14, 14), (16, 6, 5, 5), {}),                            # LeNet: Wo < 14, one vector
    ((2, 5, 9, 33), (33, 5, 3, 3), dict(stride=(1, 2), padding=1)),  # 3 blocks, overlapped tile
    ((2, 4, 12, 40), (7, 4, 1, 1), dict(stride=2)),                 # 1x1 stride 2: phases only
    ((2, 8, 11, 9), (80, 4, 3, 2), dict(groups=2, dilation=(2, 1), padding=(2, 0))),  # v = 2
    ((1, 3, 30, 29), (24, 3, 7, 7), dict(stride=2, padding=3)),     # stem-like, bands (N = 1)
    ((2, 6, 10, 10), (6, 6, 4, 4), dict(padding="same")),           # asymmetric padding
    ((2, 3, 8, 31), (5, 3, 2, 5), dict(stride=(2, 3), padding=(0, 4))),  # stride 3, wide pad
    ((2, 16, 7, 7), (40, 16, 1, 1), {}),                            # reads the input as is
    # flat: tiles across row ends (1x1 and kx1 kernels, stride 1): a band shorter than a tile
    ((1, 5, 9, 6), (20, 5, 3, 1), dict(dilation=(2, 1))),
    ((1, 4, 5, 3), (9, 4, 2, 1), {}),
    ((2, 16, 6, 5), (18, 16, 1, 1), dict(padding=1)),               # 1x1 with padding
    ((2, 6, 17, 15), (9, 6, 3, 3), dict(stride=2)),                 # bottom rows never read
    # the input gradient as tiles too (stride 1, 16 input channels a group): padding past
    # the kernel's reach (the gradient's copy crops), even kernels' one-sided 'same' padding
    ((2, 32, 9, 8), (20, 16, 3, 2), dict(groups=2, padding=(3, 2), dilation=(1, 2))),
    ((2, 16, 7, 9), (17, 16, 4, 2), dict(padding="same")),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("copy_bytes", [None, 1])
@pytest.mark.parametrize("shapes", TILED, ids=lambda s: f"{s[0]}x{s[1]}")
def test_tiled_forward(dtype, copy_bytes, shapes, monkeypatch):
    """Forward with bias (and both gradients) through the tile kernel: every tile width, one
    or two vectors of output channels, partial blocks, column phases of any stride, padding on
    any side; with the input copied whole or one output row at a time (copy_bytes=1)."""
    from fastconv.cpu import conv2d as cpu_conv2d

    if copy_bytes is not None:
        monkeypatch.setattr(cpu_conv2d, "_COPY_BYTES", copy_bytes)
    xs, ws, opts = shapes
    gen = torch.Generator().manual_seed(2)
    x, w, b = (torch.randn(s, generator=gen, dtype=dtype).requires_grad_()
               for s in (xs, ws, ws[:1]))
    params = fastconv._args.conv2d_params(ws[2:], **opts)
    assert ws[1] > 1 and not cpu_conv2d._is_winograd(params, ws,
                                                     params.output_hw(xs[2:], ws[2:]))
    assert cpu_conv2d._tiles_fill_lanes(ws[0] // opts.get("groups", 1), x.detach().numpy().dtype,
                                        cpu_conv2d.FORWARD_MIN_FILL)
    assert_matches_torch(fastconv.conv2d, F.conv2d, [x, w, b], opts)


STRIDED_GRAD = [  # (input, weight, options): strided input gradients as per-phase tiles
    ((2, 16, 13, 12), (16, 16, 3, 3), dict(stride=2, padding=1)),   # ResNet's, odd height
    # groups, column stride 3 with a phase no tap reaches, dilated columns
    ((2, 32, 11, 10), (20, 16, 3, 2), dict(groups=2, stride=(2, 3), dilation=(1, 2),
                                           padding=(1, 0))),
    ((1, 16, 9, 9), (16, 16, 2, 2), dict(stride=3)),                # kernel under the stride
    ((2, 16, 15, 14), (24, 16, 5, 5), dict(stride=2, padding=2, dilation=2)),  # odd rows: none
    ((2, 16, 14, 14), (16, 16, 7, 7), dict(stride=2, padding=3)),   # stem-like
    ((2, 16, 1, 5), (16, 16, 3, 3), dict(stride=2, padding=1)),     # one row: a phase is empty
    ((1, 16, 3, 2), (16, 16, 3, 3), dict(stride=3, padding=1)),     # narrower than the stride
]


def _matches_torch_by(path, dtype, shapes, seed, monkeypatch):
    """Forward and both gradients against PyTorch, asserting the CPU engine's ``path`` (a
    function of fastconv.cpu.conv2d) ran."""
    from fastconv.cpu import conv2d as cpu_conv2d

    calls = []
    real = getattr(cpu_conv2d, path)
    monkeypatch.setattr(cpu_conv2d, path, lambda *a: calls.append(1) or real(*a))
    xs, ws, opts = shapes
    gen = torch.Generator().manual_seed(seed)
    x, w, b = (torch.randn(s, generator=gen, dtype=dtype).requires_grad_()
               for s in (xs, ws, ws[:1]))
    assert_matches_torch(fastconv.conv2d, F.conv2d, [x, w, b], opts)
    assert calls, f"{path} did not run"


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shapes", STRIDED_GRAD, ids=lambda s: f"{s[0]}x{s[1]}")
def test_strided_input_gradient_by_phases(dtype, shapes, monkeypatch):
    """Forward and both gradients; the input gradient must take the per-phase tiles."""
    _matches_torch_by("_input_grad_tiles", dtype, shapes, 5, monkeypatch)


@pytest.mark.parametrize("chunk_bytes", [None, 1], ids=["one-chunk", "one-image-a-chunk"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shapes", [s for s in STRIDED_GRAD if s[2].get("groups", 1) == 1],
                         ids=lambda s: f"{s[0]}x{s[1]}")
def test_strided_input_gradient_by_phase_gemms(dtype, shapes, chunk_bytes, monkeypatch):
    """Forward and both gradients; the input gradient takes the autotuner's "phase-gemm"
    candidate (a GEMM per tap on shifted views of the wide grad_out), in one chunk of images
    or one image a chunk."""
    from fastconv.cpu import conv2d as cpu_conv2d

    prefer_candidate(monkeypatch, "phase-gemm")
    if chunk_bytes is not None:
        monkeypatch.setattr(cpu_conv2d, "_PHASE_GEMM_BYTES", chunk_bytes)
    _matches_torch_by("_input_grad_phase_gemm", dtype, shapes, 5, monkeypatch)


WEIGHT_GRAD = [  # (input, weight, options): weight gradients as tiles over the batch's pixels
    ((2, 16, 13, 12), (16, 16, 3, 3), dict(stride=2, padding=1)),   # ResNet's, odd height
    ((3, 6, 14, 14), (16, 6, 5, 5), {}),                            # LeNet's: x read as is
    # groups; a group's 20 channels leave a part-filled vector (float64: a block's second
    # vector past every channel); dilated rows
    ((2, 8, 11, 10), (40, 4, 3, 2), dict(groups=2, stride=(2, 1), dilation=(2, 1),
                                         padding=(1, 0))),
    ((1, 4, 9, 20), (12, 4, 1, 15), dict(padding=(0, 7))),          # a row wider than a tile
    ((2, 16, 14, 14), (16, 16, 7, 7), dict(stride=2, padding=3)),   # stem-like
    ((2, 16, 10, 10), (16, 16, 3, 3), dict(stride=3)),              # rows the windows skip
    ((2, 16, 7, 7), (16, 16, 3, 3), dict(padding=2, stride=(1, 2))),  # windows past the end
    # 'same' with a 2x2 kernel pads only the bottom and right: the windows read past the
    # input with no top or left padding
    ((2, 16, 6, 9), (16, 16, 2, 2), dict(padding="same")),
]


@pytest.mark.parametrize("rows", [1, None], ids=["row-tiles", "multi-row-tiles"])
@pytest.mark.parametrize("chunk_bytes", [None, 2048], ids=["one-chunk", "chunks"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shapes", WEIGHT_GRAD, ids=lambda s: f"{s[0]}x{s[1]}")
def test_weight_gradient_by_tiles(dtype, shapes, chunk_bytes, rows, monkeypatch):
    """Forward and both gradients; the weight gradient must take the tiles (with a small
    chunk budget, as partial sums over several chunks of pixels), of one kernel row or of
    several (the default; 5x5 and 7x7 end on a group of one row)."""
    from fastconv.cpu import conv2d as cpu_conv2d

    if chunk_bytes is not None:
        monkeypatch.setattr(cpu_conv2d, "_WEIGHT_CHUNK_BYTES", chunk_bytes)
    if rows is not None:
        monkeypatch.setattr(cpu_conv2d, "WEIGHT_TILE_ROWS", rows)
    _matches_torch_by("_weight_grad_tiles", dtype, shapes, 7, monkeypatch)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_pack_grad_out_transposes_blocks(dtype):
    """_pack_grad_out against numpy: whole and part-filled lane blocks, a block's vector past
    every channel, pixel counts off the lane count, groups."""
    from fastconv.cpu import _microkernel
    from fastconv.cpu import conv2d as cpu_conv2d

    lanes = _microkernel.lanes(dtype)
    rng = np.random.default_rng(0)
    for n, groups, cout_g, ho, wo, v in [(2, 1, lanes, 5, 7, 1), (3, 2, lanes + 3, 6, 6, 2),
                                         (1, 1, 3, 1, 5, 1), (2, 3, lanes // 2, 9, 9, 1)]:
        lv = v * lanes
        gy = rng.standard_normal((n, groups * cout_g, ho, wo)).astype(dtype)
        nb = -(-cout_g // lv)
        got = np.full((groups, nb, n * ho * wo, lv), np.nan, dtype=dtype)
        cpu_conv2d._pack_grad_out(gy, groups, lanes, got)
        want = np.zeros((groups, nb * lv, n * ho * wo), dtype=dtype)
        want[:, :cout_g] = gy.reshape(n, groups, cout_g, -1).transpose(1, 2, 0, 3).reshape(
            groups, cout_g, -1)
        want = want.reshape(groups, nb, lv, -1).transpose(0, 1, 3, 2)
        np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_narrow_layers_take_im2col(dtype):
    """Layers with too few output (or, for the input gradient, input) channels a group to fill
    a tile's vector run im2col and BLAS instead: both still right."""
    from fastconv.cpu import conv2d as cpu_conv2d

    gen = torch.Generator().manual_seed(3)
    # Few input channels too: with 256-bit vectors (4 float64 lanes) any output channel
    # count fills the forward's tiles enough.
    for xs, ws, opts in [((2, 3, 9, 9), (1, 3, 3, 3), dict(stride=2, padding=1)),
                         ((3, 4, 11, 10), (2, 2, 5, 3), dict(groups=2, padding=(2, 1))),
                         ((2, 3, 9, 9), (9, 3, 5, 5), dict(padding=2))]:
        np_dtype = torch.empty(0, dtype=dtype).numpy().dtype
        g = opts.get("groups", 1)
        assert not cpu_conv2d._tiles_fill_lanes(ws[0] // g, np_dtype,
                                                cpu_conv2d.FORWARD_MIN_FILL) \
            or not cpu_conv2d._tiles_fill_lanes(ws[1], np_dtype, cpu_conv2d.INPUT_GRAD_MIN_FILL)
        x, w, b = (torch.randn(s, generator=gen, dtype=dtype).requires_grad_()
                   for s in (xs, ws, ws[:1]))
        assert_matches_torch(fastconv.conv2d, F.conv2d, [x, w, b], opts)


POINTWISE_PACKED = [  # (input, weight, options): 1x1 layers on planes small enough that the
    # CPU engine packs several images into one GEMM (see _pointwise_per)
    ((8, 16, 7, 7), (24, 16, 1, 1), {}),                   # 4 + 4 images: one block a thread
    ((7, 6, 5, 3), (9, 6, 1, 1), {}),                      # uneven blocks
    ((5, 8, 4, 4), (6, 4, 1, 1), dict(groups=2)),          # groups
    ((9, 4, 1, 1), (3, 4, 1, 1), {}),                      # 1x1 planes: many images a GEMM
    ((6, 16, 3, 3), (37, 16, 1, 1), {}),                   # grad_weight: two row blocks
]


@pytest.mark.parametrize("depth", [None, 20], ids=["one-gemm", "image-chunks"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shapes", POINTWISE_PACKED, ids=lambda s: f"{s[0]}x{s[1]}")
def test_pointwise_packed_layers(dtype, shapes, depth, monkeypatch):
    """Forward (with bias) and both gradients, with images packed side by side per GEMM, the
    GEMMs' rows shared by the threads (the whole batch in one packed matrix, or with a small
    depth, two images per chunk, and the weight gradient's chunks added in order); and the
    packing really happens for these shapes."""
    from fastconv._args import conv2d_params
    from fastconv.cpu import conv2d as cpu_conv2d
    from fastconv.cpu.conv2d import _pointwise_per

    xs, ws, opts = shapes
    monkeypatch.setattr(cpu_conv2d, "_DIRECT_GEMM_BYTES", 1)  # the forward as GEMMs too
    if depth is not None:
        monkeypatch.setattr(cpu_conv2d, "_WEIGHT_GEMM_DEPTH", depth)
        monkeypatch.setattr(cpu_conv2d, "_PACKED_COLUMNS", 2 * xs[2] * xs[3])
    params = conv2d_params(ws[2:], **opts)
    assert _pointwise_per(params, ws[2:], xs[2:], xs[2:], xs[0]) > 1
    gen = torch.Generator().manual_seed(1)
    x, w, b = (torch.randn(s, generator=gen, dtype=dtype) for s in (xs, ws, ws[:1]))
    assert_matches_torch(fastconv.conv2d, F.conv2d,
                         [t.clone().requires_grad_() for t in (x, w, b)], opts)
    # Run to run, bitwise (the weight gradient's chunks and packing depend only on shapes and
    # the thread count).
    leaves = [t.clone().requires_grad_() for t in (x, w, b)]
    grad = torch.randn(xs[0], ws[0], *xs[2:], generator=gen, dtype=dtype)
    runs = [torch.autograd.grad(fastconv.conv2d(*leaves, **opts), leaves, grad) for _ in range(2)]
    assert all(torch.equal(p, q) for p, q in zip(*runs))


PIXEL_GRAD = [  # (input, weight, options): one-group layers with few input channels, whose
    # input gradient can run as pixel tiles (_pixel_phases)
    ((2, 6, 14, 14), (16, 6, 5, 5), {}),                                # LeNet's second layer
    ((2, 3, 30, 31), (64, 3, 7, 7), dict(stride=2, padding=3)),         # an RGB stem
    ((1, 5, 11, 9), (7, 5, 3, 3), dict(stride=3, padding=1)),           # stride 3
    ((2, 4, 13, 12), (9, 4, 3, 3), dict(stride=2, padding=2, dilation=2)),  # dilated
    ((1, 2, 8, 8), (5, 2, 3, 3), dict(padding=3)),                      # padding past the reach
    ((1, 3, 5, 7), (4, 3, 1, 1), dict(stride=2)),                       # phases no tap reaches
    ((2, 7, 9, 10), (6, 7, 2, 3), dict(stride=(2, 1), padding=(1, 0))), # even kernel, one stride
]


@pytest.mark.parametrize("channels, small", [(None, False), (4, True)],
                         ids=["planned", "tile-4-row-bands"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shapes", PIXEL_GRAD, ids=lambda s: f"{s[0]}x{s[1]}")
def test_input_gradient_by_pixel_tiles(dtype, shapes, channels, small, monkeypatch):
    """Forward and both gradients, the input gradient by pixel tiles phase by phase: strides,
    dilation, padding past the kernel's reach, phases no tap reaches; up to 8 input channels
    a tile or 4 (several blocks, the last partial); bands as planned, or one row a band and
    one channel a copy (small)."""
    from fastconv.cpu import conv2d as cpu_conv2d

    ran = []
    real = cpu_conv2d._input_grad_pixels
    monkeypatch.setattr(cpu_conv2d, "_input_grad_pixels", lambda *a: ran.append(1) or real(*a))
    prefer_candidate(monkeypatch, "pixels")
    if channels is not None:
        monkeypatch.setattr(cpu_conv2d._microkernel, "pixel_channels", lambda: channels)
    if small:
        monkeypatch.setattr(cpu_conv2d, "_PIXEL_BAND_BYTES", 1)
        monkeypatch.setattr(cpu_conv2d, "_COPY_BYTES", 1)
    xs, ws, opts = shapes
    gen = torch.Generator().manual_seed(6)
    x, w, b = (torch.randn(s, generator=gen, dtype=dtype).requires_grad_()
               for s in (xs, ws, ws[:1]))
    assert_matches_torch(fastconv.conv2d, F.conv2d, [x, w, b], opts)
    assert ran


def test_pixel_tiles_are_the_rule_where_they_waste_little():
    """The input gradient's rule (autotuning off) takes pixel tiles for an RGB stem, whose
    grad_out is barely padded, and BLAS for LeNet's 5x5 layer, where pixel tiles would also
    multiply 2.5 times as many zeros of padding as the layer's own terms."""
    from fastconv._args import conv2d_params
    from fastconv.cpu import conv2d as cpu_conv2d

    stem = conv2d_params((7, 7), stride=2, padding=3)
    assert cpu_conv2d._pixel_waste(8, 64, 3, (7, 7), (224, 224), (112, 112),
                                   stem) < cpu_conv2d._PIXEL_MAX_WASTE
    lenet = conv2d_params((5, 5))
    assert cpu_conv2d._pixel_waste(64, 16, 6, (5, 5), (14, 14), (10, 10),
                                   lenet) > cpu_conv2d._PIXEL_MAX_WASTE
    from fastconv.cpu import _autotune
    calls = []
    with mock.patch.object(_autotune, "run", lambda key, c, f: calls.append(list(c)) or
                           c[next(iter(c))]()):
        for xs, ws, opts in (((2, 3, 30, 30), (8, 3, 7, 7), dict(stride=2, padding=3)),
                             ((2, 6, 14, 14), (16, 6, 5, 5), {})):
            x, w = torch.randn(xs), torch.randn(ws)
            gy = torch.randn_like(F.conv2d(x, w, **opts))
            cpu_conv2d.conv2d_backward_input(gy, w, xs, conv2d_params(ws[2:], **opts))
    assert calls[0][0] == "pixels" and calls[1][0] == "gemm" and "pixels" in calls[1]


POINTWISE_TILED = [  # (input, weight, options): 1x1 layers on small planes through the tiles,
    # the batch's pixels in bands (see _pointwise_band); forward and input gradient
    ((8, 16, 7, 7), (40, 16, 1, 1), {}),                   # a full and a partial block
    ((5, 32, 3, 5), (20, 16, 1, 1), dict(groups=2)),       # groups; tiles across images
    ((4, 20, 5, 5), (24, 20, 1, 1), {}),                   # partial blocks both ways
    ((3, 16, 2, 3), (17, 16, 1, 1), {}),                   # 18 pixels: the last tile overlaps
    ((9, 16, 1, 1), (16, 16, 1, 1), {}),                   # fewer pixels than a tile
]


@pytest.mark.parametrize("threads", [1, 3])
@pytest.mark.parametrize("copy_bytes", [None, 1])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shapes", POINTWISE_TILED, ids=lambda s: f"{s[0]}x{s[1]}")
def test_pointwise_tiles(dtype, shapes, copy_bytes, threads, monkeypatch):
    """Forward (with bias) and both gradients with the tiles chosen wherever they may run:
    1x1 layers on small planes take their tiles over the batch's pixels in bands (one band
    or three), in runs of pixels copied from several images (copy_bytes=1: a tile a run) and
    written back image by image; the input gradient's weights packed transposed."""
    from fastconv.cpu import conv2d as cpu_conv2d

    modes = []
    real = cpu_conv2d._tile_forward
    monkeypatch.setattr(cpu_conv2d, "_tile_forward",
                        lambda *a: modes.append((a[3], a[6], a[7])) or real(*a))
    monkeypatch.setattr(cpu_conv2d, "engine_threads", lambda *a: threads)
    prefer_candidate(monkeypatch, "tiles")
    if copy_bytes is not None:
        monkeypatch.setattr(cpu_conv2d, "_COPY_BYTES", copy_bytes)
    xs, ws, opts = shapes
    gen = torch.Generator().manual_seed(5)
    x, w, b = (torch.randn(s, generator=gen, dtype=dtype).requires_grad_()
               for s in (xs, ws, ws[:1]))
    assert_matches_torch(fastconv.conv2d, F.conv2d, [x, w, b], opts)
    # (transposed, bands, pointwise): the forward, and the input gradient where a group's
    # input channels fill a vector
    whole_tiles = xs[0] * xs[2] * xs[3] // cpu_conv2d._microkernel.max_tile()
    bands = max(1, min(-(-threads // opts.get("groups", 1)), whole_tiles))
    assert (False, bands, True) in modes
    if ws[1] >= cpu_conv2d.INPUT_GRAD_MIN_FILL * cpu_conv2d._microkernel.lanes(
            x.detach().numpy().dtype):
        assert (True, bands, True) in modes


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shapes", [
    ((1, 16, 7, 7), (37, 16, 1, 1), {}),             # two row blocks
    ((1, 8, 4, 3), (6, 4, 1, 1), dict(groups=2)),    # groups
    ((1, 4, 1, 1), (3, 4, 1, 1), {}),                # a 1x1 plane
], ids=lambda s: f"{s[0]}x{s[1]}")
def test_pointwise_weight_gradient_of_one_image(dtype, shapes, monkeypatch):
    """A batch of one on small 1x1 planes: the weight gradient's GEMM path is one GEMM per
    block of output channels (_pointwise_weight_rows, as for packed batches), not a sum over
    images to transpose; it matches PyTorch, forward and input gradient too."""
    from fastconv.cpu import conv2d as cpu_conv2d

    calls = []
    real = cpu_conv2d._pointwise_weight_rows
    monkeypatch.setattr(cpu_conv2d, "_pointwise_weight_rows",
                        lambda *a: calls.append(a[3:5]) or real(*a))
    prefer_candidate(monkeypatch, "gemm")  # the GEMM path wherever there is a choice
    xs, ws, opts = shapes
    gen = torch.Generator().manual_seed(2)
    x, w, b = (torch.randn(s, generator=gen, dtype=dtype).requires_grad_()
               for s in (xs, ws, ws[:1]))
    assert_matches_torch(fastconv.conv2d, F.conv2d, [x, w, b], opts)
    assert calls and all(c == (0, 1) for c in calls)  # (first image, images)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shapes", [
    ((1, 256, 3, 3), (256, 256, 1, 1), None),   # ResNet-sized weights: BLAS as the cut-off is
    ((8, 16, 7, 7), (40, 16, 1, 1), 1),          # several images a GEMM
    ((2, 32, 20, 18), (48, 16, 1, 1), 1),        # a GEMM per image and group
], ids=lambda s: f"{s[0]}x{s[1]}" if isinstance(s, tuple) else s)
def test_pointwise_large_weights_take_blas(dtype, shapes, monkeypatch):
    """1x1 layers read as they are, with weights of _DIRECT_GEMM_BYTES or more a group, run
    their forward as BLAS GEMMs although their output channels fill the tiles: forward and
    both gradients still match PyTorch, and the tiles never ran."""
    from fastconv.cpu import conv2d as cpu_conv2d

    xs, ws, cut = shapes
    if cut is not None:
        monkeypatch.setattr(cpu_conv2d, "_DIRECT_GEMM_BYTES", cut)
    groups = xs[1] // ws[1]
    assert ws[1] * ws[0] // groups * dtype.itemsize >= cpu_conv2d._DIRECT_GEMM_BYTES
    assert cpu_conv2d._tiles_fill_lanes(ws[0] // groups, torch.empty(0, dtype=dtype).numpy().dtype,
                                        cpu_conv2d.FORWARD_MIN_FILL)
    tiles = []
    real = cpu_conv2d._tile_conv
    monkeypatch.setattr(cpu_conv2d, "_tile_conv", lambda *a, **k: tiles.append(1) or real(*a, **k))
    gen = torch.Generator().manual_seed(4)
    x, w, b = (torch.randn(s, generator=gen, dtype=dtype).requires_grad_()
               for s in (xs, ws, ws[:1]))
    assert_matches_torch(fastconv.conv2d, F.conv2d, [x, w, b], dict(groups=groups))
    assert not tiles


WINOGRAD = [  # (input, weight, options): 3x3 stride-1 layers the CPU engine runs as Winograd
    ((2, 8, 9, 7), (8, 8, 3, 3), dict(padding=1)),        # odd output: partial last tiles
    ((1, 16, 6, 11), (12, 16, 3, 3), {}),                  # no padding
    ((3, 9, 5, 5), (10, 9, 3, 3), dict(padding=(2, 3))),   # padding beyond the kernel
    ((1, 8, 3, 4), (8, 8, 3, 3), dict(padding="same")),    # smaller than a tile row
    ((2, 32, 14, 14), (24, 32, 3, 3), dict(padding=1)),    # several tile rows per item
    ((1, 8, 40, 37), (8, 8, 3, 3), dict(padding=1)),       # weight gradient: a short last chunk
    ((2, 8, 13, 12), (8, 8, 3, 3), dict(padding=2, dilation=2)),   # dilation: 4 phases
    ((1, 8, 16, 11), (8, 8, 3, 3), dict(padding=(3, 1), dilation=(3, 2))),  # uneven phases
    ((2, 8, 15, 19), (8, 8, 3, 3), dict(padding=(2, 1), dilation=(2, 1))),  # row phases only
    ((1, 8, 7, 9), (8, 8, 3, 3), dict(padding=(4, 4), dilation=(5, 4))),    # phases of 1 row
    # weight gradient: whole images per GEMM chunk, groups of 2 and 3 over 4 phases each
    ((5, 8, 9, 10), (8, 8, 3, 3), dict(padding=2, dilation=2)),
]


@pytest.mark.parametrize("tile", ["winograd", "winograd4"])
@pytest.mark.parametrize("chunks", ["default", "one-tile-row"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shapes", WINOGRAD, ids=lambda s: f"{s[0]}x{s[1]}")
def test_winograd_layers(dtype, shapes, chunks, tile, monkeypatch):
    """Forward and both gradients go through Winograd on the CPU: F(2x2, 3x3) (``tile``
    "winograd") or F(4x4, 3x3) ("winograd4") forward and input gradient, and their duals
    F(3x3, 2x2) or F(3x3, 4x4) for the weight gradient, per dilation phase; on planes of any
    size
    (the engine takes Winograd from 12x12 on: the small ones are its edge cases), with the
    chunk sizes the engine uses (these small layers fit one chunk) and with one tile row per
    forward chunk and 7 tiles per weight-gradient chunk (several chunks, short last ones).
    Error bound: a few PyTorch-sized errors plus 8 ulp of the tensor's largest condition
    scale (Winograd mixes a tile's terms, see helpers); 16 for F(4x4), whose transforms'
    larger coefficients grow the roundoff (worst seen on these layers, in ulp of that scale:
    forward and input gradient 4.5-5.9, weight gradient 6.5 in float32 and 10.5 in float64,
    against F(2x2)'s 0.7-1.8; a wrong term is off by O(1/eps) of them)."""
    from fastconv._args import conv2d_params
    from fastconv.cpu import _autotune
    from fastconv.cpu import conv2d as cpu_conv2d

    ran = set()

    def run(key, candidates, flops):  # every pass with a choice runs Winograd
        name = tile if tile in candidates else "winograd"
        candidates[name]()
        ran.add((key[0], name))
        return name

    monkeypatch.setattr(_autotune, "run", run)
    monkeypatch.setattr(cpu_conv2d, "_WINOGRAD_MIN_PLANE", 1)
    if chunks == "one-tile-row":
        monkeypatch.setattr(cpu_conv2d, "_WINOGRAD_BYTES", 1)
        monkeypatch.setattr(cpu_conv2d, "_WINOGRAD_WGRAD_TILES", 7)
        monkeypatch.setattr(cpu_conv2d, "_WINOGRAD_WGRAD_IMAGE_TILES", 7)
    xs, ws, opts = shapes
    params = conv2d_params(ws[2:], **opts)
    assert cpu_conv2d._is_winograd(params, ws, params.output_hw(xs[2:], ws[2:]))
    gen = torch.Generator().manual_seed(1)
    x, w, b = (torch.randn(s, generator=gen) for s in (xs, ws, ws[:1]))
    assert_matches_torch(fastconv.conv2d, F.conv2d, _on("cpu", dtype, x, w, b), opts,
                         scale="tensor", ulps=16 if tile == "winograd4" else 8)
    assert ran == {("conv2d_forward", tile), ("conv2d_backward_input", tile),
                   ("conv2d_backward_weight", tile)}


@pytest.mark.parametrize("shapes, winograd", [
    (((2, 16, 7, 7), (16, 16, 3, 3), dict(padding=1)), False),       # ResNet's last stage
    (((2, 16, 11, 12), (16, 16, 3, 3), dict(padding=1)), False),     # one side short
    (((1, 8, 12, 12), (8, 8, 3, 3), dict(padding=1)), True),         # the smallest plane
    (((1, 8, 24, 26), (8, 8, 3, 3), dict(padding=2, dilation=2)), True),   # 12x13 phases
    (((1, 8, 24, 24), (8, 8, 3, 3), dict(padding=(1, 3), dilation=(1, 3))), False),  # 8 wide
])
def test_small_planes_leave_winograd(shapes, winograd, monkeypatch):
    """3x3 stride-1 layers take Winograd only from 12x12 output planes per dilation phase;
    smaller ones run as tiles, forward and both gradients right either way."""
    from fastconv._args import conv2d_params
    from fastconv.cpu import conv2d as cpu_conv2d

    xs, ws, opts = shapes
    params = conv2d_params(ws[2:], **opts)
    assert cpu_conv2d._is_winograd(params, ws, params.output_hw(xs[2:], ws[2:])) == winograd
    calls = []
    real = cpu_conv2d._winograd
    monkeypatch.setattr(cpu_conv2d, "_winograd", lambda *a: calls.append(1) or real(*a))
    gen = torch.Generator().manual_seed(4)
    x, w, b = (torch.randn(s, generator=gen).requires_grad_() for s in (xs, ws, ws[:1]))
    assert_matches_torch(fastconv.conv2d, F.conv2d, [x, w, b], opts, scale="tensor")
    assert bool(calls) == winograd


@st.composite
def winograd_cases(draw):
    """3x3 stride-1 layers with enough channels for the Winograd path, any size, padding and
    dilation (including outputs of one row or column, and padding beyond the kernel)."""
    cin, cout = draw(st.integers(8, 12)), draw(st.integers(8, 12))
    dilation = (draw(st.integers(1, 3)), draw(st.integers(1, 3)))
    padding = (draw(st.integers(0, 4)), draw(st.integers(0, 4)))
    h = draw(st.integers(max(1, 2 * dilation[0] + 1 - 2 * padding[0]), 14))
    w = draw(st.integers(max(1, 2 * dilation[1] + 1 - 2 * padding[1]), 14))
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    shapes = ((draw(st.integers(1, 3)), cin, h, w), (cout, cin, 3, 3), (cout,))
    return [torch.randn(s, generator=gen) for s in shapes], dict(padding=padding,
                                                                  dilation=dilation)


@given(case=winograd_cases())
def test_winograd_random_layers(case):
    """On planes of any size: Winograd taken down to one output (see test_winograd_layers)."""
    from fastconv.cpu import conv2d as cpu_conv2d

    tensors, opts = case
    with mock.patch.object(cpu_conv2d, "_WINOGRAD_MIN_PLANE", 1):
        assert_matches_torch(fastconv.conv2d, F.conv2d, _on("cpu", torch.float32, *tensors),
                             opts, scale="tensor")


@pytest.mark.parametrize("itemsize", [4, 8])
def test_winograd_plane_stride(itemsize):
    """The 16 transform planes of a Winograd chunk are an odd number of 64-byte lines apart,
    so their 16 streams fall in 16 different L1 sets (at a multiple of 4 KiB apart they all
    fell in one), and each plane still holds its n elements."""
    from fastconv.cpu.conv2d import _plane_stride

    for n in [1, 15, 16, 17, 1024, 7168, 128 * 56, 64 * 112, 3 * 4096 + 5]:
        stride = _plane_stride(n, itemsize)
        nbytes = stride * itemsize
        assert stride >= n and nbytes % 64 == 0 and (nbytes // 64) % 2 == 1, (n, stride)
        assert nbytes - n * itemsize < 128
        sets = {(k * nbytes // 64) % 64 for k in range(16)}  # 64 sets of a 32 KiB 8-way L1
        assert len(sets) == 16, (n, stride)


def test_winograd_gradgradcheck():
    from fastconv.cpu import conv2d as cpu_conv2d

    gen = torch.Generator().manual_seed(2)
    x = torch.randn(1, 8, 5, 4, generator=gen, dtype=torch.float64, requires_grad=True)
    w = torch.randn(8, 8, 3, 3, generator=gen, dtype=torch.float64, requires_grad=True)
    with mock.patch.object(cpu_conv2d, "_WINOGRAD_MIN_PLANE", 1):  # a 5x4 plane
        assert torch.autograd.gradgradcheck(lambda x, w: fastconv.conv2d(x, w, padding=1),
                                            (x, w))


# -- bad input -----------------------------------------------------------------------------

def _x(*shape, dtype=torch.float32):
    return torch.zeros(shape, dtype=dtype)


BAD_INPUTS = [
    # (input, weight, bias, options, exception, words the message must contain)
    (_x(1, 2, 3, 5, 5), _x(1, 3, 3, 3), None, {}, ValueError, ["input", "5 dims"]),
    (_x(5, 5), _x(1, 1, 3, 3), None, {}, ValueError, ["input", "2 dims"]),
    (_x(1, 3, 5, 5), _x(3, 3, 3), None, {}, ValueError, ["weight", "4 dims"]),
    (_x(1, 4, 5, 5), _x(2, 3, 3, 3), None, {}, ValueError, ["4 channels", "expects 3"]),
    (_x(1, 4, 5, 5), _x(3, 2, 3, 3), None, {"groups": 2}, ValueError, ["groups=2", "output"]),
    (_x(1, 3, 5, 5), _x(2, 1, 3, 3), None, {"groups": 2}, ValueError, ["groups=2", "input"]),
    (_x(1, 3, 5, 5), _x(2, 3, 3, 3), None, {"groups": 0}, ValueError, ["groups", "positive"]),
    (_x(1, 1, 2, 2), _x(1, 1, 3, 3), None, {}, ValueError, ["larger than the padded input"]),
    (_x(1, 1, 5, 5), _x(1, 1, 3, 3), None, {"dilation": 3}, ValueError, ["larger", "dilation"]),
    (_x(1, 1, 5, 5), _x(1, 1, 3, 3), None, {"stride": 0}, ValueError, ["stride", ">= 1"]),
    (_x(1, 1, 5, 5), _x(1, 1, 3, 3), None, {"dilation": (1, 0)}, ValueError,
     ["dilation", ">= 1"]),
    (_x(1, 1, 5, 5), _x(1, 1, 3, 3), None, {"padding": -1}, ValueError, ["padding", ">= 0"]),
    (_x(1, 1, 5, 5), _x(1, 1, 3, 3), None, {"padding": "same", "stride": 2}, ValueError,
     ["'same'", "stride=1"]),
    (_x(1, 1, 5, 5), _x(1, 1, 3, 3), None, {"padding": "full"}, ValueError,
     ["padding", "'valid', 'same'"]),
    (_x(1, 1, 5, 5), _x(1, 1, 3, 3), None, {"stride": 1.5}, ValueError, ["stride", "int"]),
    (_x(1, 1, 5, 5), _x(1, 1, 3, 3), None, {"stride": (1, 2, 3)}, ValueError, ["stride"]),
    (_x(1, 1, 5, 5, dtype=torch.int32), _x(1, 1, 3, 3, dtype=torch.int32), None, {}, TypeError,
     ["input", "floating-point", "int32"]),
    (_x(1, 1, 5, 5, dtype=torch.complex64), _x(1, 1, 3, 3, dtype=torch.complex64), None, {},
     TypeError, ["input", "complex64"]),
    (_x(1, 1, 5, 5).to_sparse(), _x(1, 1, 3, 3), None, {}, NotImplementedError,
     ["input", "layout torch.sparse_coo", "dense"]),
    (_x(1, 1, 5, 5), _x(1, 1, 3, 3).to_sparse(), None, {}, NotImplementedError,
     ["weight", "layout torch.sparse_coo"]),
    (_x(1, 1, 5, 5), _x(1, 1, 3, 3, dtype=torch.float64), None, {}, TypeError,
     ["weight", "float64", "input", "float32"]),
    (_x(1, 1, 5, 5), _x(2, 1, 3, 3), _x(3), {}, ValueError, ["bias", "(2,)", "(3,)"]),
    (_x(1, 1, 5, 5), _x(2, 1, 3, 3), _x(2, dtype=torch.float64), {}, TypeError,
     ["bias", "float64"]),
    (_x(1, 1, 5, 5), _x(2, 1, 3, 3), "bias", {}, ValueError, ["bias", "torch.Tensor"]),
    (_x(1, 1, 5, 5), _x(2, 1, 0, 3), None, {}, ValueError, ["weight", "zero-size"]),
    (_x(1, 1, 5, 5), _x(1, 1, 3, 3, dtype=torch.float32).to("meta"), None, {}, ValueError,
     ["weight", "meta", "same device"]),
]


@pytest.mark.parametrize("x, weight, bias, opts, exc, words", BAD_INPUTS)
def test_bad_input_is_refused_clearly(x, weight, bias, opts, exc, words):
    with pytest.raises(exc) as info:
        fastconv.conv2d(x, weight, bias, **opts)
    assert isinstance(info.value, RuntimeError), "errors must also be RuntimeErrors, like torch's"
    for word in words:
        assert word in str(info.value), f"{word!r} not in {info.value}"


_G, _X, _W = _x(2, 4, 5, 5), _x(2, 3, 7, 7), _x(4, 3, 3, 3)  # a conv's grad_output, input, weight
BAD_BACKWARD = [
    # (grad_output, input, weight, input_size, kernel_size, output_mask, words)
    (_G, _X, _W, [7, 7], [3, 3], [True, True], ["output_mask", "3 bools"]),
    (_G, _X, None, [7, 7], [3, 3], [True, True, False], ["grad_input", "weight", "None"]),
    (_G, None, _W, [7, 7], [3, 3], [True, True, False], ["grad_weight", "input", "None"]),
    (_G, _X, _W, [7, 7], [3, 2], [True, True, True], ["weight", "(3, 2)", "(4, 3, 3, 3)"]),
    (_G, _X, _W, [7, 6], [3, 3], [True, True, True], ["input", "input_size", "(7, 6)"]),
    (_G, _x(3, 3, 7, 7), _W, [7, 7], [3, 3], [True, True, True],
     ["grad_output", "(2, 4, 5, 5)", "(3, 4, 5, 5)"]),
    (_x(2, 5, 5, 5), None, _W, [7, 7], [3, 3], [True, False, False], ["grad_output", "fit"]),
    (_x(2, 4, 6, 5), _X, None, [7, 7], [3, 3], [False, True, False], ["grad_output", "fit"]),
    (_G, _x(2, 3, 7, 7, dtype=torch.float64), _W, [7, 7], [3, 3], [True, True, True],
     ["input", "float64", "grad_output"]),
    (_G, _X, _x(4, 2, 3, 3), [7, 7], [3, 3], [True, True, True], ["3 channels", "expects 2"]),
    (_x(2, 4, 5), None, None, [7, 7], [3, 3], [False, False, True], ["grad_output", "4-dim"]),
]


@pytest.mark.parametrize("grad, x, weight, input_size, kernel_size, mask, words", BAD_BACKWARD)
def test_bad_backward_arguments_are_refused_clearly(grad, x, weight, input_size, kernel_size,
                                                    mask, words):
    """``fastconv::conv2d_backward`` (conv2d's gradients in one call) is callable directly:
    operands that do not belong to one convolution are refused by name."""
    with pytest.raises(RuntimeError) as info:  # ValueError or TypeError, as fastconv.conv2d's
        torch.ops.fastconv.conv2d_backward(grad, x, weight, input_size, kernel_size, mask,
                                           [1, 1], [0, 0, 0, 0], [1, 1], 1)
    assert str(info.value).startswith("conv2d_backward: ")
    for word in words:
        assert word in str(info.value), f"{word!r} not in {info.value}"


@pytest.mark.parametrize("mask", [(True, False, False), (False, True, False),
                                  (False, False, True), (True, True, True)])
def test_backward_computes_what_output_mask_asks(mask):
    gen = torch.Generator().manual_seed(5)
    grad, x, weight = (torch.randn(*s, generator=gen, dtype=torch.float64)
                       for s in ((2, 4, 4, 4), (2, 6, 7, 9), (4, 3, 3, 2)))
    opts = ([2, 2], [1, 1, 0, 0], [1, 2], 2)
    got = torch.ops.fastconv.conv2d_backward(grad, x if mask[1] else None,
                                             weight if mask[0] else None, [7, 9], [3, 2],
                                             list(mask), *opts)
    want = torch.ops.aten.convolution_backward(grad, x, weight, [4], [2, 2], [1, 0], [1, 2],
                                               False, [0, 0], 2, list(mask))
    for asked, ours, theirs in zip(mask, got, want):
        assert (ours is not None) == asked
        if asked:
            torch.testing.assert_close(ours, theirs, rtol=1e-12, atol=1e-12)


def test_unbatched_input_is_accepted():
    x = torch.randn(2, 3, 5)
    weight = torch.randn(4, 2, 3, 3)
    torch.testing.assert_close(fastconv.conv2d(x, weight, padding=1),
                               F.conv2d(x, weight, padding=1), rtol=1e-5, atol=1e-5)


def test_meta_tensors_get_shapes_without_compute():
    """Meta tensors run the operators' fake implementations, as torch's own ops do."""
    y = fastconv.conv2d(_x(2, 3, 9, 7).to("meta"), _x(4, 3, 3, 3).to("meta"), stride=2)
    assert y.device.type == "meta" and y.shape == (2, 4, 4, 3)
    with pytest.raises(ValueError, match="4 channels"):
        fastconv.conv2d(_x(1, 4, 5, 5).to("meta"), _x(2, 3, 3, 3).to("meta"))


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_and_cpu_mixed_is_refused():
    with pytest.raises(ValueError, match="same device"):
        fastconv.conv2d(_x(1, 1, 5, 5).cuda(), _x(1, 1, 3, 3))


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_tile_operand_buffers_start_on_cache_lines(dtype):
    """The tiles' packed vector operands come from _aligned_empty: 64-byte aligned whatever
    the allocator returned (Numba aligns to 32 bytes, NumPy to 16; a misaligned start split
    every zmm load across two lines: 8-16% slower tiles), with exactly n elements."""
    from fastconv.cpu.conv2d import _aligned_empty

    for n in [0, 1, 5, 16, 1000, 4099, 1 << 20]:
        for _ in range(4):
            a = _aligned_empty(n, np.dtype(dtype))
            assert a.shape == (n,) and a.dtype == dtype and a.ctypes.data % 64 == 0


def test_cache_sizes_read_from_sysfs_or_assumed(monkeypatch, tmp_path):
    """The cache-blocked buffers' sizes come from the L2 the system reports (sysfs's
    "2048K"), or 1 MiB where nothing can be read; never less than the 256 KiB they were
    first tuned at. The last-level cache (the highest level listed, 0 where none can be read)
    sets where pooling gradients switch to streaming stores, never below 12 MiB."""
    import os

    from fastconv.cpu import _runtime
    from fastconv.cpu import conv2d as cpu_conv2d
    from fastconv.cpu import pool2d as cpu_pool2d

    assert cpu_conv2d._COPY_BYTES == max(256 << 10, _runtime.l2_bytes() // 4)
    assert cpu_pool2d._STREAM_BYTES == max(12 << 20, _runtime.llc_bytes() // 10)
    real_listdir, real_open = os.listdir, open
    caches = [("1", "Data", "48K"), ("1", "Instruction", "32K"), ("2", "Unified", "2048K"),
              ("3", "Unified", "32M")]
    for index, (level, kind, size) in enumerate(caches):
        d = tmp_path / f"index{index}"
        d.mkdir()
        for name, value in (("level", level), ("type", kind), ("size", size)):
            (d / name).write_text(value + "\n")
    sysfs = "/sys/devices/system/cpu/cpu0/cache"
    monkeypatch.setattr(os, "listdir", lambda p: real_listdir(tmp_path) if p == sysfs
                        else real_listdir(p))
    monkeypatch.setattr("builtins.open", lambda p, *a, **k: real_open(
        str(p).replace(sysfs, str(tmp_path)), *a, **k))
    def clear():
        _runtime.l2_bytes.cache_clear()
        _runtime.llc_bytes.cache_clear()

    clear()
    try:
        assert (_runtime.l2_bytes(), _runtime.llc_bytes()) == (2 << 20, 32 << 20)
        (tmp_path / "index2" / "size").write_text("512K\n")
        (tmp_path / "index3" / "size").write_text("491520K\n")
        clear()
        assert (_runtime.l2_bytes(), _runtime.llc_bytes()) == (512 << 10, 480 << 20)
        (tmp_path / "index3" / "level").write_text("three\n")  # unreadable: L2 is the last
        clear()
        assert (_runtime.l2_bytes(), _runtime.llc_bytes()) == (512 << 10, 512 << 10)
        monkeypatch.setattr(os, "listdir", lambda p: (_ for _ in ()).throw(OSError(p)))
        clear()
        assert (_runtime.l2_bytes(), _runtime.llc_bytes()) == (1 << 20, 0)
    finally:
        clear()
