"""max_pool2d / avg_pool2d: fastconv vs PyTorch, forward and forward+backward, per shape,
beside the machine's ceilings measured in the same run (copy bandwidth is pooling's roofline).

    pytest bench/test_bench_pool2d.py --benchmark-only
"""

import pytest
from test_bench_conv2d import ROUNDS, time_case

from fastconv import benchmark as suite

OPS = ("max_pool2d", "avg_pool2d")


@pytest.mark.parametrize("impl", suite.IMPLS)
@pytest.mark.parametrize("passname", suite.PASSES)
def test_pool2d(benchmark, shape, passname, impl, device, dtype):
    time_case(benchmark, shape, impl, passname, device, dtype)


def test_copy_bandwidth(benchmark, device):
    """The roofline for pooling: a large copy_ (bytes = read + written)."""
    fn, nbytes = suite.copy_op(device)
    benchmark.group = "ceiling: copy bandwidth"
    benchmark.extra_info.update(op="copy", impl="torch.copy_", device=device, bytes=nbytes)
    benchmark.pedantic(suite.synced(fn, device), rounds=ROUNDS, warmup_rounds=1)


def test_gemm_peak(benchmark, device, dtype):
    """The FLOP/s ceiling: a square torch.mm in the benchmark dtype."""
    fn, flops = suite.gemm_op(device, dtype)
    benchmark.group = "ceiling: GEMM"
    benchmark.extra_info.update(op="gemm", impl="torch.mm", device=device, flops=flops)
    benchmark.pedantic(suite.synced(fn, device), rounds=ROUNDS, warmup_rounds=1)
