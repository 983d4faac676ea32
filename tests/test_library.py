"""fastconv's operators as PyTorch sees them: torch.library.opcheck, torch.compile with no
graph break, meta tensors, channels_last strides, autocast and deterministic mode."""

import pytest
import torch
import torch.nn.functional as F
from conftest import DEVICES
from torch import nn

import fastconv

ops = torch.ops.fastconv
CL = torch.channels_last


def _t(*shape, device="cpu", dtype=torch.float64, grad=True, layout=None, seed=0):
    gen = torch.Generator().manual_seed(seed + sum(shape))
    t = torch.randn(shape, generator=gen, dtype=dtype).to(device)
    if layout is not None:
        t = t.contiguous(memory_format=layout)
    return t.requires_grad_(grad)


def _conv_opts(stride=(2, 1), padding=(1, 0, 2, 1), dilation=(1, 2), groups=2):
    return [list(stride), list(padding), list(dilation), groups]


def _samples(device, dtype, layout):
    """(op, args) for every fastconv operator, with options off their defaults."""
    t = lambda *s, **k: _t(*s, device=device, dtype=dtype, layout=layout if len(s) == 4 else None,
                           **k)
    conv = _conv_opts()
    x, w = t(2, 4, 9, 8), t(6, 2, 3, 3, seed=1)
    y = ops.conv2d(x.detach(), w.detach(), None, *conv)
    g = t(*y.shape, seed=2)
    pool = [[3, 2], [2, 1], [1, 1], [1, 2], True]
    px = t(2, 3, 9, 8, seed=3)
    out, idx = ops.max_pool2d(px.detach(), *pool, "flat")
    code = ops.max_pool2d(px.detach(), *pool, "window")[1]
    avg = [[3, 2], [2, 1], [1, 1], True, False, None]
    ay = ops.avg_pool2d(px.detach(), *avg)
    return [
        (ops.conv2d, (x, w, t(6, seed=4), *conv)),
        (ops.conv2d, (x, w, None, [1, 1], [1, 1, 1, 1], [1, 1], 2)),
        (ops.conv2d_backward_input, (g, w, [9, 8], *conv)),
        (ops.conv2d_backward_weight, (g, x, [3, 3], *conv)),
        (ops.conv2d_backward_bias, (g,)),
        (ops.conv2d_backward, (g, x, w, [9, 8], [3, 3], [True, True, True], *conv)),
        (ops.conv2d_backward, (g, None, w, [9, 8], [3, 3], [True, False, True], *conv)),
        (ops.conv2d_backward, (g, x, None, [9, 8], [3, 3], [False, True, False], *conv)),
        (ops.conv2d_backward, (g, None, None, [9, 8], [3, 3], [False, False, True], *conv)),
        (ops.max_pool2d, (px, *pool, "flat")),
        (ops.max_pool2d, (px, *pool, "window")),
        (ops.max_pool2d, (px.detach(), *pool, "none")),
        (ops.max_pool2d_backward, (t(*out.shape, seed=5), idx, [9, 8], *pool)),
        (ops.max_pool2d_backward, (t(*out.shape, seed=5), code, [9, 8], *pool)),
        (ops.max_pool2d_backward, (t(*out.shape, seed=5), code, [9, 8], *pool, False)),
        (ops.max_pool2d_double_backward, (t(*px.shape, seed=6), idx, *pool)),
        (ops.max_pool2d_double_backward, (t(*px.shape, seed=6), code, *pool)),
        (ops.avg_pool2d, (px, *avg)),
        (ops.avg_pool2d, (px, [2, 2], [2, 2], [0, 0], False, True, 3)),
        (ops.avg_pool2d_backward, (t(*ay.shape, seed=7), [9, 8], *avg)),
    ]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype, layout", [(torch.float64, None), (torch.float32, CL)])
def test_opcheck_every_operator(device, dtype, layout):
    """Schema, autograd registration, fake implementation (shapes and strides) and AOT
    dispatch, for every operator, in NCHW and channels_last."""
    for op, args in _samples(device, dtype, layout):
        torch.library.opcheck(op, args)


def test_every_operator_is_checked():
    checked = {op._qualified_op_name for op, _ in _samples("cpu", torch.float64, None)}
    # ``name`` is the namespace object's own attribute, not an operator.
    registered = {f"fastconv::{n}" for n in dir(ops) if not n.startswith("_") and n != "name"}
    assert len(registered) == 10 and checked == registered


