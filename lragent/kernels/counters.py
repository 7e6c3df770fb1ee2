"""Arrival counters for one-launch split reductions: the split program that arrives last merges the others'.

A kernel counts its finished splits on an int32 per output tile (`tl.atomic_add`, acq_rel) and the last one resets it
to 0, so a buffer is all zero between launches and is never zeroed per step. Each `owner` (a kernel family) has its
own buffer per device: two owners' launches may run in the same step, and a CUDA graph can hold launches of both.
Replaced buffers stay referenced (`_RETIRED`): a CUDA graph captured earlier keeps launching on the buffer it was
captured with.
"""

from __future__ import annotations

import torch

_BUFFERS: dict[tuple[str, torch.device], torch.Tensor] = {}
_RETIRED: list[torch.Tensor] = []
MIN_COUNTERS = 4096  # decode: 512 rows x 8 kv heads at Llama-3.1-8B shapes; the engine never grows it


def _capturing(device: torch.device) -> bool:
    return device.type == "cuda" and torch.cuda.is_current_stream_capturing()


def _key(owner: str, device: torch.device | str) -> tuple[str, torch.device]:
    """ "cuda" and "cuda:0" name one buffer: the device with its index."""
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return owner, device


def arrival_counters(n: int, device: torch.device, owner: str) -> torch.Tensor:
    """At least `n` zeroed int32 arrival counters on `device` for `owner`'s kernels; every launch leaves them zero.

    The buffer only grows (to max(n, 2x, MIN_COUNTERS) entries) and is allocated and zeroed eagerly, never per step.
    CUDA graphs: a captured launch bakes in the buffer's address, so the buffer must already be large enough when
    capture starts. The engine runs every captured shape eagerly (warm-up) right before capturing it, which grows the
    buffer outside the capture; growing it during a capture is an error, raised here. One stream at a time per device
    and owner: two launches running concurrently on different streams would share counters."""
    key = _key(owner, device)
    buf = _BUFFERS.get(key)
    if buf is not None and buf.numel() >= n:
        return buf
    if _capturing(device):
        raise RuntimeError(
            f"{owner} needs {n} arrival counters on {device} but has {0 if buf is None else buf.numel()}, and a CUDA "
            "graph is being captured: run the same shape eagerly before capturing it (the engine's warm-up does), so "
            "the buffer grows outside the capture"
        )
    if buf is not None:
        _RETIRED.append(buf)
    size = max(n, 2 * (0 if buf is None else buf.numel()), MIN_COUNTERS)
    buf = _BUFFERS[key] = torch.zeros(size, dtype=torch.int32, device=device)
    return buf


def counters_of(owner: str, device: torch.device) -> torch.Tensor | None:
    """`owner`'s current buffer on `device` (None before its first split launch there), for checks and tests."""
    return _BUFFERS.get(_key(owner, device))
