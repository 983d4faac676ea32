"""The CPU engine's hot inner loops compile to packed SIMD arithmetic: the generated code,
checked. A change that stops LLVM from vectorising one of them fails here, not only as a
slowdown somewhere in ``bench/``.

Each kernel is compiled afresh from its Python source with its own Numba options (so the
on-disk cache is not what is inspected) for float32 operands, and its assembly must hold
packed single-precision arithmetic (``...ps`` on xmm/ymm/zmm registers: add, mul, max, FMA,
compare, blend), not only the scalar ``...ss`` forms.

Each check runs for the host and for the other vector width, compiled in a process of its own
and only read, never run: an AVX-512 target (Zen 4) on hosts without AVX-512, an AVX2 one
(Zen 3) on hosts with it; so both builds the engine meets (AVX-512 and 256-bit AVX2) are
checked on any x86 machine.
"""

import json
import platform
import re

import numba
import numpy as np
import pytest

from fastconv.cpu import _microkernel, _window, conv2d, pool2d
from helpers import AVX2_FEATURES, AVX512_FEATURES, run_for_target

pytestmark = pytest.mark.skipif(platform.machine().lower() not in ("x86_64", "amd64"),
                                reason="inspects x86 assembly")

PACKED = re.compile(r"^\s*v?(add|mul|max|min|fn?madd\d*|cmp\w*|blendv)ps\s", re.MULTILINE)
SCALAR = re.compile(r"^\s*v?(add|mul|max|min|fn?madd\d*)ss\s", re.MULTILINE)


def _asm(kernel, *args) -> str:
    """The assembly of ``kernel`` compiled afresh (not run) for the types of ``args``."""
    options = {k: v for k, v in kernel.targetoptions.items() if k not in ("cache", "nopython")}
    fresh = numba.njit(**options)(kernel.py_func)
    fresh.compile(tuple(numba.typeof(a) for a in args))
    return fresh.inspect_asm(fresh.signatures[0])


TARGETS = ["host", "avx2" if _microkernel._wide_vectors() else "avx512"]
# (Numba CPU name, features) of the targets compiled in a process of their own.
OTHER_TARGETS = {"avx512": ("znver4", AVX512_FEATURES), "avx2": ("znver3", AVX2_FEATURES)}


def _summary(asm: str) -> dict:
    return dict(packed=len(PACKED.findall(asm)), scalar=len(SCALAR.findall(asm)),
                gathers=len(GATHER.findall(asm)), shuffles=len(INTERLEAVE.findall(asm)),
                double_adds=len(PACKED_DOUBLE_ADD.findall(asm)))


@pytest.fixture(scope="module")
def other_target_summaries(tmp_path_factory):
    """{case name: _summary of its assembly} for TARGETS[1], every case compiled in one
    process."""
    target = TARGETS[1]
    cpu, features = OTHER_TARGETS[target]
    out = run_for_target(f"""
        import json
        import test_vectorised as t
        from fastconv.cpu import _microkernel
        assert _microkernel._wide_vectors() == {target == "avx512"}
        cases = dict(t.CASES, **t.STRIDED, **t.OTHER)
        print(json.dumps({{name: t._summary(t._asm(*make())) for name, make in cases.items()}}))
    """, tmp_path_factory.mktemp("numba"), cpu, features)
    return json.loads(out.strip().splitlines()[-1])


def _summary_for(target, name, make, request):
    if target != "host":
        return request.getfixturevalue("other_target_summaries")[name]
    return _summary(_asm(*make()))


def _f32(n=64, seed=0):
    return np.random.default_rng(seed).standard_normal(n).astype(np.float32)


