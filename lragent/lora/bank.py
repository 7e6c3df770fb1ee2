"""Device-side stacks of every loaded adapter's A and B, and the multi-LoRA projections over a mixed batch.

Slot 0 is "no adapter" and stays zero. Ranks are padded to `max_rank` with zeros, which leaves results exact.
"""

from __future__ import annotations

import torch

from lragent.lora.adapter import AdapterError, LoRAAdapter
from lragent.lora.metadata import Segments
from lragent.model_config import ModelConfig


class LoRABank:
    def __init__(self, config: ModelConfig, max_loras: int, max_rank: int, dtype: torch.dtype, device: torch.device):
        self.config = config
        self.num_slots = max_loras + 1
        self.max_rank = max_rank
        self.dtype = dtype
        self.device = device
        self.shapes = config.module_shapes()
        # (layer, module) -> (A [S, d_in, r], B [S, r, d_out]); allocated when an adapter first targets the module.
        self.down: dict[tuple[int, str], torch.Tensor] = {}
        self.up: dict[tuple[int, str], torch.Tensor] = {}
        self.scaling = torch.zeros(self.num_slots, dtype=torch.float32, device=device)
        self.scaling_host = [0.0] * self.num_slots
        self.active: set[tuple[int, str]] = set()  # (slot, module) pairs with non-zero weights

    def check(self, adapter: LoRAAdapter) -> None:
        """Refuse an adapter these stacks cannot hold (before it takes a registry slot)."""
        if adapter.rank > self.max_rank:
            raise AdapterError(
                f"adapter {adapter.name!r} has rank {adapter.rank} > max_lora_rank {self.max_rank} of this engine"
            )

    def load(self, slot: int, adapter: LoRAAdapter) -> None:
        self.check(adapter)
        self.unload(slot)
        for (layer, module), (a, b) in adapter.weights.items():
            down, up = self._stack(layer, module)
            down[slot, :, : adapter.rank] = a.to(self.device, self.dtype)
            up[slot, : adapter.rank, :] = b.to(self.device, self.dtype)
            self.active.add((slot, module))
        self.scaling[slot] = adapter.scaling
        self.scaling_host[slot] = adapter.scaling

    def unload(self, slot: int) -> None:
        for down in self.down.values():
            down[slot].zero_()
        for up in self.up.values():
            up[slot].zero_()
        self.active = {(s, m) for s, m in self.active if s != slot}
        self.scaling[slot] = 0.0
        self.scaling_host[slot] = 0.0

    def _stack(self, layer: int, module: str) -> tuple[torch.Tensor, torch.Tensor]:
        key = (layer, module)
        if key not in self.down:
            d_in, d_out = self.shapes[module]
            self.down[key] = torch.zeros(self.num_slots, d_in, self.max_rank, dtype=self.dtype, device=self.device)
            self.up[key] = torch.zeros(self.num_slots, self.max_rank, d_out, dtype=self.dtype, device=self.device)
        return self.down[key], self.up[key]

    def has(self, module: str) -> bool:
        return any(m == module for _, m in self.active)

    def delta(self, x: torch.Tensor, layer: int, module: str, segments: Segments) -> torch.Tensor | None:
        """s * (x A) B per token, each token with its own adapter; None when no loaded adapter targets the module."""
        key = (layer, module)
        if key not in self.down or not segments:
            return None
        down, up = self.down[key], self.up[key]
        out = None
        for slot, idx in segments:
            if (slot, module) not in self.active:
                continue
            if out is None:
                out = torch.zeros(x.shape[0], up.shape[-1], dtype=x.dtype, device=x.device)
            xs = x if idx is None else x[idx]
            val = (xs @ down[slot]) @ up[slot] * self.scaling_host[slot]
            if idx is None:
                out += val
            else:
                out[idx] += val
        return out

    def add_delta(self, y: torch.Tensor, x: torch.Tensor, layer: int, module: str, segments: Segments) -> torch.Tensor:
        """y += s * (x A) B per token, in place (y may be a column view of a fused projection); returns y."""
        delta = self.delta(x, layer, module, segments)
        if delta is not None:
            y += delta
        return y

    def value_shrink(self, x: torch.Tensor, layer: int, segments: Segments) -> torch.Tensor:
        """The LR cache entries R = x A_v (unscaled, [T, max_rank]); zeros for tokens whose adapter has no v_proj."""
        out = torch.zeros(x.shape[0], self.max_rank, dtype=x.dtype, device=x.device)
        down = self.down.get((layer, "v_proj"))
        if down is None:
            return out
        for slot, idx in segments:
            if (slot, "v_proj") not in self.active:
                continue
            if idx is None:
                out = x @ down[slot]
            else:
                out[idx] = x[idx] @ down[slot]
        return out

    def per_row_segments(self, row_start: torch.Tensor, row_slots: torch.Tensor) -> Segments:
        """Segments of one token per row over static buffers (CUDA-graph decode, where the grouping cannot follow
        the step's adapters); needs a bank whose kernels read per-row slots."""
        raise NotImplementedError("per-row LoRA segments need the Triton LoRA kernels (CUDA graphs)")

    def value_up(self, layer: int) -> torch.Tensor | None:
        """B of v_proj for every slot, [S, max_rank, kv_size]; read by the attention for `s (P R) B`."""
        return self.up.get((layer, "v_proj"))
