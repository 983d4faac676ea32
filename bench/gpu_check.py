"""One command for a GPU session: CUDA tests, compute-sanitizer, and the GPU benchmark.

    python bench/gpu_check.py [--out DIR] [--quick]

Runs, in order, and prints a short table at the end:
1. the CUDA tests (``pytest -m cuda``: fastconv against cuDNN, 2x-of-cuDNN error bound);
2. ``compute-sanitizer`` memcheck and racecheck over ``--smoke``, a small run that launches
   every kernel of both sources in every dtype and index width;
3. ``fastconv bench --device cuda``: float32 forward and forward+backward, float16 and
   bfloat16 forward, on the ResNet-50 shapes and pooling, side by side with cuDNN, with the
   JSON reports written to ``--out``.
Exit status 0 only if every step passed. ``--quick`` skips racecheck (slow) and times fewer
rounds.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def smoke() -> int:
    """Launch every kernel once on small inputs (the sanitizer's workload)."""
    import torch

    import fastconv
    from fastconv.cuda import _launch

    launched = set()
    backend = _launch.backend()
    real = backend.launch

    def record(device_index, op, dtype, name, grid, block, args):
        launched.add(name)
        return real(device_index, op, dtype, name, grid, block, args)

    backend.launch = record
    gen = torch.Generator().manual_seed(0)
    convs = [((2, 8, 9, 11), (12, 8, 3, 3), dict(padding=1, stride=(1, 2))),
             ((2, 16, 6, 6), (24, 16, 1, 1), {}),
             ((2, 8, 9, 9), (16, 1, 3, 3), dict(padding=1, groups=8)),      # direct dx
             ((2, 8, 9, 9), (8, 1, 3, 3), dict(padding=1, groups=8)),       # depthwise dx
             ((8, 4, 40, 40), (8, 4, 3, 3), dict(padding=1)),       # split-K weight gradient
             ((1, 130, 12, 12), (140, 130, 3, 3), dict(padding=1))]  # several M tiles
    for limit in (_launch.INT32_LIMIT, 0):  # 32- and then 64-bit index instantiations
        _launch.INT32_LIMIT = limit
        for dtype in _launch.DTYPES:
            for xs, ws, opts in convs:
                x = torch.randn(xs, generator=gen).to("cuda", dtype).requires_grad_()
                w = torch.randn(ws, generator=gen).to("cuda", dtype).requires_grad_()
                b = torch.randn(ws[0], generator=gen).to("cuda", dtype).requires_grad_()
                fastconv.conv2d(x, w, b, **opts).sum().backward()
            x = torch.randn(2, 3, 13, 12, generator=gen).to("cuda", dtype).requires_grad_()
            y = fastconv.max_pool2d(x, 3, 2, 1, dilation=(1, 2), ceil_mode=True)
            (gx,) = torch.autograd.grad(y.square().sum(), x, create_graph=True)
            gx.sum().backward()  # double backward: max_pool2d_double_backward
            fastconv.max_pool2d(x.detach(), 2)
            fastconv.avg_pool2d(x, 3, 2, 1, count_include_pad=False).sum().backward()
    torch.cuda.synchronize()
    expected = {n for op in _launch.SOURCES for d in _launch.DTYPES
                for n in _launch.instantiations(op, d)}
    kernels = {n.split("<")[0] for n in expected}
    missing = kernels - {n.split("<")[0] for n in launched}
    print(f"smoke: {len(launched)} instantiations launched, covering "
          f"{len(kernels) - len(missing)} of {len(kernels)} kernels")
    if missing:
        print("smoke: never launched:", ", ".join(sorted(missing)))
    return 1 if missing else 0


def _step(name, cmd, log_dir, env=None):
    print(f"\n=== {name}: {' '.join(cmd)}", flush=True)
    start = time.perf_counter()
    log = log_dir / (name.replace(" ", "_") + ".log")
    with open(log, "w") as f:
        proc = subprocess.run(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True, env=env)
        f.write(proc.stdout)
    tail = "\n".join(proc.stdout.strip().splitlines()[-15:])
    print(tail)
    return dict(step=name, ok=proc.returncode == 0, rc=proc.returncode,
                seconds=time.perf_counter() - start, log=str(log))


def _geomeans(report_path: Path) -> str:
    try:
        report = json.loads(report_path.read_text())
    except (OSError, ValueError):
        return "no report"
    from fastconv import benchmark

    means = benchmark.summary(benchmark.paired_rows(report))
    parts = [f"{name} {value:.2f}x" for name, value in means.items()
             if name != "all" and value is not None]
    return ", ".join(parts) or "no ratios"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="gpu_check_out", help="folder for logs and JSON reports")
    p.add_argument("--quick", action="store_true", help="no racecheck, fewer bench rounds")
    p.add_argument("--smoke", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.smoke:
        return smoke()

    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    py = sys.executable
    results = [_step("cuda tests", [py, "-m", "pytest", "-q", "-m", "cuda", "-p",
                                    "no:cacheprovider", "tests"], out)]
    sanitizer = shutil.which("compute-sanitizer")
    tools = ["memcheck"] + ([] if args.quick else ["racecheck"])
    for tool in tools:
        if sanitizer is None:
            results.append(dict(step=f"sanitizer {tool}", ok=False, rc=None, seconds=0,
                                log="compute-sanitizer not on PATH"))
            continue
        results.append(_step(f"sanitizer {tool}",
                             [sanitizer, "--tool", tool, "--error-exitcode", "9",
                              py, str(Path(__file__).resolve()), "--smoke"], out))
    rounds = "5" if args.quick else "20"
    reports = {}
    for dtype, passname in (("float32", "both"), ("float16", "fwd"), ("bfloat16", "fwd")):
        report = out / f"bench_cuda_{dtype}.json"
        reports[dtype] = report
        results.append(_step(f"bench {dtype}",
                             [py, "-m", "fastconv.cli", "bench", "--device", "cuda", "--dtype",
                              dtype, "--pass", passname, "--rounds", rounds, "--warmup", "3",
                              "--json", str(report)], out))

    print("\n=== summary")
    width = max(len(r["step"]) for r in results)
    for r in results:
        extra = ""
        if r["step"].startswith("bench "):
            extra = "  geomean speed-up vs cuDNN: " + _geomeans(reports[r["step"].split()[1]])
        print(f"{r['step']:<{width}}  {'PASS' if r['ok'] else 'FAIL'}  {r['seconds']:7.1f} s"
              f"{extra}  ({r['log']})")
    (out / "gpu_check.json").write_text(json.dumps(results, indent=2))
    return 0 if all(r["ok"] for r in results) else 1


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
