"""``fastconv bench``: the shape suite timed side by side with PyTorch, rated against the
machine's own measured ceilings, as a table, JSON, a plot, and a comparison with an earlier run.

The same case builders drive the pytest-benchmark files in ``bench/``, so both paths time the
same calls and gate them with the same correctness check.

Terms used throughout:
    speed-up = PyTorch median / fastconv median, from one run (above 1: fastconv is faster);
    rate = GFLOP/s (conv2d: 2 x multiply-adds, x3 for forward+backward) or GB/s (pooling: the
    bytes that must move, see ``bench/shapes.py``); % peak = rate / the ceiling measured in the
    same run (a torch.mm GEMM for FLOP/s, a large ``copy_`` for GB/s).
"""

from __future__ import annotations

import datetime as _dt
import importlib.util
import json
import math
import os
import platform
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

import fastconv
import fastconv.cpu

from ._args import DTypeError

SCHEMA = "fastconv-bench/1"
PASSES = ("fwd", "fwdbwd")
IMPLS = ("fastconv", "torch")
DTYPES = {"float32": torch.float32, "float64": torch.float64, "float16": torch.float16,
          "bfloat16": torch.bfloat16}
FUNCTIONS = {
    "conv2d": {"fastconv": fastconv.conv2d, "torch": F.conv2d},
    "max_pool2d": {"fastconv": fastconv.max_pool2d, "torch": F.max_pool2d},
    "avg_pool2d": {"fastconv": fastconv.avg_pool2d, "torch": F.avg_pool2d},
}
# Ceiling measurements: far beyond the last-level cache, so copy measures DRAM, not L3.
COPY_BYTES = {"cpu": 256 * 2**20, "cuda": 2**30}
GEMM_SIZE = {"cpu": 2048, "cuda": 8192}


class WrongResult(AssertionError):
    """fastconv disagreed with PyTorch beyond the dtype's tolerance; the case is not timed."""


# ---------------------------------------------------------------------------- the shape suite
_SUITE = None


def suite_path() -> Path:
    """``bench/shapes.py``: FASTCONV_BENCH_SUITE, else the copy shipped in the wheel, else the
    source checkout's."""
    env = os.environ.get("FASTCONV_BENCH_SUITE")
    candidates = [Path(env)] if env else []
    here = Path(__file__).resolve().parent
    candidates += [here / "_bench" / "shapes.py", here.parent / "bench" / "shapes.py"]
    for path in candidates:
        if path.is_file():
            return path
    raise FileNotFoundError(f"fastconv bench: no shape suite; looked in "
                            f"{', '.join(map(str, candidates))}")


def load_suite():
    """The shape-suite module (one module object per process, whoever loads it first)."""
    global _SUITE
    if _SUITE is None:
        name = "fastconv_bench_shapes"
        spec = importlib.util.spec_from_file_location(name, suite_path())
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module  # dataclasses look their module up while being created
        spec.loader.exec_module(module)
        _SUITE = module
    return _SUITE


def select_shapes(names: str | None = None, ops: tuple[str, ...] | None = None) -> list:
    """Shapes of the suite matching ``names`` (comma-separated substrings; default: all but
    the smoke shapes), optionally only those of ``ops``."""
    suite = load_suite()
    shapes = suite.select(suite.CONV_SHAPES + suite.POOL_SHAPES, names)
    return [s for s in shapes if ops is None or s.op in ops]


# ---------------------------------------------------------------------------- cases
@dataclass
class Case:
    """One timed call: ``run()`` executes it once (forward, or forward and backward)."""

    shape: object
    impl: str
    passname: str
    device: str
    dtype: torch.dtype
    batch: int
    run: Callable[[], object]

    def info(self) -> dict:
        """What a result record (and pytest-benchmark's ``extra_info``) says about the case."""
        itemsize = torch.empty((), dtype=self.dtype).element_size()
        return dict(op=self.shape.op, shape=self.shape.name, layer=self.shape.describe(),
                    impl=self.impl, **{"pass": self.passname}, device=self.device,
                    dtype=str(self.dtype).removeprefix("torch."), batch=self.batch,
                    flops=self.shape.flops(self.batch, self.passname),
                    bytes=self.shape.bytes(self.batch, itemsize, self.passname),
                    threads=torch.get_num_threads())

    def synced(self) -> Callable[[], None]:
        """``run`` that waits for the GPU: for timers that read a host clock."""
        return synced(self.run, self.device)


