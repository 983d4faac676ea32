"""fastconv.conv_transpose2d and ConvTranspose2D against torch.nn."""

import pytest
import torch
import torch.nn.functional as F
from conftest import DEVICES
from helpers import assert_matches_torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

import fastconv


@st.composite
def transpose_cases(draw, max_size=7):
    """Random conv_transpose2d operands and options, odd sizes included."""
    groups = draw(st.integers(1, 3))
    cin, cout = groups * draw(st.integers(1, 3)), groups * draw(st.integers(1, 3))
    kh, kw = draw(st.integers(1, 4)), draw(st.integers(1, 4))
    stride = (draw(st.integers(1, 3)), draw(st.integers(1, 3)))
    dilation = (draw(st.integers(1, 3)), draw(st.integers(1, 3)))
    out_pad = tuple(draw(st.integers(0, max(stride[a], dilation[a]) - 1)) for a in (0, 1))
    h, w = draw(st.integers(1, max_size)), draw(st.integers(1, max_size))
    # Padding may eat into the output but must leave at least one row and column.
    pad = []
    for a, (n, k) in enumerate(((h, kh), (w, kw))):
        full = (n - 1) * stride[a] + dilation[a] * (k - 1) + out_pad[a] + 1
        pad.append(draw(st.integers(0, min(3, (full - 1) // 2))))
    batch = draw(st.sampled_from([None, 1, 2]))
    shape = (cin, h, w) if batch is None else (batch, cin, h, w)
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    x = torch.randn(shape, generator=gen)
    weight = torch.randn((cin, cout // groups, kh, kw), generator=gen)
    bias = torch.randn(cout, generator=gen) if draw(st.booleans()) else None
    return x, weight, bias, dict(stride=stride, padding=tuple(pad), output_padding=out_pad,
                                 groups=groups, dilation=dilation)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@given(case=transpose_cases())
def test_matches_torch(device, dtype, case):
    x, weight, bias, opts = case
    tensors = [None if t is None else t.to(device, dtype).requires_grad_()
               for t in (x, weight, bias)]
    assert_matches_torch(fastconv.conv_transpose2d, F.conv_transpose2d, tensors, opts)


@pytest.mark.parametrize("device", DEVICES)
def test_1x1_with_output_padding(device):
    """1x1, stride 1, no padding is conv2d's plain-GEMM path, but output_padding (allowed by a
    dilation of 2) makes the output a column wider than the input: it must not take it."""
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(2, 3, 4, 5, generator=gen, dtype=torch.float64).to(device).requires_grad_()
    w = torch.randn(3, 2, 1, 1, generator=gen, dtype=torch.float64).to(device).requires_grad_()
    opts = dict(output_padding=(1, 1), dilation=2)
    assert_matches_torch(fastconv.conv_transpose2d, F.conv_transpose2d, [x, w], opts)
    assert torch.autograd.gradgradcheck(lambda x, w: fastconv.conv_transpose2d(x, w, **opts),
                                        (x, w))


@pytest.mark.parametrize("device", DEVICES)
def test_gradcheck(device):
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(2, 4, 3, 4, generator=gen, dtype=torch.float64).to(device).requires_grad_()
    w = torch.randn(4, 3, 3, 2, generator=gen, dtype=torch.float64).to(device).requires_grad_()
    b = torch.randn(6, generator=gen, dtype=torch.float64).to(device).requires_grad_()
    f = lambda x, w, b: fastconv.conv_transpose2d(x, w, b, stride=(2, 3), padding=(1, 0),
                                                   output_padding=(1, 2), groups=2,
                                                   dilation=(1, 2))
    assert torch.autograd.gradcheck(f, (x, w, b))


@pytest.mark.parametrize("device", DEVICES)
def test_module_is_a_drop_in(device):
    torch.manual_seed(0)
    ref = nn.ConvTranspose2d(4, 6, (3, 2), stride=2, padding=1, output_padding=1, groups=2,
                             dilation=(1, 2)).to(device)
    ours = fastconv.ConvTranspose2D(4, 6, (3, 2), stride=2, padding=1, output_padding=1,
                                    groups=2, dilation=(1, 2)).to(device)
    assert isinstance(ours, nn.ConvTranspose2d)
    ours.load_state_dict(ref.state_dict())
    assert ours.state_dict().keys() == ref.state_dict().keys()
    x = torch.randn(2, 4, 5, 6, device=device)
    torch.testing.assert_close(ours(x), ref(x), rtol=1e-5, atol=1e-5)
    # output_size picks output_padding, as nn.ConvTranspose2d's forward does.
    for size in ([9, 11], [10, 12]):
        torch.testing.assert_close(ours(x, output_size=size), ref(x, output_size=size),
                                   rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError):
        ours(x, output_size=[30, 30])


def test_convert_swaps_conv_transpose():
    model = nn.Sequential(nn.ConvTranspose2d(2, 3, 3), nn.ReLU())
    before = model(torch.ones(1, 2, 4, 4))
    fastconv.convert(model)
    assert type(model[0]) is fastconv.ConvTranspose2D
    torch.testing.assert_close(model(torch.ones(1, 2, 4, 4)), before, rtol=1e-5, atol=1e-5)


BAD = [
    (torch.zeros(1, 2, 4, 4), torch.zeros(2, 3, 3, 3), dict(stride=2, output_padding=2),
     ValueError, ["output_padding", "smaller than stride or dilation"]),
    (torch.zeros(1, 2, 4, 4), torch.zeros(3, 3, 3, 3), {}, ValueError,
     ["2 channels", "weight.shape[0]"]),
    (torch.zeros(1, 3, 4, 4), torch.zeros(3, 3, 3, 3), dict(groups=2), ValueError,
     ["groups=2", "input channels"]),
    (torch.zeros(1, 2, 1, 1), torch.zeros(2, 3, 1, 1), dict(padding=1), ValueError,
     ["output of size", "at least 1x1"]),
    (torch.zeros(1, 2, 4, 4), torch.zeros(2, 3, 3, 3), dict(padding="same"), ValueError,
     ["padding", "int"]),
    (torch.zeros(2, 4, 4), torch.zeros(2, 3, 3), {}, ValueError, ["weight", "4 dims"]),
    (torch.zeros(1, 2, 4, 4), torch.zeros(2, 3, 3, 3, dtype=torch.float64), {}, TypeError,
     ["weight", "float64"]),
]


@pytest.mark.parametrize("x, weight, opts, exc, words", BAD)
def test_bad_input_is_refused_clearly(x, weight, opts, exc, words):
    with pytest.raises(exc) as info:
        fastconv.conv_transpose2d(x, weight, **opts)
    assert isinstance(info.value, RuntimeError)
    for word in words:
        assert word in str(info.value), f"{word!r} not in {info.value}"


def test_padding_mode_other_than_zeros_is_refused_as_torch_does():
    with pytest.raises(ValueError, match="zeros"):
        fastconv.ConvTranspose2D(2, 2, 3, padding_mode="reflect")