CASES = {
    # max pooling: a tap over a whole output row (NaN-propagating max)
    "pool2d._max_into": lambda: (pool2d._max_into, _f32(), _f32(seed=1)),
    # ... recording the winning tap's number (uint8) for the gradient
    "pool2d._max_into_coded": lambda: (pool2d._max_into_coded, _f32(), _f32(seed=1),
                                       np.zeros(64, np.uint8), np.uint8(3)),
    # ... 2- or 3-wide windows at stride 2, separable: a row's window maxima, without and
    # with the winning tap (read straight from the row: interleaved loads), then their max
    # over the window's rows
    "pool2d._interior_maxima": lambda: (pool2d._interior_maxima, _f32(112), 0, _f32(200),
                                        np.zeros(200, np.float32), 0, 3, 2, 1, 1, 55, False),
    "pool2d._interior_maxima (window)": lambda: (pool2d._interior_maxima, _f32(112), 0,
                                                 _f32(200), np.zeros(200, np.float32), 0, 3, 2,
                                                 1, 1, 55, True),
    # ... at stride 1 (3x3/s1/p1)
    "pool2d._interior_maxima (stride 1, window)": lambda: (
        pool2d._interior_maxima, _f32(112), 0, _f32(300), np.zeros(300, np.float32), 0, 3, 1,
        1, 1, 111, True),
    "pool2d._column_maxima (window)": lambda: (pool2d._column_maxima, _f32(300),
                                               np.zeros(300, np.float32), 0, 100, 200, _f32(64),
                                               np.zeros(64, np.uint8), 0, 64, 3, 3, True),
    # ... and its gradient, gathered per input row from two output rows (masked adds)
    "pool2d._pair_gradients": lambda: (pool2d._pair_gradients, _f32(200),
                                       np.zeros(200, np.uint8), _f32(200), 0, 80, True, 0, 3,
                                       3, 1, 0, 64),
    # average pooling's pair loops and its backward's gathers
    "pool2d._add_pair_taps": lambda: (pool2d._add_pair_taps, _f32(112), 56, 56, _f32(56), 28,
                                      28, 2, 0, 0, 28),
    "pool2d._spread_pairs": lambda: (pool2d._spread_pairs, _f32(28), _f32(112), 56, 56, 0, 0,
                                     28),
    # the row adds of conv2d's wide grad-input at offsets (no view per tap), and conv2d's
    # bias added in the copy-out
    "_window.add_at": lambda: (_window.add_at, _f32(), 3, _f32(seed=1), 5, 50),
    "conv2d._copy_plus_at": lambda: (conv2d._copy_plus_at, _f32(), 3, _f32(seed=1), 5, 50,
                                     np.float32(0.5)),
    "conv2d._rows_from_wide (bias)": lambda: (conv2d._rows_from_wide, _f32(200), _f32(160),
                                              0, 8, 20, 25, np.float32(0.5), True),
    # depthwise conv forward: three taps of a row fused per pass over the wide plane
    "conv2d._add_taps": lambda: (conv2d._add_taps, np.zeros(200, np.float32), _f32(400),
                                 np.ones((3, 3), np.float32), 3, 3, 1, 1, 20, 150),
    # ... and on flat planes (stride 1, output as wide as the input): taps selected per
    # column, the nine of a 3x3 fused
    "conv2d._flat_plane": lambda: (conv2d._flat_plane, _f32(400), 1,
                                   np.ones((3, 3), np.float32), np.float32(0.5),
                                   np.float32(0), np.zeros(150, np.float32),
                                   np.ones((3, 150), np.bool_), 15, 3, 3, 1, 1),
    # ... and the 25 of a 5x5
    "conv2d._flat_plane_5x5": lambda: (conv2d._flat_plane_5x5, _f32(600), 2,
                                       np.ones((5, 5), np.float32), np.float32(0.5),
                                       np.float32(0), np.zeros(300, np.float32),
                                       np.ones((5, 300), np.bool_), 20, 1, 1),
    "conv2d._flat_tap_dots": lambda: (conv2d._flat_tap_dots, _f32(150), _f32(400), 1,
                                      np.ones((3, 150), np.bool_), np.float32(0),
                                      np.zeros((3, 3)), 15, 3, 3, 1, 1),
    # ... a 5x5's a column of five at a time, each sum a masked (conditional) reduction
    "conv2d._flat_tap_dots_5x5": lambda: (conv2d._flat_tap_dots_5x5, _f32(300), _f32(600), 2,
                                          np.ones((5, 300), np.bool_), np.float32(0),
                                          np.zeros((5, 5)), 20, 1, 1),
    # depthwise weight gradient: dot products with reassociation allowed
    "conv2d._tap_dots": lambda: (conv2d._tap_dots, _f32(150), _f32(400),
                                 np.zeros((3, 3)), 3, 3, 1, 1, 20, 150),
}


@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("name", list(CASES))
def test_inner_loop_is_vectorised(name, target, request):
    found = _summary_for(target, name, CASES[name], request)
    assert found["packed"], (f"{name}: no packed single-precision arithmetic in its assembly "
                             f"({found['scalar']} scalar ops); the loop is not vectorised")


def test_the_check_sees_a_loop_that_cannot_vectorise():
    """A loop-carried dependence through memory (each element depends on the previous one)
    cannot be vectorised: the check must say so, or it proves nothing."""
    @numba.njit
    def prefix_max(x):
        for k in range(1, x.shape[0]):
            x[k] = x[k] if x[k] > x[k - 1] else x[k - 1]

    x = _f32()
    prefix_max(x)
    asm = prefix_max.inspect_asm(prefix_max.signatures[0])
    assert not PACKED.findall(asm)