# ---- torch.compile ----------------------------------------------------------------------
class _Net(nn.Module):
    """Every fastconv layer, with options off their defaults."""

    def __init__(self):
        super().__init__()
        self.conv1 = fastconv.Conv2D(3, 8, 3, padding=1)
        self.pool1 = fastconv.MaxPool2D(2)
        self.conv2 = fastconv.Conv2D(8, 8, 3, stride=2, groups=2, padding_mode="reflect")
        self.pool2 = fastconv.AvgPool2D(2, ceil_mode=True, count_include_pad=False)
        self.up = fastconv.ConvTranspose2D(8, 4, 3, stride=2, output_padding=1, dilation=1)

    def forward(self, x):
        x = torch.relu(self.conv1(x))
        x = torch.relu(self.conv2(self.pool1(x)))
        return self.up(self.pool2(x))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_compile_fullgraph_matches_eager(device, backend):
    torch.manual_seed(0)
    model = _Net().to(device)
    x = torch.randn(2, 3, 17, 19, device=device)
    eager = model(x)
    eager.square().sum().backward()
    eager_grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True, backend=backend)  # a graph break raises
    out = compiled(x)
    out.square().sum().backward()
    torch.testing.assert_close(out, eager, rtol=1e-5, atol=1e-5)
    for p, g in zip(model.parameters(), eager_grads):
        torch.testing.assert_close(p.grad, g, rtol=1e-5, atol=1e-5)


def test_compile_dynamic_shapes():
    """One compiled graph for several sizes: the fake implementations (the backward ops'
    included) take symbolic sizes; outputs and every gradient as eager's."""
    torch._dynamo.reset()
    model = _Net()
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager", dynamic=True)
    for size in (17, 21, 26):
        x = torch.randn(2, 3, size, size + 1, requires_grad=True)
        outs, grads = [], []
        for run in (compiled, model):
            outs.append(run(x))
            grads.append(torch.autograd.grad(outs[-1].square().sum(), (x, *model.parameters())))
        torch.testing.assert_close(*outs, rtol=1e-5, atol=1e-5)
        for ours, eager in zip(*grads):
            torch.testing.assert_close(ours, eager, rtol=1e-5, atol=1e-5)


def test_compile_reports_bad_input_at_trace_time():
    torch._dynamo.reset()
    f = torch.compile(lambda x, w: fastconv.conv2d(x, w), fullgraph=True, backend="aot_eager")
    with pytest.raises(Exception, match="4 channels"):
        f(torch.randn(1, 4, 5, 5), torch.randn(2, 3, 3, 3))


# ---- meta tensors, memory formats ------------------------------------------------------------
def test_meta_tensors_give_shapes_and_strides():
    x = torch.empty(2, 4, 9, 8, device="meta").contiguous(memory_format=CL)
    y = fastconv.conv2d(x, torch.empty(6, 2, 3, 3, device="meta"), stride=2, groups=2)
    assert y.shape == (2, 6, 4, 3) and y.is_contiguous(memory_format=CL)
    out, idx = fastconv.max_pool2d(x, 2, return_indices=True)
    assert out.shape == idx.shape == (2, 4, 4, 4) and idx.dtype == torch.int64


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("which", ["input", "weight", "both"])
def test_channels_last_in_gives_channels_last_out(device, which):
    """Output memory formats follow PyTorch's (its CPU and cuDNN kernels), values equal."""
    x = _t(2, 4, 9, 8, device=device, dtype=torch.float32,
           layout=CL if which in ("input", "both") else None)
    w = _t(6, 4, 3, 3, device=device, dtype=torch.float32,
           layout=CL if which in ("weight", "both") else None)
    for ours, theirs in [(fastconv.conv2d, F.conv2d),
                         (lambda a, b: fastconv.conv_transpose2d(a, b.transpose(0, 1)[:4, :4]),
                          lambda a, b: F.conv_transpose2d(a, b.transpose(0, 1)[:4, :4]))]:
        got, want = ours(x, w), theirs(x, w)
        assert got.is_contiguous(memory_format=CL) == want.is_contiguous(memory_format=CL)
        assert got.is_contiguous() == want.is_contiguous()
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
        gx, gw = torch.autograd.grad(got.square().sum(), (x, w))
        tx, tw = torch.autograd.grad(want.square().sum(), (x, w))
        torch.testing.assert_close(gx, tx, rtol=1e-4, atol=1e-3)
        torch.testing.assert_close(gw, tw, rtol=1e-4, atol=1e-3)
    for ours, theirs in [(fastconv.max_pool2d, F.max_pool2d), (fastconv.avg_pool2d, F.avg_pool2d)]:
        got, want = ours(x, 3, 2, 1), theirs(x, 3, 2, 1)
        assert got.is_contiguous(memory_format=CL) == want.is_contiguous(memory_format=CL)
        torch.testing.assert_close(got, want)


# ---- autocast ------------------------------------------------------------------------------
@pytest.mark.parametrize("device, dtype", [
    ("cpu", torch.bfloat16), ("cpu", torch.float16),
    pytest.param("cuda", torch.float16, marks=DEVICES[1].marks),
    pytest.param("cuda", torch.bfloat16, marks=DEVICES[1].marks)])
