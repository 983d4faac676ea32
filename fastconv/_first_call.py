"""What fastconv's first calls cost in a new process (``PROBE`` is the program to run).

It prints one JSON object: seconds to import fastconv, then for each of the CPU engine's
algorithm paths the first forward+backward call on a tiny input. The Numba kernels are
compiled with ``cache=True``: with a warm on-disk cache a first call only loads machine code;
with a cold one (``NUMBA_CACHE_DIR`` pointing at an empty folder) it compiles. ``fastconv info
--first-call`` runs this in fresh processes both ways.
"""

from __future__ import annotations

import json
import time


def _cases():
    import torch

    import fastconv

    def leaf(*shape):
        return torch.randn(*shape, requires_grad=True)

    return {
        "conv2d 3x3 (Winograd)": lambda: fastconv.conv2d(leaf(2, 8, 12, 12), leaf(8, 8, 3, 3),
                                                         padding=1),
        "conv2d 3x3 stride 2": lambda: fastconv.conv2d(leaf(2, 4, 9, 9), leaf(4, 4, 3, 3),
                                                       stride=2, padding=1),
        "conv2d 5x5": lambda: fastconv.conv2d(leaf(2, 16, 12, 12), leaf(16, 16, 5, 5)),
        "conv2d 1x1": lambda: fastconv.conv2d(leaf(2, 8, 6, 6), leaf(4, 8, 1, 1)),
        "conv2d depthwise": lambda: fastconv.conv2d(leaf(2, 4, 8, 8), leaf(4, 1, 3, 3),
                                                    padding=1, groups=4),
        "max_pool2d": lambda: fastconv.max_pool2d(leaf(2, 3, 9, 9), 3, 2, 1),
        "avg_pool2d": lambda: fastconv.avg_pool2d(leaf(2, 3, 8, 8), 2),
    }


def measure(started: float) -> dict[str, float]:
    """Seconds: "import" (since ``started``, taken before ``import fastconv``), then one entry
    per case (forward and backward), in call order."""
    seconds = {"import": time.perf_counter() - started}
    for name, call in _cases().items():
        start = time.perf_counter()
        call().sum().backward()
        seconds[name] = time.perf_counter() - start
    return seconds


def report(started: float) -> None:
    print(json.dumps(measure(started)))


# ``python -m`` would import the fastconv package before its clock starts.
PROBE = ("import time; started = time.perf_counter(); import fastconv._first_call as probe; "
         "probe.report(started)")
