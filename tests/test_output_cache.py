"""The CPU engine's memory (fastconv/cpu/_runtime.py): large outputs recycle the memory of dead
ones, never of live ones, and the ops stay exact on recycled memory; glibc's heap keeps its
pages across calls under the settings importing the engine makes."""

import gc
import os
import platform
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

import fastconv
from fastconv.cpu import _runtime, cache_info, empty_cache

MIB = 1 << 20


@pytest.fixture
def small_cache(monkeypatch):
    """Recycle from 1 MiB (instead of 4) into a fresh cache holding at most 8 MiB idle."""
    cache = _runtime._OutputCache()
    cache.limit = 8 * MIB
    monkeypatch.setattr(_runtime, "_cache", cache)
    monkeypatch.setattr(_runtime, "_CACHE_FROM", 1 * MIB)
    return cache


def test_dead_output_memory_is_reused_live_memory_never(small_cache):
    a = _runtime.empty((2, 1000, 300), torch.float32)  # 2.4 MB, rounded to 4 MiB
    assert a.shape == (2, 1000, 300) and a.dtype == torch.float32 and a.is_contiguous()
    view = a[1]
    ptr = a.data_ptr()
    del a
    b = _runtime.empty((2, 1000, 300), torch.float32)
    assert b.data_ptr() != ptr, "memory a view still uses was handed out again"
    del view
    c = _runtime.empty((600_000,), torch.float32)  # same 2.4 MB, another shape
    assert c.data_ptr() == ptr
    d = _runtime.empty((600_000,), torch.float32)
    assert d.data_ptr() not in (ptr, b.data_ptr()), "one idle block handed out twice"
    assert cache_info()["hits"] == 1 and cache_info()["misses"] == 3
    b.fill_(-1.0), c.fill_(3.0), d.fill_(7.0)  # the live blocks do not overlap
    assert bool((b == -1.0).all()) and bool((c == 3.0).all()) and bool((d == 7.0).all())


def test_idle_bytes_stay_under_the_limit_and_empty_cache_frees_them(small_cache):
    blocks = [_runtime.empty((MIB,), torch.float32) for _ in range(3)]  # 4 MiB each
    del blocks
    gc.collect()
    info = cache_info()
    assert info["idle"] == 8 * MIB and info["blocks"] == 2, info  # the oldest was unmapped
    empty_cache()
    assert cache_info()["idle"] == 0 and cache_info()["blocks"] == 0
    big = _runtime.empty((4 * MIB,), torch.float32)  # 16 MiB: more than the cache may hold
    del big
    assert cache_info()["blocks"] == 0


def test_small_outputs_and_a_zero_limit_use_torch_memory(small_cache):
    small = _runtime.empty(1000, torch.float64)  # an int shape, as torch.empty takes
    assert small.shape == (1000,) and small.untyped_storage().resizable()  # torch's storage
    small_cache.limit = 0
    big = _runtime.empty((2, MIB), torch.float32)
    assert big.untyped_storage().resizable() and big.shape == (2, MIB)
    assert cache_info()["misses"] == 0


