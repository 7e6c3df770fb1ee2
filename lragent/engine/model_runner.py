"""Turns a scheduled batch into tensors and metadata, runs the model once, samples."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

import torch

from lragent.cache.kv_cache import KVCache
from lragent.cache.sharing import SharingScheme
from lragent.engine.sampler import sample
from lragent.engine.scheduler import ScheduledBatch
from lragent.kernels.metadata import AttentionMetadata
from lragent.lora.metadata import LoRAMetadata, group_by_slot
from lragent.models.context import ForwardContext
from lragent.models.llama import CausalLM

if TYPE_CHECKING:
    from lragent.engine.cuda_graph import DecodeGraphs


def _upload(values: list, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Host list -> device tensor; pinned staging keeps the copy asynchronous on CUDA (no host sync)."""
    host = torch.tensor(values, dtype=dtype)
    if device.type == "cuda":
        host = host.pin_memory()
    return host.to(device, non_blocking=True)


def _table(tables: list[list[int]], device: torch.device) -> torch.Tensor:
    width = max(1, max(len(t) for t in tables))
    return _upload([t + [-1] * (width - len(t)) for t in tables], torch.int32, device)


class ModelRunner:
    def __init__(self, model: CausalLM, cache: KVCache, scheme: SharingScheme, device: torch.device):
        self.model = model
        self.cache = cache
        self.scheme = scheme
        self.device = device
        self.block_size = cache.block_size
        self.graphs: DecodeGraphs | None = None  # set by the engine on CUDA unless enforce_eager
        self.prepare_s = 0.0  # host time of the last run's input preparation (read through StepStats)
        self.forward_s = 0.0  # the last run, end to end

    def enable_cuda_graphs(self, max_batch: int, max_model_len: int) -> None:
        from lragent.engine.cuda_graph import DecodeGraphs  # imports Triton

        self.graphs = DecodeGraphs(
            self.model, self.cache, not self.scheme.has_lr_pool, max_batch, max_model_len, self.device
        )

    def prepare(self, batch: ScheduledBatch) -> tuple[torch.Tensor, ForwardContext, list[int]]:
        """Flatten the batch; returns input ids, the step's context, and the row of each sampling sequence."""
        bs = self.block_size
        ids, positions, token_slots = [], [], []
        base_idx, base_slots, base_pos, lr_slots = [], [], [], []
        query_start, context_lens, sample_rows = [0], [], []
        for seq, n in zip(batch.seqs, batch.num_tokens):
            start, end = seq.num_computed, seq.num_computed + n
            for pos in range(start, end):
                if pos >= seq.num_base_cached:  # LR prefill skips tokens whose keys/base values exist
                    base_idx.append(len(ids))
                    base_pos.append(pos)
                    base_slots.append(seq.base_blocks[pos // bs] * bs + pos % bs)
                if self.cache.lr is not None:
                    lr_slots.append(seq.lr_blocks[pos // bs] * bs + pos % bs)
                ids.append(seq.token_ids[pos])
                positions.append(pos)
                token_slots.append(seq.lora_slot)
            query_start.append(len(ids))
            context_lens.append(end)
            if end == len(seq):
                sample_rows.append(len(ids) - 1)
        dev = self.device
        all_written = len(base_idx) == len(ids)
        base_token_slots = [token_slots[i] for i in base_idx]
        attn = AttentionMetadata(
            query_lens=list(batch.num_tokens),
            context_lens=context_lens,
            query_start=_upload(query_start, torch.int32, dev),
            context_lens_t=_upload(context_lens, torch.int32, dev),
            base_block_tables=_table([s.base_blocks for s in batch.seqs], dev),
            lr_block_tables=_table([s.lr_blocks for s in batch.seqs], dev) if self.cache.lr is not None else None,
            seq_lora_slots=_upload([s.lora_slot for s in batch.seqs], torch.int64, dev),
            base_write_idx=None if all_written else _upload(base_idx, torch.int64, dev),
            base_slots=_upload(base_slots, torch.int64, dev),
            lr_slots=_upload(lr_slots, torch.int64, dev) if self.cache.lr is not None else None,
            is_decode=not batch.is_prefill,
        )
        pos_t = _upload(positions, torch.int64, dev)
        ctx = ForwardContext(
            attn=attn,
            lora=LoRAMetadata(group_by_slot(token_slots, dev), group_by_slot(base_token_slots, dev)),
            expand_values=not self.scheme.has_lr_pool,
            positions=pos_t,
            base_positions=pos_t if all_written else _upload(base_pos, torch.int64, dev),
        )
        return _upload(ids, torch.int64, dev), ctx, sample_rows

    def run(self, batch: ScheduledBatch) -> tuple[list[int], list[float]]:
        """One forward pass; returns a token (and its log-prob) for each sequence whose pending tokens all ran."""
        start = time.perf_counter()
        self.prepare_s = 0.0
        try:
            return self._run(batch)
        finally:
            self.forward_s = time.perf_counter() - start

    @torch.inference_mode()
    def _run(self, batch: ScheduledBatch) -> tuple[list[int], list[float]]:
        if self.graphs is not None and self.graphs.supports(batch.seqs, batch.is_prefill):
            hidden = self.graphs.run(batch.seqs)  # every decode row samples
        else:
            start = time.perf_counter()
            input_ids, ctx, rows = self.prepare(batch)
            self.prepare_s = time.perf_counter() - start
            if not rows:
                self.model(input_ids, ctx)
                return [], []
            hidden = self.model(input_ids, ctx)[rows]
        logits = self.model.logits(hidden)
        samplers = [s for s, n in zip(batch.seqs, batch.num_tokens) if s.num_computed + n == len(s)]
        return sample(logits, [s.params for s in samplers], [s.generator for s in samplers])
