"""The fused GPU form of the decoder layer against the PyTorch reference form.

Kernel by kernel (residual add + RMSNorm, RoPE over strided views, SiLU-and-multiply) on fresh random inputs with
poisoned outputs, then whole engines: the Triton backend (fused q/k/v and gate/up matmuls, LoRA deltas added into
column views, the fused kernels) must generate what the reference backend does, under every sharing scheme. On the
CPU the kernels run under TRITON_INTERPRET=1 (set by conftest).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from lragent.bench.adapters import write_peft_adapter, write_random_llama
from lragent.kernels.triton_fused import add_rms_norm, rotary, silu_mul
from lragent.llm import LLM
from lragent.model_config import ModelConfig
from lragent.models.llama import RMSNorm
from lragent.models.presets import preset
from lragent.models.rope import RotaryEmbedding
from lragent.sampling import SamplingParams

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TOL = {torch.float32: 1e-5, torch.bfloat16: 2e-2}


def _close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype) -> None:
    assert torch.isfinite(actual).all()
    torch.testing.assert_close(actual.float(), expected.float(), rtol=TOL[dtype], atol=TOL[dtype])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("n,with_residual", [(576, True), (96, False), (128, True)])
def test_add_rms_norm_matches_reference(n, with_residual, dtype):
    gen = torch.Generator().manual_seed(n)
    x = torch.randn(7, n, generator=gen).to(DEVICE, dtype)
    residual = torch.randn(7, n, generator=gen).to(DEVICE, dtype) if with_residual else None
    norm = RMSNorm(n, 1e-5).to(DEVICE, dtype)
    norm.weight.data = (1 + 0.1 * torch.randn(n, generator=gen)).to(DEVICE, dtype)
    want_out, want_sum = norm(x, residual)
    out = torch.full_like(x, float("nan"))
    got_out, got_sum = add_rms_norm(x, residual, norm.weight, norm.eps, out=out)
    assert got_out is out
    _close(got_out, want_out, dtype)
    _close(got_sum, want_sum, dtype)
    if not with_residual:
        assert got_sum is x


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("heads,head_dim,model", [(9, 64, "smollm2-135m"), (4, 128, "llama-3.1-8b")])
def test_rotary_matches_reference_on_strided_views(heads, head_dim, model, dtype):
    config = ModelConfig.from_dict({**preset(model), "num_attention_heads": heads, "head_dim": head_dim})
    rope = RotaryEmbedding(config, 4096)
    rope.build(torch.device(DEVICE))
    gen = torch.Generator().manual_seed(heads)
    t = 11
    fused = torch.randn(t, (heads + 2) * head_dim, generator=gen).to(DEVICE, dtype)  # [q | k] of one matmul
    x = fused[:, : heads * head_dim].view(t, heads, head_dim)
    positions = torch.randint(0, 4096, (t,), generator=gen).to(DEVICE)
    out = torch.full((t, heads, head_dim), float("nan"), dtype=dtype, device=DEVICE)
    got = rotary(x, positions, rope.cos, rope.sin, out=out)
    assert got is out
    _close(got, rope(x.contiguous(), positions), dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("n", [1536, 100])
def test_silu_mul_matches_reference(n, dtype):
    gen = torch.Generator().manual_seed(n)
    gate_up = (2 * torch.randn(5, 2 * n, generator=gen)).to(DEVICE, dtype)
    out = torch.full((5, n), float("nan"), dtype=dtype, device=DEVICE)
    got = silu_mul(gate_up, out=out)
    gate, up = gate_up.chunk(2, dim=-1)
    _close(got, F.silu(gate) * up, dtype)


# ---- whole engines ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_gqa_all(tmp_path_factory) -> tuple[str, dict[str, str], dict[str, str]]:
    """2 layers, 4 q heads over 2 kv heads; adapters on every projection (k and gate/up land in fused column views)
    and shared-A q/v adapters for the LR-pool schemes."""
    root = tmp_path_factory.mktemp("fused")
    config = write_random_llama(
        root / "model",
        vocab_size=300,
        hidden_size=128,
        intermediate_size=192,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=32,
        max_position_embeddings=512,
        tie_word_embeddings=False,
    )
    every = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    wide = {
        role: str(write_peft_adapter(root / f"all_{role}", config, every, rank=4 + 4 * i, seed=60 + i, b_scale=0.05))
        for i, role in enumerate(("plan", "action"))
    }
    shared: dict[int, torch.Tensor] = {}
    qv = {
        role: str(
            write_peft_adapter(
                root / role, config, ("q_proj", "v_proj"), seed=70 + i, shared_value_a=shared, b_scale=0.05
            )
        )
        for i, role in enumerate(("plan", "action"))
    }
    return str(root / "model"), wide, qv


def _generate(model: str, adapters: dict[str, str], scheme: str, backend: str):
    llm = LLM(
        model=model,
        adapters=adapters,
        sharing=scheme,
        device=DEVICE,
        dtype="float32",
        warmup=False,  # these tests time lazy captures and compare paths, not the warm-up
        kv_cache_bytes=8 << 20,
        attention_backend=backend,
        max_model_len=256,
        enforce_eager=True,
    )
    context = [(7 * i) % 290 + 3 for i in range(37)]
    prompts = [context + [5], context + [9, 4], context + [11] * 3]
    params = SamplingParams(max_tokens=5, temperature=0.0, ignore_eos=True, logprobs=True)
    return llm, llm.generate(prompts, adapter=["plan", "action", None], sampling_params=params)


@pytest.mark.parametrize("scheme", ["non_shared", "full_shared", "base_shared", "base_lr_shared", "stacked_lr"])
def test_fused_engine_matches_reference_engine(tiny_gqa_all, scheme):
    model, wide, qv = tiny_gqa_all
    adapters = wide if scheme in ("non_shared", "full_shared") else qv
    _, want = _generate(model, adapters, scheme, "torch")
    llm, got = _generate(model, adapters, scheme, "triton")
    attn = llm.engine.model.model.layers[0].self_attn
    assert llm.engine.fused_layers and attn.qkv_weight is not None
    assert attn.q_proj.weight.data_ptr() == attn.qkv_weight.data_ptr()  # the parameters are views, not copies
    for g, w in zip(got, want):
        assert g.token_ids == w.token_ids
        assert max(abs(a - b) for a, b in zip(g.logprobs, w.logprobs)) < 1e-4
