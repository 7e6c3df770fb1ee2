"""Where a step's time goes on the GPU: kernel time, launches and the heaviest kernels, from torch.profiler."""

from __future__ import annotations

import time
from collections.abc import Callable

import torch


def profile_steps(step: Callable[[], object], steps: int, top: int = 10) -> dict:
    """Run `step` `steps` times under torch.profiler (CUDA); per step: wall ms, GPU kernel ms, busy fraction,
    kernel launches, and the `top` kernels by time (kernels inside CUDA-graph replays are listed one by one)."""
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    t0 = time.perf_counter()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            step()
        torch.cuda.synchronize()
    wall_ms = 1e3 * (time.perf_counter() - t0) / steps
    kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    busy_ms = sum(e.device_time for e in kernels) / steps / 1e3
    by_name: dict[str, float] = {}
    for e in kernels:
        by_name[e.name] = by_name.get(e.name, 0.0) + e.device_time / steps / 1e3
    heaviest = sorted(by_name.items(), key=lambda kv: -kv[1])[:top]
    return {
        **kernel_gaps(kernels, steps),
        "profiled_step_wall_ms": wall_ms,
        "gpu_kernel_ms": busy_ms,
        "gpu_busy_fraction": busy_ms / wall_ms,
        "kernel_launches": len(kernels) / steps,
        "top_kernels_ms": {n[:80]: ms for n, ms in heaviest},
    }


SHORT_GAP_US = 10.0  # idle time between two kernels up to this long: back-to-back launches (a graph's, a stream's)


def kernel_gaps(kernels: list, steps: int, top: int = 5) -> dict:
    """Idle time of the GPU between consecutive kernels, per step: the short gaps (<= SHORT_GAP_US, the cost of
    launching one kernel after another, which fewer launches would save) and the long ones (waiting on the host:
    inflated under the profiler), with the kernels after the longest long gaps (what the GPU waited to start)."""
    spans = sorted((e.time_range.start, e.time_range.end, e.name) for e in kernels)
    short = long = 0.0
    waits: list[tuple[float, str]] = []
    for (_, end, _), (start, _, name) in zip(spans, spans[1:]):
        gap = max(0.0, start - end)
        if gap <= SHORT_GAP_US:
            short += gap
        else:
            long += gap
            waits.append((gap, name[:60]))
    waits.sort(reverse=True)
    return {
        "gap_short_ms": short / steps / 1e3,
        "gap_long_ms": long / steps / 1e3,
        "longest_waits_us": [(round(g, 1), n) for g, n in waits[:top]],
    }
