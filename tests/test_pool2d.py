"""fastconv.max_pool2d / avg_pool2d and their modules against torch.nn.functional."""

import inspect

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import DEVICES
from helpers import assert_matches_torch
from hypothesis import assume, given
from hypothesis import strategies as st
from torch import nn

import fastconv
from fastconv import reference
from fastconv._args import ArgumentError, out_size, pool2d_params


def _every_window_hits_input(size, k, s, p, d, ceil_mode):
    """False when some dilated window has no tap inside the input (see test below)."""
    return all(any(0 <= o * s - p + t * d < size for t in range(k))
               for o in range(out_size(size, k, s, p, p, d, ceil_mode)))


@st.composite
def pool_cases(draw, avg=False):
    """Random pooling input and options (every option, odd sizes), valid for PyTorch."""
    kernel = (draw(st.integers(1, 4)), draw(st.integers(1, 4)))
    dilation = (1, 1) if avg else (draw(st.integers(1, 3)), draw(st.integers(1, 3)))
    eff = [d * (k - 1) + 1 for k, d in zip(kernel, dilation)]
    padding = (draw(st.integers(0, kernel[0] // 2)), draw(st.integers(0, kernel[1] // 2)))
    stride = draw(st.one_of(st.none(), st.tuples(st.integers(1, 3), st.integers(1, 3))))
    ceil_mode = draw(st.booleans())
    min_hw = [max(1, e - 2 * p) for e, p in zip(eff, padding)]
    h = draw(st.integers(min_hw[0], min_hw[0] + 9))
    w = draw(st.integers(min_hw[1], min_hw[1] + 9))
    for size, a in ((h, 0), (w, 1)):
        assume(_every_window_hits_input(size, kernel[a], (stride or kernel)[a], padding[a],
                                        dilation[a], ceil_mode))
    batch = draw(st.sampled_from([None, 1, 2]))
    c = draw(st.integers(1, 3))
    shape = (c, h, w) if batch is None else (batch, c, h, w)
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    # Few distinct values: ties are common, so tie-breaking is tested too.
    x = torch.randint(-4, 5, shape, generator=gen).double() + 0.25 * torch.rand(shape, generator=gen) \
        * draw(st.sampled_from([0.0, 1.0]))
    opts = dict(kernel_size=kernel, stride=stride, padding=padding, ceil_mode=ceil_mode)
    if avg:
        opts.update(count_include_pad=draw(st.booleans()),
                    divisor_override=draw(st.sampled_from([None, 1, 3, 7])))
    else:
        opts["dilation"] = dilation
    return x, opts


def _leaf(x, device, dtype):
    return x.to(device, dtype).requires_grad_()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@given(case=pool_cases())
def test_max_pool2d_matches_torch(device, dtype, case):
    x, opts = case
    x = x.to(device, dtype)
    ours, ours_idx = fastconv.max_pool2d(x, return_indices=True, **opts)
    theirs, theirs_idx = F.max_pool2d(x, return_indices=True, **opts)
    assert torch.equal(ours, theirs)
    assert torch.equal(ours_idx, theirs_idx)
    assert_matches_torch(fastconv.max_pool2d, F.max_pool2d, [_leaf(x, device, dtype)], opts)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@given(case=pool_cases(avg=True))
def test_avg_pool2d_matches_torch(device, dtype, case):
    x, opts = case
    assert_matches_torch(fastconv.avg_pool2d, F.avg_pool2d, [_leaf(x, device, dtype)], opts)


@given(case=pool_cases(avg=True))
def test_avg_pool2d_is_bitwise_torch(case):
    """Same summation order as PyTorch's CPU kernel: identical bits, forward and backward."""
    x, opts = case
    a, b = x.float().requires_grad_(), x.float().requires_grad_()
    ya, yb = fastconv.avg_pool2d(a, **opts), F.avg_pool2d(b, **opts)
    assert torch.equal(ya, yb)
    grad = torch.randn_like(ya)
    ya.backward(grad), yb.backward(grad)
    assert torch.equal(a.grad, b.grad)


@pytest.mark.parametrize("mode", ["max", "avg"])
@given(data=st.data())
def test_matches_loop_reference(mode, data):
    k = data.draw(st.integers(1, 3))
    pad = data.draw(st.integers(0, k // 2))
    stride = data.draw(st.integers(1, 3))
    x = torch.randn(2, data.draw(st.integers(k, 8)), data.draw(st.integers(k, 8)),
                    dtype=torch.float64)
    expected = reference.pool2d(x, k, mode, padding=pad, stride=stride)
    fn = fastconv.max_pool2d if mode == "max" else fastconv.avg_pool2d
    torch.testing.assert_close(fn(x, k, stride, pad), expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("opts", [
    dict(kernel_size=3, stride=2, padding=1),
    dict(kernel_size=(2, 3), stride=(1, 2), padding=(1, 0), dilation=(2, 1), ceil_mode=True),
])
def test_max_pool2d_gradcheck(opts):
    x = torch.randn(2, 3, 7, 8, dtype=torch.float64, requires_grad=True)  # no ties: continuous
    assert torch.autograd.gradcheck(lambda t: fastconv.max_pool2d(t, **opts), (x,))


@pytest.mark.parametrize("opts", [
    dict(kernel_size=3, stride=2, padding=1),
    dict(kernel_size=(2, 3), stride=(3, 1), padding=(1, 1), ceil_mode=True,
         count_include_pad=False),
    dict(kernel_size=2, divisor_override=3),
])
def test_avg_pool2d_gradcheck(opts):
    x = torch.randn(2, 3, 7, 8, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: fastconv.avg_pool2d(t, **opts), (x,))


def test_nan_propagates_and_indices_follow_torch():
    nan, inf = float("nan"), float("inf")
    x = torch.tensor([[[[1.0, nan, 3.0, -inf],
                        [nan, 2.0, -inf, -inf],
                        [0.0, 0.0, 5.0, 5.0],
                        [0.0, 0.0, 5.0, 5.0]]]])
    for opts in [dict(kernel_size=2), dict(kernel_size=3, stride=1, padding=1),
                 dict(kernel_size=2, stride=1, dilation=2)]:
        ours, ours_idx = fastconv.max_pool2d(x, return_indices=True, **opts)
        theirs, theirs_idx = F.max_pool2d(x, return_indices=True, **opts)
        assert torch.equal(ours.isnan(), theirs.isnan())
        assert torch.equal(ours.nan_to_num(), theirs.nan_to_num())
        assert torch.equal(ours_idx, theirs_idx)


@pytest.mark.parametrize("opts", [dict(kernel_size=2), dict(kernel_size=3, stride=2, padding=1),
                                  dict(kernel_size=2, ceil_mode=True),
                                  dict(kernel_size=3, stride=2, padding=1, ceil_mode=True),
                                  dict(kernel_size=(3, 2), stride=2),
                                  dict(kernel_size=3, stride=2)])
@pytest.mark.parametrize("width", [1, 2, 7, 8, 33])
def test_stride_2_fast_path_with_nans_infs_and_ties(opts, width):
    """2- and 3-wide windows at stride 2 take the pair loops (max pooling's values without
    return_indices and the window indices the gradient keeps; average pooling); their edge
    columns go tap by tap. Ties, NaN and -inf everywhere: values, NaN positions and where each
    gradient lands match torch."""
    gen = torch.Generator().manual_seed(width)
    x = torch.randint(-2, 3, (2, 3, 6, width), generator=gen).float()
    x[torch.rand(x.shape, generator=gen) < 0.1] = float("nan")
    x[torch.rand(x.shape, generator=gen) < 0.1] = float("-inf")
    h = x.shape[-1] + 2 * opts.get("padding", 0)
    k = opts["kernel_size"] if isinstance(opts["kernel_size"], int) else opts["kernel_size"][1]
    if h < k:
        pytest.skip("input narrower than the window")
    a, b = x.clone().requires_grad_(), x.clone().requires_grad_()
    ours, theirs = fastconv.max_pool2d(a, **opts), F.max_pool2d(b, **opts)
    assert torch.equal(ours.isnan(), theirs.isnan())
    assert torch.equal(ours.nan_to_num(), theirs.nan_to_num())
    grad = torch.randn(ours.shape, generator=gen)
    ours.backward(grad), theirs.backward(grad)
    assert torch.equal(a.grad, b.grad)
    with torch.no_grad():
        y = fastconv.max_pool2d(x, **opts)  # no indices at all
    assert torch.equal(y.nan_to_num(), theirs.detach().nan_to_num())
    # Average pooling's pair loops: the same bits as PyTorch's, forward and backward.
    xf = x.nan_to_num(nan=0.5, neginf=-3.0)
    a, b = xf.clone().requires_grad_(), xf.clone().requires_grad_()
    ours, theirs = fastconv.avg_pool2d(a, **opts), F.avg_pool2d(b, **opts)
    assert torch.equal(ours, theirs)
    ours.backward(grad), theirs.backward(grad)
    assert torch.equal(a.grad, b.grad)


@pytest.mark.parametrize("kw, pw", [(2, 0), (2, 1), (3, 0), (3, 1)])
@pytest.mark.parametrize("sw", [1, 2])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_separable_max_pooling_is_the_tap_by_tap_kernel_bitwise(kw, pw, sw, dtype):
    """_max_forward_pairs (2- or 3-wide windows at column stride 1 or 2) against the tap-by-tap
    kernel, which the tests above hold to PyTorch: the same bits (NaN payloads, -0.0) and the
    same window codes, for kernel heights 1-4, row strides 1-3, row padding and dilation,
    ceil_mode, rows of 1 to 75 windows (the loops' padding to 8 and to 64), and work split
    into 1 to 40 blocks (the padded output loops write junk ahead only into their own block)."""
    from fastconv.cpu import pool2d as P

    rng = np.random.default_rng(kw * 10 + pw)
    bits = np.uint32 if dtype == np.float32 else np.uint64
    for kh, sh, dh in [(1, 1, 1), (2, 2, 1), (3, 2, 1), (3, 1, 1), (2, 3, 1), (4, 2, 1),
                       (3, 2, 2), (2, 1, 3)]:
        for ph in range(kh // 2 + 1):
            for h, w, ceil in [(1, 2, True), (5, 3, False), (7, 9, True), (4, 57, False),
                               (9, 130, False), (6, 151, True)]:
                try:
                    params = pool2d_params((kh, kw), (sh, sw), (ph, pw), (dh, 1), ceil,
                                           op="max_pool2d")
                    ho, wo = params.output_hw((h, w))
                except ArgumentError:
                    continue
                x = rng.integers(-2, 3, (3, h, w)).astype(dtype)
                x[rng.random(x.shape) < 0.05] = np.nan
                x.view(bits)[rng.random(x.shape) < 0.03] |= 0x123  # other NaN payloads
                x[rng.random(x.shape) < 0.05] = -np.inf
                x[rng.random(x.shape) < 0.1] = -0.0
                for mode in (P.NO_INDICES, P.WINDOW_INDICES):
                    ref_y, ref_c = np.empty((3, ho, wo), dtype), np.empty((3, ho, wo), np.uint8)
                    P._max_forward(x, ref_y, ref_c, mode, dtype(-np.inf), 1, kh, kw, sh, sw, ph,
                                   pw, dh, 1)
                    for blocks in (1, 7, 40):
                        y = np.full((3, ho, wo), 9, dtype)
                        c = np.full((3, ho, wo), 99, np.uint8)
                        P._max_forward_pairs(x, y, c, mode, blocks, kh, kw, sh, sw, ph, pw,
                                             dh, P._edge_windows(kw, sw, pw, w, wo))
                        case = (kh, sh, dh, ph, h, w, ceil, mode, blocks)
                        assert np.array_equal(y.view(bits), ref_y.view(bits)), case
                        if mode == P.WINDOW_INDICES:
                            assert np.array_equal(c, ref_c), case


@pytest.mark.parametrize("kw, pw", [(2, 0), (2, 1), (3, 0), (3, 1)])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_gathered_max_pool_gradient_is_the_scatter_bitwise(kw, pw, dtype):
    """_max_backward_pairs (window codes of 2- or 3-wide windows at column stride 2, input
    rows in at most two windows' rows) against the scatter kernel, which the tests above hold
    to PyTorch: the same bits (-0.0 gradients included) for kernel heights 1-4, row strides
    1-3, row padding, ceil_mode, rows of 1 to 130 columns (the pair loop's padding to 8 and
    64; stages of one to 512 rows) and work split into 1 to 40 blocks, the rows leaving the
    stage by plain or by streaming stores."""
    from fastconv.cpu import pool2d as P

    rng = np.random.default_rng(kw * 10 + pw)
    bits = np.uint32 if dtype == np.float32 else np.uint64
    for kh, sh in [(1, 1), (2, 1), (2, 2), (3, 2), (4, 2), (2, 3), (3, 3)]:
        for ph in range(kh // 2 + 1):
            for h, w, ceil in [(1, 2, True), (5, 3, False), (7, 9, True), (4, 57, False),
                               (6, 130, True)]:
                try:
                    params = pool2d_params((kh, kw), (sh, 2), (ph, pw), 1, ceil,
                                           op="max_pool2d")
                    ho, wo = params.output_hw((h, w))
                except ArgumentError:
                    continue
                x = rng.integers(-2, 3, (3, h, w)).astype(dtype)
                y, code = np.empty((3, ho, wo), dtype), np.empty((3, ho, wo), np.uint8)
                P._max_forward_pairs(x, y, code, P.WINDOW_INDICES, 1, kh, kw, sh, 2, ph, pw, 1,
                                     P._edge_windows(kw, 2, pw, w, wo))
                gy = rng.standard_normal((3, ho, wo)).astype(dtype)
                gy[rng.random(gy.shape) < 0.2] = -0.0
                ref, bad = np.empty((3, h, w), dtype), np.zeros(3, np.uint8)
                P._max_backward(gy, code, ref, True, *P._window_taps(params), sh, 2, ph, pw,
                                *P._windows_ok((h, w), (ho, wo), params), bad)
                assert not bad.any()
                for blocks, stream in [(1, False), (7, True), (40, False), (1, True)]:
                    gx = np.full((3, h, w), 9, dtype)
                    P._max_backward_pairs(gy, code, gx, blocks, kh, kw, sh, ph, pw, 1, stream)
                    assert np.array_equal(gx.view(bits), ref.view(bits)), (kh, sh, ph, h, w,
                                                                          ceil, blocks, stream)


@pytest.mark.parametrize("kernel", [(3, 3), (1, 1), (2, 3), (3, 2), (1, 5), (4, 4), (5, 7)])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_stride_1_max_pool_gradient_is_the_scatter_bitwise(kernel, dtype):
    """_max_backward_s1 (window codes at stride 1) against the scatter kernel, which the tests
    above hold to PyTorch: the same bits (-0.0 gradients included) for every padding up to
    half the kernel, dilations 1-3, planes of 1 to 67 columns and 1 to 9 rows (3x3/p1's
    whole-plane loop and the elements it leaves to others among them), work split into 1 to
    40 blocks (row runs cut anywhere)."""
    from fastconv.cpu import pool2d as P

    kh, kw = kernel
    rng = np.random.default_rng(kh * 10 + kw)
    bits = np.uint32 if dtype == np.float32 else np.uint64
    for ph in range(kh // 2 + 1):
        for pw in range(kw // 2 + 1):
            for dh, dw in [(1, 1), (2, 1), (1, 3)]:
                for h, w in [(1, 1), (2, 2), (3, 2), (3, 1), (9, 5), (4, 67), (7, 33)]:
                    try:
                        params = pool2d_params((kh, kw), 1, (ph, pw), (dh, dw), False,
                                               op="max_pool2d")
                        ho, wo = params.output_hw((h, w))
                    except ArgumentError:
                        continue
                    if ho < 1 or wo < 1:
                        continue
                    x = rng.integers(-2, 3, (3, h, w)).astype(dtype)
                    y, code = np.empty((3, ho, wo), dtype), np.empty((3, ho, wo), np.uint8)
                    P._max_forward(x, y, code, P.WINDOW_INDICES, dtype(-np.inf), 1, kh, kw,
                                   1, 1, ph, pw, dh, dw)
                    gy = rng.standard_normal((3, ho, wo)).astype(dtype)
                    gy[rng.random(gy.shape) < 0.2] = -0.0
                    ref, bad = np.empty((3, h, w), dtype), np.zeros(3, np.uint8)
                    P._max_backward(gy, code, ref, True, *P._window_taps(params), 1, 1, ph, pw,
                                    *P._windows_ok((h, w), (ho, wo), params), bad)
                    assert not bad.any()
                    for blocks in (1, 2, 7, 40):
                        gx = np.full((3, h, w), 9, dtype)
                        P._max_backward_s1(gy, code, gx, blocks, kh, kw, ph, pw, dh, dw)
                        assert np.array_equal(gx.view(bits), ref.view(bits)), (
                            ph, pw, dh, dw, h, w, blocks)


@pytest.mark.parametrize("opts", [dict(kernel_size=3, stride=2, padding=1),
                                  dict(kernel_size=(2, 3), stride=2, padding=(1, 0),
                                       ceil_mode=True),
                                  dict(kernel_size=2, stride=(3, 2), padding=1, dilation=(2, 1))])
def test_window_code_check_finds_every_bad_code(opts):
    """_bad_window_codes against a window-by-window check: random codes, some beyond the
    window, some naming taps in the padding, a plane at a time."""
    from fastconv.cpu import pool2d as P

    params = pool2d_params(**opts, op="max_pool2d")
    (kh, kw), (sh, sw), (ph, pw), (dh, dw) = (params.kernel, params.stride, params.padding,
                                              params.dilation)
    h, w = 11, 13
    ho, wo = params.output_hw((h, w))
    row_ok, col_ok = P._windows_ok((h, w), (ho, wo), params)
    rng = np.random.default_rng(1)
    good = np.empty((ho, wo), np.uint8)  # every window's first tap inside the input
    for oh in range(ho):
        for ow in range(wo):
            good[oh, ow] = next(i * kw + j for i in range(kh) for j in range(kw)
                                if 0 <= oh * sh - ph + i * dh < h and 0 <= ow * sw - pw + j * dw < w)
    for trial in range(200):
        codes = np.repeat(good[None], 4, axis=0)
        for _ in range(trial % 3):  # 0 to 2 random codes, anywhere, mostly taps of the window
            codes[rng.integers(4), rng.integers(ho), rng.integers(wo)] = \
                rng.integers(kh * kw) if rng.random() < 0.7 else rng.integers(256)
        expected = np.zeros(4, bool)
        for p, oh, ow in np.ndindex(codes.shape):
            t = int(codes[p, oh, ow])
            ih, iw = oh * sh - ph + (t // kw) * dh, ow * sw - pw + (t % kw) * dw
            expected[p] |= bool(t >= kh * kw or not (0 <= ih < h and 0 <= iw < w))
        bad = np.zeros(4, np.uint8)
        P._bad_window_codes(codes, h, w, kh, kw, sh, sw, ph, pw, dh, dw, *P._window_taps(params),
                            row_ok, col_ok, bad)
        assert np.array_equal(bad.astype(bool), expected), (trial, codes)


@pytest.mark.parametrize("return_indices", [True, False])
def test_window_missing_the_input(return_indices):
    """A dilated window can lie wholly in the padding: (1, 2) taps at columns -1 and 2 of a
    2-wide input. Forward matches PyTorch (the dtype's lowest value, PyTorch's index). PyTorch's
    backward then writes that window's gradient outside its plane (into the next plane, or past
    the tensor); fastconv writes nothing for it, from flat or window indices."""
    x = torch.tensor([[[[4.0, -4.0]]], [[[-2.0, 2.0]]]], requires_grad=True)
    opts = dict(kernel_size=(1, 2), padding=(0, 1), dilation=(1, 3))
    y = fastconv.max_pool2d(x, return_indices=return_indices, **opts)
    if return_indices:
        y, idx = y
        assert torch.equal(idx, F.max_pool2d(x.detach(), return_indices=True, **opts)[1])
    assert torch.equal(y, F.max_pool2d(x.detach(), **opts))
    assert y.isneginf().all()
    y.backward(torch.ones_like(y))
    assert torch.equal(x.grad, torch.zeros_like(x))


def bad_indices():
    """(indices, error words) for 3x3/s2/p1 max pooling of (1, 2, 9, 9): flat indices outside
    the plane, window indices beyond the window or naming a tap in the padding."""
    return [(torch.full((1, 2, 5, 5), 81), "outside \\[0, H\\*W\\)"),
            (torch.full((1, 2, 5, 5), 9, dtype=torch.uint8), "taps outside the input"),
            (torch.zeros(1, 2, 5, 5, dtype=torch.uint8), "taps outside the input")]  # padding


def test_pooling_operators_refuse_indices_not_made_by_max_pool2d():
    """Indices naming no input element (bad_indices): a clear error from backward and double
    backward, never a stray write."""
    ops = torch.ops.fastconv
    pool = [[3, 3], [2, 2], [1, 1], [1, 1], False]
    ggx, grad = torch.randn(1, 2, 9, 9), torch.randn(1, 2, 5, 5)
    for idx, words in bad_indices():
        with pytest.raises(ValueError, match=words):
            ops.max_pool2d_backward(grad, idx, [9, 9], *pool)
        with pytest.raises(ValueError, match=words):
            ops.max_pool2d_double_backward(ggx, idx, *pool)
    # Stride 1 (its own gradient kernel): one code naming a tap in the padding, where the
    # 3x3/p1 kernel's whole-plane loop would reach the row above's last element.
    pool1 = [[3, 3], [1, 1], [1, 1], [1, 1], False]
    code = ops.max_pool2d(ggx, *pool1, "window")[1].clone()
    ones = torch.ones(1, 2, 9, 9)
    ops.max_pool2d_backward(ones, code, [9, 9], *pool1)  # the forward's codes: accepted
    code[0, 1, 4, 0] = 3  # tap (1, 0) of window (4, 0): column -1, in the padding
    with pytest.raises(ValueError, match="taps outside the input"):
        ops.max_pool2d_backward(ones, code, [9, 9], *pool1)
    with pytest.raises(TypeError,
                       match="indices must be int64 .* or torch.uint8 .* got torch.int32"):
        ops.max_pool2d_backward(grad, torch.zeros(1, 2, 5, 5, dtype=torch.int32), [9, 9], *pool)
    with pytest.raises(ValueError, match="indices must be one of none, flat, window, got 'all'"):
        ops.max_pool2d(ggx, *pool, "all")


@pytest.mark.parametrize("pool, gather", [([[3, 3], [2, 2], [1, 1], [1, 1], False], True),
                                          ([[3, 3], [1, 1], [1, 1], [1, 1], False], True),
                                          ([[2, 3], [1, 2], [0, 1], [2, 1], True], False)])
def test_max_pool2d_gradient_checks_only_indices_it_did_not_make(pool, gather, monkeypatch):
    """The operator checks window indices it is given, in a pass of its own before its gather
    kernels; max pooling's autograd formula, whose indices the forward made (autograd refuses
    them once changed), skips that pass. Unchecked indices naming no tap give no gradient and
    touch nothing outside the operands. The scatter checks as it writes, always."""
    from fastconv.cpu import pool2d as engine

    ops = torch.ops.fastconv
    calls = []
    check = engine._bad_window_codes
    monkeypatch.setattr(engine, "_bad_window_codes", lambda *a: calls.append(1) or check(*a))
    x = torch.randn(2, 3, 11, 10, requires_grad=True)
    y, code = ops.max_pool2d(x, *pool, "window")
    grad = torch.randn_like(y)
    checked = ops.max_pool2d_backward(grad, code, [11, 10], *pool)
    assert len(calls) == gather
    (ours,) = torch.autograd.grad(y, x, grad)
    assert torch.equal(ours, checked) and len(calls) == gather
    nowhere = torch.full_like(code, 255)
    for check_indices in (True, False):
        if check_indices or not gather:
            with pytest.raises(ValueError, match="taps outside the input"):
                ops.max_pool2d_backward(grad, nowhere, [11, 10], *pool, check_indices)
        else:
            assert torch.equal(ops.max_pool2d_backward(grad, nowhere, [11, 10], *pool, False),
                               torch.zeros(2, 3, 11, 10))
    y, code = ops.max_pool2d(x, *pool, "window")
    code[0, 0, 0, 0] = 1
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        y.backward(grad)


@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.uint8, torch.int8])
def test_max_pool2d_integer_dtypes(dtype):
    x = torch.randint(0, 100, (2, 3, 7, 9)).to(dtype)
    for opts in [dict(kernel_size=3, stride=2, padding=1), dict(kernel_size=2, ceil_mode=True)]:
        ours, ours_idx = fastconv.max_pool2d(x, return_indices=True, **opts)
        theirs, theirs_idx = F.max_pool2d(x, return_indices=True, **opts)
        assert ours.dtype == dtype and torch.equal(ours, theirs)
        assert torch.equal(ours_idx, theirs_idx)


def test_indices_work_with_max_unpool2d():
    x = torch.randn(2, 3, 8, 10)
    y, idx = fastconv.max_pool2d(x, 2, return_indices=True)
    unpooled = F.max_unpool2d(y, idx, 2, output_size=x.shape[-2:])
    assert torch.equal(unpooled, F.max_unpool2d(*F.max_pool2d(x, 2, return_indices=True), 2,
                                                output_size=x.shape[-2:]))
    assert torch.equal(unpooled.amax((2, 3)), x.amax((2, 3)))


def test_unbatched_input():
    x = torch.randn(3, 9, 7)
    y, idx = fastconv.max_pool2d(x, 3, 2, 1, return_indices=True)
    ty, tidx = F.max_pool2d(x, 3, 2, 1, return_indices=True)
    assert torch.equal(y, ty) and torch.equal(idx, tidx)
    assert torch.equal(fastconv.avg_pool2d(x, 2), F.avg_pool2d(x, 2))


@pytest.mark.parametrize("kernel, dtype", [(2, torch.uint8), (16, torch.uint8),
                                           ((16, 17), torch.int32)])
def test_max_pool2d_saves_only_window_indices(kernel, dtype):
    """The gradient keeps the argmax, not the input, and as the tap's number in its window:
    one byte per output up to 256 taps."""
    x = torch.randn(2, 3, 20, 20, requires_grad=True)
    y = fastconv.max_pool2d(x, kernel, 1)
    (saved,) = y.grad_fn.saved_tensors
    assert saved.dtype == dtype and saved.shape == y.shape
    kh, kw = (kernel, kernel) if isinstance(kernel, int) else kernel
    assert 0 <= saved.min().item() and saved.max().item() < kh * kw
    xt = x.detach().clone().requires_grad_()
    grad = torch.randn(y.shape)
    y.backward(grad), F.max_pool2d(xt, kernel, 1).backward(grad)
    assert torch.equal(x.grad, xt.grad)
    # return_indices keeps PyTorch's flat int64 indices, for max_unpool2d.
    y, idx = fastconv.max_pool2d(x, kernel, 1, return_indices=True)
    assert y.grad_fn.saved_tensors[0].dtype == torch.int64


def test_max_pool2d_backward_makes_no_gradient_for_the_indices():
    """The indices are not differentiable: autograd neither offers them a gradient nor fills
    a zero one as large as them before each backward (it did, 0.5 ms on 32x64x56x56)."""
    from torch.profiler import profile

    x = torch.randn(2, 3, 20, 20, requires_grad=True)
    for return_indices in (False, True):
        out = fastconv.max_pool2d(x, 3, 2, 1, return_indices=return_indices)
        y, idx = out if return_indices else (out, None)
        assert idx is None or not idx.requires_grad
        grad = torch.ones_like(y)
        with profile() as prof:
            y.backward(grad)
        names = {e.name for e in prof.events()}
        assert "fastconv::max_pool2d_backward" in names
        assert not names & {"aten::zeros", "aten::zeros_like", "aten::zero_", "aten::fill_"}


@pytest.mark.parametrize("padding", [(0, 0), (1, 0), (0, 1), (1, 1)])
@pytest.mark.parametrize("ceil_mode", [False, True])
@pytest.mark.parametrize("count_include_pad, divisor_override",
                         [(True, None), (False, None), (True, 3)])
@pytest.mark.parametrize("stream", [False, True])
def test_avg_pool2d_2x2_kernels_are_bitwise_torch(padding, ceil_mode, count_include_pad,
                                                  divisor_override, stream, monkeypatch):
    """2x2/stride-2 average pooling has kernels of its own (cpu/pool2d.py): every option, odd
    and even sizes (rows and columns in no window, windows reaching into the padding or past
    the input), -0.0 and ties: the same bits as PyTorch, forward and backward, the gradient
    written straight or through the streamed stage (which large gradients take)."""
    from fastconv.cpu import pool2d as P

    monkeypatch.setattr(P, "_STREAM_BYTES", 0 if stream else 1 << 62)
    opts = dict(kernel_size=2, stride=2, padding=padding, ceil_mode=ceil_mode,
                count_include_pad=count_include_pad, divisor_override=divisor_override)
    gen = torch.Generator().manual_seed(sum(padding) + 7 * ceil_mode)
    for h, w in [(1, 1), (2, 3), (5, 4), (7, 9), (6, 33), (9, 40)]:
        if min(h + 2 * padding[0], w + 2 * padding[1]) < 2:
            continue
        x = torch.randint(-2, 3, (2, 3, h, w), generator=gen).float() * 0.7
        x[torch.rand(x.shape, generator=gen) < 0.2] = -0.0
        a, b = x.clone().requires_grad_(), x.clone().requires_grad_()
        ours, theirs = fastconv.avg_pool2d(a, **opts), F.avg_pool2d(b, **opts)
        assert torch.equal(ours, theirs) and torch.equal(ours.signbit(), theirs.signbit())
        grad = torch.randn(ours.shape, generator=gen)
        grad[torch.rand(grad.shape, generator=gen) < 0.2] = -0.0
        ours.backward(grad), theirs.backward(grad)
        assert torch.equal(a.grad, b.grad) and torch.equal(a.grad.signbit(), b.grad.signbit())


@pytest.mark.parametrize("opts", [dict(kernel_size=3, stride=2, padding=1),
                                  dict(kernel_size=3, stride=1, padding=1, dilation=2),
                                  dict(kernel_size=(2, 3), stride=(1, 2), ceil_mode=True)])
@pytest.mark.parametrize("stream", [False, True])
def test_large_max_pool2d_is_bitwise_torch(opts, stream, monkeypatch):
    """Many planes, overlapping windows, ties everywhere (so one input element collects several
    gradients and their order matters), outputs on the huge-page allocation path (lowered
    from 32 MiB to 4 MiB here, to keep the test small), gradients written straight or by
    streaming stores (the size that switches to them lowered or raised past this one)."""
    from fastconv.cpu import _runtime
    from fastconv.cpu import pool2d as P

    monkeypatch.setattr(_runtime, "_CACHE_FROM", 4 << 20)
    monkeypatch.setattr(P, "_STREAM_BYTES", 0 if stream else 1 << 62)
    gen = torch.Generator().manual_seed(3)
    x = torch.randint(-3, 4, (8, 20, 96, 97), generator=gen).float()
    a, b = x.clone().requires_grad_(), x.clone().requires_grad_()
    (ya, ia), (yb, ib) = (fastconv.max_pool2d(a, return_indices=True, **opts),
                          F.max_pool2d(b, return_indices=True, **opts))
    assert torch.equal(ya, yb) and torch.equal(ia, ib)
    grad = torch.randn(ya.shape, generator=gen)
    ya.backward(grad), yb.backward(grad)
    assert torch.equal(a.grad, b.grad)
    assert torch.equal(fastconv.max_pool2d(x, **opts), yb)  # the inference path
    assert torch.equal(fastconv.avg_pool2d(x, 3, 2, 1), F.avg_pool2d(x, 3, 2, 1))


@pytest.mark.parametrize("threads", [1, 2])
def test_bitwise_deterministic_across_runs_and_threads(threads):
    torch.set_num_threads(threads)
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(3, 4, 17, 19, generator=gen, requires_grad=True)
    grad = torch.randn(3, 4, 9, 10, generator=gen)
    results = []
    for _ in range(2):
        outs = []
        for fn in (lambda t: fastconv.max_pool2d(t, 3, 2, 1),
                   lambda t: fastconv.avg_pool2d(t, 3, 2, 1)):
            y = fn(x)
            outs += [y, torch.autograd.grad(y, x, grad)[0]]
        results.append(outs)
    torch.set_num_threads(1)
    y1 = fastconv.max_pool2d(x, 3, 2, 1)
    assert all(torch.equal(a, b) for a, b in zip(*results))
    assert torch.equal(y1, results[0][0])
    assert torch.get_num_threads() == 1


# -- modules ---------------------------------------------------------------------------------

def test_module_signatures_match_torch():
    assert inspect.signature(fastconv.MaxPool2D) == inspect.signature(nn.MaxPool2d)
    assert inspect.signature(fastconv.AvgPool2D) == inspect.signature(nn.AvgPool2d)
    assert issubclass(fastconv.MaxPool2D, nn.MaxPool2d)
    assert issubclass(fastconv.AvgPool2D, nn.AvgPool2d)


@pytest.mark.parametrize("ours, theirs, kwargs", [
    (fastconv.MaxPool2D, nn.MaxPool2d, dict(kernel_size=3, stride=2, padding=1, dilation=1,
                                            ceil_mode=True)),
    (fastconv.MaxPool2D, nn.MaxPool2d, dict(kernel_size=2, return_indices=True)),
    (fastconv.AvgPool2D, nn.AvgPool2d, dict(kernel_size=(3, 2), stride=(2, 1), padding=(1, 1),
                                            count_include_pad=False)),
    (fastconv.AvgPool2D, nn.AvgPool2d, dict(kernel_size=2, divisor_override=2)),
])
def test_modules_match_torch(ours, theirs, kwargs):
    a, b = ours(**kwargs), theirs(**kwargs)
    assert repr(a).split("(", 1)[1] == repr(b).split("(", 1)[1]
    x = torch.randn(2, 3, 9, 8)
    ya, yb = a(x), b(x)
    if kwargs.get("return_indices"):
        assert torch.equal(ya[1], yb[1])
        ya, yb = ya[0], yb[0]
    assert torch.equal(ya, yb)


def test_convert_swaps_pooling():
    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.MaxPool2d(2), nn.AvgPool2d(2), nn.ReLU())
    x = torch.randn(2, 1, 10, 10)
    expected = model(x)
    fastconv.convert(model)
    assert [type(m) for m in model] == [fastconv.Conv2D, fastconv.MaxPool2D, fastconv.AvgPool2D,
                                        nn.ReLU]
    torch.testing.assert_close(model(x), expected)


def test_seed_pooling_examples():
    X = torch.arange(16, dtype=torch.float32).reshape((1, 1, 4, 4))
    assert torch.equal(fastconv.MaxPool2D(3)(X), torch.tensor([[[[10.0]]]]))
    assert torch.equal(fastconv.MaxPool2D(3, padding=1, stride=2)(X),
                       torch.tensor([[[[5.0, 7.0], [13.0, 15.0]]]]))
    assert torch.equal(fastconv.MaxPool2D((2, 3), padding=(1, 1), stride=(2, 3))(X),
                       torch.tensor([[[[1.0, 3.0], [9.0, 11.0], [13.0, 15.0]]]]))
    X2 = torch.cat((X, X + 1), 1)
    expected = torch.tensor([[[[5.0, 7.0], [13.0, 15.0]], [[6.0, 8.0], [14.0, 16.0]]]])
    assert torch.equal(fastconv.MaxPool2D(3, padding=1, stride=2)(X2), expected)
    assert torch.equal(reference.pool2d(X2[0], 3, padding=1, stride=2), expected[0])
    assert torch.equal(reference.pool2d(X[0, 0], 3, stride=3), torch.tensor([[10.0]]))
    assert torch.equal(reference.pool2d(X[0, 0], (2, 3), padding=(1, 1), stride=(2, 3)),
                       torch.tensor([[1.0, 3.0], [9.0, 11.0], [13.0, 15.0]]))


# -- bad input --------------------------------------------------------------------------------

BAD = [
    (fastconv.max_pool2d, torch.zeros(1, 1, 4, 4), dict(kernel_size=0), ValueError,
     ["kernel_size", ">= 1"]),
    (fastconv.avg_pool2d, torch.zeros(1, 1, 4, 4), dict(kernel_size=(2, 0)), ValueError,
     ["kernel_size", ">= 1"]),
    (fastconv.max_pool2d, torch.zeros(1, 1, 4, 4), dict(kernel_size=2, stride=0), ValueError,
     ["stride", ">= 1"]),
    (fastconv.max_pool2d, torch.zeros(1, 1, 4, 4), dict(kernel_size=3, padding=2), ValueError,
     ["padding", "at most half of kernel_size"]),
    (fastconv.max_pool2d, torch.zeros(1, 1, 9, 9), dict(kernel_size=3, padding=2, dilation=2),
     ValueError, ["padding=(2, 2)", "at most half of kernel_size=(3, 3)"]),
    (fastconv.avg_pool2d, torch.zeros(1, 1, 4, 4), dict(kernel_size=2, padding=-1), ValueError,
     ["padding", ">= 0"]),
    (fastconv.max_pool2d, torch.zeros(1, 1, 4, 4), dict(kernel_size=2, dilation=0), ValueError,
     ["dilation", ">= 1"]),
    (fastconv.max_pool2d, torch.zeros(1, 1, 4, 4), dict(kernel_size=5), ValueError,
     ["output", "at least 1x1", "(4, 4)"]),
    (fastconv.avg_pool2d, torch.zeros(4, 4), dict(kernel_size=2), ValueError,
     ["input", "2 dims"]),
    (fastconv.max_pool2d, torch.zeros(1, 1, 1, 4, 4), dict(kernel_size=2), ValueError,
     ["input", "5 dims"]),
    (fastconv.avg_pool2d, torch.zeros(1, 1, 4, 4, dtype=torch.int64), dict(kernel_size=2),
     TypeError, ["input", "floating-point", "int64"]),
    (fastconv.max_pool2d, torch.zeros(1, 1, 4, 4, dtype=torch.bool), dict(kernel_size=2),
     TypeError, ["input", "bool"]),
    (fastconv.max_pool2d, torch.zeros(1, 1, 4, 4).to_sparse(), dict(kernel_size=2),
     NotImplementedError, ["input", "layout torch.sparse_coo"]),
    (fastconv.avg_pool2d, torch.zeros(1, 1, 4, 4).to_sparse(), dict(kernel_size=2),
     NotImplementedError, ["input", "layout torch.sparse_coo"]),
    (fastconv.avg_pool2d, torch.zeros(1, 1, 4, 4), dict(kernel_size=2, divisor_override=0),
     ValueError, ["divisor_override", "non-zero"]),
    (fastconv.max_pool2d, [[1.0]], dict(kernel_size=1), ValueError, ["input", "torch.Tensor"]),
]


@pytest.mark.parametrize("fn, x, opts, exc, words", BAD)
def test_bad_input_is_refused_clearly(fn, x, opts, exc, words):
    with pytest.raises(exc) as info:
        fn(x, **opts)
    assert isinstance(info.value, RuntimeError)
    for word in words:
        assert word in str(info.value), f"{word!r} not in {info.value}"
