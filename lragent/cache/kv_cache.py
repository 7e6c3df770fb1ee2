"""The cache tensors of the pools a sharing scheme declares: keys and base values (one block id space), and the
rank-r LR pool (its own block ids)."""

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
    lr_rank: int

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
            raise ValueError(f"KV cache budget of {budget_bytes} bytes holds fewer than 2 blocks of {block_size} tokens")
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
        self.layout = layout
        self.block_size = layout.block_size
        self.num_kv_heads = config.num_kv_heads
        self.head_dim = config.head_dim
        self.lr_rank = layout.lr_rank

    def tensors(self, pool: str) -> tuple[torch.Tensor, ...]:
        """The tensors holding one declared pool's entries (block ids index their dimension 1)."""
        if pool == PoolKind.KV.value:
            return self.key, self.value
        return () if self.lr is None else (self.lr,)

    def pool_bytes(self) -> dict[str, int]:
        """Allocated bytes of each pool."""
        def size(t: torch.Tensor | None) -> int:
            return 0 if t is None else t.numel() * t.element_size()

        return {"key": size(self.key), "base_value": size(self.value), "lr": size(self.lr)}

    def nonfinite_blocks(self, blocks: dict[str, list[int]]) -> dict[str, set[int]]:
        """Blocks of each pool holding a NaN or inf in any layer: never to be published into the shared cache.

        One host sync for all pools; blocks are read in chunks so a long prefill's check never gathers more than
        ~256 MiB at once.
        """
        checks = []
        for pool, ids in blocks.items():
            tensors = self.tensors(pool)
            if ids and tensors:
                ok = self._finite(tensors[0], ids)
                for t in tensors[1:]:
                    ok &= self._finite(t, ids)
                checks.append((pool, ids, ok))
        if not checks:
            return {}
        flags = torch.cat([ok for _, _, ok in checks]).tolist()
        bad: dict[str, set[int]] = {}
        at = 0
        for pool, ids, _ in checks:
            bad[pool] = {b for b, fine in zip(ids, flags[at : at + len(ids)]) if not fine}
            at += len(ids)
        return bad

    @staticmethod
    def _finite(pool: torch.Tensor, ids: list[int]) -> torch.Tensor:
        """Per block: every entry finite. A float32 sum over the block propagates any NaN or inf (inf - inf is NaN),
        so one reduction pass over the gathered rows decides it; a finite block could only fail if its entries
        summed past 3e38 (a broken cache anyway, and the cost of a false alarm is one failed request)."""
        flat = pool.flatten(2)  # [L, N, entries per block]
        chunk = max(1, (256 << 20) // max(1, flat[:, 0].numel() * flat.element_size()))
        index = torch.tensor(ids, dtype=torch.long)
        index = (index.pin_memory() if pool.is_cuda else index).to(pool.device, non_blocking=True)
        sums = [
            torch.sum(flat.index_select(1, index[i : i + chunk]), dim=(0, 2), dtype=torch.float32)
            for i in range(0, len(ids), chunk)
        ]
        return torch.cat(sums).isfinite()
