import os

import pytest
import torch
from hypothesis import HealthCheck, settings

# First calls JIT-compile (or load cached) Numba code, so no per-example deadline.
settings.register_profile("default", max_examples=40, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("thorough", max_examples=400, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow])
settings.load_profile(os.environ.get("FASTCONV_HYPOTHESIS_PROFILE", "default"))


def _cuda_engine_ready() -> bool:
    """A GPU that PyTorch sees, CuPy, and compute capability 8.0+ (fastconv.cuda.available)."""
    import fastconv.cuda

    return fastconv.cuda.available()[0]


cuda_only = pytest.mark.skipif(
    not (torch.cuda.is_available() and _cuda_engine_ready()),
    reason="needs a CUDA GPU (compute capability 8.0+) and CuPy")

# One test body for every device: `@pytest.mark.parametrize("device", DEVICES)`.
DEVICES = ["cpu", pytest.param("cuda", marks=[pytest.mark.cuda, cuda_only])]


@pytest.fixture(autouse=True)
def _no_tf32():
    """cuDNN and cuBLAS in true fp32 for every comparison: with TF32 (PyTorch's default for
    cuDNN convolutions) the baseline itself is off by ~1e-3 relative, so a float32 test against
    it would either fail a correct kernel or need a tolerance loose enough to pass a wrong one."""
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


@pytest.fixture(autouse=True)
def _restore_torch_threads():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)
