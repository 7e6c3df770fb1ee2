"""The attention interface a kernel implements: store new cache entries, then Flash-LoRA-Attention over them."""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch

from lragent.cache.kv_cache import KVCache
from lragent.kernels.metadata import AttentionMetadata


class AttentionBackend(ABC):
    name: str = "abstract"

    @abstractmethod
    def store(
        self,
        cache: KVCache,
        layer: int,
        key: torch.Tensor | None,
        value: torch.Tensor | None,
        lr: torch.Tensor | None,
        meta: AttentionMetadata,
    ) -> None:
        """Write keys [n, kv_heads, d] and (base) values [n, kv_heads, d] at `meta.base_slots`, LR rows [T, r] at
        `meta.lr_slots`."""

    @abstractmethod
    def attend(
        self,
        cache: KVCache,
        layer: int,
        query: torch.Tensor,
        value_up: torch.Tensor | None,
        lora_scaling: torch.Tensor,
        meta: AttentionMetadata,
    ) -> torch.Tensor:
        """O = P V_base + s (P R) B for every query token [T, q_heads, d].

        value_up: v_proj B of every adapter slot [S, r, kv_heads * d] (None: no LR term); lora_scaling: [S].
        """
