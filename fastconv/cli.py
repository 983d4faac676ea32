"""The ``fastconv`` command: ``demo`` (the seed lesson end to end, then a real model on real
data), ``bench`` (the shape suite against PyTorch), ``profile`` (training steps under
torch.profiler) and ``info``."""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

import fastconv
from fastconv import reference

console = Console(highlight=False, soft_wrap=True)


def _median_seconds(fn, repeat: int) -> float:
    fn()  # warm-up: JIT load, allocator, caches
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def band_image(h: int = 6, w: int = 8) -> torch.Tensor:
    """The seed's image: ones with a vertical band of zeros in columns 2..w-3."""
    X = torch.ones((h, w))
    X[:, 2:w - 2] = 0
    return X


def learn_edge_kernel(lr: float = 3e-2, tol: float = 1e-2, max_steps: int = 500, seed: int = 0):
    """Train ``Conv2D(1, 1, (1, 2), bias=False)`` on the seed's (X, Y) by plain gradient descent.

    Stops once every weight is within ``tol`` of the edge kernel ``[1, -1]``. Returns
    ``(layer, losses)``: losses[i] is the summed squared error at step i + 1.
    """
    torch.manual_seed(seed)
    X = band_image()
    K = torch.tensor([[1.0, -1.0]])
    Y = reference.corr2d(X, K)
    X, Y = X.reshape(1, 1, 6, 8), Y.reshape(1, 1, 6, 7)
    layer = fastconv.Conv2D(1, 1, kernel_size=(1, 2), bias=False)
    target = K.reshape(1, 1, 1, 2)
    losses = []
    for _ in range(max_steps):
        loss = ((layer(X) - Y) ** 2).sum()
        layer.zero_grad()
        loss.backward()
        with torch.no_grad():
            layer.weight -= lr * layer.weight.grad
        losses.append(loss.item())
        if (layer.weight.detach() - target).abs().max() < tol:
            break
    return layer, losses


def demo(args) -> int:
    console.rule("[bold]1. Edge detection: cross-correlation with K = [1, -1]")
    X = band_image()
    K = torch.tensor([[1.0, -1.0]])
    Y = fastconv.conv2d(X[None, None], K[None, None])[0, 0]
    console.print("X (6x8, a band of zeros):\n", X)
    console.print("fastconv.conv2d(X, K): +1 where 1 turns to 0, -1 where 0 turns to 1\n", Y)
    if not torch.equal(Y, reference.corr2d(X, K)):
        console.print("[red]fastconv disagrees with the seed's corr2d")
        return 1

    console.rule("[bold]2. Learning the kernel from (X, Y) by gradient descent")
    layer, losses = learn_edge_kernel(seed=args.seed)
    table = Table("step", "loss (sum of squares)")
    for step, loss in enumerate(losses, 1):
        if step % 2 == 0 or step == len(losses):
            table.add_row(str(step), f"{loss:.6f}")
    console.print(table)
    learned = layer.weight.detach().reshape(-1)
    converged = (learned - K.reshape(-1)).abs().max().item() < 1e-2
    console.print(f"learned kernel {learned.tolist()} after {len(losses)} steps "
                  f"({'within' if converged else '[red]NOT within'} 1e-2 of [1, -1])")
    if not converged:
        return 1

    console.rule(f"[bold]3. Timing on a {args.size}x{args.size} image")
    big = torch.rand(args.size, args.size)
    x4, k4 = big[None, None], K[None, None]
    start = time.perf_counter()
    y_seed = reference.corr2d(big, K)
    t_seed = time.perf_counter() - start
    t_fast = _median_seconds(lambda: fastconv.conv2d(x4, k4), args.repeat)
    t_torch = _median_seconds(lambda: torch.nn.functional.conv2d(x4, k4), args.repeat)
    same = torch.allclose(fastconv.conv2d(x4, k4)[0, 0], y_seed, rtol=1e-6, atol=1e-6)
    table = Table("implementation", "time", "speed-up over the seed loop")
    table.add_row("seed loop corr2d (1 run)", f"{t_seed * 1e3:.1f} ms", "1x")
    table.add_row(f"fastconv.conv2d (median of {args.repeat})", f"{t_fast * 1e3:.3f} ms",
                  f"{t_seed / t_fast:,.0f}x")
    table.add_row(f"torch F.conv2d (median of {args.repeat})", f"{t_torch * 1e3:.3f} ms",
                  f"{t_seed / t_torch:,.0f}x")
    console.print(table)
    console.print("fastconv matches the seed loop" if same else "[red]fastconv != seed loop")
    if not same:
        return 1
    return _demo_digits(args) or _demo_resnet()


