"""CUDA graphs for decode steps.

An eager decode step of an 8B model launches ~2,000 kernels (66 per layer) and the GPU idles while Python issues
them. A captured graph replays the whole stack in one launch. Everything a graph reads lives in static buffers
that each step refills in place: token ids, positions, pool slots, context lengths, block tables and the adapter
slot of every row. Batches are padded to the next captured size; padding rows write nowhere (slot -1) and their
outputs are dropped. Graphs are captured lazily, the first time a size is needed, into one shared memory pool.
"""

from __future__ import annotations

import logging
import time

import numpy as np
import torch

from lragent.cache.kv_cache import KVCache
from lragent.engine.sequence import Sequence
from lragent.kernels.metadata import AttentionMetadata
from lragent.kernels.triton_attention import default_num_splits
from lragent.kernels.triton_lora import SegmentPlan
from lragent.lora.metadata import LoRAMetadata
from lragent.models.context import ForwardContext
from lragent.models.llama import CausalLM

logger = logging.getLogger(__name__)

# rows of the int64 buffer
_IDS, _POS, _BASE_SLOT, _LR_SLOT, _LORA = range(5)


def capture_sizes(max_batch: int) -> list[int]:
    """1, 2, 4, 8, then every multiple of 16 up to `max_batch` (the largest always included)."""
    sizes = [s for s in (1, 2, 4, 8) if s < max_batch] + list(range(16, max_batch, 16))
    return sorted(set(sizes + [max_batch]))


def _host(t: torch.Tensor, pin: bool) -> torch.Tensor:
    return t.pin_memory() if pin else t


