"""The CPU engine's per-configuration choice of conv algorithm (fastconv.cpu._autotune).

Two halves: ``run`` itself on stand-in candidates whose speed the test sets (it measures, keeps
the fastest beyond the margin, leaves the chosen one's result in the output, remembers, and
stays off where it must); and every algorithm a real conv pass can be handed, forced in turn
on layers that offer it, against PyTorch, forward and both gradients.
"""

import pytest
import torch
import torch.nn.functional as F

import fastconv
from fastconv.cpu import _autotune
from fastconv.cpu import conv2d as cpu_conv2d
from helpers import assert_matches_torch


class _Clock:
    """A stand-in for time.perf_counter that only the stand-in candidates advance."""

    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


@pytest.fixture(autouse=True)
def _fresh_choices(monkeypatch):
    monkeypatch.delenv("FASTCONV_AUTOTUNE", raising=False)
    _autotune.clear()
    yield
    _autotune.set_autotune(None)
    _autotune.clear()


@pytest.fixture
def clock(monkeypatch):
    fake = _Clock()
    monkeypatch.setattr(_autotune, "_clock", fake)
    return fake


def _stand_ins(seconds: dict, log: list, clock: _Clock):
    """Candidates that take ``seconds[name]`` each on ``clock`` and log their name: the last
    name logged is the one whose result the output holds."""
    def make(name):
        def call():
            clock.now += seconds[name]
            log.append(name)
        return call
    return {name: make(name) for name in seconds}


@pytest.mark.parametrize("order", [("rule", "fast"), ("fast", "rule")], ids=["last", "first"])
def test_measures_once_and_keeps_the_fastest(order, clock):
    seconds = {"rule": 0.02, "fast": 0.002}
    if order[0] == "fast":  # the rule's choice is always the first; make the fast one first
        seconds = {"fast": 0.002, "rule": 0.02}
    log = []
    assert _autotune.run(("k",), _stand_ins(seconds, log, clock), flops=1e12) == "fast"
    assert set(log[:2]) == {"rule", "fast"}  # each run untimed first
    assert log[-1] == "fast"  # the output holds the chosen candidate's result
    assert len(log) == 2 + 2 * _autotune.ROUNDS + (list(seconds)[-1] != "fast")
    made = _autotune.choices()[("k",)]
    assert made["chosen"] == "fast" and set(made["seconds"]) == {"rule", "fast"}
    assert made["seconds"]["fast"] < made["seconds"]["rule"]
    log.clear()
    assert _autotune.run(("k",), _stand_ins(seconds, log, clock), flops=1e12) == "fast"
    assert log == ["fast"]  # remembered: no second measurement


def test_the_rule_keeps_close_calls(clock):
    """Another candidate must beat the rule's choice by more than MARGIN to replace it."""
    log = []
    seconds = {"rule": 0.010, "close": 0.010 * (1 - _autotune.MARGIN / 2)}
    assert _autotune.run(("close",), _stand_ins(seconds, log, clock), flops=1e12) == "rule"
    assert log[-1] == "rule"
    seconds = {"rule": 0.010, "faster": 0.010 * (1 - 2 * _autotune.MARGIN)}
    assert _autotune.run(("faster",), _stand_ins(seconds, log, clock), flops=1e12) == "faster"


def test_configurations_are_measured_apart(clock):
    log = []
    _autotune.run(("a",), _stand_ins({"rule": 0.01, "fast": 0.001}, log, clock), flops=1e12)
    assert _autotune.run(("b",), _stand_ins({"rule": 0.001, "slow": 0.01}, log, clock),
                         flops=1e12) == "rule"
    assert {k: v["chosen"] for k, v in _autotune.choices().items()} == {("a",): "fast",
                                                                          ("b",): "rule"}


@pytest.mark.parametrize("why", ["small", "single", "env", "set_autotune", "deterministic"])
def test_rule_only(why, monkeypatch, clock):
    """No measurement (the first candidate runs, once) for small passes, a single candidate,
    FASTCONV_AUTOTUNE=0, set_autotune(False), or torch's deterministic mode."""
    seconds = {"rule": 0.005, "fast": 0.0}
    flops = 1e12
    if why == "small":
        flops = _autotune.MIN_FLOPS - 1
    elif why == "single":
        seconds = {"rule": 0.0}
    elif why == "env":
        monkeypatch.setenv("FASTCONV_AUTOTUNE", "0")
    elif why == "set_autotune":
        _autotune.set_autotune(False)
    else:
        previous = torch.are_deterministic_algorithms_enabled()
        torch.use_deterministic_algorithms(True)
    try:
        log = []
        assert _autotune.run(("k",), _stand_ins(seconds, log, clock), flops) == "rule"
        assert log == ["rule"] and _autotune.choices() == {}
    finally:
        if why == "deterministic":
            torch.use_deterministic_algorithms(previous)
    _autotune.set_autotune(None)
    assert _autotune.enabled() == (why != "env")


def _force(monkeypatch, algorithm: str, offered: dict):
    """Every pass with a choice runs ``algorithm`` where it is a candidate (else the rule's
    choice); ``offered`` collects {pass name: candidate names}."""
    def run(key, candidates, flops):
        offered[key[0]] = list(candidates)
        name = algorithm if algorithm in candidates else list(candidates)[0]
        candidates[name]()
        return name
    monkeypatch.setattr(_autotune, "run", run)