def _demo_digits(args) -> int:
    """Part 2: a LeNet-style CNN of fastconv layers on sklearn's digits, beside torch.nn."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from fastconv.examples import digits

    console.rule("[bold]4. A real model: LeNet on scikit-learn's handwritten digits")
    console.print("1,797 8x8 images shipped with scikit-learn (75% train, 25% test); the same "
                  "model, initial weights and batches on fastconv layers and on torch.nn")
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                  TimeElapsedColumn(), console=console) as bar:
        task = bar.add_task("training", total=2 * args.epochs)

        def progress(description):
            bar.update(task, description=description)
            bar.advance(task)

        ours, theirs = digits.train(epochs=args.epochs, seed=args.seed, progress=progress)
    table = Table("epoch", "fastconv loss", "fastconv test acc.", "fastconv s",
                  "torch.nn loss", "torch.nn test acc.", "torch.nn s")
    for e in range(args.epochs):
        table.add_row(str(e + 1), f"{ours.loss[e]:.4f}", f"{ours.accuracy[e]:.1%}",
                      f"{ours.seconds[e]:.3f}", f"{theirs.loss[e]:.4f}",
                      f"{theirs.accuracy[e]:.1%}", f"{theirs.seconds[e]:.3f}")
    console.print(table)
    console.print(f"per-epoch training time, median: fastconv "
                  f"{statistics.median(ours.seconds):.3f} s, torch.nn "
                  f"{statistics.median(theirs.seconds):.3f} s")
    if args.plot:
        console.print(f"loss and accuracy curves: {digits.plot((ours, theirs), args.plot)}")
    final = ours.accuracy[-1]
    ok = final >= 0.95
    console.print(f"fastconv LeNet test accuracy {final:.1%} "
                  f"({'>=' if ok else '[red]below'} 95%), torch.nn {theirs.accuracy[-1]:.1%}")
    return 0 if ok else 1


def _demo_resnet() -> int:
    """Part 3: fastconv.convert on a torchvision-free ResNet-18."""
    from fastconv.examples import resnet

    console.rule("[bold]5. fastconv.convert on ResNet-18")
    r = resnet.convert_and_check()
    close = r["max_diff"] <= 1e-4 * max(1.0, r["scale"])
    console.print(f"{r['swapped']} layers now compute with fastconv; eval-mode outputs differ "
                  f"from the original's by at most {r['max_diff']:.2e} "
                  f"({'matches' if close else '[red]MISMATCH'}); one SGD training step: loss "
                  f"{r['loss_before']:.4f} -> {r['loss_after']:.4f}")
    trained = r["loss_after"] < r["loss_before"]
    return 0 if close and trained else 1


def _numba_cache() -> tuple[str, int]:
    """Where the CPU engine's compiled kernels are cached on disk, and how many are there."""
    import numba

    import fastconv.cpu

    folder = Path(numba.config.CACHE_DIR) if numba.config.CACHE_DIR \
        else Path(fastconv.cpu.__file__).parent / "__pycache__"
    return str(folder), len(list(folder.glob("*.nbi"))) if folder.is_dir() else 0


