"""Every op pass runs inside a range named fastconv.<op>.<pass>; `fastconv profile` works."""

import json

import pytest
import torch
from torch.profiler import ProfilerActivity, profile

import fastconv
from fastconv import _profiling, cli


def _names(prof):
    return {e.key for e in prof.key_averages()}


def test_every_op_and_pass_is_a_named_range():
    x = torch.randn(2, 3, 9, 9, requires_grad=True)
    w = torch.randn(4, 3, 3, 3, requires_grad=True)
    b = torch.randn(4, requires_grad=True)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        y = fastconv.conv2d(x, w, b, padding=1)
        y = fastconv.max_pool2d(y, 3, stride=2, padding=1)
        y = fastconv.avg_pool2d(y, 2)
        y.sum().backward()
        with torch.no_grad():
            fastconv.max_pool2d(x, 2)  # the inference path, no autograd node
    names = _names(prof)
    for op, passes in {"conv2d": ["forward", "backward_input", "backward_weight",
                                  "backward_bias"],
                       "max_pool2d": ["forward", "backward"],
                       "avg_pool2d": ["forward", "backward"]}.items():
        for p in passes:
            assert f"fastconv.{op}.{p}" in names, (op, p)
    counts = {e.key: e.count for e in prof.key_averages()}
    assert counts["fastconv.max_pool2d.forward"] == 2


def test_only_needed_backward_ranges():
    x = torch.randn(1, 2, 5, 5)
    w = torch.randn(3, 2, 3, 3, requires_grad=True)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fastconv.conv2d(x, w).sum().backward()
    names = _names(prof)
    assert "fastconv.conv2d.backward_weight" in names
    assert "fastconv.conv2d.backward_input" not in names


def test_no_record_function_without_a_profiler(monkeypatch):
    """The range is free when nothing records: no RecordFunction is created at all."""
    def boom(*args, **kwargs):
        raise AssertionError("record_function created with no profiler attached")

    monkeypatch.setattr(torch.autograd.profiler, "record_function", boom)
    x = torch.randn(1, 1, 4, 4, requires_grad=True)
    fastconv.avg_pool2d(fastconv.conv2d(x, torch.ones(1, 1, 1, 1)), 2).sum().backward()
    with pytest.raises(AssertionError, match="record_function created"):
        with profile(activities=[ProfilerActivity.CPU]):
            with _profiling.op_range("fastconv.test.forward", x):
                pass


def test_profile_command_writes_traces(tmp_path, capsys):
    assert cli.main(["profile", "--steps", "2", "--batch", "4", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "fastconv: 2 training steps" in out and "torch: 2 training steps" in out
    summary = out[out.index("fastconv: 2 training steps"):]
    assert "fastconv.conv2d.forward" in summary, summary  # in the fastconv model's summary
    ours = json.loads((tmp_path / "fastconv-trace.json").read_text())
    theirs = json.loads((tmp_path / "torch-trace.json").read_text())
    our_names = {e.get("name") for e in ours["traceEvents"]}
    their_names = {e.get("name") for e in theirs["traceEvents"]}
    for name in ["fastconv.conv2d.forward", "fastconv.conv2d.backward_weight",
                 "fastconv.max_pool2d.backward", "fastconv.avg_pool2d.forward"]:
        assert name in our_names, name
    assert not any(str(n).startswith("fastconv.") for n in their_names)
    assert any(str(n).startswith("aten::") and "conv" in str(n) for n in their_names)
