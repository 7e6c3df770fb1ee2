"""Everything one forward step needs beyond the tokens, in one object passed down through the layers."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lragent.cache.kv_cache import HiddenRows
from lragent.kernels.metadata import AttentionMetadata
from lragent.lora.metadata import LoRAMetadata


@dataclass
class ForwardContext:
    attn: AttentionMetadata
    lora: LoRAMetadata
    expand_values: bool  # FULL_SHARED: the value pool stores V_base + s R B, so no LR pool is read
    positions: torch.Tensor  # [T]
    base_positions: torch.Tensor  # positions of the tokens whose keys/base values are written
    # DROIDSPEAK: the context of the critical layers (their own KV pool's tables and writes), and the step's rows of
    # the hidden-state pool; None under the other schemes
    critical: ForwardContext | None = None
    hidden: HiddenRows | None = None
