"""Which algorithm computes a CPU conv pass: measured once per layer shape and process.

Several algorithms compute some passes (a 3x3 stride-1 layer: Winograd F(2x2, 3x3) or direct
register tiles; a 1x1 layer: tiles or a BLAS GEMM), and which is fastest depends on the
machine, not only on the shape. The rule in conv2d.py (Winograd from 12x12 output planes) was
measured where Winograd won every pass of 256->256 on 14x14 (5.7 / 6.3 / 7.1 ms forward /
input / weight gradient, tiles 8.6 / 8.7 / 8.9). On an Intel Xeon with AVX-512 (2 threads,
batch 8, ms, Winograd / tiles), that layer: forward 5.6 / 6.4, input gradient 6.6 / 6.1;
64->64 on 56x56: forward 7.0 / 6.4, weight gradient 8.4 / 9.3; at dilation 2, forward
7.9 / 6.6. (Since Winograd's transforms run as vectors, it wins every pass of those layers on
that Xeon: 64->64 forward 3.8 / 5.6, the dilated one 4.9 / 6.2.) So, as
``torch.backends.cudnn.benchmark`` does on the GPU, the first call of a pass on a new
configuration (shapes, stride, padding, dilation, groups, dtype, thread count) that has a
choice and at least ``MIN_FLOPS`` of work runs every candidate, times them (each once to load
its code and warm the caches, then the best of ``ROUNDS`` runs), and that call and every later
one with the same configuration run the fastest. The rule-based choice (the first candidate)
keeps the call unless another is more than ``MARGIN`` faster, so close calls do not flip
with the noise between processes.

Off (the rule-based choice always) with ``FASTCONV_AUTOTUNE=0``, ``set_autotune(False)``, or
under ``torch.use_deterministic_algorithms(True)``: the candidates round differently (each
within the tests' tolerances), so results are bitwise repeatable only within one process
while autotuning is on; across processes a close measurement may pick differently.
"""

from __future__ import annotations

import math
import os
import threading
import time
from typing import Callable

import torch

# Passes with less work than this keep the rule-based choice: trying the others would cost
# more than it could save.
MIN_FLOPS = 50_000_000
ROUNDS = 2
MARGIN = 0.03

_lock = threading.Lock()
_chosen: dict[tuple, str] = {}
_timings: dict[tuple, dict[str, float]] = {}
_setting: bool | None = None
_clock = time.perf_counter  # the tests' stand-in candidates run on a clock of their own


def set_autotune(enabled: bool | None) -> None:
    """Turn autotuning on or off for this process; ``None`` restores the default (on, unless
    the environment sets ``FASTCONV_AUTOTUNE=0``). Choices already made are kept; see
    ``clear``."""
    global _setting
    _setting = None if enabled is None else bool(enabled)


def enabled() -> bool:
    """Whether a pass with a choice is measured (see the module docstring)."""
    if torch.are_deterministic_algorithms_enabled():
        return False
    if _setting is not None:
        return _setting
    return os.environ.get("FASTCONV_AUTOTUNE", "1").strip().lower() not in ("0", "false", "off",
                                                                             "no")


def clear() -> None:
    """Forget every measured choice: the next call of each configuration measures again."""
    with _lock:
        _chosen.clear()
        _timings.clear()


def choices() -> dict[tuple, dict]:
    """{configuration key: {"chosen": name, "seconds": {candidate: best seconds}}} for every
    measurement made in this process."""
    with _lock:
        return {k: {"chosen": v, "seconds": dict(_timings.get(k, {}))}
                for k, v in _chosen.items()}


def run(key: tuple, candidates: dict[str, Callable[[], None]], flops: float) -> str:
    """Run one of ``candidates`` (name -> a call that writes the pass's whole output; the
    rule-based choice first) and return its name: the measured choice for ``key`` (measuring
    it now if this is the first call), or the first candidate where there is nothing to
    choose, the pass is small, or autotuning is off."""
    names = list(candidates)
    if len(names) == 1 or flops < MIN_FLOPS or not enabled():
        candidates[names[0]]()
        return names[0]
    with _lock:
        chosen = _chosen.get(key)
    if chosen in candidates:
        candidates[chosen]()
        return chosen
    chosen, seconds = _measure(candidates)
    with _lock:
        _chosen[key] = chosen
        _timings[key] = seconds
    return chosen


def _measure(candidates: dict[str, Callable[[], None]]) -> tuple[str, dict[str, float]]:
    names = list(candidates)
    for name in names:  # untimed: loads each candidate's compiled code, warms the caches
        candidates[name]()
    best = dict.fromkeys(names, math.inf)
    for _ in range(ROUNDS):  # rounds alternate the candidates, so drift hits them alike
        for name in names:
            start = _clock()
            candidates[name]()
            best[name] = min(best[name], _clock() - start)
    fastest = min(names, key=best.__getitem__)
    chosen = fastest if best[fastest] < (1 - MARGIN) * best[names[0]] else names[0]
    if chosen != names[-1]:  # the output must hold the chosen candidate's result
        candidates[chosen]()
    return chosen, best
