"""The Triton attention backend: the store kernel plus Flash-LoRA-Attention (varlen prefill / split-KV decode)."""

from __future__ import annotations

from typing import Any

import torch

from lragent.cache.kv_cache import KVCache
from lragent.kernels import flashinfer_prefill, key_lr_prefill, value_lr_prefill
from lragent.kernels.backend import AttentionBackend, KeyLR, LayerOps
from lragent.kernels.graph_inputs import GraphInputs, PrefillGraphInputs
from lragent.kernels.metadata import AttentionMetadata, BatchRows
from lragent.kernels.triton_attention import default_num_splits, paged_decode, paged_prefill
from lragent.kernels.triton_cascade import (
    MAX_GROUPS,
    CascadeOptions,
    PrefixMemo,
    StaticCascadePlan,
    cascade_decode,
    find_groups,
    plan_cascade,
)
from lragent.kernels.triton_fused import add_rms_norm, rotary, silu_mul
from lragent.kernels.triton_lora import TritonLoRABank
from lragent.kernels.triton_store import store_kv_lr
from lragent.lora.bank import LoRABank

CASCADE = "cascade"  # the decode-graph variant whose metadata carries a fixed-shape cascade plan
_OPS = LayerOps(add_rms_norm=add_rms_norm, rotary=rotary, silu_mul=silu_mul)