def test_huge_page_advice_with_recycling_off_only_for_large_outputs(small_cache,
                                                                    monkeypatch):
    """With recycling off, each call's fresh output is advised only from _ADVISE_FROM (advice
    on every fresh mid-size output made the stem's forward swing); recycled blocks are
    advised once, when first mapped."""
    advised = []
    monkeypatch.setattr(_runtime, "_advise", lambda start, n: advised.append(n))
    monkeypatch.setattr(_runtime, "_ADVISE_FROM", 4 * MIB)
    first = _runtime.empty((MIB,), torch.float32)  # 4 MiB, recycled: mapped and advised
    del first
    again = _runtime.empty((MIB,), torch.float32)  # the same block: not advised again
    assert advised == [4 * MIB] and cache_info()["hits"] == 1
    del again
    small_cache.limit = 0
    _runtime.empty((MIB // 2,), torch.float32)  # 2 MiB: torch's memory, no advice
    _runtime.empty((MIB,), torch.float32)  # 4 MiB: advised
    assert advised == [4 * MIB, 4 * MIB]


def test_cache_limit_comes_from_the_environment(monkeypatch):
    monkeypatch.setenv("FASTCONV_CACHE_MB", "12.5")
    assert _runtime._cache_limit() == int(12.5 * MIB)
    monkeypatch.setenv("FASTCONV_CACHE_MB", "lots")
    with pytest.raises(ValueError, match="FASTCONV_CACHE_MB"):
        _runtime._cache_limit()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_training_steps_on_recycled_memory_match_torch(small_cache, dtype):
    """Three steps that each free the last step's outputs, gradients accumulated across two
    backward calls: every output and gradient is PyTorch's, bitwise for pooling."""
    gen = torch.Generator().manual_seed(11)
    x = torch.randn(4, 8, 100, 101, generator=gen, dtype=dtype)  # 2.6 or 5.2 MB planes
    w = torch.randn(8, 8, 3, 3, generator=gen, dtype=dtype)
    ours, theirs = x.clone().requires_grad_(), x.clone().requires_grad_()
    for _ in range(3):
        ours.grad = theirs.grad = None
        for _ in range(2):
            grad = torch.randn(4, 8, 50, 51, generator=gen, dtype=dtype)
            a = fastconv.max_pool2d(ours, 3, 2, 1)
            b = F.max_pool2d(theirs, 3, 2, 1)
            assert torch.equal(a, b)
            a.backward(grad), b.backward(grad)
        assert torch.equal(ours.grad, theirs.grad)
        y = fastconv.conv2d(ours, w, padding=1)
        torch.testing.assert_close(y, F.conv2d(theirs, w, padding=1))
    assert cache_info()["hits"] > 0


_HEAP_SCRIPT = """
import resource, numpy as np
import fastconv
from fastconv.cpu import _runtime
def faults():
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt
def resident():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()
np.ones(1 << 21)  # numpy's own first use
before = faults()
for _ in range(20):  # an 8 MiB temporary, as a kernel makes one per call
    np.ones(1 << 21)
temporaries = faults() - before
# A backward pass's worth of blocks under 32 MiB alive at once (~100 MB, more than glibc's
# largest trim threshold of 64 MiB), all freed at its end, four times.
stack = [np.ones(3_200_000) for _ in range(4)]  # the first step grows the heap
stack = None
before = faults()
for _ in range(4):
    stack = [np.ones(3_200_000) for _ in range(4)]
    stack = None
steps = faults() - before
held = resident()
fastconv.cpu.empty_cache()
print(_runtime.MALLOC_KEEP >> 20, temporaries, steps, (held - resident()) >> 20)
"""


def _python(code: str, keep_mb: str) -> subprocess.CompletedProcess:
    """``code`` run by a fresh interpreter with FASTCONV_MALLOC_KEEP_MB=keep_mb: the settings
    are made once, at import."""
    env = dict(os.environ, FASTCONV_MALLOC_KEEP_MB=keep_mb)
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)


def _heap(keep_mb: str) -> list[int]:
    run = _python(_HEAP_SCRIPT, keep_mb)
    assert run.returncode == 0, run.stderr
    return [int(v) for v in run.stdout.split()]


glibc_only = pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc's malloc")


@glibc_only
def test_heap_keeps_its_pages_across_calls():
    """Importing the engine sets glibc's thresholds (fastconv/cpu/_runtime.py, "glibc's heap"):
    an 8 MiB temporary comes from the heap, its pages already there, and a step's ~100 MB of
    blocks freed at its end stay mapped for the next step; ``empty_cache`` returns them."""
    keep, temporaries, steps, returned = _heap("512")
    assert keep == 512
    assert temporaries < 10, f"{temporaries} page faults over 20 temporaries from the heap"
    assert steps < 50, f"{steps} page faults over 4 steps of 100 MB on a kept heap"
    assert returned >= 64, f"empty_cache returned {returned} MiB of a 100 MB free heap top"


@glibc_only
@pytest.mark.parametrize("keep_mb", ["64", "0"])
def test_heap_settings_follow_the_environment(keep_mb):
    """FASTCONV_MALLOC_KEEP_MB=64 keeps only that much: most of each step's 100 MB is trimmed
    and faults in again. 0 leaves malloc alone: a fresh process maps every block over 128 KiB
    afresh, so each temporary faults too. (Faults are counted per folio: Linux may map 64 KiB
    or 2 MiB of anonymous memory at one fault, so the bounds are far below one per 4 KiB.)"""
    keep, temporaries, steps, _ = _heap(keep_mb)
    assert keep == int(keep_mb)
    assert steps >= 100, f"only {steps} page faults over 4 steps of 100 MB"
    if keep == 0:
        assert temporaries >= 20, f"only {temporaries} page faults over 20 fresh mappings"


def test_heap_setting_must_be_a_size():
    run = _python("import fastconv.cpu", "lots")
    assert run.returncode != 0
    assert "FASTCONV_MALLOC_KEEP_MB must be a number of MiB >= 0" in run.stderr, run.stderr
