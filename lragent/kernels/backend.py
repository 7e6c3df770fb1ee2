"""The attention interface a kernel family implements.

A backend owns everything about its kernels: it stores new cache entries and runs Flash-LoRA-Attention over them,
builds its per-step metadata from the runner's host-side `BatchRows`, prepares the static buffers CUDA graphs
capture and replay, says which LoRA bank runs the adapter projections beside it, and which fused forms of the
decoder layer's elementwise parts it provides. The engine and the graph runner talk to this interface only.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass

import torch

from lragent.cache.kv_cache import KVCache
from lragent.kernels.metadata import AttentionMetadata, BatchRows
from lragent.lora.bank import LoRABank


@dataclass(frozen=True)
class LayerOps:
    """Fused forms of a decoder layer's elementwise parts (same arithmetic as the PyTorch reference layers)."""

    add_rms_norm: Callable[..., tuple[torch.Tensor, torch.Tensor]]  # (x, residual, weight, eps) -> (normed, sum)
    rotary: Callable[..., torch.Tensor]  # (x, positions, cos, sin, out=None) -> rotated x
    silu_mul: Callable[..., torch.Tensor]  # (gate_up [T, 2I]) -> silu(gate) * up [T, I]


@dataclass(frozen=True)
class KeyLR:
    """A scheme whose keys are shared with k_proj adapters (`SharingScheme.key_lr`): the key pool holds RoPE(X W_k)
    and each LR row is [R_v | R_k] (r columns each, R_k = X A_k). The attention adds s RoPE_p(R_k B_k) to every key
    it reads (RoPE is linear), with the reader's own B_k: RoPE_p(u) = u cos_p + rotate_half(u) sin_p."""

    up: torch.Tensor | None  # k_proj B of every slot [S, r, kv_heads * d]; None: no adapter adapts this layer's keys
    cos: torch.Tensor  # [max_positions, d] float32, half-split layout (`RotaryEmbedding`), indexed by key position
    sin: torch.Tensor
    # [d / 2] float32 frequencies of those tables: the Triton kernels then compute cos / sin on chip instead of
    # reading 2 x d / 2 floats per key from the tables (as many bytes as the bf16 key and value themselves)
    inv_freq: torch.Tensor | None = None


def upload(values: list, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Host list -> device tensor; pinned staging keeps the copy asynchronous on CUDA (no host sync)."""
    host = torch.tensor(values, dtype=dtype)
    if device.type == "cuda":
        host = host.pin_memory()
    return host.to(device, non_blocking=True)


def _table(tables: list[list[int]], device: torch.device) -> torch.Tensor:
    width = max(1, max((len(t) for t in tables), default=0))
    return upload([t + [-1] * (width - len(t)) for t in tables], torch.int32, device)


class AttentionBackend(ABC):
    name: str = "abstract"
    supports_cuda_graphs: bool = False
    # layers routed to pools of their own and hidden states swapped at layer boundaries (DROIDSPEAK's critical
    # layers, `SharingScheme.splits_layers`): the store and attention then see one pool's cache and metadata per layer
    supports_layer_pools: bool = False

    @property
    def layer_ops(self) -> LayerOps | None:
        """Fused layer forms this backend provides; None: the model keeps its plain PyTorch layers."""
        return None

    @property
    def lora_bank_class(self) -> type[LoRABank]:
        """The multi-LoRA implementation that runs beside these kernels."""
        return LoRABank

    def metadata(self, rows: BatchRows, device: torch.device) -> AttentionMetadata:
        """The step's attention metadata on the device, from the runner's host-side description."""
        lr = rows.write_slots.get("lr")
        return AttentionMetadata(
            query_lens=list(rows.query_lens),
            context_lens=list(rows.context_lens),
            query_start=upload([0, *_cumsum(rows.query_lens)], torch.int32, device),
            context_lens_t=upload(rows.context_lens, torch.int32, device),
            base_block_tables=_table(rows.tables["kv"], device),
            lr_block_tables=_table(rows.tables["lr"], device) if lr is not None else None,
            seq_lora_slots=upload(rows.seq_lora_slots, torch.int64, device),
            base_write_idx=None if rows.kv_write_idx is None else upload(rows.kv_write_idx, torch.int64, device),
            base_slots=upload(rows.write_slots["kv"], torch.int64, device),
            lr_slots=upload(lr, torch.int64, device) if lr is not None else None,
            is_decode=rows.is_decode,
        )

    def enable_cascade(self, block_size: int) -> bool:
        """Turn on cascade decode (decode rows sharing leading cache blocks read them once per step) where the
        backend has it; False: it does not, decode stays plain."""
        return False

    def decode_graph(self, rows: BatchRows) -> str | None:
        """Which captured CUDA graph runs this decode step: "" the plain one, another name a variant the backend's
        graph inputs capture (`GraphInputs.variants`, e.g. cascade decode), None: run it eagerly."""
        return ""

    def graph_inputs(self, cache: KVCache, pools: list[str], max_batch: int, max_model_len: int, device: torch.device):
        """Static input buffers for CUDA-graph decode (`lragent.kernels.graph_inputs.GraphInputs`)."""
        raise NotImplementedError(f"the {self.name} attention backend does not support CUDA graphs")

    def prefill_graph_inputs(
        self, cache: KVCache, pools: list[str], max_seqs: int, max_tokens: int, max_model_len: int, device: torch.device
    ):
        """Static input buffers for CUDA-graph prefill of short chunks (`graph_inputs.PrefillGraphInputs`)."""
        raise NotImplementedError(f"the {self.name} attention backend does not support CUDA-graph prefill")

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
        key_lr: KeyLR | None = None,
    ) -> torch.Tensor:
        """O = P V_base + s (P R) B for every query token [T, q_heads, d].

        value_up: v_proj B of every adapter slot [S, r, kv_heads * d] (None: no LR term); lora_scaling: [S];
        key_lr: given when the LR rows are [R_v | R_k] (the keys read get s RoPE(R_k B_k) of the reader's adapter).
        """


def _cumsum(values: list[int]) -> list[int]:
    out, total = [], 0
    for v in values:
        total += v
        out.append(total)
    return out
