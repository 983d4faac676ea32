"""The seed notebooks' outputs, reproduced exactly by fastconv.reference and by fastconv."""

import torch
import torch.nn.functional as F

import fastconv
from fastconv import reference


def band():
    X = torch.ones((6, 8))
    X[:, 2:6] = 0
    return X


def test_corr2d_seed():
    X = torch.tensor([[0, 1, 2], [3, 4, 5], [6, 7, 8]], dtype=torch.float32)
    K = torch.tensor([[0, 1], [2, 3]], dtype=torch.float32)
    expected = torch.tensor([[19.0, 25.0], [37.0, 43.0]])
    assert torch.equal(reference.corr2d(X, K), expected)
    assert torch.equal(reference.corr2d(X.long(), K.long()), expected)  # integer seed variant
    assert torch.equal(fastconv.conv2d(X[None, None], K[None, None])[0, 0], expected)


def test_edge_detection_seed():
    X = band()
    expected_row = torch.tensor([0.0, 1.0, 0.0, 0.0, 0.0, -1.0, 0.0])
    Y = reference.corr2d(X, torch.tensor([[1.0, -1.0]]))
    assert torch.equal(Y, expected_row.expand(6, 7))
    assert torch.equal(reference.corr2d(X, torch.tensor([[-1.0, 1.0]])), -expected_row.expand(6, 7))
    # Horizontal edges only: the transposed image gives zeros.
    assert torch.equal(reference.corr2d(X.t(), torch.tensor([[1.0, -1.0]])), torch.zeros(8, 5))
    assert torch.equal(fastconv.conv2d(X[None, None], torch.tensor([[[[1.0, -1.0]]]]))[0, 0], Y)


def test_diagonal_seed():
    X = torch.tril(torch.ones(6, 8))
    K = torch.tensor([[-1.0, 1.0]])
    assert torch.equal(reference.corr2d(X, K), -torch.eye(6, 7))
    expected = torch.zeros(5, 8)
    expected[range(5), range(1, 6)] = 1  # the seed's output: ones just above the diagonal
    assert torch.equal(reference.corr2d(X, K.T), expected)


def test_multi_channel_seed():
    X = torch.tensor([[[0.0, 1.0, 2.0], [3.0, 4.0, 5.0], [6.0, 7.0, 8.0]],
                      [[1.0, 2.0, 3.0], [4.0, 5.0, 6.0], [7.0, 8.0, 9.0]]])
    K = torch.tensor([[[0.0, 1.0], [2.0, 3.0]], [[1.0, 2.0], [3.0, 4.0]]])
    assert torch.equal(reference.corr2d_multi_in(X, K), torch.tensor([[56.0, 72.0], [104.0, 120.0]]))
    K4 = torch.stack((K, K + 1, K + 2), 0)
    expected = torch.tensor([[[56.0, 72.0], [104.0, 120.0]],
                             [[76.0, 100.0], [148.0, 172.0]],
                             [[96.0, 128.0], [192.0, 224.0]]])
    assert torch.equal(reference.corr2d_multi_in_out(X, K4), expected)
    assert torch.equal(fastconv.conv2d(X, K4), expected)


def test_multi_channel_seed_3_by_2_by_3():
    # The third notebook's variant: X is (3, 2, 3), output (3, 1, 2).
    X = torch.tensor([[[0.0, 1.0, 2.0], [1.0, 2.0, 3.0]],
                      [[3.0, 4.0, 5.0], [4.0, 5.0, 6.0]],
                      [[6.0, 7.0, 8.0], [7.0, 8.0, 9.0]]])
    K = torch.tensor([[[0.0, 1.0], [2.0, 3.0]],
                      [[1.0, 2.0], [3.0, 4.0]],
                      [[2.0, 3.0], [4.0, 5.0]]])
    K4 = torch.stack((K, K + 1, K + 2), 0)
    expected = torch.tensor([[[153.0, 183.0]], [[201.0, 243.0]], [[249.0, 303.0]]])
    assert torch.equal(reference.corr2d_multi_in_out(X, K4), expected)
    assert torch.equal(fastconv.conv2d(X, K4), expected)


def test_1x1_seed():
    gen = torch.Generator().manual_seed(0)
    X = torch.normal(0, 1, (3, 3, 3), generator=gen)
    K = torch.normal(0, 1, (2, 3, 1, 1), generator=gen)
    Y1 = reference.corr2d_multi_in_out_1x1(X, K)
    Y2 = reference.corr2d_multi_in_out(X, K)
    assert float(torch.abs(Y1 - Y2).sum()) < 1e-6
    assert float(torch.abs(fastconv.conv2d(X, K) - Y2).sum()) < 1e-6


def test_pool2d_seed():
    X = torch.tensor([[0.0, 1.0, 2.0], [3.0, 4.0, 5.0], [6.0, 7.0, 8.0]])
    assert torch.equal(reference.pool2d(X, (2, 2)), torch.tensor([[4.0, 5.0], [7.0, 8.0]]))
    assert torch.equal(reference.pool2d(X, (2, 2), "avg"), torch.tensor([[2.0, 3.0], [5.0, 6.0]]))


def test_padding_and_stride_seed_shapes():
    X = torch.rand(8, 8)[None, None]
    cases = [(dict(kernel_size=3, padding=1), (8, 8)),
             (dict(kernel_size=(5, 3), padding=(2, 1)), (8, 8)),
             (dict(kernel_size=3, padding=1, stride=2), (4, 4)),
             (dict(kernel_size=(3, 5), padding=(0, 1), stride=(3, 4)), (2, 2))]
    for config, shape in cases:
        layer = fastconv.Conv2D(1, 1, **config)
        assert layer(X).shape[2:] == shape


def test_loop_reference_conv2d_matches_torch():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 7, 6, generator=gen, dtype=torch.float64)
    w = torch.randn(6, 2, 3, 2, generator=gen, dtype=torch.float64)
    b = torch.randn(6, generator=gen, dtype=torch.float64)
    for opts in [dict(groups=2), dict(stride=(2, 1), padding=(1, 2), dilation=(1, 2), groups=2),
                 dict(padding="same", dilation=2, groups=2)]:
        torch.testing.assert_close(reference.conv2d(x, w, b, **opts), F.conv2d(x, w, b, **opts))
    torch.testing.assert_close(reference.conv2d(x[0], w, b, groups=2), F.conv2d(x[0], w, b, groups=2))