class TritonGraphInputs(GraphInputs):
    """Graph inputs whose captured metadata fixes the split-KV count: a graph's grid cannot follow the lengths.

    With cascade decode on, each bucket of 2+ rows also has a "cascade" variant whose metadata carries a
    `StaticCascadePlan`'s fixed-shape plan; `fill` writes the step's groups there, or declines a step whose groups
    do not fit (too many, or mixed adapter slots where a layer's choice depended on them), which then runs
    eagerly."""

    def __init__(self, num_kv_heads: int, backend: TritonBackend, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.num_kv_heads = num_kv_heads
        self.backend = backend
        self.max_batch = self.i32.shape[1]
        self._cascade: StaticCascadePlan | None = None

    @property
    def cascade(self) -> StaticCascadePlan:
        if self._cascade is None:
            self._cascade = StaticCascadePlan(
                self.max_batch, self.backend.max_groups, self.max_model_len, self.block_size, self.device
            )
        return self._cascade

    def variants(self, size: int) -> list[str]:
        opt = self.backend.cascade
        return [CASCADE] if opt is not None and size >= opt.min_seqs else []

    def metadata(self, size: int, decode_splits: int | None = None, variant: str = "") -> AttentionMetadata:
        splits = decode_splits or default_num_splits(size, self.num_kv_heads, self.max_model_len, self.device)
        meta = super().metadata(size, splits, variant)
        if variant == CASCADE:
            meta.cascade = self.cascade.plan(size)
        return meta

    def pad(self, size: int, variant: str = "") -> None:
        super().pad(size, variant)
        if variant == CASCADE:
            self.cascade.clear(size)

    def fill(self, rows: BatchRows, size: int, variant: str = "") -> bool:
        if variant == CASCADE:
            backend = self.backend
            groups = backend.cascade_groups(rows)
            if not self.cascade.fits(groups, rows, size):
                backend.cascade_eager_steps += 1
                return False
            self.cascade.fill(groups, rows, size)
            backend.cascade_steps += 1
            backend.cascade_graph_steps += 1
        return super().fill(rows, size, variant)


class TritonBackend(AttentionBackend):
    """Reads the paged pools directly; no host synchronisation (lengths come from the metadata's host lists).

    `decode_splits`: a fixed split-KV count for decode (set it before capturing CUDA graphs, where the grid must
    not depend on the step's lengths); None picks one per step from the batch size and the longest context.
    `cascade`: group decode rows by shared leading blocks and read those keys once per group
    (`lragent.kernels.triton_cascade`); None (the default): plain split-KV decode. Under CUDA graphs a step with
    groups replays its bucket's cascade graph when they fit `max_groups` group slots, else runs eagerly
    (`cascade_eager_steps` counts those).
    """

    name = "triton"
    supports_cuda_graphs = True

    def __init__(
        self, decode_splits: int | None = None, cascade: CascadeOptions | None = None, max_groups: int = MAX_GROUPS
    ):
        self.decode_splits = decode_splits
        self.cascade = cascade
        self.max_groups = max_groups  # group slots of a decode graph's cascade plan
        self.cascade_steps = 0  # decode steps that found cascade groups (a counter for tests and stats)
        self.cascade_graph_steps = 0  # of those, steps replayed from a cascade decode graph
        self.cascade_eager_steps = 0  # of those, steps whose groups did not fit a graph's plan (run eagerly)
        self._planned: tuple[BatchRows, list[tuple[list[int], int]]] | None = None  # the last step's groups
        self._memo = PrefixMemo()  # block-list comparisons carried across steps

    def enable_cascade(self, block_size: int) -> bool:
        self.cascade = CascadeOptions.for_tokens(block_size)
        return True

    def cascade_groups(self, rows: BatchRows) -> list[tuple[list[int], int]]:
        """The step's cascade groups, found once per BatchRows (asked by the runner, then by `metadata`)."""
        if self._planned is None or self._planned[0] is not rows:
            found = find_groups(rows, self.cascade, self._memo) if self.cascade is not None and rows.is_decode else []
            self._planned = (rows, found)
        return self._planned[1]

    def decode_graph(self, rows: BatchRows) -> str:
        return CASCADE if self.cascade is not None and self.cascade_groups(rows) else ""

    def metadata(self, rows: BatchRows, device: torch.device) -> AttentionMetadata:
        meta = super().metadata(rows, device)
        if self.cascade is not None and rows.is_decode:
            meta.cascade = plan_cascade(self.cascade_groups(rows), rows, self.cascade.block_size, device)
            self.cascade_steps += meta.cascade is not None
        return meta

    @property
    def layer_ops(self) -> LayerOps:
        return _OPS

    @property
    def lora_bank_class(self) -> type[LoRABank]:
        return TritonLoRABank

    def graph_inputs(
        self, cache: KVCache, pools: list[str], max_batch: int, max_model_len: int, device: torch.device
    ) -> TritonGraphInputs:
        return TritonGraphInputs(cache.num_kv_heads, self, pools, max_batch, max_model_len, cache.block_size, device)

    def prefill_graph_inputs(
        self, cache: KVCache, pools: list[str], max_seqs: int, max_tokens: int, max_model_len: int, device: torch.device
    ) -> PrefillGraphInputs:
        return PrefillGraphInputs(pools, max_seqs, max_tokens, max_model_len, cache.block_size, device)

    def store(self, cache: KVCache, layer: int, key, value, lr, meta: AttentionMetadata) -> None:
        lr_pool = cache.lr[layer] if cache.lr is not None else None
        flags = getattr(cache, "flags", None)  # caches without flag arrays (kernel tests) skip the marking
        store_kv_lr(
            cache.key[layer],
            cache.value[layer],
            lr_pool,
            key,
            value,
            meta.base_slots,
            lr if lr_pool is not None else None,
            meta.lr_slots,
            kv_flags=flags["kv"] if flags else None,
            lr_flags=flags.get("lr", flags["kv"]) if flags else None,
            block_size=cache.block_size,
        )

    def attend(
        self,
        cache: KVCache,
        layer: int,
        query: torch.Tensor,
        value_up: torch.Tensor | None,
        lora_scaling: torch.Tensor,
        meta: AttentionMetadata,
        key_lr: KeyLR | None = None,
    ) -> torch.Tensor:
        key_up = None if key_lr is None else key_lr.up
        lr_pool = cache.lr[layer] if cache.lr is not None and (value_up is not None or key_up is not None) else None
        args: dict[str, Any] = dict(
            key_pool=cache.key[layer],
            value_pool=cache.value[layer],
            lr_pool=lr_pool,
            base_block_tables=meta.base_block_tables,
            lr_block_tables=meta.lr_block_tables,
            seq_lora_slots=meta.seq_lora_slots,
            value_up=value_up if lr_pool is not None else None,
            lora_scaling=lora_scaling,
            key_lr=key_lr,
        )
        if meta.is_decode:
            if meta.cascade is not None:
                out = cascade_decode(query, context_lens=meta.context_lens_t, plan=meta.cascade, **args)
                if out is not None:  # else a layout this layer cannot cascade (`cascade_supported`): plain decode
                    return out
            return paged_decode(
                query,
                context_lens=meta.context_lens_t,
                max_context=max(meta.context_lens, default=1),
                num_splits=meta.decode_splits or self.decode_splits,
                **args,
            )
        if key_lr_prefill.KEY_LR_PREFILL == "materialize" and key_up is not None and lr_pool is not None:
            assert key_lr is not None
            args.update(key_rows=key_lr_prefill.materialize_keys(
                cache.key[layer], lr_pool, meta.base_block_tables, args["lr_block_tables"], meta.seq_lora_slots,
                lora_scaling, key_lr, meta.context_lens,
            ))  # fmt: skip
        if (
            args["value_up"] is not None
            and meta.graph_seqs is None
            and value_lr_prefill.gathered_route_worth_it(
                meta.query_lens,
                meta.context_lens,
                query.device,
                row_bytes=value_lr_prefill.row_bytes(cache.value[layer]),
            )
        ):
            assert lr_pool is not None and value_up is not None  # value_up passed on only with an LR pool
            if meta.scratch_rows is None:
                meta.scratch_rows = value_lr_prefill.ScratchRows.of(meta.context_lens, query.device)
            keys = args.pop("key_rows")[0] if "key_rows" in args else None
            args.update(value_lr_prefill.gathered_prefill_args(
                cache.key[layer], cache.value[layer], lr_pool, meta.base_block_tables, args["lr_block_tables"],
                meta.seq_lora_slots, value_up, lora_scaling, meta.scratch_rows, key_lr, keys,
            ))  # fmt: skip
            if flashinfer_prefill.serves(query):  # plain attention over the gathered rows: the library's, if faster
                if meta.library_prefill is None:
                    kv_heads = cache.key[layer].shape[2]
                    meta.library_prefill = flashinfer_prefill.RaggedPrefill(
                        meta.query_lens, meta.context_lens, query, kv_heads
                    )
                return meta.library_prefill.run(query, args["key_rows"][0], args["value_rows"][0])
        return paged_prefill(
            query,
            query_start=meta.query_start,
            context_lens=meta.context_lens_t,
            max_query_len=max(meta.query_lens, default=0),
            max_context=max(meta.context_lens, default=1),
            graph_seqs=meta.graph_seqs,
            **args,
        )
