"""Llama-family decoder (Llama 2/3/3.1, Mistral, Qwen2) over a flattened batch of tokens.

Parameter names follow Hugging Face so checkpoints load by name. The attention layer owns the LRAgent split:
keys and base values go to the shared pools, `X A_v` to the LR pool, and the adapter's value path is applied
inside the attention backend (never expanded), except under FULL_SHARED where values are stored expanded. Where keys
are shared (`LoRABank.key_lr`) a k_proj adapter's part is not added to the stored keys either: `X A_k` joins the LR
row and the backend adds the reader's s RoPE(X A_k B_k) to each key it reads.

Two forms of each layer: the plain PyTorch one (the CPU path and the exact reference), and the fused one, used when
the attention backend provides `LayerOps` (`Runtime.ops`): q/k/v and gate/up run as one matmul each
(`CausalLM.fuse_projections`) and the residual add + RMSNorm, RoPE and SiLU-and-multiply are the backend's kernels.
"""

from __future__ import annotations

from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn

from lragent.cache.kv_cache import KVCache
from lragent.kernels.backend import AttentionBackend, KeyLR, LayerOps
from lragent.lora.bank import LoRABank
from lragent.model_config import ModelConfig
from lragent.models.context import ForwardContext
from lragent.models.rope import RotaryEmbedding


class RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(
        self, x: torch.Tensor, residual: torch.Tensor | None = None, ops: LayerOps | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(norm(x + residual), x + residual): the pending residual add rides along so the GPU does both at once."""
        if ops is not None:
            return ops.add_rms_norm(x, residual, self.weight, self.eps)
        if residual is not None:
            x = x + residual
        dtype = x.dtype
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(dtype), x


class Runtime:
    """The engine-owned objects the layers read: cache pools, adapter stacks, attention backend, and the fused layer
    ops the backend provides (None: the plain PyTorch layers; fused ones need `CausalLM.fuse_projections` first)."""

    def __init__(self, cache: KVCache, bank: LoRABank, backend: AttentionBackend):
        self.cache, self.bank, self.backend = cache, bank, backend
        self.ops: LayerOps | None = backend.layer_ops


def _with_lora(y: torch.Tensor, delta: torch.Tensor | None) -> torch.Tensor:
    return y if delta is None else y + delta


class LinearWeight(Protocol):
    """A weight with its own matmul, standing in for a fused weight tensor after a weight transform (FP8 weights:
    `lragent.quant.fp8.Fp8Weight`); the model never builds one.

    It may also offer `linear_silu_mul(gate_up, bias) -> Tensor | None`: its matmul of silu(gate) * up computed
    from the [gate | up] row itself (one launch instead of two), None where it cannot (see `linear_silu_mul`); and
    `linear_add_rms_norm(x, residual, norm_weight, eps) -> (Tensor, Tensor) | None`: its matmul of the normalised
    x + residual, and that sum, in one launch (see `MLP.normed_gate_up`)."""

    def linear(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor: ...


def linear(x: torch.Tensor, weight: torch.Tensor | LinearWeight, bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear for a plain weight tensor, else the transformed weight's own matmul."""
    if isinstance(weight, torch.Tensor):
        return F.linear(x, weight, bias)
    return weight.linear(x, bias)


def linear_silu_mul(
    gate_up: torch.Tensor, weight: torch.Tensor | LinearWeight, bias: torch.Tensor | None = None
) -> torch.Tensor | None:
    """linear(silu(gate) * up, weight, bias) with the activation fused into the weight's own matmul, where the
    weight offers that for this input (`LinearWeight.linear_silu_mul`); None otherwise (a plain tensor, no such
    method, or it declines): the caller runs the SiLU kernel and `linear`."""
    fused = None if isinstance(weight, torch.Tensor) else getattr(weight, "linear_silu_mul", None)
    return None if fused is None else fused(gate_up, bias)


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
        # set by `fuse`: q/k/v_proj weights are views into it (a weight transform may replace it, see `linear`)
        self.qkv_weight: torch.Tensor | LinearWeight | None = None
        self.qkv_bias: torch.Tensor | None = None

    def fuse(self) -> None:
        self.qkv_weight, self.qkv_bias = _fuse_linears(self.q_proj, self.k_proj, self.v_proj)

    def forward(self, x: torch.Tensor, ctx: ForwardContext, rt: Runtime) -> torch.Tensor:
        bank, layer = rt.bank, self.layer
        cache, index = rt.cache, rt.cache.shared_index.get(layer, layer)
        own = rt.cache.for_layer(layer)
        if own is not None:  # a critical layer (DROIDSPEAK): its own pool, with that pool's tables and writes
            assert ctx.critical is not None, "a critical layer's pool comes with its context"
            (cache, index), ctx = own, ctx.critical
        if rt.ops is not None and self.qkv_weight is not None and ctx.attn.base_write_idx is None:
            q, key, value, lr = self._fused_qkv(x, self.qkv_weight, ctx, rt, lr_rows=cache.lr is not None)
        else:
            q = _with_lora(self.q_proj(x), bank.delta(x, layer, "q_proj", ctx.lora.segments))
            q = self.rope(q.view(x.shape[0], self.num_heads, self.head_dim), ctx.positions, rt.ops)
            key, value = self._base_entries(x, ctx, rt)
            lr = bank.value_shrink(x, layer, ctx.lora.segments) if cache.lr is not None else None
        rt.backend.store(cache, index, key, value, lr, ctx.attn)
        value_up = None if ctx.expand_values else bank.value_up(layer)
        key_lr = None
        if bank.key_lr and cache.lr is not None:
            assert self.rope.cos is not None and self.rope.sin is not None, "RotaryEmbedding.build() first"
            key_lr = KeyLR(bank.key_up(layer), self.rope.cos, self.rope.sin, self.rope.inv_freq)
        out = rt.backend.attend(cache, index, q, value_up, bank.scaling, ctx.attn, key_lr=key_lr)
        out = out.reshape(x.shape[0], -1)
        return _with_lora(self.o_proj(out), bank.delta(out, layer, "o_proj", ctx.lora.segments))

    def _base_entries(self, x: torch.Tensor, ctx: ForwardContext, rt: Runtime):
        """Keys and base values of the tokens whose pool entries are missing; LR prefill tokens skip this."""
        idx = ctx.attn.base_write_idx
        xb = x if idx is None else x[idx]
        if xb.shape[0] == 0:
            return None, None
        segs, bank, layer = ctx.lora.base_segments, rt.bank, self.layer
        key = self.k_proj(xb)
        if not bank.key_lr:  # else the adapter's part of the keys rides in the LR rows
            key = _with_lora(key, bank.delta(xb, layer, "k_proj", segs))
        value = self.v_proj(xb)
        if ctx.expand_values:
            value = _with_lora(value, bank.delta(xb, layer, "v_proj", segs))
        key = self.rope(key.view(-1, self.num_kv_heads, self.head_dim), ctx.base_positions, rt.ops)
        return key, value.view(-1, self.num_kv_heads, self.head_dim)

    def _fused_qkv(
        self,
        x: torch.Tensor,
        qkv_weight: torch.Tensor | LinearWeight,
        ctx: ForwardContext,
        rt: Runtime,
        lr_rows: bool,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """One matmul for q, k and v (every token writes its keys); LoRA deltas are added into the column views.
        With `lr_rows` also the tokens' LR cache rows (else None): every token's q and LR row come from this x over
        the same segments, so the bank takes both at once (`LoRABank.query_delta_and_values`: one shrink launch)."""
        bank, layer, t = rt.bank, self.layer, x.shape[0]
        qkv = linear(x, qkv_weight, self.qkv_bias)
        hq, hkv, d = self.num_heads, self.num_kv_heads, self.head_dim
        q, key, value = qkv.split([hq * d, hkv * d, hkv * d], dim=-1)
        lr = None
        if lr_rows:
            lr = bank.query_delta_and_values(q, x, layer, ctx.lora.segments)
        else:
            bank.add_delta(q, x, layer, "q_proj", ctx.lora.segments)
        if not bank.key_lr:
            bank.add_delta(key, x, layer, "k_proj", ctx.lora.base_segments)
        if ctx.expand_values:
            bank.add_delta(value, x, layer, "v_proj", ctx.lora.base_segments)
        # q and k share positions here (every token writes its key): rotate both heads in place, one launch
        qk = qkv[:, : (hq + hkv) * d].view(t, hq + hkv, d)
        self.rope(qk, ctx.positions, rt.ops, out=qk)
        return qk[:, :hq], qk[:, hq:], value.view(t, hkv, d), lr


class MLP(nn.Module):
    def __init__(self, config: ModelConfig, layer: int):
        super().__init__()
        self.layer = layer
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)
        self.gate_up_weight: torch.Tensor | LinearWeight | None = None  # set by `fuse` (see Attention.qkv_weight)

    def fuse(self) -> None:
        self.gate_up_weight, _ = _fuse_linears(self.gate_proj, self.up_proj)

    def normed_gate_up(
        self, x: torch.Tensor, residual: torch.Tensor, norm: RMSNorm, rt: Runtime
    ) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(gate_up(norm(x + residual)), x + residual) where the gate/up weight computes the add and the norm as its
        matmul's prologue (FP8 weights, one decode row: no norm launch), else None and the caller runs `norm`.
        Not when an adapter of the bank targets gate_proj or up_proj: its delta reads the normalised row itself."""
        fused = getattr(self.gate_up_weight, "linear_add_rms_norm", None)
        if rt.ops is None or fused is None or self.bank_reads_input(rt.bank):
            return None
        return fused(x, residual, norm.weight, norm.eps)

    @staticmethod
    def bank_reads_input(bank: LoRABank) -> bool:
        """Whether a loaded adapter targets gate_proj or up_proj (asked of the whole bank: a captured decode graph
        serves any slot, and adapter loads recapture)."""
        return bank.has("gate_proj") or bank.has("up_proj")

    def forward(
        self, x: torch.Tensor | None, ctx: ForwardContext, rt: Runtime, gate_up: torch.Tensor | None = None
    ) -> torch.Tensor:
        """The MLP of x, or of a gate/up output already computed (`normed_gate_up`: then no gate/up adapter)."""
        segs, bank, layer = ctx.lora.segments, rt.bank, self.layer
        if rt.ops is not None and self.gate_up_weight is not None:
            if gate_up is None:
                assert x is not None
                gate_up = linear(x, self.gate_up_weight)
                gate, up = gate_up.chunk(2, dim=-1)
                bank.add_delta(gate, x, layer, "gate_proj", segs)
                bank.add_delta(up, x, layer, "up_proj", segs)
            # a down_proj adapter's delta reads h = silu(gate) * up itself: then h is materialised. Asked of the whole
            # bank, not this batch's slots: a captured decode graph serves any slot (adapter loads recapture)
            if not bank.has("down_proj"):
                y = linear_silu_mul(gate_up, self.down_proj.weight, self.down_proj.bias)
                if y is not None:  # the down matmul computed silu(gate) * up itself (one decode row, FP8 GEMV)
                    return y
            h = rt.ops.silu_mul(gate_up)
        else:
            assert x is not None
            gate = _with_lora(self.gate_proj(x), bank.delta(x, layer, "gate_proj", segs))
            up = _with_lora(self.up_proj(x), bank.delta(x, layer, "up_proj", segs))
            h = F.silu(gate) * up
        return _with_lora(self.down_proj(h), bank.delta(h, layer, "down_proj", segs))


def _fuse_linears(*linears: nn.Linear) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Concatenate the weights (and biases) of linears that read the same input; each module's parameters become
    views into the result, so names, loading and memory stay as they were."""
    weight = torch.cat([m.weight.data for m in linears])
    has_bias = all(m.bias is not None for m in linears)
    bias = torch.cat([m.bias.data for m in linears]) if has_bias else None
    row = 0
    for m in linears:
        n = m.weight.shape[0]
        m.weight.data = weight[row : row + n]
        if bias is not None:
            m.bias.data = bias[row : row + n]
        row += n
    return weight, bias


class DecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig, layer: int, rope: RotaryEmbedding):
        super().__init__()
        self.self_attn = Attention(config, layer, rope)
        self.mlp = MLP(config, layer)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(
        self, h: torch.Tensor, pending: torch.Tensor | None, ctx: ForwardContext, rt: Runtime
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns the residual stream and this layer's MLP output, which the next norm adds (one fused kernel)."""
        x, h = self.input_layernorm(h, pending, rt.ops)
        attn = self.self_attn(x, ctx, rt)
        fused = self.mlp.normed_gate_up(attn, h, self.post_attention_layernorm, rt)
        if fused is not None:  # the gate/up GEMV added and normalised the row itself
            gate_up, h = fused
            return h, self.mlp(None, ctx, rt, gate_up=gate_up)
        x, h = self.post_attention_layernorm(attn, h, rt.ops)
        return h, self.mlp(x, ctx, rt)


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
        self.lm_head = (
            None if config.tie_word_embeddings else nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        )
        self.runtime: Runtime | None = None

    def bind(self, runtime: Runtime) -> None:
        self.runtime = runtime

    def fuse_projections(self) -> None:
        """q/k/v and gate/up as one matmul each (the GPU form of the layers; parameters become views)."""
        for layer in self.model.layers:
            assert isinstance(layer, DecoderLayer)
            layer.self_attn.fuse()
            layer.mlp.fuse()

    def forward(self, input_ids: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        """input_ids [T] -> final hidden states [T, hidden]."""
        rt = self.runtime
        assert rt is not None, "bind() a Runtime before the forward pass"
        h, pending = self.model.embed_tokens(input_ids), None
        for i, layer in enumerate(self.model.layers):
            if ctx.hidden is not None and i in rt.cache.hidden_index:  # DROIDSPEAK: a run of critical layers starts
                h, pending = h if pending is None else h + pending, None
                rt.cache.exchange_hidden(i, h, ctx.hidden)
            h, pending = layer(h, pending, ctx, rt)
        return self.model.norm(h, pending, rt.ops)[0]

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        weight = self.model.embed_tokens.weight if self.lm_head is None else self.lm_head.weight
        return (hidden @ weight.t()).float()
