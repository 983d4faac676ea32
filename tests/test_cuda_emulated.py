"""The CUDA engine's kernels and launchers, run on the CPU by the test emulator.

No GPU needed: the real kernel sources are compiled with g++ against tests/cuda_emulator and
launched by fastconv's own CUDA launchers (``fastconv.cuda``), with the same grids, blocks,
shared memory and barriers as on a GPU. This checks the kernels' arithmetic, indexing,
tiling, split-K reduction, tensor-core fragment bookkeeping and bounds on every dtype; it
cannot check speed or the hardware's view of the PTX (tests/test_cuda.py does, on a GPU).
"""

import contextlib
import re
import shutil
from unittest import mock

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from cuda_emulator import EmulatorBackend, KernelFault
from helpers import assert_matches_torch
from hypothesis import given, settings
from torch.autograd import gradgradcheck
from test_conv2d import conv_cases
from test_conv_transpose2d import transpose_cases
from test_pool2d import bad_indices, pool_cases

import fastconv
from fastconv import _args
from fastconv.cuda import _launch as L
from fastconv.cuda import conv2d as cuda_conv2d
from fastconv.cuda import kernel_dir

pytestmark = pytest.mark.skipif(shutil.which("g++") is None, reason="needs g++ for the emulator")
HALF = [torch.float16, torch.bfloat16]


@pytest.fixture(scope="session")
def emulator(tmp_path_factory):
    return EmulatorBackend(tmp_path_factory.mktemp("cuda_emulator"))


@contextlib.contextmanager
def cuda_engine_on_cpu(backend):
    """fastconv's public API on CPU tensors, computed by the CUDA engine on ``backend``."""
    def engine(tensor, op):
        return fastconv.cuda
    dtypes = dict(_args.ENGINE_DTYPES, cpu=_args.ENGINE_DTYPES["cuda"])
    with mock.patch("fastconv.ops._library.engine_for", engine), \
            mock.patch.dict(_args.ENGINE_DTYPES, dtypes), L.use_backend(backend):
        yield backend


def _on(dtype, *tensors):
    return [None if t is None else t.to(dtype).requires_grad_() for t in tensors]


# ---- conv2d ------------------------------------------------------------------------------
def input_grad_path(path):
    """The grad of input of a layer with few input channels per group on either of its
    kernels: the direct one it takes (up to 8 channels), or the implicit GEMM it takes with the
    direct kernel's limit at 0 (which covers the GEMM on the random shapes, mostly thin)."""
    limit = cuda_conv2d.DIRECT_INPUT_MAX_CIN if path == "direct" else 0
    return mock.patch.object(cuda_conv2d, "DIRECT_INPUT_MAX_CIN", limit)


