"""The benchmark tooling cannot rot: the suite, the `fastconv bench` path end to end on tiny
shapes, the correctness gate, the comparison, and the pytest-benchmark files."""

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from fastconv import benchmark, cli

REPO = Path(__file__).resolve().parent.parent


def test_suite_has_the_named_shapes():
    suite = benchmark.load_suite()
    conv = {s.name: s for s in suite.CONV_SHAPES}
    expect = {  # name: (cin, cout, hw, k, stride, padding, dilation, groups)
        "lenet-conv1": (1, 6, 28, 5, 1, 2, 1, 1), "lenet-conv2": (6, 16, 14, 5, 1, 0, 1, 1),
        "resnet-stem-7x7s2": (3, 64, 224, 7, 2, 3, 1, 1),
        "resnet-3x3-64": (64, 64, 56, 3, 1, 1, 1, 1),
        "resnet-1x1-256to64": (256, 64, 56, 1, 1, 0, 1, 1),
        "resnet-3x3s2-128": (128, 128, 56, 3, 2, 1, 1, 1),
        "resnet-3x3-256": (256, 256, 14, 3, 1, 1, 1, 1),
        "resnet-1x1-512to2048": (512, 2048, 7, 1, 1, 0, 1, 1),
        "vgg-3x3-128": (128, 128, 112, 3, 1, 1, 1, 1),
        "depthwise-3x3-256": (256, 256, 28, 3, 1, 1, 1, 256),
        "dilated-3x3-d2": (64, 64, 56, 3, 1, 2, 2, 1)}
    for name, fields in expect.items():
        s = conv[name]
        assert (s.cin, s.cout, s.hw, s.k, s.stride, s.padding, s.dilation, s.groups) == fields
        assert s.batch["cuda"] >= 32 and 1 <= s.batch["cpu"] <= s.batch["cuda"]
    assert conv["resnet-3x3s2-128"].out_hw() == 28
    pool = {s.name: s for s in suite.POOL_SHAPES}
    assert (pool["maxpool-3x3s2-64x112"].c, pool["maxpool-3x3s2-64x112"].hw) == (64, 112)
    assert (pool["avgpool-2x2s2-64x56"].mode, pool["avgpool-2x2s2-64x56"].k) == ("avg", 2)


def test_select_leaves_smoke_shapes_out_unless_named():
    default = benchmark.select_shapes()
    assert default and not any("smoke" in s.tags for s in default)
    smoke = benchmark.select_shapes("smoke")
    assert {s.op for s in smoke} == {"conv2d", "max_pool2d", "avg_pool2d"}
    assert all("smoke" in s.tags for s in smoke)
    assert [s.name for s in benchmark.select_shapes("lenet", ("conv2d",))] == [
        "lenet-conv1", "lenet-conv2"]


def test_flops_and_bytes():
    s = next(s for s in benchmark.load_suite().CONV_SHAPES if s.name == "resnet-3x3-64")
    assert s.flops(8) == 2 * 8 * 64 * 56 * 56 * 64 * 9
    assert s.flops(8, "fwdbwd") == 3 * s.flops(8)
    p = next(s for s in benchmark.load_suite().POOL_SHAPES if s.name == "avgpool-2x2s2-64x56")
    assert p.bytes(32) == 4 * 32 * 64 * (56 * 56 + 28 * 28)
    assert p.bytes(32, passname="fwdbwd") == 2 * p.bytes(32)


@pytest.mark.parametrize("passname", benchmark.PASSES)
def test_gate_passes_fastconv_and_catches_a_wrong_kernel(monkeypatch, passname):
    shape = benchmark.select_shapes("smoke-conv")[0]
    assert benchmark.check_case(shape, passname) <= 1.0
    # A kernel that is off by one part in 1e4 in its weights must not be timed.
    wrong = {**benchmark.FUNCTIONS["conv2d"],
             "fastconv": lambda x, w, **kw: F.conv2d(x, w * (1 + 1e-4), **kw)}
    monkeypatch.setitem(benchmark.FUNCTIONS, "conv2d", wrong)
    with pytest.raises(benchmark.WrongResult, match="smoke-conv-3x3"):
        benchmark.check_case(shape, passname)
    record = benchmark.run_case(shape, "fastconv", passname, "cpu", torch.float32, 1, 0)
    assert record["status"] == "wrong" and record["median_s"] is None