def test_autocast_follows_torch_policy(device, dtype):
    """Inside torch.autocast, convolutions run in the autocast dtype (as nn.Conv2d does),
    pooling keeps its input's dtype, and float32 parameters get float32 gradients."""
    torch.manual_seed(0)
    ref = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.MaxPool2d(2), nn.AvgPool2d(2),
                        nn.ConvTranspose2d(8, 4, 3, stride=2)).to(device)
    ours = fastconv.convert(nn.Sequential(*[m for m in _copy(ref)]))
    x = torch.randn(2, 3, 16, 16, device=device)
    with torch.autocast(device, dtype=dtype):
        want, got = ref(x), ours(x)
    assert got.dtype == want.dtype == dtype
    # Both round each layer's output to the autocast dtype: a few units of its roundoff.
    tol = 8 * torch.finfo(dtype).eps * want.float().abs().max().item()
    torch.testing.assert_close(got.float(), want.float(), rtol=0, atol=tol)
    got.float().sum().backward()
    want.float().sum().backward()
    for p, q in zip(ours.parameters(), ref.parameters()):
        assert p.grad.dtype == torch.float32
        gtol = 16 * torch.finfo(dtype).eps * q.grad.abs().max().item()
        torch.testing.assert_close(p.grad, q.grad, rtol=0, atol=gtol)


def _copy(module):
    import copy

    return copy.deepcopy(module)


def test_autocast_leaves_float64_alone():
    x, w = torch.randn(1, 2, 5, 5, dtype=torch.float64), torch.randn(3, 2, 3, 3, dtype=torch.float64)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert fastconv.conv2d(x, w).dtype == torch.float64 == F.conv2d(x, w).dtype


# ---- determinism ---------------------------------------------------------------------------
@pytest.mark.parametrize("device", DEVICES)
def test_deterministic_algorithms_mode(device):
    """Every fastconv kernel is deterministic (no atomics, fixed reduction orders), so under
    torch.use_deterministic_algorithms(True) every op runs and repeats bitwise."""
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        def step():
            torch.manual_seed(0)
            model = _Net().to(device)
            x = torch.randn(4, 3, 17, 19, device=device, requires_grad=True)
            out = model(x)
            out.square().sum().backward()
            return [out.detach(), x.grad] + [p.grad for p in model.parameters()]

        first, second = step(), step()
        for a, b in zip(first, second):
            assert torch.equal(a, b)
    finally:
        torch.use_deterministic_algorithms(previous)


# ---- what fastconv does not do: said clearly ----------------------------------------------
def test_torch_func_transforms_are_refused_by_name():
    w = torch.randn(4, 3, 3, 3)
    with pytest.raises(NotImplementedError, match="torch.func transforms"):
        torch.func.grad(lambda x: fastconv.conv2d(x, w).sum())(torch.randn(2, 3, 8, 8))


def test_vmap_without_gradients_computes_per_sample():
    """vmap of an inference call runs the operator once per sample (PyTorch's fallback)."""
    w, xs = torch.randn(4, 3, 3, 3), torch.randn(5, 2, 3, 8, 8)
    got = torch.func.vmap(lambda x: fastconv.conv2d(x, w, padding=1))(xs)
    torch.testing.assert_close(got, torch.stack([F.conv2d(x, w, padding=1) for x in xs]),
                               rtol=1e-5, atol=1e-5)


def test_device_without_an_engine_is_not_implemented():
    from types import SimpleNamespace

    from fastconv.ops._engine import engine_for

    with pytest.raises(NotImplementedError, match="'cpu' and 'cuda'.*xpu"):
        engine_for(SimpleNamespace(device=torch.device("xpu")), "conv2d")


def test_a_plain_call_skips_the_redispatch_and_a_dispatch_mode_still_sees_the_op(monkeypatch):
    """With only a backend below autograd, the Autograd kernel (or, recording a gradient, its
    node's forward) calls the implementation itself (one trip through the dispatcher, not
    two); under a TorchDispatchMode the op goes the dispatcher's way and reaches the mode."""
    from torch.utils._python_dispatch import TorchDispatchMode

    op = ops.conv2d.default
    redispatched = []
    real = op.redispatch
    monkeypatch.setattr(op, "redispatch", lambda *a: redispatched.append(1) or real(*a))
    x, w = torch.randn(2, 3, 8, 8), torch.randn(4, 3, 3, 3)
    expected = F.conv2d(x, w, padding=1)
    torch.testing.assert_close(fastconv.conv2d(x, w, padding=1), expected)
    with torch.no_grad():
        torch.testing.assert_close(fastconv.conv2d(x.requires_grad_(), w, padding=1), expected)
    with torch.inference_mode():
        torch.testing.assert_close(fastconv.conv2d(x, w, padding=1), expected)
    # Recording a gradient: the autograd node's forward calls the implementation itself too.
    xg = x.detach().requires_grad_()
    out = fastconv.conv2d(xg, w, padding=1)
    torch.testing.assert_close(out, expected)
    gx, = torch.autograd.grad(out, xg, torch.ones_like(out))
    torch.testing.assert_close(gx, torch.autograd.grad(F.conv2d(xg, w, padding=1), xg,
                                                       torch.ones_like(out))[0])
    assert redispatched == []

    seen = []

    class Mode(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            seen.append(func)
            return func(*args, **(kwargs or {}))

    with Mode():
        out = fastconv.conv2d(x.detach(), w, padding=1)
    torch.testing.assert_close(out, expected)
    assert op in seen and redispatched
    seen.clear()
    redispatched.clear()
    with Mode():  # and with a gradient to record
        out = fastconv.conv2d(xg, w, padding=1)
    torch.testing.assert_close(out, expected)
    assert out.requires_grad and op in seen and redispatched
