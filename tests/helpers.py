"""Comparison against PyTorch with tolerances that come from the dtype, not from guesswork; and
running test code in a process whose Numba compiles for another x86 target."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import torch


def _grads(fn, tensors, grad_out, kwargs):
    leaves = [t for t in tensors if t is not None and t.requires_grad]
    out = fn(*tensors, **kwargs)
    grads = torch.autograd.grad(out, leaves, grad_out) if leaves else ()
    return [out.detach(), *grads]


def _copy(tensors, dtype=None, transform=None):
    result = []
    for t in tensors:
        if t is None:
            result.append(None)
            continue
        c = t.detach()
        if transform is not None:
            c = transform(c)
        result.append(c.to(dtype or c.dtype).requires_grad_(t.requires_grad))
    return result


def assert_matches_torch(ours, theirs, tensors, kwargs=None, k: float = 4.0, seed: int = 0,
                         scale: str = "element", ulps: float = 8.0):
    """Check ``ours(*tensors, **kwargs)`` and every gradient against ``theirs`` (torch.nn.functional).

    Truth is ``theirs`` in float64. Each element of ours (forward and every gradient) must be
    within ``k`` times PyTorch's own worst error against that truth, plus ``ulps`` (8) units of
    roundoff of the element's condition scale (the same op on absolute values, i.e. sum |a||b| for a
    convolution). A wrong index or a missing term is off by O(scale) and fails by orders of
    magnitude; honest rounding differences pass.

    ``scale="tensor"`` uses the largest condition scale of the tensor for every element: for
    Winograd, whose transforms mix a tile's terms, so an element's rounding error follows its
    neighbours' magnitudes (an element of a few small terms next to large ones is not exact).
    """
    kwargs = kwargs or {}
    tensors = list(tensors)
    first = next(t for t in tensors if t is not None)
    dtype = first.dtype
    out_shape = theirs(*_copy(tensors), **kwargs).shape
    gen = torch.Generator().manual_seed(seed)  # on the CPU: the same draw on every device
    grad_out = torch.randn(out_shape, generator=gen, dtype=torch.float64).to(first.device)
    got = _grads(ours, _copy(tensors), grad_out.to(dtype), kwargs)
    base = _grads(theirs, _copy(tensors), grad_out.to(dtype), kwargs)
    truth = _grads(theirs, _copy(tensors, torch.float64), grad_out, kwargs)
    scales = _grads(theirs, _copy(tensors, torch.float64, torch.abs), grad_out.abs(), kwargs)
    eps = torch.finfo(dtype).eps
    names = ["output"] + [f"grad[{i}]" for i, t in enumerate(tensors)
                          if t is not None and t.requires_grad]
    for name, g, b, t, s in zip(names, got, base, truth, scales):
        assert g.shape == t.shape, f"{name}: shape {tuple(g.shape)} != {tuple(t.shape)}"
        assert g.dtype == dtype, f"{name}: dtype {g.dtype} != {dtype}"
        err = (g.double() - t).abs()
        torch_err = (b.double() - t).abs().max().item() if t.numel() else 0.0
        if scale == "tensor" and s.numel():
            s = s.max()
        tol = k * torch_err + ulps * eps * s
        bad = err > tol
        assert not bad.any(), (
            f"{name}: {int(bad.sum())} of {err.numel()} elements off; worst error "
            f"{err.max().item():.3e} (PyTorch's own worst error {torch_err:.3e}, eps {eps:.1e})")


# Numba target features of an AVX-512 x86 CPU (Zen 4), for tests that compile the CPU engine's
# 512-bit build and read its assembly on any x86 host (never running it: the host may lack
# AVX-512).
AVX512_FEATURES = ("+avx512f,+avx512vl,+avx512bw,+avx512dq,+avx512cd,+avx2,+avx,+fma,+f16c,+bmi,"
                   "+bmi2,+lzcnt,+popcnt,+sse4.2,+sse4.1,+ssse3,+sse3,+sse2,+sse,+cx16,+movbe")
# Zen 3's: AVX2 and FMA, no AVX-512.
AVX2_FEATURES = ("-avx512f,-avx512vl,-avx512bw,-avx512dq,-avx512cd,+avx2,+avx,+fma,+f16c,+bmi,"
                 "+bmi2,+lzcnt,+popcnt,+sse4.2,+sse4.1,+ssse3,+sse3,+sse2,+sse,+cx16,+movbe")


def run_for_target(code: str, cache_dir, cpu_name: str, features: str | None = None,
                   timeout: int = 900) -> str:
    """Run ``code`` (dedented; the tests folder is importable) in a new Python process whose
    Numba compiles for ``cpu_name`` (and ``features``), with its own cache folder; assert it
    exits 0 and return its stdout."""
    env = dict(os.environ, NUMBA_CPU_NAME=cpu_name, NUMBA_CACHE_DIR=str(cache_dir))
    if features is not None:
        env["NUMBA_CPU_FEATURES"] = features
    code = f"import sys; sys.path.insert(0, {str(Path(__file__).parent)!r})\n" + \
        textwrap.dedent(code)
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                            text=True, timeout=timeout)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


def prefer_candidate(monkeypatch, name: str) -> None:
    """Make the CPU autotuner run candidate ``name`` wherever a pass offers it (else the
    rule's choice), without timing anything."""
    from fastconv.cpu import _autotune

    def run(key, candidates, flops):
        chosen = name if name in candidates else next(iter(candidates))
        candidates[chosen]()
        return chosen

    monkeypatch.setattr(_autotune, "run", run)
