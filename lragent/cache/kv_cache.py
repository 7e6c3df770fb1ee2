"""The cache tensors of the pools a sharing scheme declares: keys and base values (one block id space), and the
LR pool (its own block ids; rows of rank r, or of N x r under STACKED_LR)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lragent.cache.sharing import PoolKind, SharingScheme
from lragent.model_config import ModelConfig


@dataclass(frozen=True)
class CacheLayout:
    """How many blocks each declared pool has (pool name -> blocks; see `SharingScheme.pools`)."""

    block_size: int
    num_blocks: dict[str, int]
    lr_rank: int  # width of an LR row: the rank, or the rank per adapter slot when stacked (`SharingScheme.lr_width`)

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
        unit = sum(p.bytes_per_block(config, block_size, lr_rank, dtype) * copies[p.name] for p in scheme.pools)
        num_kv = int(budget_bytes // unit)
        if num_kv < 2:
            raise ValueError(
                f"KV cache budget of {budget_bytes} bytes holds fewer than 2 blocks of {block_size} tokens"
            )
        return cls(block_size, {name: num_kv * n for name, n in copies.items()}, lr_rank)


class KVCache:
    """The pool tensors of a layout: `key` / `value` [L, blocks, block_size, kv_heads, d] for the KV pool, `lr`
    [L, blocks, block_size, rank] for the LR pool (None when the scheme declares none)."""

    def __init__(self, config: ModelConfig, layout: CacheLayout, dtype: torch.dtype, device: torch.device):
        kv, lr = layout.num_base_blocks, layout.num_lr_blocks
        shape = (config.num_layers, kv, layout.block_size, config.num_kv_heads, config.head_dim)
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
        self.layout = layout
        self.block_size = layout.block_size
        self.num_kv_heads = config.num_kv_heads
        self.head_dim = config.head_dim
        self.lr_rank = layout.lr_rank

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
