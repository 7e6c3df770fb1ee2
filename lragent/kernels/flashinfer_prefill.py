"""FlashInfer's ragged prefill (FlashAttention-3 on Hopper) for the gathered route, where a library is faster.

On the gathered route (`value_lr_prefill`) a prefill step's attention is plain causal attention over contiguous
keys and values, the LR term already added to the values: exactly what FlashInfer's ragged prefill computes. On an
H200 its FA3 kernel ran 8k new tokens in 0.92 ms against our kernel's 1.31 ms (80% vs 64% of the bf16 matmul rate,
BENCHMARKS.md thirteenth session), so the backend hands that attention to it when the package imports. FlashInfer
is not a dependency (it builds its kernels with the machine's nvcc on first use, and has no CPU path): without it,
with `LRAGENT_PREFILL_LIBRARY=triton`, off Hopper or in fp32, our kernel runs, and it stays the reference the
library's output is tested against.
"""

from __future__ import annotations

import functools
import os
from types import ModuleType

import torch

LIBRARY = os.environ.get("LRAGENT_PREFILL_LIBRARY", "auto")  # auto (flashinfer where it imports) | flashinfer | triton
WORKSPACE_BYTES = 128 << 20  # FlashInfer's recommended float workspace (split-KV partials)
_WORKSPACES: dict[torch.device, torch.Tensor] = {}


@functools.cache
def library() -> ModuleType | None:
    """The flashinfer module, or None (not installed, or turned off)."""
    if LIBRARY == "triton":
        return None
    try:
        import flashinfer  # type: ignore[import-not-found]
    except ImportError:
        if LIBRARY == "flashinfer":
            raise
        return None
    return flashinfer


def serves(query: torch.Tensor) -> bool:
    """Whether the library computes this step's gathered attention: CUDA, Hopper or newer, 16-bit."""
    return (
        query.is_cuda
        and query.dtype in (torch.bfloat16, torch.float16)
        and torch.cuda.get_device_capability(query.device)[0] >= 9
        and library() is not None
    )


class RaggedPrefill:
    """One prefill step's plan over the gathered rows (sequences back to back, queries likewise), made once per step
    from the host lengths and run by every layer. Causal masks align each sequence's queries with the end of its
    keys, as the engine's prefill does."""

    def __init__(self, query_lens: list[int], context_lens: list[int], query: torch.Tensor, kv_heads: int):
        lib = library()
        assert lib is not None
        device = query.device
        workspace = _WORKSPACES.get(device)
        if workspace is None:
            workspace = _WORKSPACES[device] = torch.empty(WORKSPACE_BYTES, dtype=torch.uint8, device=device)
        self.wrapper = lib.BatchPrefillWithRaggedKVCacheWrapper(workspace, "NHD")
        self.wrapper.plan(
            _indptr(query_lens),
            _indptr(context_lens),
            query.shape[1],
            kv_heads,
            query.shape[2],
            causal=True,
            q_data_type=query.dtype,
            kv_data_type=query.dtype,
        )

    def run(self, query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
        """query [T, Hq, d], keys / values [sum(context_lens), Hkv, d] -> [T, Hq, d]."""
        return self.wrapper.run(query, keys, values)


def _indptr(lens: list[int]) -> torch.Tensor:
    """[B + 1] int32 on the host (the plan reads it there; no device round trip)."""
    out = [0]
    for n in lens:
        out.append(out[-1] + n)
    return torch.tensor(out, dtype=torch.int32)
