"""The cache tensors: key and base value pools (shared block ids) and the rank-r LR pool (its own block ids)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lragent.models.config import ModelConfig


@dataclass(frozen=True)
class CacheLayout:
    """How many blocks of each pool fit a byte budget."""

    block_size: int
    num_base_blocks: int
    num_lr_blocks: int  # 0 when the scheme has no LR pool
    lr_rank: int

    @staticmethod
    def bytes_per_base_block(config: ModelConfig, block_size: int, dtype: torch.dtype) -> int:
        """Keys plus base values of one block over all layers."""
        return 2 * config.num_layers * block_size * config.kv_size * dtype.itemsize

    @staticmethod
    def bytes_per_lr_block(config: ModelConfig, block_size: int, rank: int, dtype: torch.dtype) -> int:
        return config.num_layers * block_size * rank * dtype.itemsize

    @classmethod
    def for_budget(
        cls,
        config: ModelConfig,
        budget_bytes: int,
        block_size: int,
        lr_rank: int,
        lr_blocks_per_base_block: int,
        dtype: torch.dtype,
    ) -> CacheLayout:
        """Split the budget so that each base block can pair with `lr_blocks_per_base_block` LR blocks."""
        base = cls.bytes_per_base_block(config, block_size, dtype)
        lr = cls.bytes_per_lr_block(config, block_size, lr_rank, dtype) if lr_blocks_per_base_block else 0
        num_base = int(budget_bytes // (base + lr * lr_blocks_per_base_block))
        if num_base < 2:
            raise ValueError(f"KV cache budget of {budget_bytes} bytes holds fewer than 2 blocks of {block_size} tokens")
        return cls(block_size, num_base, num_base * lr_blocks_per_base_block, lr_rank)


class KVCache:
    def __init__(self, config: ModelConfig, layout: CacheLayout, dtype: torch.dtype, device: torch.device):
        shape = (config.num_layers, layout.num_base_blocks, layout.block_size, config.num_kv_heads, config.head_dim)
        self.key = torch.zeros(shape, dtype=dtype, device=device)
        self.value = torch.zeros(shape, dtype=dtype, device=device)  # X W_v0 (full values under FULL_SHARED)
        self.lr = (
            torch.zeros(config.num_layers, layout.num_lr_blocks, layout.block_size, layout.lr_rank, dtype=dtype, device=device)
            if layout.num_lr_blocks
            else None
        )
        self.layout = layout
        self.block_size = layout.block_size
        self.num_kv_heads = config.num_kv_heads
        self.head_dim = config.head_dim
        self.lr_rank = layout.lr_rank

    def pool_bytes(self) -> dict[str, int]:
        """Allocated bytes of each pool."""
        def size(t: torch.Tensor | None) -> int:
            return 0 if t is None else t.numel() * t.element_size()

        return {"key": size(self.key), "base_value": size(self.value), "lr": size(self.lr)}

    def nonfinite_blocks(self, base_ids: list[int], lr_ids: list[int]) -> tuple[set[int], set[int]]:
        """Blocks (base, LR) holding a NaN or inf in any layer: never to be published into the shared cache.

        One host sync for both pools; the blocks are read in chunks so a long prefill's check never gathers more
        than ~64 MiB at once.
        """
        if not base_ids and not lr_ids:
            return set(), set()
        parts = []
        if base_ids:
            parts.append(self._finite(self.key, base_ids) & self._finite(self.value, base_ids))
        if lr_ids and self.lr is not None:
            parts.append(self._finite(self.lr, lr_ids))
        ok = torch.cat(parts).tolist()
        bad_base = {b for b, fine in zip(base_ids, ok) if not fine}
        bad_lr = {b for b, fine in zip(lr_ids, ok[len(base_ids) :]) if not fine}
        return bad_base, bad_lr

    @staticmethod
    def _finite(pool: torch.Tensor, ids: list[int]) -> torch.Tensor:
        per_block = pool[:, 0].numel() * pool.element_size()
        chunk = max(1, (64 << 20) // max(1, per_block))
        index = torch.tensor(ids, dtype=torch.long, device=pool.device)
        parts = [
            pool.index_select(1, index[i : i + chunk]).isfinite().transpose(0, 1).flatten(1).all(-1)
            for i in range(0, len(ids), chunk)
        ]
        return torch.cat(parts)
