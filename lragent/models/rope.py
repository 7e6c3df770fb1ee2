"""Rotary position embeddings (default and Llama-3.1 frequency scaling), half-split layout as in HF Llama."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch

from lragent.model_config import ModelConfig

if TYPE_CHECKING:
    from lragent.kernels.backend import LayerOps


def inverse_frequencies(config: ModelConfig) -> torch.Tensor:
    dim = config.head_dim
    inv_freq = 1.0 / (config.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
    scaling = config.rope_scaling
    if scaling and scaling["rope_type"] == "llama3":
        factor = scaling["factor"]
        low, high = scaling["low_freq_factor"], scaling["high_freq_factor"]
        old_len = scaling["original_max_position_embeddings"]
        low_wavelen, high_wavelen = old_len / low, old_len / high
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
        smooth = (old_len / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
        inv_freq = torch.where(medium, smoothed, scaled)
    return inv_freq


class RotaryEmbedding:
    """Float32 cos/sin tables indexed by absolute position, built once on the model's device.

    Not an nn.Module on purpose: casting the model to bf16 must not round these tables.
    """

    def __init__(self, config: ModelConfig, max_positions: int):
        self.config, self.max_positions = config, max_positions
        self.cos: torch.Tensor | None = None  # [max_positions, head_dim] after build()
        self.sin: torch.Tensor | None = None
        self.inv_freq: torch.Tensor | None = None  # [head_dim / 2] float32: the kernels' on-chip key RoPE reads it

    def build(self, device: torch.device) -> None:
        positions = torch.arange(self.max_positions, dtype=torch.float32, device=device)
        self.inv_freq = inverse_frequencies(self.config).to(device=device, dtype=torch.float32)
        freqs = torch.outer(positions, self.inv_freq)
        emb = torch.cat([freqs, freqs], dim=-1)
        self.cos, self.sin = emb.cos(), emb.sin()

    def __call__(
        self, x: torch.Tensor, positions: torch.Tensor, ops: LayerOps | None = None, out: torch.Tensor | None = None
    ) -> torch.Tensor:
        """x: [T, heads, head_dim]; positions: [T]. With a backend's `ops`: its one-kernel rotary, same arithmetic,
        optionally into `out` (which may be x itself)."""
        if ops is not None:
            return ops.rotary(x, positions, self.cos, self.sin, out=out)
        assert self.cos is not None and self.sin is not None, "RotaryEmbedding.build() first"
        cos = self.cos[positions].unsqueeze(1)
        sin = self.sin[positions].unsqueeze(1)
        half = x.shape[-1] // 2
        rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
        return (x.float() * cos + rotated.float() * sin).to(x.dtype)
