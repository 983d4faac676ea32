"""conv2d: fastconv vs PyTorch (oneDNN on the CPU), forward and forward+backward, per shape.

    pytest bench --benchmark-only                       # everything, grouped by shape and pass
    pytest bench --benchmark-only --shapes resnet       # a subset
    pytest bench --benchmark-only --benchmark-json=out.json

Every case first checks fastconv against PyTorch; a wrong kernel is never timed.
Run without --benchmark-only (or with --benchmark-disable) each case runs once as a smoke test.
"""


import pytest
import torch
import torch.nn.functional as F
from shapes import CONV_SHAPES, DEMO_IMAGE_SIZE, select

import fastconv
from fastconv import reference

IMPLS = {"fastconv": fastconv.conv2d, "torch": F.conv2d}
DEVICE = "cpu"
ROUNDS = 5


def pytest_generate_tests(metafunc):
    if "shape" in metafunc.fixturenames:
        shapes = select(CONV_SHAPES, metafunc.config.getoption("--shapes"))
        metafunc.parametrize("shape", shapes, ids=[s.name for s in shapes])


def _operands(shape, requires_grad):
    batch = shape.batch[DEVICE]
    x = torch.randn(batch, shape.cin, shape.hw, shape.hw, requires_grad=requires_grad)
    w = torch.randn(shape.cout, shape.cin // shape.groups, shape.k, shape.k,
                    requires_grad=requires_grad)
    w.data.mul_((shape.cin // shape.groups * shape.k ** 2) ** -0.5)
    return x, w


def _check_correct(shape, x, w):
    """Gate: fastconv's forward must match PyTorch before either is timed."""
    with torch.no_grad():
        ours = fastconv.conv2d(x, w, **shape.options())
        ref = F.conv2d(x.double(), w.double(), **shape.options())
    k = shape.cin // shape.groups * shape.k ** 2
    tol = 8 * torch.finfo(torch.float32).eps * k ** 0.5 * ref.abs().max().item() + 1e-6
    err = (ours.double() - ref).abs().max().item()
    assert err <= tol, f"{shape.name}: fastconv is wrong (max error {err:.2e} > {tol:.2e})"


def _extra(benchmark, shape, impl, passname):
    batch = shape.batch[DEVICE]
    flops = shape.flops(batch) * (3 if passname == "fwdbwd" else 1)
    benchmark.group = f"conv2d {shape.name} {passname}"
    benchmark.extra_info.update(
        op="conv2d", shape=shape.name, impl=impl, pass_=passname, device=DEVICE,
        dtype="float32", batch=batch, flops=flops, bytes=shape.bytes(batch),
        torch_threads=torch.get_num_threads())


@pytest.mark.parametrize("impl", list(IMPLS))
def test_conv2d_fwd(benchmark, shape, impl):
    x, w = _operands(shape, requires_grad=False)
    _check_correct(shape, x, w)
    fn = IMPLS[impl]
    _extra(benchmark, shape, impl, "fwd")
    benchmark.pedantic(fn, args=(x, w), kwargs=shape.options(), rounds=ROUNDS, warmup_rounds=1)


@pytest.mark.parametrize("impl", list(IMPLS))
def test_conv2d_fwdbwd(benchmark, shape, impl):
    x, w = _operands(shape, requires_grad=True)
    _check_correct(shape, x, w)
    fn = IMPLS[impl]
    grad = torch.randn_like(fn(x, w, **shape.options()))

    def step():
        x.grad = w.grad = None
        fn(x, w, **shape.options()).backward(grad)

    _extra(benchmark, shape, impl, "fwdbwd")
    benchmark.pedantic(step, rounds=ROUNDS, warmup_rounds=1)


@pytest.mark.parametrize("impl", ["seed-loop", "fastconv", "torch"])
def test_demo_image(benchmark, impl):
    """The demo's edge detection on a DEMO_IMAGE_SIZE^2 image: the seed loop vs fast versions."""
    X = torch.rand(DEMO_IMAGE_SIZE, DEMO_IMAGE_SIZE)
    K = torch.tensor([[1.0, -1.0]])
    expected = F.conv2d(X[None, None], K[None, None])[0, 0]
    fns = {"seed-loop": lambda: reference.corr2d(X, K),
           "fastconv": lambda: fastconv.conv2d(X[None, None], K[None, None])[0, 0],
           "torch": lambda: F.conv2d(X[None, None], K[None, None])[0, 0]}
    torch.testing.assert_close(fns[impl](), expected)
    benchmark.group = f"demo-image {DEMO_IMAGE_SIZE}x{DEMO_IMAGE_SIZE}"
    benchmark.extra_info.update(op="corr2d", impl=impl, device=DEVICE)
    rounds = 1 if impl == "seed-loop" else 50
    benchmark.pedantic(fns[impl], rounds=rounds, warmup_rounds=0 if impl == "seed-loop" else 2)
