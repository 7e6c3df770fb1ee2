"""Device-side stacks of every loaded adapter's A and B, and the multi-LoRA projections over a mixed batch.

Slot 0 is "no adapter" and stays zero. Ranks are padded to `max_rank` with zeros, which leaves results exact.
With `stack_values` (STACKED_LR) the bank also keeps every slot's v_proj A side by side, [A_1 | ... | A_N] per layer,
and the LR cache entries of every token are its projection through all of them at once. With `key_lr` (schemes that
share keys) an LR entry is [X A_v | X A_k]: the key adapter's part is rebuilt from it by the attention (`key_up`).
"""

from __future__ import annotations

import torch

from lragent.lora.adapter import AdapterError, LoRAAdapter
from lragent.lora.metadata import Segments
from lragent.model_config import ModelConfig


class LoRABank:
    def __init__(
        self,
        config: ModelConfig,
        max_loras: int,
        max_rank: int,
        dtype: torch.dtype,
        device: torch.device,
        stack_values: bool = False,
        key_lr: bool = False,
    ):
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
        # STACKED_LR: layer -> [d_in, max_loras * max_rank], slot s's v_proj A at columns (s - 1) * max_rank, kept
        # in step with `down` on load / unload (written in place: captured CUDA graphs keep reading the same tensor)
        self.stack_values = stack_values
        self.value_stack: dict[int, torch.Tensor] = {}
        # the k_proj delta is not added to the stored keys: its low-rank part X A_k rides in the LR rows
        self.key_lr = key_lr

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
            if module == "v_proj" and self.stack_values:
                self._stack_columns(layer, slot).copy_(down[slot])
        self.scaling[slot] = adapter.scaling
        self.scaling_host[slot] = adapter.scaling

    def unload(self, slot: int) -> None:
        for down in self.down.values():
            down[slot].zero_()
        for up in self.up.values():
            up[slot].zero_()
        for layer in self.value_stack:
            self._stack_columns(layer, slot).zero_()
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

    def _stack_columns(self, layer: int, slot: int) -> torch.Tensor:
        """Slot `slot`'s columns of the layer's stacked v_proj A (allocated on first use)."""
        if layer not in self.value_stack:
            d_in = self.shapes["v_proj"][0]
            width = (self.num_slots - 1) * self.max_rank
            self.value_stack[layer] = torch.zeros(d_in, width, dtype=self.dtype, device=self.device)
        return self.value_stack[layer][:, (slot - 1) * self.max_rank : slot * self.max_rank]

    @property
    def value_width(self) -> int:
        """Width of an LR cache row `value_shrink` returns."""
        if self.stack_values:
            return (self.num_slots - 1) * self.max_rank
        return 2 * self.max_rank if self.key_lr else self.max_rank

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
        """The LR cache entries of the tokens x [T, d_in] (unscaled): R = x A_v of each token's own adapter
        [T, max_rank], zeros where it has no v_proj; with `stack_values`, x [A_1 | ... | A_N] [T, N * max_rank] for
        every token whatever its adapter (one matmul: any agent may read the row later); with `key_lr`,
        [x A_v | x A_k] of each token's own adapter [T, 2 max_rank]."""
        if self.stack_values:
            stack = self.value_stack.get(layer)
            if stack is None:
                return torch.zeros(x.shape[0], self.value_width, dtype=x.dtype, device=x.device)
            return x @ stack
        if self.key_lr:
            own = [self._own_value_shrink(x, layer, segments, m) for m in ("v_proj", "k_proj")]
            return torch.cat(own, dim=1)
        return self._own_value_shrink(x, layer, segments)

    def query_delta_and_values(self, q: torch.Tensor, x: torch.Tensor, layer: int, segments: Segments) -> torch.Tensor:
        """q += s (x A_q) B_q per token in place (`add_delta` for q_proj), then returns `value_shrink(x, layer,
        segments)`: the two reads of a layer's normalised input x where q's delta and the LR rows share segments.
        One call so that a bank may shrink x through both A stacks at once (`TritonLoRABank`: one launch); here
        exactly the two calls."""
        self.add_delta(q, x, layer, "q_proj", segments)
        return self.value_shrink(x, layer, segments)

    def _own_value_shrink(
        self, x: torch.Tensor, layer: int, segments: Segments, module: str = "v_proj"
    ) -> torch.Tensor:
        """R = x A of each token's own adapter for `module` (v_proj, or k_proj's key LR), [T, max_rank]."""
        out = torch.zeros(x.shape[0], self.max_rank, dtype=x.dtype, device=x.device)
        down = self.down.get((layer, module))
        if down is None:
            return out
        for slot, idx in segments:
            if (slot, module) not in self.active:
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

    def key_up(self, layer: int) -> torch.Tensor | None:
        """B of k_proj for every slot, [S, max_rank, kv_size], where keys are shared (`key_lr`): the attention adds
        s RoPE_p(R_k B_k) to each key it reads (None: no adapter adapts this layer's keys, or keys are expanded)."""
        return self.up.get((layer, "k_proj")) if self.key_lr else None