# (input, weight, options, {pass: candidates offered, the rule's first}) on the CPU.
OFFERS = [
    # A Winograd layer whose channels fill the tiles' vectors (16 of float32's 16 lanes); the
    # weight gradient always offers im2col and BLAS too.
    (((2, 16, 14, 14), (16, 16, 3, 3), dict(padding=1)),
     {"conv2d_forward": ["winograd", "winograd4", "tiles"],
      "conv2d_backward_input": ["winograd", "winograd4", "tiles"],
      "conv2d_backward_weight": ["winograd", "winograd4", "tiles", "gemm"]}),
    # Dilated: the weight gradient's alternative is im2col and BLAS (no tiles for dW > 1).
    (((2, 16, 26, 25), (16, 16, 3, 3), dict(padding=2, dilation=2)),
     {"conv2d_forward": ["winograd", "winograd4", "tiles"],
      "conv2d_backward_input": ["winograd", "winograd4", "tiles"],
      "conv2d_backward_weight": ["winograd", "winograd4", "gemm"]}),
    # A 1x1 layer read as it is, small weights: tiles first forward, the GEMM first backward.
    (((2, 32, 9, 11), (24, 32, 1, 1), {}),
     {"conv2d_forward": ["tiles", "gemm"], "conv2d_backward_input": ["gemm", "tiles"],
      "conv2d_backward_weight": ["gemm"]}),
    # Strided, one group: the input gradient's phase tiles first, a GEMM per tap the other.
    (((2, 16, 13, 12), (16, 16, 3, 3), dict(stride=2, padding=1)),
     {"conv2d_forward": ["tiles"], "conv2d_backward_input": ["tiles", "phase-gemm"],
      "conv2d_backward_weight": ["tiles", "gemm"]}),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("algorithm", ["winograd", "winograd4", "tiles", "gemm", "phase-gemm"])
@pytest.mark.parametrize("case", OFFERS, ids=lambda c: f"{c[0][0]}x{c[0][1]}")
def test_every_offered_algorithm_matches_torch(case, algorithm, dtype, monkeypatch):
    """Each algorithm a pass offers computes it: forward and both gradients against PyTorch
    with that algorithm forced wherever offered; the offers are as listed."""
    (xs, ws, opts), expected = case
    offered = {}
    _force(monkeypatch, algorithm, offered)
    gen = torch.Generator().manual_seed(5)
    x, w, b = (torch.randn(s, generator=gen, dtype=dtype).requires_grad_()
               for s in (xs, ws, ws[:1]))
    assert_matches_torch(fastconv.conv2d, F.conv2d, [x, w, b], opts,
                         scale="tensor" if "winograd" in expected["conv2d_forward"] else "element")
    assert all(offered[p][:len(v)] == v for p, v in expected.items() if p in offered)
    assert {p: v for p, v in offered.items() if len(v) > 1} == \
        {p: v for p, v in expected.items() if len(v) > 1}


def test_a_measured_layer_runs_its_choice(monkeypatch):
    """On a real layer: the first call measures Winograd against tiles for each pass (and
    im2col + BLAS for the weight gradient) and keeps one; later calls run it without measuring, bitwise the same as the first call's result
    (which is the chosen candidate's, whatever ran last while measuring)."""
    monkeypatch.setattr(_autotune, "MIN_FLOPS", 0)
    measured = []
    real = _autotune._measure
    monkeypatch.setattr(_autotune, "_measure", lambda c: measured.append(1) or real(c))
    gen = torch.Generator().manual_seed(6)
    x = torch.randn(2, 16, 14, 14, generator=gen, requires_grad=True)
    w = torch.randn(16, 16, 3, 3, generator=gen, requires_grad=True)
    gy = torch.randn(2, 16, 14, 14, generator=gen)
    first = torch.autograd.grad(fastconv.conv2d(x, w, padding=1), (x, w), gy)
    assert len(measured) == 3
    made = fastconv.cpu.autotune_choices()
    assert {k[0] for k in made} == {"conv2d_forward", "conv2d_backward_input",
                                    "conv2d_backward_weight"}
    assert {k[0]: set(v["seconds"]) for k, v in made.items()} == {
        "conv2d_forward": {"winograd", "winograd4", "tiles"},
        "conv2d_backward_input": {"winograd", "winograd4", "tiles"},
        "conv2d_backward_weight": {"winograd", "winograd4", "tiles", "gemm"}}
    y1 = fastconv.conv2d(x, w, padding=1)
    again = torch.autograd.grad(fastconv.conv2d(x, w, padding=1), (x, w), gy)
    assert len(measured) == 3
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    # The forward alone: the same as the chosen algorithm's output, forced.
    chosen = made[next(k for k in made if k[0] == "conv2d_forward")]["chosen"]
    _force(monkeypatch, chosen, {})
    assert torch.equal(y1, fastconv.conv2d(x, w, padding=1))
    fastconv.cpu.clear_autotune()
    assert fastconv.cpu.autotune_choices() == {}
