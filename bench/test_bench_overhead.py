"""Per-call overhead of a tiny conv2d (1x1x4x4 input, 2x2 kernel: ~50 FLOPs), where nothing
but the call path is timed: the engine called directly, the ``fastconv::conv2d`` operator
(dispatcher, autograd registration, argument checks), the functional API, the functional API
with an input that requires grad (autograd records a node), and ``torch.nn.functional.conv2d``.

    pytest bench/test_bench_overhead.py --benchmark-only

The difference between "operator" and "engine" is what registering the op with
``torch.library`` (for torch.compile, opcheck, autocast) costs per eager call.
"""

import pytest
import torch
import torch.nn.functional as F

import fastconv
from fastconv._args import conv2d_params
from fastconv.cpu import conv2d as cpu_conv2d

ROUNDS = 2000


def _calls():
    x = torch.randn(1, 1, 4, 4)
    w = torch.randn(1, 1, 2, 2)
    xg = x.clone().requires_grad_()
    params = conv2d_params((2, 2))
    return {
        "engine": lambda: cpu_conv2d.conv2d_forward(x, w, None, params),
        "operator": lambda: torch.ops.fastconv.conv2d(x, w, None, [1, 1], [0, 0, 0, 0],
                                                      [1, 1], 1),
        "fastconv": lambda: fastconv.conv2d(x, w),
        "fastconv-requires-grad": lambda: fastconv.conv2d(xg, w),
        "torch": lambda: F.conv2d(x, w),
    }, F.conv2d(x, w)


@pytest.mark.parametrize("impl", ["engine", "operator", "fastconv", "fastconv-requires-grad",
                                  "torch"])
def test_tiny_conv_call_overhead(benchmark, impl):
    calls, expected = _calls()
    torch.testing.assert_close(calls[impl]().detach(), expected)
    benchmark.group = "tiny conv2d call overhead (cpu, 1 thread)"
    benchmark.extra_info.update(op="conv2d", impl=impl, device="cpu")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # time the call path, not a thread pool's wake-up
    try:
        benchmark.pedantic(calls[impl], rounds=ROUNDS, warmup_rounds=50)
    finally:
        torch.set_num_threads(threads)
