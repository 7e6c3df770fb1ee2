"""The cache tensors of the pools a sharing scheme declares: keys and base values (one block id space), and the
LR pool (its own block ids; rows of rank r, or of N x r under STACKED_LR). Under DROIDSPEAK the KV pool covers the
layers outside the critical set, the critical layers have a KV pool of their own (`KVCache.critical`), and the
hidden-state pool holds the residual stream entering each run of critical layers."""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from lragent.cache.sharing import PoolKind, SharingScheme, hidden_boundaries
from lragent.model_config import ModelConfig


@dataclass(frozen=True)
class CacheLayout:
    """How many blocks each declared pool has (pool name -> blocks; see `SharingScheme.pools`)."""

    block_size: int
    num_blocks: dict[str, int]
    lr_rank: int  # width of an LR row: the rank, or the rank per adapter slot when stacked (`SharingScheme.lr_width`)
    critical_layers: tuple[int, ...] = ()  # DROIDSPEAK: layers in the CRITICAL_KV pool, not the KV pool

    @property
    def num_base_blocks(self) -> int:
        return self.num_blocks.get(PoolKind.KV.value, 0)

    @property
    def num_lr_blocks(self) -> int:
        return self.num_blocks.get(PoolKind.LR.value, 0)

    @classmethod
    def for_budget(
        cls,
        config: ModelConfig,
        scheme: SharingScheme,
        budget_bytes: int,
        block_size: int,
        lr_rank: int,
        num_agents: int,
        dtype: torch.dtype,
    ) -> CacheLayout:
        """Split the budget so that every KV block pairs with its share of each other declared pool."""
        copies = {p.name: scheme.copies_per_kv_block(p, num_agents) for p in scheme.pools}
        critical = scheme.critical_layers
        unit = sum(
            p.bytes_per_block(config, block_size, lr_rank, dtype, critical) * copies[p.name] for p in scheme.pools
        )
        num_kv = int(budget_bytes // unit)
        if num_kv < 2:
            raise ValueError(
                f"KV cache budget of {budget_bytes} bytes holds fewer than 2 blocks of {block_size} tokens"
            )
        return cls(block_size, {name: num_kv * n for name, n in copies.items()}, lr_rank, critical)


@dataclass
class HiddenRows:
    """One step's traffic with the HIDDEN pool (DROIDSPEAK), the same at every boundary layer."""

    write_idx: torch.Tensor | None  # tokens whose residual stream is stored (None: every token of the step)
    write_slots: torch.Tensor  # [n written] flat slots (block * block_size + offset) in the pool
    read_idx: torch.Tensor | None  # tokens another agent computed: they take the stored state (None: none)
    read_slots: torch.Tensor | None  # their flat slots


class KVCache:
    """The pool tensors of a layout: `key` / `value` [L, blocks, block_size, kv_heads, d] for the KV pool, `lr`
    [L, blocks, block_size, rank] for the LR pool (None when the scheme declares none).

    With critical layers (DROIDSPEAK) the KV pool's L counts the other layers only; `critical` is a KVCache of the
    CRITICAL_KV pool's blocks over the critical layers, and `hidden` [boundaries, blocks, block_size, hidden_size]
    the HIDDEN pool. `for_layer` maps a model layer to its pool and its index there."""

    def __init__(self, config: ModelConfig, layout: CacheLayout, dtype: torch.dtype, device: torch.device):
        kv, lr = layout.num_base_blocks, layout.num_lr_blocks
        critical = layout.critical_layers
        shared = [layer for layer in range(config.num_layers) if layer not in critical]
        self.shared_index = {layer: i for i, layer in enumerate(shared)}
        self.critical_index = {layer: i for i, layer in enumerate(critical)}
        self.hidden_index = {layer: i for i, layer in enumerate(hidden_boundaries(critical))}
        shape = (len(shared), kv, layout.block_size, config.num_kv_heads, config.head_dim)
        self.key = torch.zeros(shape, dtype=dtype, device=device)
        self.value = torch.zeros(shape, dtype=dtype, device=device)  # X W_v0 (full values under FULL_SHARED)
        self.lr = (
            torch.zeros(config.num_layers, lr, layout.block_size, layout.lr_rank, dtype=dtype, device=device)
            if lr
            else None
        )
        # per block of each pool: 1 once a non-finite entry was stored there (set by the backends' stores)
        self.flags = {
            name: torch.zeros(n, dtype=torch.int8, device=device) for name, n in layout.num_blocks.items() if n
        }
        self.critical: KVCache | None = None
        n_critical = layout.num_blocks.get(PoolKind.CRITICAL_KV.value, 0)
        if n_critical and critical:
            sub = CacheLayout(layout.block_size, {PoolKind.KV.value: n_critical}, layout.lr_rank)
            self.critical = KVCache(replace(config, num_layers=len(critical)), sub, dtype, device)
            self.critical.flags = {PoolKind.KV.value: self.flags[PoolKind.CRITICAL_KV.value]}  # marks land here
        n_hidden = layout.num_blocks.get(PoolKind.HIDDEN.value, 0)
        self.hidden = (
            torch.zeros(
                len(self.hidden_index), n_hidden, layout.block_size, config.hidden_size, dtype=dtype, device=device
            )
            if n_hidden and self.hidden_index
            else None
        )
        self.layout = layout
        self.block_size = layout.block_size
        self.num_kv_heads = config.num_kv_heads
        self.head_dim = config.head_dim
        self.lr_rank = layout.lr_rank

    def for_layer(self, layer: int) -> tuple[KVCache, int] | None:
        """The critical pool's cache and the layer's index there, for a critical layer; None for the others (they live
        in this cache's KV pool at `shared_index[layer]`)."""
        index = self.critical_index.get(layer)
        return None if index is None or self.critical is None else (self.critical, index)

    def exchange_hidden(self, layer: int, hidden: torch.Tensor, rows: HiddenRows) -> None:
        """At a hidden boundary `layer` (the first of a run of critical layers), in place on the residual stream
        `hidden` [T, H]: store it for the tokens computed in full, and replace it by the stored one for the tokens
        another agent computed (their critical layers are recomputed from it)."""
        assert self.hidden is not None, "a hidden boundary comes with the HIDDEN pool"
        pool = self.hidden[self.hidden_index[layer]].view(-1, hidden.shape[-1])
        if rows.read_idx is not None and rows.read_slots is not None:
            hidden.index_copy_(0, rows.read_idx, pool.index_select(0, rows.read_slots).to(hidden.dtype))
        stored = hidden if rows.write_idx is None else hidden.index_select(0, rows.write_idx)
        if stored.shape[0]:
            stored = stored.to(pool.dtype)
            pool.index_copy_(0, rows.write_slots, stored)
            self.mark_nonfinite(PoolKind.HIDDEN.value, rows.write_slots, ~stored.isfinite().all(1))

    def mark_nonfinite(self, pool: str, slots: torch.Tensor, bad: torch.Tensor) -> None:
        """Flag the blocks of `slots` whose row is `bad` (the reference store; the Triton store kernel does the same
        in place). No host sync: a max-scatter of 0/1 per row."""
        blocks = torch.div(slots, self.block_size, rounding_mode="floor")
        self.flags[pool].scatter_reduce_(0, blocks, bad.to(torch.int8), reduce="amax")

    def nonfinite_blocks(self, blocks: dict[str, list[int]]) -> dict[str, set[int]]:
        """Blocks of each pool that received a NaN or inf since they were last cleared: never to be published into
        the shared cache. The stores flag them as they write, so this is one small gather and one host sync."""
        checks = [(pool, ids) for pool, ids in blocks.items() if ids and pool in self.flags]
        if not checks:
            return {}
        device = self.key.device
        index = torch.tensor([b for _, ids in checks for b in ids], dtype=torch.long)
        index = (index.pin_memory() if device.type == "cuda" else index).to(device, non_blocking=True)
        flags, at = [], 0
        for pool, ids in checks:
            flags.append(self.flags[pool].index_select(0, index[at : at + len(ids)]))
            at += len(ids)
        marked = torch.cat(flags).tolist()
        bad: dict[str, set[int]] = {}
        at = 0
        for pool, ids in checks:
            bad[pool] = {b for b, m in zip(ids, marked[at : at + len(ids)]) if m}
            at += len(ids)
        return bad

    def clear_flags(self, blocks: dict[str, list[int]]) -> None:
        """Forget the marks of blocks going back to the free list (their next owner writes them afresh)."""
        for pool, ids in blocks.items():
            if ids and pool in self.flags:
                index = torch.tensor(ids, dtype=torch.long)
                index = (index.pin_memory() if self.key.is_cuda else index).to(self.key.device, non_blocking=True)
                self.flags[pool].index_fill_(0, index, 0)
