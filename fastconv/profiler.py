"""``fastconv profile``: a few training steps of a small CNN under ``torch.profiler``, once with
fastconv layers and once with the same model on ``torch.nn``; Chrome traces and a kernel-time
summary for each.

fastconv's own work shows up under the ranges ``fastconv.<op>.<pass>`` (see ``_profiling``);
PyTorch's under its ``aten::`` ops (and, on a GPU, the cuDNN kernels they launch).
"""

from __future__ import annotations

import copy
import statistics
import time
from pathlib import Path

import torch
from torch import nn

import fastconv


def small_cnn(in_channels: int = 3, classes: int = 10) -> nn.Sequential:
    """A CIFAR-sized CNN over (N, in_channels, 32, 32): 3x3 and 1x1 convs, max and avg pooling."""
    return nn.Sequential(
        nn.Conv2d(in_channels, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),   # 32 -> 16
        nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.AvgPool2d(2),            # 16 -> 8
        nn.Conv2d(64, 64, 1), nn.ReLU(), nn.MaxPool2d(3, stride=2, padding=1),  # 8 -> 4
        nn.Flatten(), nn.Linear(64 * 4 * 4, classes))


def _self_time_us(event, device: str) -> float:
    if device == "cpu":
        return event.self_cpu_time_total
    return getattr(event, "self_device_time_total", None) or getattr(event, "self_cuda_time_total")


def profile_training(model: nn.Module, device: str = "cpu", steps: int = 3, batch: int = 32,
                     trace_path=None, seed: int = 0) -> dict:
    """Run ``steps`` SGD steps on random data under ``torch.profiler``.

    One untimed step first keeps JIT compilation and autotuning out of the trace. Returns
    ``dict(step_s=[...], events=[(name, calls, self_time_us), ...] by self time)`` and writes a
    Chrome trace to ``trace_path`` if given.
    """
    from torch.profiler import ProfilerActivity, profile, record_function

    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 3, 32, 32, generator=gen).to(device)
    y = torch.randint(0, 10, (batch,), generator=gen).to(device)
    model = model.to(device)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)

    def step():
        opt.zero_grad(set_to_none=True)
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        opt.step()

    step()  # warm-up
    activities = [ProfilerActivity.CPU]
    if device.startswith("cuda"):
        activities.append(ProfilerActivity.CUDA)
        torch.cuda.synchronize()
    times = []
    with profile(activities=activities) as prof:
        for i in range(steps):
            t0 = time.perf_counter()
            with record_function(f"train_step_{i}"):
                step()
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
    if trace_path is not None:
        prof.export_chrome_trace(str(trace_path))
    kind = "cpu" if device == "cpu" else "cuda"
    events = [(e.key, e.count, _self_time_us(e, kind)) for e in prof.key_averages()
              if not e.key.startswith("train_step_") and _self_time_us(e, kind) > 0]
    events.sort(key=lambda e: -e[2])
    return dict(step_s=times, events=events)


def run(device: str = "cpu", steps: int = 3, batch: int = 32, out_dir=".", top: int = 12,
        console=None) -> dict:
    """Profile the small CNN with fastconv layers and with torch.nn; print the summary."""
    from rich.console import Console
    from rich.table import Table

    console = console or Console(highlight=False)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    reference = small_cnn()
    models = {"torch": reference, "fastconv": fastconv.convert(copy.deepcopy(reference))}
    results = {}
    for name, model in models.items():
        trace = out_dir / f"{name}-trace.json"
        try:
            results[name] = profile_training(model, device, steps, batch, trace)
        except NotImplementedError as exc:  # no engine for this device in this version
            console.print(f"[yellow]{name} on {device}: {str(exc).splitlines()[0]}")
            continue
        results[name]["trace"] = trace
        step = statistics.median(results[name]["step_s"])
        total = sum(e[2] for e in results[name]["events"]) or 1.0
        table = Table(title=f"{name}: {steps} training steps of the small CNN, batch {batch}, "
                            f"{device} (median step {step * 1e3:.1f} ms)")
        table.add_column("op / range")
        table.add_column("calls", justify="right")
        table.add_column(f"self {'CPU' if device == 'cpu' else 'GPU'} time", justify="right")
        table.add_column("share", justify="right")
        for key, calls, us in results[name]["events"][:top]:
            table.add_row(key, str(calls), f"{us / 1e3:.2f} ms", f"{100 * us / total:.1f}%")
        console.print(table)
        console.print(f"Chrome trace: {trace} (open in chrome://tracing or ui.perfetto.dev)")
    return results
