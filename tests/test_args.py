"""The shared argument module: normalisation and output sizes agree with PyTorch."""

import itertools

import pytest
import torch
import torch.nn.functional as F

from fastconv._args import ArgumentError, conv2d_op_params, conv2d_params, out_size, pair


def test_pair():
    assert pair(3, "stride", "op") == (3, 3)
    assert pair((2, 5), "stride", "op") == (2, 5)
    assert pair([4], "stride", "op") == (4, 4)
    for bad in [1.0, True, (1, 2, 3), "2", (1, None)]:
        with pytest.raises(ArgumentError, match="op: stride must be an int or a pair"):
            pair(bad, "stride", "op")


def test_op_params_remember_only_what_they_accepted():
    """conv2d_op_params keeps the options it accepted (each pass of each call normalises
    them): the same options give the same answer, and values equal to accepted ones but of
    another type (True == 1) or wrong are still refused, on every call."""
    first = conv2d_op_params([2, 1], [1, 1, 0, 0], [1, 1], 1)
    assert conv2d_op_params([2, 1], [1, 1, 0, 0], [1, 1], 1) is first
    assert (first.stride, first.padding, first.dilation, first.groups) == \
        ((2, 1), (1, 1, 0, 0), (1, 1), 1)
    for _ in range(2):
        for args, words in [(([2, True], [1, 1, 0, 0], [1, 1], 1), "stride must be an int"),
                            (([2, 1], [1, 1, 0, -1], [1, 1], 1), "padding must be 4 ints"),
                            (([2, 1], [1, 1, 0], [1, 1], 1), "padding must be 4 ints"),
                            (([2, 1], [1, 1, 0, 0], [0, 1], 1), "dilation must be >= 1"),
                            (([2, 1], [1, 1, 0, 0], [1, 1], True), "groups must be a positive"),
                            (([2, 1], [1, 1, 0, 0], [1, 1], 0), "groups must be a positive")]:
            with pytest.raises(ArgumentError, match=words):
                conv2d_op_params(*args, op="conv2d_backward_input")
    # The op's name is part of what is remembered: its errors name it.
    with pytest.raises(ArgumentError, match="^conv2d_backward_weight: stride"):
        conv2d_op_params([2, 0], [1, 1, 0, 0], [1, 1], 1, op="conv2d_backward_weight")


@pytest.mark.parametrize("size, k, s, p, d", [
    c for c in itertools.product([1, 2, 5, 8], [1, 2, 3], [1, 2, 3], [0, 1], [1, 2])
    if c[0] + 2 * c[3] >= c[4] * (c[1] - 1) + 1])
def test_out_size_matches_torch(size, k, s, p, d):
    x = torch.zeros(1, 1, size, size)
    assert F.conv2d(x, torch.zeros(1, 1, k, k), stride=s, padding=p, dilation=d).shape[-1] == \
        out_size(size, k, s, p, p, d)
    if 2 * p <= k:
        for ceil in (False, True):
            torch_out = F.max_pool2d(x, k, s, p, d, ceil_mode=ceil).shape[-1]
            assert torch_out == out_size(size, k, s, p, p, d, ceil_mode=ceil), (ceil,)


@pytest.mark.parametrize("k, d", [(1, 1), (2, 1), (3, 1), (4, 2), (2, 3), (5, 1)])
def test_same_padding_matches_torch(k, d):
    params = conv2d_params((k, 1), padding="same", dilation=(d, 1))
    top, bottom, _, _ = params.padding
    assert top + bottom == d * (k - 1) and bottom - top in (0, 1)
    x = torch.randn(1, 1, 9, 4)
    w = torch.randn(1, 1, k, 1)
    expected = F.conv2d(x, w, padding="same", dilation=(d, 1))
    padded = F.pad(x, (0, 0, top, bottom))
    torch.testing.assert_close(F.conv2d(padded, w, dilation=(d, 1)), expected)