def synced(fn: Callable[[], object], device: str) -> Callable[[], object]:
    """``fn``, followed on a GPU by a wait for the device, so a host clock times its work."""
    if device == "cpu":
        return fn

    def run_and_wait():
        fn()
        torch.cuda.synchronize()

    return run_and_wait


def _operands(shape, device, dtype, requires_grad, seed):
    """Input (and weight) for ``shape``: unit normal input, weight scaled by fan-in so outputs
    stay O(1) in every dtype."""
    gen = torch.Generator(device="cpu").manual_seed(seed)
    batch = shape.batch[device.split(":")[0]]
    if shape.op == "conv2d":
        fan_in = shape.cin // shape.groups * shape.k ** 2
        x = torch.randn(batch, shape.cin, shape.hw, shape.hw, generator=gen)
        w = torch.randn(shape.cout, shape.cin // shape.groups, shape.k, shape.k,
                        generator=gen) * fan_in ** -0.5
        tensors = [x, w]
    else:
        tensors = [torch.randn(batch, shape.c, shape.hw, shape.hw, generator=gen)]
    return [t.to(device=device, dtype=dtype).requires_grad_(requires_grad) for t in tensors]


def make_case(shape, impl: str, passname: str, device: str = "cpu",
              dtype: torch.dtype = torch.float32, seed: int = 0) -> Case:
    """Build the operands once; the returned case's ``run`` is what gets timed."""
    fn = FUNCTIONS[shape.op][impl]
    opts = shape.options()
    tensors = _operands(shape, device, dtype, passname == "fwdbwd", seed)
    batch = tensors[0].shape[0]
    if passname == "fwd":
        def run():
            return fn(*tensors, **opts)
    else:
        with torch.no_grad():
            out_shape = FUNCTIONS[shape.op]["torch"](*tensors, **opts).shape
        gen = torch.Generator(device="cpu").manual_seed(seed + 1)
        grad = torch.randn(out_shape, generator=gen).to(device=device, dtype=dtype)

        def run():
            for t in tensors:
                t.grad = None
            fn(*tensors, **opts).backward(grad)

    return Case(shape, impl, passname, device, dtype, batch, run)


def _evaluate(fn, tensors, opts, grad_out):
    leaves = [t for t in tensors if t.requires_grad]
    out = fn(*tensors, **opts)
    grads = torch.autograd.grad(out, leaves, grad_out) if leaves else ()
    return [out.detach(), *grads]


def check_case(shape, passname: str, device: str = "cpu", dtype: torch.dtype = torch.float32,
               seed: int = 0, k: float = 4.0) -> float:
    """Gate a case: fastconv's output (and for ``fwdbwd`` every gradient) against PyTorch.

    Truth is PyTorch in float64. fastconv's worst error must be within ``k`` times PyTorch's own
    worst error at ``dtype`` plus 8 units of roundoff of the largest condition scale: the same
    op in float64 on the operands' absolute values (for a convolution, sum |x| |w| over an
    output's terms), the rule of the tests (``tests/helpers.py``, ``scale="tensor"``). A
    wrong index or a missing term misses it by orders of magnitude, a weight off by 1e-4 of
    itself by 12-22x on the suite's 3x3 layers; Winograd F(4x4, 3x3)'s rounding, which mixes
    a tile's terms, passes (it exceeded a bound of 8 ulp of the largest output by up to
    2.3x). Returns the worst ratio error / tolerance (<= 1); raises ``WrongResult``
    otherwise.
    """
    fwdbwd = passname == "fwdbwd"
    tensors = _operands(shape, device, dtype, fwdbwd, seed)
    opts = shape.options()
    grad = None
    if fwdbwd:
        with torch.no_grad():
            out_shape = FUNCTIONS[shape.op]["torch"](*tensors, **opts).shape
        grad = torch.randn(out_shape, generator=torch.Generator().manual_seed(seed + 1))
        grad = grad.to(device=device, dtype=torch.float64)

    def copies(to_dtype, transform=None):
        return [(t.detach() if transform is None else transform(t.detach())).to(to_dtype)
                .requires_grad_(fwdbwd) for t in tensors]

    g = None if grad is None else grad.to(dtype)
    ours = _evaluate(FUNCTIONS[shape.op]["fastconv"], copies(dtype), opts, g)
    theirs = _evaluate(FUNCTIONS[shape.op]["torch"], copies(dtype), opts, g)
    truth = _evaluate(FUNCTIONS[shape.op]["torch"], copies(torch.float64), opts, grad)
    scales = _evaluate(FUNCTIONS[shape.op]["torch"], copies(torch.float64, torch.abs), opts,
                       None if grad is None else grad.abs())
    eps = torch.finfo(dtype).eps
    worst = 0.0
    names = ["output", "grad input", "grad weight"]
    for name, o, t, tr, sc in zip(names, ours, theirs, truth, scales):
        if tr.numel() == 0:
            continue
        if o.shape != tr.shape:
            raise WrongResult(f"{shape.name} {passname}: {name} has shape {tuple(o.shape)}, "
                              f"PyTorch's is {tuple(tr.shape)}")
        err = (o.double() - tr).abs().max().item()
        tol = k * (t.double() - tr).abs().max().item() + 8 * eps * sc.abs().max().item()
        if not err <= tol:  # also catches NaN
            raise WrongResult(f"{shape.name} {passname}: fastconv's {name} is off by {err:.3e} "
                              f"(tolerance {tol:.3e} from PyTorch's own error at {dtype})")
        worst = max(worst, err / tol if tol else 0.0)
    return worst


