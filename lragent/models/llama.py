"""Llama-family decoder (Llama 2/3/3.1, Mistral, Qwen2) over a flattened batch of tokens.

Parameter names follow Hugging Face so checkpoints load by name. The attention layer owns the LRAgent split:
keys and base values go to the shared pools, `X A_v` to the LR pool, and the adapter's value path is applied
inside the attention backend (never expanded), except under FULL_SHARED where values are stored expanded.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lragent.cache.kv_cache import KVCache
from lragent.kernels.backend import AttentionBackend
from lragent.lora.bank import LoRABank
from lragent.models.config import ModelConfig
from lragent.models.context import ForwardContext
from lragent.models.rope import RotaryEmbedding


class RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


class Runtime:
    """The engine-owned objects the layers read: cache pools, adapter stacks, attention backend."""

    def __init__(self, cache: KVCache, bank: LoRABank, backend: AttentionBackend):
        self.cache, self.bank, self.backend = cache, bank, backend


def _with_lora(y: torch.Tensor, delta: torch.Tensor | None) -> torch.Tensor:
    return y if delta is None else y + delta


class Attention(nn.Module):
    def __init__(self, config: ModelConfig, layer: int, rope: RotaryEmbedding):
        super().__init__()
        self.layer = layer
        self.num_heads, self.num_kv_heads, self.head_dim = config.num_heads, config.num_kv_heads, config.head_dim
        bias = config.attention_bias
        self.q_proj = nn.Linear(config.hidden_size, config.q_size, bias=bias)
        self.k_proj = nn.Linear(config.hidden_size, config.kv_size, bias=bias)
        self.v_proj = nn.Linear(config.hidden_size, config.kv_size, bias=bias)
        self.o_proj = nn.Linear(config.q_size, config.hidden_size, bias=False)
        self.rope = rope

    def forward(self, x: torch.Tensor, ctx: ForwardContext, rt: Runtime) -> torch.Tensor:
        bank, layer = rt.bank, self.layer
        q = _with_lora(self.q_proj(x), bank.delta(x, layer, "q_proj", ctx.lora.segments))
        q = self.rope(q.view(x.shape[0], self.num_heads, self.head_dim), ctx.positions)
        key, value = self._base_entries(x, ctx, rt)
        lr = bank.value_shrink(x, layer, ctx.lora.segments) if rt.cache.lr is not None else None
        rt.backend.store(rt.cache, layer, key, value, lr, ctx.attn)
        value_up = None if ctx.expand_values else bank.value_up(layer)
        out = rt.backend.attend(rt.cache, layer, q, value_up, bank.scaling, ctx.attn)
        out = out.reshape(x.shape[0], -1)
        return _with_lora(self.o_proj(out), bank.delta(out, layer, "o_proj", ctx.lora.segments))

    def _base_entries(self, x: torch.Tensor, ctx: ForwardContext, rt: Runtime):
        """Keys and base values of the tokens whose pool entries are missing; LR prefill tokens skip this."""
        idx = ctx.attn.base_write_idx
        xb = x if idx is None else x[idx]
        if xb.shape[0] == 0:
            return None, None
        segs, bank, layer = ctx.lora.base_segments, rt.bank, self.layer
        key = _with_lora(self.k_proj(xb), bank.delta(xb, layer, "k_proj", segs))
        value = self.v_proj(xb)
        if ctx.expand_values:
            value = _with_lora(value, bank.delta(xb, layer, "v_proj", segs))
        key = self.rope(key.view(-1, self.num_kv_heads, self.head_dim), ctx.base_positions)
        return key, value.view(-1, self.num_kv_heads, self.head_dim)


class MLP(nn.Module):
    def __init__(self, config: ModelConfig, layer: int):
        super().__init__()
        self.layer = layer
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)

    def forward(self, x: torch.Tensor, ctx: ForwardContext, rt: Runtime) -> torch.Tensor:
        segs, bank, layer = ctx.lora.segments, rt.bank, self.layer
        gate = _with_lora(self.gate_proj(x), bank.delta(x, layer, "gate_proj", segs))
        up = _with_lora(self.up_proj(x), bank.delta(x, layer, "up_proj", segs))
        h = F.silu(gate) * up
        return _with_lora(self.down_proj(h), bank.delta(h, layer, "down_proj", segs))


class DecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig, layer: int, rope: RotaryEmbedding):
        super().__init__()
        self.self_attn = Attention(config, layer, rope)
        self.mlp = MLP(config, layer)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, h: torch.Tensor, ctx: ForwardContext, rt: Runtime) -> torch.Tensor:
        h = h + self.self_attn(self.input_layernorm(h), ctx, rt)
        return h + self.mlp(self.post_attention_layernorm(h), ctx, rt)


class DecoderStack(nn.Module):
    def __init__(self, config: ModelConfig, rope: RotaryEmbedding):
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config, i, rope) for i in range(config.num_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)


class CausalLM(nn.Module):
    def __init__(self, config: ModelConfig, max_positions: int):
        super().__init__()
        self.config = config
        self.rotary = RotaryEmbedding(config, max_positions)
        self.model = DecoderStack(config, self.rotary)
        self.lm_head = None if config.tie_word_embeddings else nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.runtime: Runtime | None = None

    def bind(self, runtime: Runtime) -> None:
        self.runtime = runtime

    def forward(self, input_ids: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        """input_ids [T] -> final hidden states [T, hidden]."""
        h = self.model.embed_tokens(input_ids)
        for layer in self.model.layers:
            h = layer(h, ctx, self.runtime)
        return self.model.norm(h)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        weight = self.model.embed_tokens.weight if self.lm_head is None else self.lm_head.weight
        return (hidden @ weight.t()).float()