class DecodeGraphs:
    def __init__(
        self, model: CausalLM, cache: KVCache, expand_values: bool, max_batch: int, max_model_len: int,
        device: torch.device,
    ):
        self.model, self.cache, self.expand_values = model, cache, expand_values
        self.sizes = capture_sizes(max_batch)
        self.max_batch = self.sizes[-1]
        self.max_model_len = max_model_len
        self.block_size = cache.block_size
        self.width = -(-max_model_len // cache.block_size)  # block-table columns
        self.has_lr = cache.lr is not None
        self.num_kv_heads = model.config.num_kv_heads
        self.device = device
        b, w = self.max_batch, self.width
        self.i64 = torch.zeros(5, b, dtype=torch.int64, device=device)
        self.i32 = torch.zeros(2, b, dtype=torch.int32, device=device)  # context lengths, adapter slot (int32)
        self.tables = torch.zeros(2 if self.has_lr else 1, b, w, dtype=torch.int32, device=device)
        self.seg_start = torch.arange(b + 1, dtype=torch.int32, device=device)
        pin = device.type == "cuda"  # (the buffers also work unpinned on the CPU, where the filling is tested)
        self.host_i64 = _host(torch.zeros(5, b, dtype=torch.int64), pin)
        self.host_i32 = _host(torch.zeros(2, b, dtype=torch.int32), pin)
        self.host_tables = _host(torch.zeros(self.tables.shape, dtype=torch.int32), pin)
        self.host_staging = _host(torch.zeros(self.tables.numel(), dtype=torch.int32), pin)
        self.staging = torch.zeros(self.tables.numel(), dtype=torch.int32, device=device)
        # per row: (base block list, LR block list, entries already in host_tables) of the sequence it held last
        # step; block lists only grow in place or are replaced, so an unchanged list needs only its new entries
        self._rows: list[tuple[list[int], list[int], int] | None] = [None] * b
        self._graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self._pool = None

    def supports(self, seqs: list[Sequence], is_prefill: bool) -> bool:
        """Decode rows only, within the captured sizes, each writing its own keys/base values."""
        return (
            not is_prefill
            and 0 < len(seqs) <= self.max_batch
            and all(s.num_base_cached <= s.num_computed for s in seqs)
        )

    def clear(self) -> None:
        """Forget every graph (adapter stacks were added or removed, so the captured launches are stale) and their
        memory pool: once its last graph is gone the allocator retires the pool, and capturing into the stale
        handle trips an allocator assertion (seen on torch 2.11)."""
        self._graphs.clear()
        self._pool = None

    def run(self, seqs: list[Sequence]) -> torch.Tensor:
        """Final hidden states [len(seqs), hidden] of one decode step."""
        size = next(s for s in self.sizes if s >= len(seqs))
        if size not in self._graphs:
            start = time.perf_counter()
            self._graphs[size] = self._capture(size)
            logger.info("captured the decode graph of batch size %d in %.2f s", size, time.perf_counter() - start)
        graph, hidden = self._graphs[size]
        self._fill(seqs, size)
        graph.replay()
        return hidden[: len(seqs)]

    # ---- static inputs -------------------------------------------------------------------------------------
    def _fill(self, seqs: list[Sequence], size: int) -> None:
        """Write the step's rows into pinned host buffers, then upload them asynchronously (no host sync)."""
        n, bs = len(seqs), self.block_size
        i64, i32, tables = self.host_i64.numpy(), self.host_i32.numpy(), self.host_tables.numpy()
        used = 1
        for i, seq in enumerate(seqs):
            pos = seq.num_computed
            i64[:, i] = (
                seq.token_ids[pos], pos, seq.base_blocks[pos // bs] * bs + pos % bs,
                seq.lr_blocks[pos // bs] * bs + pos % bs if self.has_lr else -1, seq.lora_slot,
            )
            i32[:, i] = (pos + 1, seq.lora_slot)
            nb = pos // bs + 1
            row = self._rows[i]
            done = row[2] if row is not None and row[0] is seq.base_blocks and row[1] is seq.lr_blocks else 0
            if nb > done:
                tables[0, i, done:nb] = seq.base_blocks[done:nb]
                if self.has_lr:
                    tables[1, i, done:nb] = seq.lr_blocks[done:nb]
            self._rows[i] = (seq.base_blocks, seq.lr_blocks, nb)
            used = max(used, nb)
        self._pad_rows(i64, i32, tables, self._rows, n, size)
        self.i64[:, :size].copy_(self.host_i64[:, :size], non_blocking=True)
        self.i32[:, :size].copy_(self.host_i32[:, :size], non_blocking=True)
        # only the used corner of the tables travels: staged contiguously, then scattered on the device
        # (the previous step's copies are done: its sampling synchronised with the host)
        corner = self.host_tables[:, :size, :used]
        count = corner.numel()
        self.host_staging[:count].view(corner.shape).copy_(corner)
        self.staging[:count].copy_(self.host_staging[:count], non_blocking=True)
        self.tables[:, :size, :used].copy_(self.staging[:count].view(corner.shape))

    @staticmethod
    def _pad_rows(i64: np.ndarray, i32: np.ndarray, tables: np.ndarray, rows: list, n: int, size: int) -> None:
        """Padding rows: token 0 at position 0, slot -1 (no store), one key of block 0, no adapter."""
        rows[n:size] = [None] * (size - n)
        i64[:, n:size] = 0
        i64[_BASE_SLOT, n:size] = -1
        i64[_LR_SLOT, n:size] = -1
        i32[0, n:size] = 1
        i32[1, n:size] = 0
        tables[:, n:size, 0] = 0

    def _context(self, size: int) -> ForwardContext:
        splits = default_num_splits(size, self.num_kv_heads, self.max_model_len, self.device)
        attn = AttentionMetadata(
            query_lens=[1] * size,
            context_lens=[self.max_model_len] * size,
            query_start=self.seg_start[: size + 1],
            context_lens_t=self.i32[0, :size],
            base_block_tables=self.tables[0, :size],
            lr_block_tables=self.tables[1, :size] if self.has_lr else None,
            seq_lora_slots=self.i64[_LORA, :size],
            base_write_idx=None,
            base_slots=self.i64[_BASE_SLOT, :size],
            lr_slots=self.i64[_LR_SLOT, :size] if self.has_lr else None,
            is_decode=True,
            decode_splits=splits,
        )
        plan = SegmentPlan.per_token(self.seg_start[: size + 1], self.i32[1, :size])
        positions = self.i64[_POS, :size]
        return ForwardContext(attn, LoRAMetadata(plan, plan), self.expand_values, positions, positions)

    def _capture(self, size: int) -> tuple[torch.cuda.CUDAGraph, torch.Tensor]:
        # safe contents for the warm-up run (it really executes: no pool writes, finite reads)
        self._pad_rows(self.host_i64.numpy(), self.host_i32.numpy(), self.host_tables.numpy(), self._rows, 0, size)
        self.i64[:, :size].copy_(self.host_i64[:, :size])
        self.i32[:, :size].copy_(self.host_i32[:, :size])
        self.tables[:, :size, 0] = 0
        ctx = self._context(size)
        ids = self.i64[_IDS, :size]
        self.model(ids, ctx)  # compiles the Triton kernels for this size outside the capture
        torch.cuda.synchronize(self.device)
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        graph = torch.cuda.CUDAGraph()
        # thread_local: a server thread touching CUDA meanwhile (e.g. a metrics scrape) must not void the capture
        with torch.cuda.graph(graph, pool=self._pool, capture_error_mode="thread_local"):
            hidden = self.model(ids, ctx)
        return graph, hidden
