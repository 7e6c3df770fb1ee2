"""The Triton attention backend: the store kernel plus Flash-LoRA-Attention (varlen prefill / split-KV decode)."""

from __future__ import annotations

import torch

from lragent.cache.kv_cache import KVCache
from lragent.kernels.backend import AttentionBackend
from lragent.kernels.metadata import AttentionMetadata
from lragent.kernels.triton_attention import paged_decode, paged_prefill
from lragent.kernels.triton_store import store_kv_lr


class TritonBackend(AttentionBackend):
    """Reads the paged pools directly; no host synchronisation (lengths come from the metadata's host lists).

    `decode_splits`: a fixed split-KV count for decode (set it before capturing CUDA graphs, where the grid must
    not depend on the step's lengths); None picks one per step from the batch size and the longest context.
    """

    name = "triton"

    def __init__(self, decode_splits: int | None = None):
        self.decode_splits = decode_splits

    def store(self, cache: KVCache, layer: int, key, value, lr, meta: AttentionMetadata) -> None:
        lr_pool = cache.lr[layer] if cache.lr is not None else None
        store_kv_lr(
            cache.key[layer], cache.value[layer], lr_pool,
            key, value, meta.base_slots,
            lr if lr_pool is not None else None, meta.lr_slots,
        )

    def attend(
        self,
        cache: KVCache,
        layer: int,
        query: torch.Tensor,
        value_up: torch.Tensor | None,
        lora_scaling: torch.Tensor,
        meta: AttentionMetadata,
    ) -> torch.Tensor:
        lr_pool = cache.lr[layer] if cache.lr is not None and value_up is not None else None
        args = dict(
            key_pool=cache.key[layer],
            value_pool=cache.value[layer],
            lr_pool=lr_pool,
            base_block_tables=meta.base_block_tables,
            lr_block_tables=meta.lr_block_tables,
            seq_lora_slots=meta.seq_lora_slots,
            value_up=value_up if lr_pool is not None else None,
            lora_scaling=lora_scaling,
        )
        if meta.is_decode:
            return paged_decode(
                query,
                context_lens=meta.context_lens_t,
                max_context=max(meta.context_lens, default=1),
                num_splits=meta.decode_splits or self.decode_splits,
                **args,
            )
        return paged_prefill(
            query,
            query_start=meta.query_start,
            context_lens=meta.context_lens_t,
            max_query_len=max(meta.query_lens, default=0),
            max_context=max(meta.context_lens, default=1),
            **args,
        )
