"""CUDA graphs for decode steps.

An eager decode step of an 8B model launches ~2,000 kernels (66 per layer) and the GPU idles while Python issues
them. A captured graph replays the whole stack in one launch. Everything a graph reads lives in static buffers
that each step refills in place: the token ids and positions (here), and the attention inputs, which the attention
backend owns (`AttentionBackend.graph_inputs`). Batches are padded to the next captured size; padding rows write
nowhere and their outputs are dropped. Graphs are captured into one shared memory pool: all sizes at start-up
when the engine warms up (`lragent.engine.warmup`), else lazily, the first time a size is needed. This module knows
no backend and no kernel: it talks to the backend and LoRA bank interfaces.

A backend may capture variants of a size beside the plain graph (`GraphInputs.variants`): with cascade decode on,
the Triton backend captures each size of 2+ rows twice, plain and with a fixed-shape cascade plan, and picks per
step (`AttentionBackend.decode_graph`); a step its variant cannot compute (`GraphInputs.fill` declines) runs
eagerly. What the variants cost: twice the capture time, a second set of graph nodes and the output buffer of each
variant graph; their temporaries (the cascade partials: about one wave of split partials per launch, ~20 MB a
layer at Llama-3.1-8B's shape on an H200 whatever the size, freed layer by layer) come from the one shared pool,
which graphs captured one after another reuse, so the pool's peak grows by that, not by a copy per graph.
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
        # the last step's uploads from the host mirrors (here and the backend's): a step launched ahead refills the
        # mirrors while the previous step may still be queued, so it first waits for their copies (not the step)
        self._uploaded: torch.cuda.Event | None = None
        self._graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}  # the plain graph of each size
        self._variant_graphs: dict[tuple[int, str], tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self.replays: dict[str, int] = {}  # replays per variant ("" plain): a counter for tests and stats
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
        self._variant_graphs.clear()
        self._pool = None

    def capture_all(self) -> None:
        """Capture every size now (start-up), so no request waits for a capture."""
        for size in self.sizes:
            self._ensure(size)
            for variant in self.attn.variants(size):
                self._ensure(size, variant)

    def _ensure(self, size: int, variant: str = "") -> tuple[torch.cuda.CUDAGraph, torch.Tensor]:
        graphs: dict = self._graphs if not variant else self._variant_graphs
        key = size if not variant else (size, variant)
        if key not in graphs:
            start = time.perf_counter()
            graphs[key] = self._capture(size, variant)
            took = time.perf_counter() - start
            logger.debug("captured the %s decode graph of batch size %d in %.2f s", variant or "plain", size, took)
        return graphs[key]

    def run(self, step: StepInputs, variant: str = "", feed: torch.Tensor | None = None) -> torch.Tensor | None:
        """Final hidden states [rows, hidden] of one decode step; None: the variant's graph cannot compute this step
        (its inputs declined it), run it eagerly. `feed`: the input ids on the device (a step run ahead)."""
        n = step.rows.num_seqs
        size = next(s for s in self.sizes if s >= n)
        self._wait_uploads()  # (a capture's warm-up writes the host mirrors too)
        graph, hidden = self._ensure(size, variant)
        if not self.fill(step, size, variant, feed):
            return None
        graph.replay()
        self.replays[variant] = self.replays.get(variant, 0) + 1
        return hidden[:n]

    def fill(self, step: StepInputs, size: int, variant: str = "", feed: torch.Tensor | None = None) -> bool:
        """Refill the static inputs in place (asynchronous uploads; no host sync); False, nothing written: the
        variant's graph cannot compute this step. `feed`: the ids on the device, copied over the host's."""
        self._wait_uploads()
        if not self.attn.fill(step.rows, size, variant):
            return False
        n = step.rows.num_seqs
        host = self._np_tokens
        host[0, :n], host[1, :n] = step.token_ids, step.positions
        if n < size:
            host[:, n:size] = 0
        self.tokens[:, :size].copy_(self.host_tokens[:, :size], non_blocking=True)
        if feed is not None:
            self.tokens[0, :n].copy_(feed)
        if self.device.type == "cuda":
            self._uploaded = torch.cuda.Event()
            self._uploaded.record()
        return True

    def _wait_uploads(self) -> None:
        """Wait until the last step's uploads have left the host mirrors (they may be queued behind a step still
        running when the next one is prepared ahead of it)."""
        if self._uploaded is not None:
            self._uploaded.synchronize()
            self._uploaded = None

    def _context(self, size: int, variant: str = "") -> ForwardContext:
        segments = self.bank.per_row_segments(*self.attn.lora_rows(size))
        positions = self.tokens[1, :size]
        meta = self.attn.metadata(size, variant=variant)
        return ForwardContext(meta, LoRAMetadata(segments, segments), self.expand_values, positions, positions)

    def pool(self) -> torch.cuda._POOL_HANDLE:
        """The memory pool every graph of this runner is captured into (decode and prefill: they never overlap)."""
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        return self._pool

    def _capture(self, size: int, variant: str = "") -> tuple[torch.cuda.CUDAGraph, torch.Tensor]:
        self.attn.pad(size, variant)  # safe contents for the warm-up run (it really executes)
        self.tokens[:, :size] = 0
        return capture_forward(self.model, self.tokens[0, :size], self._context(size, variant), self.pool())


def capture_forward(
    model: torch.nn.Module, ids: torch.Tensor, ctx: ForwardContext, pool: torch.cuda._POOL_HANDLE
) -> tuple[torch.cuda.CUDAGraph, torch.Tensor]:
    """One forward pass over static inputs, run once (compiling its kernels outside the capture), then captured
    into `pool`; returns the graph and its output buffer."""
    model(ids, ctx)
    torch.cuda.synchronize(ids.device)
    graph = torch.cuda.CUDAGraph()
    # thread_local: a server thread touching CUDA meanwhile (e.g. a metrics scrape) must not void the capture
    with torch.cuda.graph(graph, pool=pool, capture_error_mode="thread_local"):
        hidden = model(ids, ctx)
    return graph, hidden
