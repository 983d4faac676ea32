"""The fastconv command: demo and info."""

import subprocess
import sys

import pytest
import torch

from fastconv import cli


def test_learn_edge_kernel_converges():
    layer, losses = cli.learn_edge_kernel(seed=0)
    learned = layer.weight.detach().reshape(-1)
    assert (learned - torch.tensor([1.0, -1.0])).abs().max() < 1e-2
    assert losses[-1] < losses[0] / 100
    assert all(b < a for a, b in zip(losses, losses[1:]))  # plain GD on a convex loss


def test_demo_runs(capsys, tmp_path):
    png = tmp_path / "digits.png"
    assert cli.main(["demo", "--size", "48", "--repeat", "3", "--plot", str(png)]) == 0
    out = capsys.readouterr().out
    for text in ["Edge detection", "Learning the kernel", "within 1e-2", "seed loop corr2d",
                 "fastconv.conv2d", "torch F.conv2d", "fastconv matches the seed loop",
                 "handwritten digits", "fastconv LeNet test accuracy", "(>= 95%)",
                 "per-epoch training time", "ResNet-18", "21 layers now compute with fastconv",
                 "(matches)"]:
        assert text in out, text
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_info_reports_engines(capsys):
    assert cli.main(["info"]) == 0
    out = capsys.readouterr().out
    for text in ["torch", "numba", "threading layer", "BLAS", "CPU engine", "CuPy", "GPU",
                 "CUDA engine", "CUDA sources", "Numba cache", "CPU output cache",
                 "CPU heap (glibc malloc)"]:
        assert text in out, text
    assert "first calls" not in out  # only with --first-call
    import fastconv.cuda

    ok, reason = fastconv.cuda.available()
    assert ("usable: kernels compile" in out) if ok else ("not usable" in out)


FIRST_CALLS = ["conv2d 3x3 (Winograd)", "conv2d 3x3 stride 2", "conv2d 5x5", "conv2d 1x1",
               "conv2d depthwise", "max_pool2d", "avg_pool2d"]


@pytest.mark.slow
def test_info_first_call_reports_cold_and_warm_cache(capsys, tmp_path, monkeypatch):
    """The cold compile really compiles: it fills an empty cache folder, and a second process
    on that folder finds every kernel there and compiles nothing new."""
    cold = cli.first_call_seconds(str(tmp_path))
    assert list(cold) == ["import", *FIRST_CALLS] and all(v > 0 for v in cold.values())
    cached = sorted(p.name for p in tmp_path.rglob("*.nbc"))
    assert len(cached) > 20
    warm = cli.first_call_seconds(str(tmp_path))
    assert list(warm) == list(cold)
    assert sorted(p.name for p in tmp_path.rglob("*.nbc")) == cached  # nothing recompiled
    # The command's report of those two runs (measured above; one cold compile is enough).
    runs = iter([cold, warm, warm])
    monkeypatch.setattr(cli, "first_call_seconds", lambda cache_dir=None: next(runs))
    assert cli.main(["info", "--first-call"]) == 0
    out = " ".join(capsys.readouterr().out.split())
    for text in ["first calls, cold cache", f"{sum(cold.values()) - cold['import']:.2f} s",
                 "first calls, warm cache", f"{warm['import']:.2f} s of import"]:
        assert text in out, text


def test_console_script_entry_point():
    result = subprocess.run([sys.executable, "-m", "fastconv.cli", "--version"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and result.stdout.startswith("fastconv ")
