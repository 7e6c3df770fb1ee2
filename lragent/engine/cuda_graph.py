"""CUDA graphs for decode steps.

An eager decode step of an 8B model launches ~2,000 kernels (66 per layer) and the GPU idles while Python issues
them. A captured graph replays the whole stack in one launch. Everything a graph reads lives in static buffers
that each step refills in place: the token ids and positions (here), and the attention inputs, which the attention
backend owns (`AttentionBackend.graph_inputs`). Batches are padded to the next captured size; padding rows write
nowhere and their outputs are dropped. Graphs are captured into one shared memory pool: all sizes at start-up
when the engine warms up (`lragent.engine.warmup`), else lazily, the first time a size is needed. This module knows
no backend and no kernel: it talks to the backend and LoRA bank interfaces.
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING

import torch

from lragent.engine.scheduler import ScheduledBatch
from lragent.lora.metadata import LoRAMetadata
from lragent.models.context import ForwardContext

if TYPE_CHECKING:
    from lragent.engine.model_runner import ModelRunner, StepInputs

logger = logging.getLogger(__name__)


def capture_sizes(max_batch: int) -> list[int]:
    """1, 2, 4, 8, then every multiple of 16 up to `max_batch` (the largest always included)."""
    sizes = [s for s in (1, 2, 4, 8) if s < max_batch] + list(range(16, max_batch, 16))
    return sorted(set(sizes + [max_batch]))


class DecodeGraphs:
    def __init__(self, runner: ModelRunner, max_batch: int, max_model_len: int):
        self.model, self.bank, self.expand_values = runner.model, runner.bank, runner.expand_values
        self.device = runner.device
        self.sizes = capture_sizes(max_batch)
        self.max_batch = self.sizes[-1]
        self.attn = runner.backend.graph_inputs(runner.cache, runner.pools, self.max_batch, max_model_len, self.device)
        self.tokens = torch.zeros(2, self.max_batch, dtype=torch.int64, device=self.device)  # ids, positions
        pin = self.device.type == "cuda"
        host = torch.zeros(2, self.max_batch, dtype=torch.int64)
        self.host_tokens = host.pin_memory() if pin else host
        self._np_tokens = self.host_tokens.numpy()
        self._graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self._pool: torch.cuda._POOL_HANDLE | None = None  # the graphs' shared memory pool, made on first capture

    def supports(self, batch: ScheduledBatch) -> bool:
        """Decode rows only, within the captured sizes, each writing its own keys/base values."""
        return (
            not batch.is_prefill
            and 0 < len(batch.seqs) <= self.max_batch
            and all(s.num_base_cached <= s.num_computed for s in batch.seqs)
        )

    def clear(self) -> None:
        """Forget every graph (adapter stacks were added or removed, so the captured launches are stale) and their
        memory pool: once its last graph is gone the allocator retires the pool, and capturing into the stale
        handle trips an allocator assertion (seen on torch 2.11)."""
        self._graphs.clear()
        self._pool = None

    def capture_all(self) -> None:
        """Capture every size now (start-up), so no request waits for a capture."""
        for size in self.sizes:
            self._ensure(size)

    def _ensure(self, size: int) -> tuple[torch.cuda.CUDAGraph, torch.Tensor]:
        if size not in self._graphs:
            start = time.perf_counter()
            self._graphs[size] = self._capture(size)
            logger.debug("captured the decode graph of batch size %d in %.2f s", size, time.perf_counter() - start)
        return self._graphs[size]

    def run(self, step: StepInputs) -> torch.Tensor:
        """Final hidden states [rows, hidden] of one decode step."""
        n = step.rows.num_seqs
        size = next(s for s in self.sizes if s >= n)
        graph, hidden = self._ensure(size)
        self.fill(step, size)
        graph.replay()
        return hidden[:n]

    def fill(self, step: StepInputs, size: int) -> None:
        """Refill the static inputs in place (asynchronous uploads; no host sync)."""
        n = step.rows.num_seqs
        host = self._np_tokens
        host[0, :n], host[1, :n] = step.token_ids, step.positions
        if n < size:
            host[:, n:size] = 0
        self.tokens[:, :size].copy_(self.host_tokens[:, :size], non_blocking=True)
        self.attn.fill(step.rows, size)

    def _context(self, size: int) -> ForwardContext:
        segments = self.bank.per_row_segments(*self.attn.lora_rows(size))
        positions = self.tokens[1, :size]
        return ForwardContext(
            self.attn.metadata(size), LoRAMetadata(segments, segments), self.expand_values, positions, positions
        )

    def _capture(self, size: int) -> tuple[torch.cuda.CUDAGraph, torch.Tensor]:
        self.attn.pad(size)  # safe contents for the warm-up run (it really executes)
        self.tokens[:, :size] = 0
        ctx = self._context(size)
        ids = self.tokens[0, :size]
        self.model(ids, ctx)  # compiles the kernels for this size outside the capture
        torch.cuda.synchronize(self.device)
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        graph = torch.cuda.CUDAGraph()
        # thread_local: a server thread touching CUDA meanwhile (e.g. a metrics scrape) must not void the capture
        with torch.cuda.graph(graph, pool=self._pool, capture_error_mode="thread_local"):
            hidden = self.model(ids, ctx)
        return graph, hidden