# Stride-2 loops index with unsigned offsets so their loads vectorise as interleaved ones (see
# _window.U64); with a signed ``x[r0 + 2*t]`` LLVM keeps Numba's negative-index wraparound
# and emits gathers, several times slower. The pooling pair loops (2-wide windows) and the
# phase split and merge of strided rows must compile without any.
_FACTORS = (np.full(28, 2), np.full(28, 2, np.float32))  # 2x2 windows: divide by 2 * 2
STRIDED = {
    "pool2d._pair_sums": lambda: (pool2d._pair_sums, _f32(112), np.uint64(0), _f32(56),
                                  np.uint64(0), np.uint64(56)),
    "pool2d._spread_pairs": CASES["pool2d._spread_pairs"],
    # (Not separable max pooling's row maxima: a 3-wide window at stride 2 reads its third
    # tap as the next pair's first, a stride-2 load with a gap that LLVM turns into a gather
    # on Intel tunings; measured, that still beat splitting the row into phases first. See
    # pool2d's comment on separable max pooling.)
    "pool2d._pair_gradients": CASES["pool2d._pair_gradients"],  # interleaved stores
    # 2x2/s2 average pooling's own kernels, whole (edge code is scalar and gathers nothing)
    "pool2d._avg_forward_2x2": lambda: (pool2d._avg_forward_2x2,
                                        _f32(4 * 56 * 56).reshape(4, 56, 56),
                                        np.zeros((4, 28, 28), np.float32), 4, 0, 0, *_FACTORS),
    "pool2d._avg_backward_2x2": lambda: (pool2d._avg_backward_2x2,
                                         _f32(4 * 28 * 28).reshape(4, 28, 28),
                                         np.zeros((4, 56, 56), np.float32), 4, 0, 0, *_FACTORS,
                                         False),
    "_window.phase_split": lambda: (_window.phase_split, _f32(112), 56, 56,
                                    np.zeros(56, np.float32), 28, 2),
    "_window.phase_merge": lambda: (_window.phase_merge, _f32(56), 28, _f32(112), 56, 56, 2),
    # Winograd's transforms, a band of 15 tiles of 8 channels on 30x30: patch columns 2t, 2t+1
    # (and the output's) split and merged by shuffles (``_microkernel.winograd_*_band``)
    "conv2d._winograd_input": lambda: (conv2d._winograd_input, _f32(7200).reshape(8, 30, 30),
                                       _f32(16 * 1936), 1936, 225, -1, -1, 1, 0, 15, 15, 0, 2),
    "conv2d._winograd_grad_tiles": lambda: (conv2d._winograd_grad_tiles,
                                            _f32(7200).reshape(8, 30, 30), _f32(16 * 1936), 1936,
                                            225, 0, 1, 30, 0, 15, 15, 0, 2),
    # ... and F(3x3, 4x4)'s: 8x8 tiles of 4x4 on the same planes, 36 transformed planes
    "conv2d._winograd_grad_tiles (4x4)": lambda: (conv2d._winograd_grad_tiles,
                                                  _f32(7200).reshape(8, 30, 30), _f32(36 * 576),
                                                  576, 64, 0, 1, 30, 0, 8, 8, 0, 4),
    "conv2d._winograd_output": lambda: (conv2d._winograd_output, _f32(16 * 1936), 1936, 225,
                                        np.zeros((8, 30, 30), np.float32), _f32(8), 0, 1, 30,
                                        0, 15, 15, 0, 2),
}
GATHER = re.compile(r"^\s*v(p?gather|gather)\w*\s", re.MULTILINE)
INTERLEAVE = re.compile(r"^\s*v(permt2ps|permt2d|shufps|unpck[lh]ps|perm[iq]?\w*)\s.*[yz]mm",
                        re.MULTILINE)


def _interleaved(asm: str) -> bool:
    """Vector shuffles and no gathers: loads vectorised as interleaved ones."""
    return not GATHER.findall(asm) and bool(INTERLEAVE.findall(asm))


@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("name", list(STRIDED))
def test_strided_loop_is_interleaved(name, target, request):
    found = _summary_for(target, name, STRIDED[name], request)
    assert not found["gathers"] and found["shuffles"], (
        f"{name}: {found['gathers']} gathers, {found['shuffles']} shuffles: a signed strided "
        f"index, or not vectorised")


def test_the_check_sees_a_signed_strided_loop():
    """The same pair sum with a signed index (gathers, or scalar code): the check fails it."""
    @numba.njit
    def pair_sum(x, r0, y, n):
        for t in range(n):
            y[t] = x[r0 + 2 * t] + x[r0 + 2 * t + 1]

    args = (_f32(112), 0, _f32(56), 56)
    pair_sum(*args)
    assert not _interleaved(pair_sum.inspect_asm(pair_sum.signatures[0]))


PACKED_DOUBLE_ADD = re.compile(r"^\s*vaddpd\s.*[yz]mm", re.MULTILINE)


OTHER = {
    "conv2d._backward_bias": lambda: (
        conv2d._backward_bias,
        np.random.default_rng(0).standard_normal((2, 3, 200)).astype(np.float32),
        np.zeros(3, np.float32)),
}


@pytest.mark.parametrize("target", TARGETS)
def test_bias_gradient_sums_in_vector_lanes(target, request):
    """conv2d's bias gradient sums each plane in float64 lanes (reassociation allowed): a
    single chain of float64 adds ran 8x slower."""
    found = _summary_for(target, "conv2d._backward_bias", OTHER["conv2d._backward_bias"],
                         request)
    assert found["double_adds"], "no packed float64 adds: the sum is not vectorised"
