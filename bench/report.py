"""Summarise a pytest-benchmark JSON with the same table as ``fastconv bench``.

    pytest bench --benchmark-only --benchmark-json=run.json && python bench/report.py run.json
    python bench/report.py run.json --compare old.json      # regressions highlighted

speed-up = PyTorch median / fastconv median from the same run (above 1: fastconv is faster);
% peak uses the ceilings (copy bandwidth, GEMM) timed in the same run. The geometric mean of
the speed-ups closes the table.
"""

from __future__ import annotations

import argparse
import json

from rich.console import Console
from rich.table import Table

from fastconv import benchmark


def demo_table(data: dict):
    """The demo-image group: the seed's loop against the fast versions."""
    rows = {b["extra_info"]["impl"]: b["stats"]["median"] for b in data["benchmarks"]
            if b["group"].startswith("demo-image")}
    if "seed-loop" not in rows:
        return None
    table = Table("demo image (edge detector)", "median", "speed-up over the seed loop")
    for impl, t in rows.items():
        table.add_row(impl, f"{t * 1e3:.3f} ms", f"{rows['seed-loop'] / t:,.0f}x")
    return table


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("json", help="pytest-benchmark --benchmark-json output")
    parser.add_argument("--compare", help="an earlier run's JSON (pytest-benchmark or fastconv)")
    parser.add_argument("--threshold", type=float, default=0.10)
    args = parser.parse_args(argv)
    with open(args.json) as f:
        data = json.load(f)
    report = benchmark.from_pytest_benchmark(data)
    console = Console(highlight=False, width=150)
    console.print(benchmark.results_table(report))
    demo = demo_table(data)
    if demo is not None:
        console.print(demo)
    peaks = report.get("peaks") or {}
    console.print("ceilings in this run: " + (", ".join(
        [f"{peaks['gemm_gflops']:.1f} GFLOP/s GEMM"] * ("gemm_gflops" in peaks)
        + [f"{peaks['copy_gbs']:.1f} GB/s copy"] * ("copy_gbs" in peaks)) or "not measured")
        + f"; {report['machine'].get('cpu')}, {report['machine'].get('logical_cpus')} "
          f"logical CPUs; {report.get('created')}")
    if args.compare:
        changes = benchmark.compare(benchmark.load_report(args.compare), report, args.threshold)
        console.print(benchmark.compare_table(changes, args.threshold))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