@pytest.mark.parametrize("path", ["direct", "gemm"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@settings(max_examples=25)
@given(case=conv_cases())
def test_conv2d_matches_torch(emulator, dtype, path, case):
    x, weight, bias, opts = case
    with cuda_engine_on_cpu(emulator), input_grad_path(path):
        assert_matches_torch(fastconv.conv2d, F.conv2d, _on(dtype, x, weight, bias), opts, k=2)


CONV_SHAPES = [  # (input, weight, options): one per kernel path
    ((2, 4, 7, 9), (6, 4, 3, 3), dict(padding=1)),                          # implicit GEMM
    ((2, 6, 11, 10), (4, 3, 3, 2), dict(stride=(2, 3), padding=(1, 2), dilation=(2, 1),
                                        groups=2)),                         # every option
    ((3, 5, 6, 7), (70, 5, 1, 1), {}),                                      # pointwise GEMM
    ((2, 4, 9, 8), (8, 1, 3, 3), dict(stride=2, padding=1, groups=4)),      # depthwise x2
    ((2, 5, 9, 8), (5, 1, 3, 2), dict(stride=(1, 2), padding=1, dilation=(2, 1),
                                      groups=5)),                           # depthwise x1
    ((2, 1, 12, 12), (6, 1, 5, 5), {}),                                     # C_in == 1
    ((1, 130, 5, 5), (140, 130, 3, 3), dict(padding=1)),                    # several M tiles
    ((2, 18, 11, 10), (4, 9, 3, 2), dict(stride=(2, 3), padding=(1, 2), dilation=(2, 1),
                                         groups=2)),                        # GEMM grad of input
    ((2, 3, 15, 14), (5, 3, 7, 7), dict(stride=2, padding=3)),              # RGB stem
    ((2, 12, 9, 8), (6, 6, 3, 3), dict(stride=(1, 2), padding=1, groups=2)),  # 6 of 8 channels
]


@pytest.mark.parametrize("dtype", HALF + [torch.float32, torch.float64])
@pytest.mark.parametrize("shapes", CONV_SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_conv2d_every_path_and_dtype(emulator, dtype, shapes):
    """Half precision runs the tensor-core loop (mma.sync emulated lane by lane)."""
    xs, ws, opts = shapes
    gen = torch.Generator().manual_seed(0)
    x, w, b = torch.randn(xs, generator=gen), torch.randn(ws, generator=gen), \
        torch.randn(ws[0], generator=gen)
    start = len(emulator.launches)
    with cuda_engine_on_cpu(emulator):
        assert_matches_torch(fastconv.conv2d, F.conv2d, _on(dtype, x, w, b), opts, k=2)
    launched = " ".join(emulator.launches[start:])
    assert L.CTYPES[dtype] in launched
    path = "depthwise" if ws[1] == 1 else "implicit_gemm"
    assert f"conv2d_forward_{path}" in launched
    path = ("depthwise" if ws[1] == 1 and ws[0] == opts.get("groups", 1) else
            "direct" if ws[1] <= cuda_conv2d.DIRECT_INPUT_MAX_CIN else "implicit_gemm")
    assert f"conv2d_backward_input_{path}" in launched
    if ws[2:] == (1, 1):
        assert "implicit_gemm<float, int, true" in launched or dtype != torch.float32


def _conv_grads(x, w, b, opts):
    x, w, b = _on(x.dtype, x, w, b)
    y = fastconv.conv2d(x, w, b, **opts)
    return [y.detach(), *torch.autograd.grad(y, (x, w, b), torch.ones_like(y))]


def test_split_k_weight_gradient_and_64bit_indexing(tmp_path_factory, monkeypatch):
    """Many SMs force the split-K weight gradient (and its ordered reduce); a zero int32
    limit forces the 64-bit-index instantiations."""
    wide = EmulatorBackend(tmp_path_factory.mktemp("emulator_wide"), sms=64)
    gen = torch.Generator().manual_seed(1)
    x, w, b = torch.randn(4, 3, 20, 20, generator=gen), torch.randn(5, 3, 3, 3, generator=gen), \
        torch.randn(5, generator=gen)
    opts = dict(padding=1, stride=1)
    monkeypatch.setattr(L, "INT32_LIMIT", 0)
    with cuda_engine_on_cpu(wide):
        assert_matches_torch(fastconv.conv2d, F.conv2d, _on(torch.float32, x, w, b), opts, k=2)
        first = _conv_grads(x, w, b, opts)
        again = _conv_grads(x, w, b, opts)
    names = " ".join(wide.launches)
    assert "conv2d_backward_weight_reduce<float, long long>" in names
    assert "int>" not in names and "int," not in names
    for a, c in zip(first, again):
        assert torch.equal(a, c)


def test_large_tile(tmp_path_factory):
    """One SM makes a 130-channel layer take the 128x128 CUDA-core tile."""
    small = EmulatorBackend(tmp_path_factory.mktemp("emulator_one_sm"), sms=1)
    gen = torch.Generator().manual_seed(2)
    x, w = torch.randn(1, 9, 17, 16, generator=gen), torch.randn(130, 9, 3, 3, generator=gen)
    with cuda_engine_on_cpu(small):
        assert_matches_torch(fastconv.conv2d, F.conv2d, _on(torch.float32, x, w), {}, k=2)
    assert any(", 128, 128, 8, 8, 8>" in n for n in small.launches)


def test_conv2d_module_trains_on_the_cuda_engine(emulator):
    torch.manual_seed(0)
    ours = fastconv.Conv2D(3, 4, 3, padding=1)
    theirs = torch.nn.Conv2d(3, 4, 3, padding=1)
    theirs.load_state_dict(ours.state_dict())
    x = torch.randn(2, 3, 8, 8)
    with cuda_engine_on_cpu(emulator):
        for model in (ours, theirs):
            opt = torch.optim.SGD(model.parameters(), lr=0.1)
            for _ in range(3):
                opt.zero_grad()
                model(x).square().mean().backward()
                opt.step()
    for a, b in zip(ours.parameters(), theirs.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@settings(max_examples=12)
@given(case=transpose_cases(max_size=5))
def test_conv_transpose2d_matches_torch(emulator, case):
    x, weight, bias, opts = case
    with cuda_engine_on_cpu(emulator):
        assert_matches_torch(fastconv.conv_transpose2d, F.conv_transpose2d,
                             _on(torch.float32, x, weight, bias), opts, k=2)


def test_double_backward_on_the_cuda_engine(emulator):
    """Second derivatives run on CUDA kernels too (max pooling's on its own gather kernel)."""
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(1, 2, 5, 4, generator=gen, dtype=torch.float64, requires_grad=True)
    w = torch.randn(2, 2, 2, 2, generator=gen, dtype=torch.float64, requires_grad=True)
    px = torch.randperm(40, generator=gen).reshape(1, 2, 5, 4).double().requires_grad_()
    start = len(emulator.launches)
    with cuda_engine_on_cpu(emulator):
        assert gradgradcheck(lambda x, w: fastconv.conv2d(x, w, stride=(2, 1), padding=1),
                             (x, w))
        assert gradgradcheck(lambda x, w: fastconv.conv_transpose2d(x, w, stride=2,
                                                                    output_padding=1), (x, w))
        # 1x1 with output_padding: not the plain-GEMM path (the output outgrows the input).
        assert gradgradcheck(lambda x, w: fastconv.conv_transpose2d(
            x, w[:, :, :1, :1], output_padding=1, dilation=2), (x, w))
        assert gradgradcheck(lambda x: fastconv.max_pool2d(x, 3, 2, 1, ceil_mode=True), (px,))
        # Flat indices (return_indices) and a dilated window's tap numbers.
        assert gradgradcheck(lambda x: fastconv.max_pool2d(x, 2, 1, 1, dilation=(1, 2),
                                                           return_indices=True)[0], (px,))
        assert gradgradcheck(lambda x: fastconv.max_pool2d(x, 2, 1, 1, dilation=(1, 2)), (px,))
        assert gradgradcheck(lambda x: fastconv.avg_pool2d(x, 2, 1, 1), (x,))
    launched = " ".join(emulator.launches[start:])
    for arg in ("unsigned char", "long long"):
        assert f"max_pool2d_double_backward<double, int, {arg}>" in launched


# ---- pooling -----------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@settings(max_examples=25)
@given(case=pool_cases())
def test_max_pool2d_matches_torch(emulator, dtype, case):
    x, opts = case
    x = x.to(dtype)
    with cuda_engine_on_cpu(emulator):
        ours, ours_idx = fastconv.max_pool2d(x, return_indices=True, **opts)
        assert_matches_torch(fastconv.max_pool2d, F.max_pool2d, _on(dtype, x), opts, k=2)
    theirs, theirs_idx = F.max_pool2d(x, return_indices=True, **opts)
    assert torch.equal(ours, theirs)
    assert torch.equal(ours_idx, theirs_idx)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@settings(max_examples=25)
@given(case=pool_cases(avg=True))
def test_avg_pool2d_matches_torch(emulator, dtype, case):
    x, opts = case
    with cuda_engine_on_cpu(emulator):
        assert_matches_torch(fastconv.avg_pool2d, F.avg_pool2d, _on(dtype, x), opts, k=2)


@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize("opts", [dict(kernel_size=3, stride=2, padding=1),
                                  dict(kernel_size=(2, 3), stride=(2, 1), padding=(1, 1),
                                       ceil_mode=True)])
def test_pooling_half_precision(emulator, dtype, opts):
    x = torch.randn(2, 3, 9, 11, generator=torch.Generator().manual_seed(3))
    x[0, 0, 1, 1] = float("nan")
    xh = x.to(dtype)
    with cuda_engine_on_cpu(emulator):
        y, idx = fastconv.max_pool2d(xh, return_indices=True, **opts)
        assert_matches_torch(fastconv.avg_pool2d, F.avg_pool2d, _on(dtype, x), opts, k=2)
    ty, tidx = F.max_pool2d(xh, return_indices=True, **opts)
    assert torch.equal(idx, tidx)
    assert torch.equal(y.nan_to_num(), ty.nan_to_num()) and torch.equal(y.isnan(), ty.isnan())


def test_pooling_gradients_refuse_indices_not_made_by_max_pool2d(emulator):
    """The GPU's gather kernels would skip an index naming no input element; the operators
    check first and raise as the CPU's do, but where told the indices are the forward's own."""
    ops = torch.ops.fastconv
    pool = [[3, 3], [2, 2], [1, 1], [1, 1], False]
    ggx, grad = torch.randn(1, 2, 9, 9), torch.randn(1, 2, 5, 5)
    bad = bad_indices()
    # Unchecked, a skipped index adds nothing, as on the CPU (the all-zero codes' windows
    # away from the padding name real taps).
    cpu = [ops.max_pool2d_backward(grad, idx, [9, 9], *pool, False) for idx, _ in bad[1:]]
    with cuda_engine_on_cpu(emulator):
        for i, (idx, words) in enumerate(bad):
            with pytest.raises(ValueError, match=words):
                ops.max_pool2d_backward(grad, idx, [9, 9], *pool)
            with pytest.raises(ValueError, match=words):
                ops.max_pool2d_double_backward(ggx, idx, *pool)
            unchecked = ops.max_pool2d_backward(grad, idx, [9, 9], *pool, False)
            assert torch.equal(unchecked, cpu[i - 1] if i else torch.zeros(1, 2, 9, 9))
        # One bad code among the forward's own, past the input's bottom right corner; the
        # autograd formula, unchecked, matches PyTorch.
        x = torch.randn(2, 3, 9, 9, requires_grad=True)
        g = torch.randn(2, 3, 5, 5)
        y, code = ops.max_pool2d(x, *pool, "window")
        ops.max_pool2d_backward(g, code, [9, 9], *pool)
        (ours,) = torch.autograd.grad(y, x, g)
        code = code.clone()
        code[1, 2, 4, 4] = 8  # tap (2, 2) of window (4, 4): row and column 9
        with pytest.raises(ValueError, match="taps outside the input"):
            ops.max_pool2d_backward(g, code, [9, 9], *pool)
    assert torch.equal(ours, torch.autograd.grad(F.max_pool2d(x, 3, 2, 1), x, g)[0])


# ---- the harness and the instantiation list ------------------------------------------------
def test_every_kernel_is_instantiated_for_every_dtype():
    """The nvcc test and NVRTC compile only the listed instantiations, so every __global__
    template must appear in the list of its op for every dtype."""
    for op, source in L.SOURCES.items():
        kernels = set(re.findall(r"__global__\s+void\s+(\w+)", (kernel_dir() / source).read_text()))
        assert kernels
        for dtype in L.DTYPES:
            listed = {name.split("<")[0] for name in L.instantiations(op, dtype)}
            assert kernels == listed, f"{op} {dtype}: {kernels ^ listed}"
            assert all(L.CTYPES[dtype] in name for name in L.instantiations(op, dtype))


def test_emulator_catches_out_of_bounds_writes(emulator):
    """A launch told the output is bigger than it is must be caught by the guards."""
    x = torch.randn(1, 2, 6, 6)
    w = torch.randn(3, 2, 3, 3)
    params = _args.conv2d_params((3, 3))
    with L.use_backend(emulator):
        y = L.empty((1, 3, 4, 4), x)
        geom = cuda_conv2d._geometry((2, 2, 6, 6), w.shape, params, (4, 4))  # n=2: too big
        name = L.expr("conv2d_forward_depthwise", "float", "int")
        with pytest.raises(KernelFault, match="wrote outside"):
            L.launch("conv2d", x, name, (4,), (L.THREADS,), (x, w, None, y, geom))


def test_unwritten_outputs_are_visible(emulator):
    """Emulated allocations start as NaN, so an output element a kernel skips cannot pass
    for a computed zero."""
    out = emulator.empty((3, 4), torch.float32, torch.device("cpu"))
    assert out.isnan().all()


def test_launch_parameters_carry_each_argument_by_its_exact_size():
    """The CuPy backend hands cuLaunchKernel one pointer per kernel parameter; read back
    through those pointers, every argument is there with its exact bytes."""
    import ctypes

    geom = cuda_conv2d._geometry((2, 3, 9, 8), (4, 3, 3, 3), _args.conv2d_params((3, 3)),
                                 (7, 6))
    ptr = 0x7F00_1234_5678
    args = (ptr, 0, np.int32(-5), geom, np.int64(2**40 + 3), np.int32(7))
    storage, params = L.pack_params(args)
    assert len(params) == len(args)
    read = [ctypes.c_uint64.from_address(params[0]).value,
            ctypes.c_uint64.from_address(params[1]).value,
            ctypes.c_int32.from_address(params[2]).value,
            ctypes.string_at(params[3], geom.itemsize),
            ctypes.c_int64.from_address(params[4]).value,
            ctypes.c_int32.from_address(params[5]).value]
    assert read == [ptr, 0, -5, geom.tobytes(), 2**40 + 3, 7]
    with pytest.raises(TypeError, match="float"):
        L.pack_params((1.5,))


def test_geometry_layout_matches_the_kernels():
    header = (kernel_dir() / "fastconv_common.cuh").read_text()
    for struct, dtype in (("ConvGeometry", cuda_conv2d.GEOMETRY),
                          ("PoolGeometry", fastconv.cuda.pool2d.GEOMETRY)):
        body = re.search(struct + r" \{(.*?)\};", header, re.S).group(1)
        fields = [f for line in body.splitlines() for f in
                  re.findall(r"(\w+)\s*[,;]", line.split("//")[0].replace("int ", "", 1))]
        assert fields == list(dtype.names), struct
        assert dtype.itemsize == 4 * len(fields)
        assert all(dtype[f] == np.int32 for f in dtype.names)