def test_records_the_algorithms_fastconv_chose(monkeypatch):
    """A CPU fastconv case records, per engine pass whose algorithm its first call measured,
    the choice and the candidates' times, and the table shows the choices under its time."""
    from fastconv.cpu import _autotune

    conv_shape = type(benchmark.select_shapes("smoke-conv")[0])  # the suite's ConvShape

    monkeypatch.setattr(_autotune, "MIN_FLOPS", 0)  # measure this small layer
    shape = conv_shape("winograd-or-tiles", 16, 16, 14, 3, padding=1, batch={"cpu": 2})
    record = benchmark.run_case(shape, "fastconv", "fwdbwd", "cpu", torch.float32, 1, 0)
    made = record["algorithms"]
    assert set(made) == {"conv2d_forward", "conv2d_backward_input", "conv2d_backward_weight"}
    for name, choice in made.items():  # the weight gradient also offers im2col + BLAS
        assert set(choice["seconds"]) == {"winograd", "winograd4", "tiles"} | (
            {"gemm"} if name == "conv2d_backward_weight" else set())
        assert choice["chosen"] in choice["seconds"]
    theirs = benchmark.run_case(shape, "torch", "fwdbwd", "cpu", torch.float32, 1, 0)
    assert "algorithms" not in theirs
    report = dict(settings={}, peaks=None, results=[record, theirs])
    cell = benchmark._cell(record) + benchmark._algorithms(record)
    assert f"fwd {made['conv2d_forward']['chosen']}, dx " in cell
    assert benchmark.results_table(report).row_count > 0


def test_gate_catches_a_wrong_gradient(monkeypatch):
    shape = benchmark.select_shapes("smoke-maxpool")[0]

    def forward_right_backward_wrong(x, **kw):
        y = F.max_pool2d(x, **kw)
        return y + 1e-3 * (y - y.detach())  # same values, gradient scaled by 1.001

    monkeypatch.setitem(benchmark.FUNCTIONS, "max_pool2d",
                        {**benchmark.FUNCTIONS["max_pool2d"],
                         "fastconv": forward_right_backward_wrong})
    assert benchmark.check_case(shape, "fwd") <= 1.0
    with pytest.raises(benchmark.WrongResult, match="grad input"):
        benchmark.check_case(shape, "fwdbwd")


def test_fastconv_bench_end_to_end(tmp_path, capsys):
    report_path, png = tmp_path / "run.json", tmp_path / "speedups.png"
    rc = cli.main(["bench", "--shapes", "smoke", "--rounds", "2", "--warmup", "1",
                   "--json", str(report_path), "--plot", str(png)])
    out = capsys.readouterr().out
    assert rc == 0, out
    for text in ["smoke-conv-3x3", "smoke-maxpool-3x3s2", "smoke-avgpool-2x2s2", "GFLOP/s",
                 "GB/s", "geometric mean (fwd)", "geometric mean (fwdbwd)", "ceilings measured"]:
        assert text in out, text
    report = json.loads(report_path.read_text())
    assert report["schema"] == benchmark.SCHEMA
    assert report["peaks"]["gemm_gflops"] > 0 and report["peaks"]["copy_gbs"] > 0
    results = report["results"]
    assert len(results) == 3 * 2 * 2
    assert {(r["shape"], r["pass"], r["impl"]) for r in results} == {
        (s, p, i) for s in ["smoke-conv-3x3", "smoke-maxpool-3x3s2", "smoke-avgpool-2x2s2"]
        for p in benchmark.PASSES for i in benchmark.IMPLS}
    for r in results:
        assert r["status"] == "ok" and len(r["times_s"]) == 2 and r["median_s"] > 0
        assert r["bytes"] > 0 and bool(r["flops"]) == (r["op"] == "conv2d")
    rows = benchmark.paired_rows(report)
    assert all(r["speedup"] > 0 for r in rows) and len(rows) == 6
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # The comparison: the run against itself has no regression; against a saved run where
    # fastconv took a nanosecond, every fastconv case is one (and no PyTorch case is).
    assert benchmark.compare(report, report) and not any(
        c["regression"] for c in benchmark.compare(report, report))
    faster = copy.deepcopy(report)
    for r in faster["results"]:
        r["median_s"] = 1e-9 if r["impl"] == "fastconv" else 1e3
    old = tmp_path / "old.json"
    old.write_text(json.dumps(faster))
    changes = benchmark.compare(faster, report)
    assert sum(c["regression"] for c in changes) == 6
    assert not any(c["regression"] for c in changes if c["impl"] == "torch")
    rc = cli.main(["bench", "--shapes", "smoke-conv", "--pass", "fwd", "--rounds", "1",
                   "--json", "", "--compare", str(old), "--fail-on-regression"])
    out = capsys.readouterr().out
    assert rc == 3 and "1 regression(s)" in out


