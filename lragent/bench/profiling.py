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
        "profiled_step_wall_ms": wall_ms,
        "gpu_kernel_ms": busy_ms,
        "gpu_busy_fraction": busy_ms / wall_ms,
        "kernel_launches": len(kernels) / steps,
        "top_kernels_ms": {n[:80]: ms for n, ms in heaviest},
    }
