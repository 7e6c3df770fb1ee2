"""The sampler's device part (`lragent.engine.sampler.device_sample`) replayed from captured CUDA graphs.

Eagerly, the torch path is ~20 launches and the Triton path two plus their Python launch overhead; at decode batch
sizes the GPU work is microseconds and the launches are the cost. A graph per batch shape replays them in one.
What a graph reads lives in static buffers: the logits and the six per-row tensors of `SamplingBatch`, refilled in
place each call (device-to-device copies, no host sync); its output is a static float64 tensor that `sample` copies
to the host through its one pinned copy, before any other replay can overwrite it.

Batches are padded to a bucket size (powers of two up to 32, then multiples of 32) so that a varying batch reuses
few graphs; padding rows hold whatever the last call left there and their results are dropped. A graph is keyed by
(device, padded rows, vocabulary, path, the batch-level switches its Python code branches on); at most
`MAX_GRAPHS` are kept (least recently used dropped), captured into one memory pool per device. Batches with logit
bias or penalties are never graphed (`lragent.engine.sampler.resolve_impl`).
"""

from __future__ import annotations

import dataclasses
from collections import OrderedDict
from dataclasses import dataclass

import torch

from lragent.engine.sampler import SamplingBatch, device_sample

MAX_GRAPHS = 16
_FIELDS = ("greedy", "temperature", "top_k", "top_p", "min_p", "keys")


@dataclass
class _Captured:
    graph: torch.cuda.CUDAGraph
    logits: torch.Tensor  # [rows, V] static input
    batch: SamplingBatch  # static per-row tensors (and the key's switches)
    out: torch.Tensor  # static output of device_sample


_GRAPHS: OrderedDict[tuple, _Captured] = OrderedDict()
_POOLS: dict[torch.device, torch.cuda._POOL_HANDLE] = {}


def bucket(n: int) -> int:
    """Padded row count of a batch of n rows."""
    if n <= 32:
        return 1 << max(0, (n - 1).bit_length())
    return -(-n // 32) * 32


def run_graph(logits: torch.Tensor, batch: SamplingBatch, triton: bool) -> tuple[torch.Tensor, int]:
    """(device_sample's output for the padded batch, its row count), computed by replaying a captured graph."""
    if batch.bias is not None or batch.penalties is not None:
        raise ValueError("batches with logit bias or penalties are not graphed")
    n, vocab = logits.shape
    rows = bucket(n)
    key = (*_key(logits.device, rows, vocab, batch, triton), logits.dtype)
    cap = _GRAPHS.get(key)
    if cap is None:
        cap = _capture(logits.device, rows, vocab, logits.dtype, batch, triton)
        _GRAPHS[key] = cap
        while len(_GRAPHS) > MAX_GRAPHS:
            _GRAPHS.popitem(last=False)
    _GRAPHS.move_to_end(key)
    if cap.logits.data_ptr() != logits.data_ptr():
        cap.logits[:n].copy_(logits)
    for name in _FIELDS:
        getattr(cap.batch, name)[:n].copy_(getattr(batch, name))
    cap.graph.replay()
    return cap.out, rows


def clear() -> None:
    """Drop every captured graph and the pools they were captured into."""
    _GRAPHS.clear()
    _POOLS.clear()


def _key(device: torch.device, rows: int, vocab: int, batch: SamplingBatch, triton: bool) -> tuple:
    """What the captured code depends on besides the static tensors' contents: the Triton path only on its
    candidate slots, the torch path on its Python branches (all greedy, truncation, candidate count)."""
    if triton:
        from lragent.kernels.triton_sampling import kcap_for

        return (device, rows, vocab, "triton", kcap_for(1 if batch.all_greedy else batch.max_top_k), batch.top_logprobs)
    return (device, rows, vocab, "torch", batch.all_greedy, batch.truncates, batch.max_top_k, batch.top_logprobs)


def _static_batch(batch: SamplingBatch, rows: int, vocab: int, device: torch.device) -> SamplingBatch:
    """Static per-row tensors of `rows` rows with harmless contents (greedy, temperature 1, no truncation)."""

    def full(value: float | bool, dtype: torch.dtype) -> torch.Tensor:
        return torch.full((rows,), value, dtype=dtype, device=device)

    return dataclasses.replace(
        batch,
        params=[],
        greedy=full(True, torch.bool),
        temperature=full(1.0, torch.float32),
        top_k=full(vocab, torch.int64),
        top_p=full(1.0, torch.float32),
        min_p=full(0.0, torch.float32),
        keys=full(0, torch.int64),
        bias=None,
        penalties=None,
    )


def _pool(device: torch.device) -> torch.cuda._POOL_HANDLE:
    """The device's graph memory pool (a fresh one once every graph of the old one is gone: capturing into a
    retired pool trips an allocator assertion)."""
    if device not in _POOLS or not any(k[0] == device for k in _GRAPHS):
        _POOLS[device] = torch.cuda.graph_pool_handle()
    return _POOLS[device]


def _capture(
    device: torch.device, rows: int, vocab: int, dtype: torch.dtype, batch: SamplingBatch, triton: bool
) -> _Captured:
    """Warm up on a side stream (Triton compiles, torch initialises its kernels), then capture. The static inputs
    are normal tensors even under inference mode: later calls outside it refill them in place."""
    with torch.inference_mode(False):
        logits = torch.zeros(rows, vocab, dtype=dtype, device=device)
        static = _static_batch(batch, rows, vocab, device)
    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):
        for _ in range(2):
            device_sample(logits, static, triton)
    torch.cuda.current_stream(device).wait_stream(side)
    torch.cuda.synchronize(device)
    graph = torch.cuda.CUDAGraph()
    # thread_local: a server thread touching CUDA meanwhile must not void the capture
    with torch.cuda.graph(graph, pool=_pool(device), capture_error_mode="thread_local"):
        out = device_sample(logits, static, triton)
    return _Captured(graph, logits, static, out)