def test_bench_exit_code_when_fastconv_is_wrong(monkeypatch, capsys):
    wrong = {**benchmark.FUNCTIONS["avg_pool2d"], "fastconv": lambda x, **kw: F.avg_pool2d(
        x, **kw) * 1.01}
    monkeypatch.setitem(benchmark.FUNCTIONS, "avg_pool2d", wrong)
    rc = cli.main(["bench", "--shapes", "smoke-avgpool", "--pass", "fwd", "--rounds", "1",
                   "--json", ""])
    out = capsys.readouterr().out
    assert rc == 1 and "WRONG" in out


def test_bench_rejects_an_unknown_shape(capsys):
    assert cli.main(["bench", "--shapes", "no-such-layer", "--json", ""]) == 2
    assert "no-such-layer" in capsys.readouterr().out


def _pytest_bench(*args, tmp_path):
    # Not an xdist worker's environment: pytest-benchmark reads PYTEST_XDIST_WORKER and then
    # turns benchmarking off, which --benchmark-only refuses.
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST_XDIST")}
    env["PYTHONPATH"] = str(REPO)
    return subprocess.run([sys.executable, "-m", "pytest", "bench", "-q", "-p", "no:cacheprovider",
                           "--shapes", "smoke", *args], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=600)


def test_pytest_benchmark_files_run_with_benchmarks_disabled(tmp_path):
    result = _pytest_bench("--benchmark-disable", tmp_path=tmp_path)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-2000:]
    # 3 smoke shapes x 2 passes x 2 impls, the demo image x 3, the two ceilings, the 5 call paths
    assert "22 passed" in result.stdout, result.stdout[-1000:]


def test_pytest_benchmark_json_feeds_the_report(tmp_path):
    out = tmp_path / "pb.json"
    result = _pytest_bench("--benchmark-only", f"--benchmark-json={out}", "-k",
                           "not demo_image and not call_overhead", tmp_path=tmp_path)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-2000:]
    data = json.loads(out.read_text())
    infos = [b["extra_info"] for b in data["benchmarks"]]
    assert {i["op"] for i in infos} == {"conv2d", "max_pool2d", "avg_pool2d", "copy", "gemm"}
    assert all(i["bytes"] > 0 for i in infos if i["op"] != "gemm")
    assert all("flops" in i and "shape" in i for i in infos if i["op"] == "conv2d")
    report = benchmark.from_pytest_benchmark(data)
    assert set(report["peaks"]) == {"copy_gbs", "gemm_gflops"}
    assert len(benchmark.paired_rows(report)) == 6
    text = subprocess.run([sys.executable, str(REPO / "bench" / "report.py"), str(out)],
                          capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": str(REPO)})
    assert text.returncode == 0 and "geometric mean (all)" in text.stdout, text.stderr


def test_gpu_check_script_runs_its_cli():
    """bench/gpu_check.py needs a GPU to do its work; here, that it parses and documents it."""
    result = subprocess.run([sys.executable, str(REPO / "bench" / "gpu_check.py"), "--help"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    for word in ("--out", "--quick"):
        assert word in result.stdout