# ---------------------------------------------------------------------------- timing
def time_call(fn: Callable[[], object], device: str = "cpu", rounds: int = 5,
              warmup: int = 1) -> list[float]:
    """Seconds per call, ``rounds`` times, after ``warmup`` untimed calls (JIT compilation,
    allocator warm-up and cudnn.benchmark's autotuning happen there). CUDA calls are timed
    with CUDA events on the current stream."""
    for _ in range(warmup):
        fn()
    times = []
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        for _ in range(rounds):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
    else:
        for _ in range(rounds):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    return times


def gemm_op(device: str = "cpu", dtype: torch.dtype = torch.float32):
    """(call, flops): one square torch.mm, the FLOP/s ceiling."""
    n = GEMM_SIZE[device.split(":")[0]]
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    c = torch.empty(n, n, device=device, dtype=dtype)
    return (lambda: torch.mm(a, b, out=c)), 2 * n ** 3


def copy_op(device: str = "cpu"):
    """(call, bytes): one large float32 ``copy_``, bytes read + written: the GB/s ceiling."""
    nbytes = COPY_BYTES[device.split(":")[0]]
    src = torch.rand(nbytes // 4, device=device)
    dst = torch.empty_like(src)
    return (lambda: dst.copy_(src)), 2 * nbytes


def measure_peaks(device: str = "cpu", dtype: torch.dtype = torch.float32, rounds: int = 5) -> dict:
    """The machine's ceilings, measured now: best of ``rounds`` (a ceiling, not a typical run)."""
    gemm, flops = gemm_op(device, dtype)
    gemm_s = min(time_call(gemm, device, rounds, warmup=1))
    del gemm
    copy, nbytes = copy_op(device)
    copy_s = min(time_call(copy, device, rounds, warmup=1))
    return dict(gemm_gflops=flops / gemm_s / 1e9, copy_gbs=nbytes / copy_s / 1e9,
                gemm=f"torch.mm {GEMM_SIZE[device.split(':')[0]]}^2 "
                     f"{str(dtype).removeprefix('torch.')}",
                copy=f"copy_ of {nbytes // 2 // 2**20} MiB float32")


# ---------------------------------------------------------------------------- running the suite
def machine_info(device: str = "cpu") -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    info = dict(cpu=cpu, logical_cpus=os.cpu_count(), python=platform.python_version(),
                torch=torch.__version__, fastconv=fastconv.__version__,
                torch_threads=torch.get_num_threads())
    if device.startswith("cuda") and torch.cuda.is_available():
        info.update(gpu=torch.cuda.get_device_name(device), cuda=torch.version.cuda,
                    cudnn=torch.backends.cudnn.version())
    return info


def configure_device(device: str, tf32: bool = False) -> None:
    """GPU baseline settings, explicit: cuDNN autotuning on, TF32 as asked (off by default)."""
    if device.startswith("cuda"):
        torch.backends.cudnn.benchmark = True
        torch.backends.cudnn.allow_tf32 = tf32
        torch.backends.cuda.matmul.allow_tf32 = tf32


def run_case(shape, impl, passname, device, dtype, rounds, warmup) -> dict:
    """Gate (fastconv only), then time one case; a record for the report."""
    case = make_case(shape, impl, passname, device, dtype)
    record = case.info()
    tuned = impl == "fastconv" and device == "cpu"
    if tuned:  # so the choices this case makes are its own (see fastconv.cpu._autotune)
        fastconv.cpu.clear_autotune()
    try:
        if impl == "fastconv":
            check_case(shape, passname, device, dtype)
        times = time_call(case.run, device, rounds, warmup)
    except WrongResult as exc:
        status, error, times = "wrong", str(exc), []
    except (NotImplementedError, DTypeError) as exc:
        status, error, times = "unsupported", str(exc).split("\n")[0], []
    else:
        status, error = "ok", None
    record.update(status=status, error=error, times_s=times,
                  median_s=statistics.median(times) if times else None,
                  min_s=min(times) if times else None)
    if tuned:
        # {engine pass: {"chosen": algorithm, "seconds": {candidate: best seconds}}} for the
        # passes whose algorithm was measured on their first call.
        record["algorithms"] = {key[0]: made for key, made in
                                fastconv.cpu.autotune_choices().items()}
    return record


def run_suite(shapes, device: str = "cpu", dtype: torch.dtype = torch.float32,
              passes=PASSES, rounds: int = 5, warmup: int = 1, tf32: bool = False,
              peaks: bool = True, progress=None) -> dict:
    """Time every (shape, pass) for fastconv and PyTorch; returns the report (JSON-ready).

    ``progress(description)`` is called before each case, if given.
    """
    configure_device(device, tf32)
    report = dict(schema=SCHEMA, created=_dt.datetime.now(_dt.timezone.utc).isoformat(),
                  machine=machine_info(device),
                  settings=dict(device=device, dtype=str(dtype).removeprefix("torch."),
                                passes=list(passes), rounds=rounds, warmup=warmup, tf32=tf32),
                  peaks=None, results=[])
    if peaks:
        if progress:
            progress("measuring the GEMM and copy ceilings")
        report["peaks"] = measure_peaks(device, dtype)
    for shape in shapes:
        for passname in passes:
            for impl in IMPLS:
                if progress:
                    progress(f"{shape.name} {passname} {impl}")
                report["results"].append(run_case(shape, impl, passname, device, dtype,
                                                  rounds, warmup))
    return report


def case_count(shapes, passes=PASSES) -> int:
    return len(shapes) * len(passes) * len(IMPLS)


# ---------------------------------------------------------------------------- reading reports
def from_pytest_benchmark(data: dict) -> dict:
    """A pytest-benchmark ``--benchmark-json`` file as a report (peaks from its ceiling cases)."""
    results, peaks = [], {}
    for bench in data.get("benchmarks", []):
        info = dict(bench.get("extra_info", {}))
        stats = bench["stats"]
        if info.get("op") == "copy":
            peaks["copy_gbs"] = info["bytes"] / stats["min"] / 1e9
            continue
        if info.get("op") == "gemm":
            peaks["gemm_gflops"] = info["flops"] / stats["min"] / 1e9
            continue
        if "pass" not in info:
            continue
        info.update(status="ok", error=None, times_s=stats.get("data", []),
                    median_s=stats["median"], min_s=stats["min"])
        results.append(info)
    machine = data.get("machine_info", {})
    settings = ({"device": results[0].get("device"), "dtype": results[0].get("dtype")}
                if results else {})
    return dict(schema=SCHEMA, created=data.get("datetime"),
                machine=dict(cpu=machine.get("cpu", {}).get("brand_raw"),
                             logical_cpus=machine.get("cpu", {}).get("count")),
                settings=settings, peaks=peaks or None, results=results)


def load_report(path) -> dict:
    with open(path) as f:
        data = json.load(f)
    if data.get("schema") == SCHEMA:
        return data
    if "benchmarks" in data:
        return from_pytest_benchmark(data)
    raise ValueError(f"{path}: neither a fastconv bench report nor pytest-benchmark JSON")


def _key(r: dict) -> tuple:
    return (r["op"], r["shape"], r["pass"], r.get("device"), r.get("dtype"))


def paired_rows(report: dict) -> list[dict]:
    """One row per (shape, pass): both implementations' records and fastconv's speed-up."""
    peaks = report.get("peaks") or {}
    rows, index = [], {}
    for r in report["results"]:
        key = _key(r)
        if key not in index:
            index[key] = dict(op=r["op"], shape=r["shape"], layer=r.get("layer", ""),
                              **{"pass": r["pass"]}, impls={})
            rows.append(index[key])
        index[key]["impls"][r["impl"]] = r
    # Group by shape (in order of first appearance), forward before forward+backward.
    first = {}
    for row in rows:
        first.setdefault(row["shape"], len(first))
    rows.sort(key=lambda row: (first[row["shape"]], PASSES.index(row["pass"])
                               if row["pass"] in PASSES else len(PASSES)))
    for row in rows:
        for r in row["impls"].values():
            r["rate"], r["unit"], r["pct_peak"] = _rate(r, peaks)
        ours, theirs = row["impls"].get("fastconv"), row["impls"].get("torch")
        ok = ours and theirs and ours.get("median_s") and theirs.get("median_s")
        row["speedup"] = theirs["median_s"] / ours["median_s"] if ok else None
    return rows


def _rate(r: dict, peaks: dict):
    t = r.get("median_s")
    if not t:
        return None, "", None
    if r.get("flops"):
        rate, ceiling, unit = r["flops"] / t / 1e9, peaks.get("gemm_gflops"), "GFLOP/s"
    else:
        rate, ceiling, unit = r["bytes"] / t / 1e9, peaks.get("copy_gbs"), "GB/s"
    return rate, unit, (100 * rate / ceiling if ceiling else None)


def geomean(values) -> float | None:
    values = [v for v in values if v]
    return math.exp(sum(math.log(v) for v in values) / len(values)) if values else None


def summary(rows: list[dict]) -> dict:
    """Geometric means of the speed-ups: per pass and overall."""
    out = {p: geomean(r["speedup"] for r in rows if r["pass"] == p) for p in PASSES}
    out["all"] = geomean(r["speedup"] for r in rows)
    return out


def compare(old: dict, new: dict, threshold: float = 0.10) -> list[dict]:
    """Median times of the same cases in two reports. ``change`` = new / old - 1; a fastconv
    case slower by more than ``threshold`` is a regression (PyTorch's own change in the same
    pair of runs says how much of it is the machine)."""
    before = {(*_key(r), r["impl"]): r for r in old["results"] if r.get("median_s")}
    out = []
    for r in new["results"]:
        o = before.get((*_key(r), r["impl"]))
        if not o or not r.get("median_s"):
            continue
        change = r["median_s"] / o["median_s"] - 1
        out.append(dict(op=r["op"], shape=r["shape"], **{"pass": r["pass"]}, impl=r["impl"],
                        old_s=o["median_s"], new_s=r["median_s"], change=change,
                        regression=r["impl"] == "fastconv" and change > threshold,
                        improvement=r["impl"] == "fastconv" and change < -threshold))
    return out


# ---------------------------------------------------------------------------- rendering
def _ms(t):
    return f"{t * 1e3:.3f} ms" if t else ""


def _cell(r):
    if r is None:
        return ""
    if r.get("status") == "wrong":
        return "[red]WRONG"
    if r.get("status") == "unsupported":
        return "[yellow]n/a"
    return _ms(r.get("median_s"))


def _rate_cell(r):
    if not r or r.get("rate") is None:
        return ""
    pct = f" ({r['pct_peak']:.0f}%)" if r.get("pct_peak") is not None else ""
    return f"{r['rate']:.1f} {r['unit']}{pct}"


_PASS_LABELS = {"conv2d_forward": "fwd", "conv2d_backward_input": "dx",
                "conv2d_backward_weight": "dw"}


def _algorithms(r) -> str:
    """A second line for a fastconv cell: the chosen algorithm of each measured pass."""
    made = (r or {}).get("algorithms") or {}
    order = [p for p in _PASS_LABELS if p in made] + [p for p in made if p not in _PASS_LABELS]
    names = [f"{_PASS_LABELS.get(p, p)} {made[p]['chosen']}" for p in order]
    return f"\n[dim]{', '.join(names)}[/]" if names else ""


def results_table(report: dict):
    from rich.table import Table

    rows = paired_rows(report)
    s = report.get("settings", {})
    title = f"fastconv vs PyTorch: {s.get('device', '?')} {s.get('dtype', '')}".strip()
    table = Table(title=title, caption="speed-up = PyTorch median / fastconv median "
                                       "(above 1: fastconv is faster); under fastconv's time, the "
                                       "algorithm its first call measured and chose per pass "
                                       "(forward, dx: input gradient, dw: weight gradient)")
    for col in ("shape", "pass", "fastconv", "PyTorch", "speed-up", "fastconv rate (% peak)",
                "PyTorch rate (% peak)"):
        table.add_column(col, justify="left" if col in ("shape", "pass") else "right")
    last = None
    for row in rows:
        ours, theirs = row["impls"].get("fastconv"), row["impls"].get("torch")
        sp = row["speedup"]
        style = "" if sp is None else ("green" if sp >= 1 else ("red" if sp < 0.7 else ""))
        speed = f"[{style}]{sp:.2f}x[/]" if sp and style else (f"{sp:.2f}x" if sp else "")
        if last is not None and row["shape"] != last:
            table.add_section()
        first = row["shape"] != last
        label = f"{row['shape']}\n[dim]{row['layer']}[/]" if first else ""
        table.add_row(label, row["pass"], _cell(ours) + _algorithms(ours), _cell(theirs), speed,
                      _rate_cell(ours), _rate_cell(theirs))
        last = row["shape"]
    means = summary(rows)
    table.add_section()
    for name in (*PASSES, "all"):
        if means[name] is not None:
            table.add_row(f"geometric mean ({name})", "", "", "", f"{means[name]:.2f}x", "", "")
    return table


def compare_table(changes: list[dict], threshold: float):
    from rich.table import Table

    table = Table(title=f"against the saved run (regression: fastconv slower by more than "
                        f"{threshold:.0%})")
    for col in ("shape", "pass", "impl", "before", "now", "change"):
        table.add_column(col, justify="left" if col in ("shape", "pass", "impl") else "right")
    for c in changes:
        style = "bold red" if c["regression"] else ("green" if c["improvement"] else "")
        change = f"{c['change']:+.1%}"
        table.add_row(c["shape"], c["pass"], c["impl"], _ms(c["old_s"]), _ms(c["new_s"]),
                      f"[{style}]{change}[/]" if style else change)
    return table


def plot(report: dict, path) -> Path:
    """A PNG bar chart of the speed-ups (log scale, a line at 1x)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    rows = [r for r in paired_rows(report) if r["speedup"]]
    labels = [f"{r['shape']} {r['pass']}" for r in rows]
    values = [r["speedup"] for r in rows]
    fig, ax = plt.subplots(figsize=(8, 0.32 * len(rows) + 1.6))
    colors = ["tab:green" if v >= 1 else "tab:red" for v in values]
    # Bars grow from 1x: left of the line fastconv is slower, right of it faster.
    ax.barh(range(len(rows)), [v - 1 for v in values], left=1, color=colors)
    ax.set_yticks(range(len(rows)), labels, fontsize=8)
    ax.invert_yaxis()
    ax.set_xscale("log")
    lo, hi = min(values + [1.0]), max(values + [1.0])
    ax.set_xlim(lo / 1.6, hi * 1.6)
    ax.xaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}x"))
    ax.axvline(1.0, color="black", linewidth=1)
    ax.set_xlabel("speed-up over PyTorch (PyTorch time / fastconv time)")
    s, m = report.get("settings", {}), report.get("machine", {})
    ax.set_title(f"fastconv vs PyTorch, {s.get('device', '')} {s.get('dtype', '')}\n"
                 f"{m.get('gpu') or m.get('cpu', '')}", fontsize=9)
    for i, v in enumerate(values):
        ax.text(v, i, f" {v:.2f}x " if v >= 1 else f"{v:.2f}x ", va="center", fontsize=7,
                ha="left" if v >= 1 else "right")
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