def first_call_seconds(cache_dir: str | None = None) -> dict[str, float]:
    """``fastconv._first_call`` in a fresh process: seconds to import and for each first call;
    with ``cache_dir``, Numba's cache is that folder (empty: a cold compile)."""
    from fastconv._first_call import PROBE

    env = dict(os.environ)
    if cache_dir is not None:
        env["NUMBA_CACHE_DIR"] = cache_dir
    result = subprocess.run([sys.executable, "-c", PROBE], env=env,
                            capture_output=True, text=True, check=False)
    if result.returncode:
        raise RuntimeError(f"fastconv._first_call failed:\n{result.stderr[-2000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def _first_call_rows():
    """Rows for ``fastconv info --first-call``: a cold compile (an empty cache folder), then a
    new process with the real cache warm (run once first, in case it was not)."""
    def summary(seconds):
        calls = {k: v for k, v in seconds.items() if k != "import"}
        slowest = max(calls, key=calls.get)
        return (f"{sum(calls.values()):.2f} s for the {len(calls)} first calls (slowest: "
                f"{slowest}, {calls[slowest]:.2f} s), after {seconds['import']:.2f} s of import")

    with console.status("first calls with an empty Numba cache (compiling everything)..."):
        with tempfile.TemporaryDirectory() as empty:
            cold = first_call_seconds(empty)
    with console.status("first calls with the Numba cache warm..."):
        first_call_seconds()
        warm = first_call_seconds()
    return [("first calls, cold cache", summary(cold)),
            ("first calls, warm cache", summary(warm))]


def info(args) -> int:
    from fastconv.cpu import _runtime
    import fastconv.cuda
    from fastconv.cuda import cupy_status, kernel_dir

    import numba
    import numpy

    # Run one tiny conv so Numba has launched its threading layer and the BLAS is loaded.
    fastconv.conv2d(torch.zeros(1, 1, 2, 2), torch.zeros(1, 1, 1, 1))
    table = Table("component", "status", show_header=False)
    table.add_row("fastconv", fastconv.__version__)
    table.add_row("python", f"{platform.python_version()} ({sys.executable})")
    table.add_row("torch", f"{torch.__version__}, {torch.get_num_threads()} threads")
    table.add_row("numpy", numpy.__version__)
    table.add_row("numba", f"{numba.__version__}, threading layer "
                  f"{_runtime.threading_layer()}, {numba.config.NUMBA_NUM_THREADS} threads at most")
    for lib in _runtime.blas_info():
        table.add_row("BLAS (the engine's GEMMs)", f"{lib['internal_api']} {lib.get('version')}, "
                      f"{lib['num_threads']} threads, {lib['filepath']}")
    table.add_row("CPU engine", f"usable, {_runtime.engine_threads()} threads "
                  f"(follows torch.set_num_threads)")
    cache = _runtime.cache_info()
    table.add_row("CPU output cache", f"outputs of {_runtime._CACHE_FROM >> 20} MiB and up reuse "
                  f"freed ones; {cache['limit'] / 2**20:.0f} MiB may stay idle "
                  f"(FASTCONV_CACHE_MB), {cache['idle'] / 2**20:.0f} MiB idle now")
    table.add_row("CPU heap (glibc malloc)",
                  f"blocks under {_runtime._MMAP_THRESHOLD >> 20} MiB from the heap, up to "
                  f"{_runtime.MALLOC_KEEP / 2**20:.0f} MiB of it kept mapped when free "
                  f"(FASTCONV_MALLOC_KEEP_MB)"
                  if _runtime.MALLOC_KEEP else "malloc's settings as they were "
                  "(FASTCONV_MALLOC_KEEP_MB=0, or not glibc)")
    usable, why = cupy_status()
    table.add_row("CuPy", why)
    if torch.cuda.is_available():
        index = torch.cuda.current_device()
        props = torch.cuda.get_device_properties(index)
        table.add_row("GPU", f"{props.name}, compute capability {props.major}.{props.minor}, "
                      f"{props.multi_processor_count} SMs, {props.total_memory / 2**30:.0f} GiB "
                      f"(cuda:{index} of {torch.cuda.device_count()})")
        table.add_row("CUDA (torch)", f"{torch.version.cuda}, cuDNN {torch.backends.cudnn.version()}")
    else:
        table.add_row("GPU", "none visible to torch")
    if usable:
        import cupy

        nvrtc = ".".join(str(v) for v in cupy.cuda.nvrtc.getVersion())
        runtime = cupy.cuda.runtime.runtimeGetVersion()
        table.add_row("NVRTC / CUDA runtime (CuPy)",
                      f"{nvrtc} / {runtime // 1000}.{runtime % 1000 // 10}")
    cache, entries = _numba_cache()
    table.add_row("Numba cache", f"{cache} ({entries} compiled kernels)")
    if args.first_call:
        for label, row in _first_call_rows():
            table.add_row(label, row)
    ok, reason = fastconv.cuda.available()
    table.add_row("CUDA engine", "usable: kernels compile on first use (NVRTC) and are cached "
                  "by CuPy" if ok else f"not usable: {reason}")
    try:
        table.add_row("CUDA sources", str(kernel_dir()))
    except FileNotFoundError as exc:
        table.add_row("CUDA sources", f"[red]{exc}")
    console.print(table)
    return 0


def bench(args) -> int:
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from fastconv import benchmark

    dtype = benchmark.DTYPES[args.dtype]
    passes = benchmark.PASSES if args.passname == "both" else (args.passname,)
    shapes = benchmark.select_shapes(args.shapes)
    if not shapes:
        console.print(f"[red]no shape in the suite matches --shapes {args.shapes!r}")
        return 2
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        console.print("[red]--device cuda: no CUDA device is visible to torch")
        return 2
    total = benchmark.case_count(shapes, passes) + 1
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                  TimeElapsedColumn(), console=console, transient=True,
                  disable=not console.is_terminal) as bar:
        task = bar.add_task("fastconv bench", total=total)

        def progress(description):
            bar.update(task, description=description)
            bar.advance(task)

        report = benchmark.run_suite(shapes, args.device, dtype, passes, args.rounds,
                                     args.warmup, tf32=args.tf32, progress=progress)
    peaks = report["peaks"]
    # Logs and pipes get the full table instead of an 80-column squeeze.
    tables = console if console.is_terminal else Console(highlight=False, width=150)
    tables.print(benchmark.results_table(report))
    console.print(f"ceilings measured in this run: {peaks['gemm_gflops']:.1f} GFLOP/s "
                  f"({peaks['gemm']}), {peaks['copy_gbs']:.1f} GB/s ({peaks['copy']}); "
                  f"{report['machine']['cpu']}, {torch.get_num_threads()} torch threads"
                  + (f"; {report['machine']['gpu']}" if "gpu" in report["machine"] else ""))
    for r in report["results"]:
        if r["status"] != "ok":
            console.print(f"[{'red' if r['status'] == 'wrong' else 'yellow'}]{r['shape']} "
                          f"{r['pass']} {r['impl']}: {r['status']}: {r['error']}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)
        console.print(f"JSON report: {args.json}")
    if args.plot:
        console.print(f"plot: {benchmark.plot(report, args.plot)}")
    rc = 1 if any(r["status"] == "wrong" for r in report["results"]) else 0
    if args.compare:
        changes = benchmark.compare(benchmark.load_report(args.compare), report, args.threshold)
        tables.print(benchmark.compare_table(changes, args.threshold))
        regressions = [c for c in changes if c["regression"]]
        console.print(f"{len(regressions)} regression(s) against {args.compare}")
        if regressions and args.fail_on_regression:
            rc = rc or 3
    return rc


def profile(args) -> int:
    from fastconv import profiler

    if args.device.startswith("cuda") and not torch.cuda.is_available():
        console.print("[red]--device cuda: no CUDA device is visible to torch")
        return 2
    profiler.run(args.device, args.steps, args.batch, args.out, args.top, console=console)
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="fastconv", description=fastconv.__doc__.split("\n")[0])
    parser.add_argument("--version", action="version", version=f"fastconv {fastconv.__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("demo", help="the seed lesson end to end (edge detection, learning a "
                                    "kernel, timing), then LeNet trained on the digits beside "
                                    "torch.nn, and ResNet-18 converted")
    p.add_argument("--size", type=int, default=256, help="side of the timing image (default 256)")
    p.add_argument("--repeat", type=int, default=20, help="timed runs for the fast versions")
    p.add_argument("--seed", type=int, default=0, help="random seed (kernel, weights, split)")
    p.add_argument("--epochs", type=int, default=15, help="digits training epochs (default 15)")
    p.add_argument("--plot", default="fastconv-digits.png", metavar="PNG",
                   help="save the digits loss/accuracy curves here ('' for none)")
    p.set_defaults(func=demo)
    p = sub.add_parser("bench", help="time the shape suite against PyTorch: a table, JSON, "
                                     "a plot, a comparison with an earlier run")
    p.add_argument("--device", default="cpu", help="cpu (default) or cuda[:N]")
    p.add_argument("--dtype", default="float32", choices=["float32", "float64", "float16",
                                                          "bfloat16"])
    p.add_argument("--shapes", default=None,
                   help="comma-separated substrings of shape names (default: the whole suite; "
                        "'smoke' selects the tiny shapes)")
    p.add_argument("--pass", dest="passname", default="both", choices=["fwd", "fwdbwd", "both"])
    p.add_argument("--rounds", type=int, default=5, help="timed calls per case (median taken)")
    p.add_argument("--warmup", type=int, default=2, help="untimed calls per case first")
    p.add_argument("--tf32", action="store_true",
                   help="let PyTorch's float32 baseline use TF32 on the GPU (default: off)")
    p.add_argument("--json", default="fastconv-bench.json", metavar="PATH",
                   help="write the report here (default fastconv-bench.json; '' for none)")
    p.add_argument("--plot", default=None, metavar="PNG", help="save a chart of the speed-ups")
    p.add_argument("--compare", default=None, metavar="JSON",
                   help="an earlier report (or pytest-benchmark JSON) to compare with")
    p.add_argument("--threshold", type=float, default=0.10,
                   help="slower by more than this fraction counts as a regression (0.10)")
    p.add_argument("--fail-on-regression", action="store_true",
                   help="exit with status 3 if --compare finds a regression")
    p.set_defaults(func=bench)
    p = sub.add_parser("profile", help="training steps of a small CNN, fastconv and torch.nn, "
                                       "under torch.profiler: Chrome traces and a summary")
    p.add_argument("--device", default="cpu", help="cpu (default) or cuda[:N]")
    p.add_argument("--steps", type=int, default=3, help="profiled training steps")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--out", default="fastconv-profile", help="folder for the Chrome traces")
    p.add_argument("--top", type=int, default=12, help="rows of the summary per model")
    p.set_defaults(func=profile)
    p = sub.add_parser("info", help="versions, engines and why an engine is unusable")
    p.add_argument("--first-call", action="store_true",
                   help="also time a new process's first calls: with an empty Numba cache "
                        "(the cold compile, about a minute) and with the cache warm")
    p.set_defaults(func=info)
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
