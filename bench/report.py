"""Summarise a pytest-benchmark JSON: per group, each implementation's median and the speed ratio.

    pytest bench --benchmark-only --benchmark-json=run.json && python bench/report.py run.json

ratio = baseline median / fastconv median, both from the same run (> 1: fastconv is faster).
The geometric mean of the ratios closes the table.
"""

from __future__ import annotations

import argparse
import json
import math
from collections import defaultdict

from rich.console import Console
from rich.table import Table


def summarise(data: dict, ours: str = "fastconv", baselines=("torch", "seed-loop")):
    groups = defaultdict(dict)
    for bench in data["benchmarks"]:
        groups[bench["group"]][bench["extra_info"]["impl"]] = bench
    rows = []
    for group, impls in groups.items():
        if ours not in impls:
            continue
        mine = impls[ours]["stats"]["median"]
        for base in baselines:
            if base in impls:
                other = impls[base]["stats"]["median"]
                flops = impls[ours]["extra_info"].get("flops")
                rows.append(dict(group=group, baseline=base, ours=mine, theirs=other,
                                 ratio=other / mine, gflops=flops / mine / 1e9 if flops else None,
                                 base_gflops=flops / other / 1e9 if flops else None))
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("json", help="pytest-benchmark --benchmark-json output")
    args = parser.parse_args(argv)
    with open(args.json) as f:
        data = json.load(f)
    rows = summarise(data)
    table = Table("benchmark", "fastconv median", "baseline median", "ratio (baseline/fastconv)",
                  "fastconv GFLOP/s", "baseline GFLOP/s")
    for r in rows:
        table.add_row(f"{r['group']} vs {r['baseline']}", f"{r['ours'] * 1e3:.3f} ms",
                      f"{r['theirs'] * 1e3:.3f} ms", f"{r['ratio']:.2f}x",
                      f"{r['gflops']:.1f}" if r["gflops"] else "",
                      f"{r['base_gflops']:.1f}" if r["base_gflops"] else "")
    torch_rows = [r["ratio"] for r in rows if r["baseline"] == "torch"]
    if torch_rows:
        geo = math.exp(sum(math.log(r) for r in torch_rows) / len(torch_rows))
        table.add_row("geometric mean vs torch", "", "", f"{geo:.2f}x", "", "")
    Console(highlight=False, width=160).print(table)
    machine = data.get("machine_info", {})
    print(f"machine: {machine.get('cpu', {}).get('brand_raw', '?')}, "
          f"{machine.get('cpu', {}).get('count', '?')} logical CPUs; {data.get('datetime', '')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
