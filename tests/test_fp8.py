"""FP8 weights (`quantization="fp8"`, lragent.quant.fp8): the quantiser's error bound, the model transform, and the
engine with FP8 weights against the unquantised one (CPU: the dequantise + F.linear reference path)."""

from __future__ import annotations

import argparse
import json
import logging
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lragent import LLM, SamplingParams
from lragent.bench import decode as bench_decode
from lragent.config import EngineConfig
from lragent.engine_args import HelpFormatter, add_engine_args, engine_config
from lragent.model_config import ModelConfig
from lragent.models.llama import Attention, linear
from lragent.models.loader import empty_model
from lragent.quant import fp8 as fp8_module
from lragent.quant import quantize_model
from lragent.quant.fp8 import (
    FP8,
    FP8_MAX,
    Fp8Linear,
    Fp8Weight,
    dequantize_fp8,
    quantize_fp8,
    quantize_model_fp8,
    quantize_rows_fp8,
    scaled_mm_supported,
)

PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
SUBNORMAL_HALF_STEP = 2.0**-10  # e4m3: subnormal step 2^-9 below 2^-6; above, a step is 2^-3 of the binade


def _weights(rows: int = 64, cols: int = 96, seed: int = 0) -> torch.Tensor:
    """Rows over 12 orders of magnitude, heavy tails, an outlier per row: the scales must follow each row."""
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=gen) ** 3
    w[:, 0] *= 20.0
    return w * torch.logspace(-8, 4, rows)[:, None]


def test_quantize_error_bound_per_channel():
    """|w - dq(w)| <= max(|w| / 16, scale / 1024) elementwise (round to nearest: half a step of 3 mantissa bits,
    or half the subnormal step), hence <= absmax(row) / 16; truncation would break the first bound."""
    w = _weights()
    w8, scale = quantize_fp8(w)
    assert w8.dtype == FP8 and w8.shape == w.shape
    assert scale.dtype == torch.float32 and scale.shape == (w.shape[0],)
    amax = w.abs().amax(dim=1)
    torch.testing.assert_close(scale, amax / FP8_MAX)
    assert torch.equal(w8.float().abs().amax(dim=1), torch.full_like(amax, FP8_MAX))  # the absmax maps to 448
    err = (w - dequantize_fp8(w8, scale, torch.float32)).abs()
    slack = 1e-6 * amax[:, None]  # float32 rounding of w / scale and q * scale
    bound = torch.maximum(w.abs() / 16, scale[:, None] * SUBNORMAL_HALF_STEP) + slack
    assert (err <= bound).all(), f"worst excess {(err - bound).max().item():.3g}"
    assert (err.amax(dim=1) <= amax / 16 * (1 + 1e-6)).all()
    assert err.max() > 0  # it did quantise
    rel = err / w.abs().clamp_min(1e-30)
    assert rel[w.abs() > scale[:, None] * 2**-6 * FP8_MAX].max() > 1 / 32  # and to 3 mantissa bits, not more


def test_scales_positive_and_finite_for_zero_rows():
    w = _weights(8, 32)
    w[2] = 0.0
    w[5] = -0.0
    for weight in (w, torch.zeros(4, 16)):
        w8, scale = quantize_fp8(weight)
        assert torch.isfinite(scale).all() and (scale > 0).all()
        deq = dequantize_fp8(w8, scale, torch.float32)
        assert torch.isfinite(deq).all()
        assert (deq[weight.abs().amax(dim=1) == 0] == 0).all()


def test_bfloat16_weight_and_activation_quantisation():
    w = _weights(32, 48).to(torch.bfloat16)
    w8, scale = quantize_fp8(w)
    deq = dequantize_fp8(w8, scale, torch.bfloat16)
    assert deq.dtype == torch.bfloat16
    # bf16 rounding of the dequantised value adds at most 2^-9 relative
    assert ((w.float() - deq.float()).abs() <= w.float().abs().amax(1, keepdim=True) * (1 / 16 + 2**-8)).all()
    x = _weights(5, 48, seed=1).to(torch.bfloat16)
    x8, x_scale = quantize_rows_fp8(x)
    assert x8.dtype == FP8 and x_scale.shape == (5, 1) and x8.is_contiguous()
    assert ((x.float() - x8.float() * x_scale).abs() <= x.float().abs().amax(1, keepdim=True) / 16 * 1.001).all()


def test_fp8_linear_is_f_linear_on_the_dequantised_weight():
    w, bias = _weights(48, 32), torch.randn(48)
    layer = Fp8Linear(Fp8Weight.of(w, scaled_mm=False), bias)
    x = torch.randn(2, 3, 32)
    want = F.linear(x, dequantize_fp8(layer.weight.data, layer.weight.scale, torch.float32), bias)
    assert torch.equal(layer(x), want)
    assert layer.weight.data.dtype == FP8 and "fp8 (dequant)" in repr(layer)
    assert not list(layer.parameters()) and "bias" not in layer.state_dict()


def _tiny_config(tie: bool, bias: bool = False) -> ModelConfig:
    shape = {
        "model_type": "qwen2" if bias else "llama",
        "vocab_size": 300,
        "hidden_size": 64,
        "intermediate_size": 96,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 16,
        "max_position_embeddings": 256,
        "tie_word_embeddings": tie,
    }
    return ModelConfig.from_dict(shape, name="tiny")


def _random_model(config: ModelConfig):
    model = empty_model(config, 64, torch.float32, torch.device("cpu"))
    gen = torch.Generator().manual_seed(0)
    for param in model.parameters():
        param.data.normal_(0.0, 0.02, generator=gen)
    return model.eval()


def test_transform_swaps_exactly_the_projections():
    model = _random_model(_tiny_config(tie=False))
    embed, head = model.model.embed_tokens.weight.clone(), model.lm_head.weight.clone()
    before = {n: m.weight.detach().clone() for n, m in model.named_modules() if n.rsplit(".", 1)[-1] in PROJECTIONS}
    linear_bytes = sum(w.numel() * 4 for w in before.values())
    saved = quantize_model_fp8(model)
    swapped = {n for n, m in model.named_modules() if isinstance(m, Fp8Linear)}
    assert swapped == set(before) and len(swapped) == 2 * len(PROJECTIONS)
    assert type(model.model.embed_tokens) is nn.Embedding and type(model.lm_head) is nn.Linear
    assert torch.equal(model.model.embed_tokens.weight, embed) and torch.equal(model.lm_head.weight, head)
    assert model.model.embed_tokens.weight.dtype == model.lm_head.weight.dtype == torch.float32
    scales = sum(w.shape[0] for w in before.values()) * 4
    assert saved == linear_bytes - (linear_bytes // 4 + scales)  # 4 bytes -> 1 byte + a float32 scale per row
    for name, module in model.named_modules():
        if name in before:
            w8, scale = quantize_fp8(before[name])
            assert torch.equal(module.weight.data.float(), w8.float()) and torch.equal(module.weight.scale, scale)
    assert quantize_model_fp8(model) == 0  # idempotent: nothing left to swap


def test_fused_weights_quantised_once_with_views():
    """After `fuse_projections`, q/k/v (and gate/up) are row views of the one FP8 fused weight, and the fused
    matmul equals the projections' (the per-row scales make quantising the concatenation the same)."""
    model = _random_model(_tiny_config(tie=True, bias=True))
    model.fuse_projections()
    attn = model.model.layers[0].self_attn
    assert isinstance(attn, Attention) and attn.qkv_bias is not None
    quantize_model_fp8(model)
    qkv = attn.qkv_weight
    assert isinstance(qkv, Fp8Weight) and qkv.data.dtype == FP8
    assert attn.q_proj.weight.data.data_ptr() == qkv.data.data_ptr()
    assert attn.q_proj.bias.data_ptr() == attn.qkv_bias.data_ptr()  # biases stay views of the fused bias
    x = torch.randn(5, 64)
    fused = linear(x, qkv, attn.qkv_bias)
    torch.testing.assert_close(fused, torch.cat([attn.q_proj(x), attn.k_proj(x), attn.v_proj(x)], -1))
    mlp = model.model.layers[1].mlp
    assert isinstance(mlp.gate_up_weight, Fp8Weight)
    torch.testing.assert_close(linear(x, mlp.gate_up_weight), torch.cat([mlp.gate_proj(x), mlp.up_proj(x)], -1))


def test_bad_quantization_refused():
    for bad in ("int4", "FP8 ", "", "none"):
        with pytest.raises(ValueError, match="quantization"):
            EngineConfig(quantization=bad)
    with pytest.raises(ValueError, match="quantization"):
        quantize_model(_random_model(_tiny_config(tie=True)), "int8")
    parser = argparse.ArgumentParser(formatter_class=HelpFormatter)
    add_engine_args(parser)
    assert engine_config(parser.parse_args(["--quantization", "fp8"])).quantization == "fp8"
    assert engine_config(parser.parse_args([])).quantization is None
    with pytest.raises(SystemExit):
        parser.parse_args(["--quantization", "int4"])


def test_scaled_mm_only_on_cuda_from_sm89():
    assert not scaled_mm_supported(torch.device("cpu"), torch.bfloat16)
    assert not Fp8Weight.of(torch.randn(32, 32), scaled_mm=True).rows(0, 8).scaled_mm  # 8 rows: not a GEMM shape


def _engine(model: str, adapters: dict[str, str], quantization: str | None, backend: str = "torch", **kw) -> LLM:
    kw = {"device": "cpu", "dtype": "float32", "enforce_eager": True, **kw}
    return LLM(
        model=model,
        adapters=adapters,
        sharing="non_shared",
        kv_cache_bytes=8 << 20,
        max_model_len=256,
        warmup=False,
        attention_backend=backend,
        quantization=quantization,
        **kw,
    )


PROMPTS = [[(31 * i + 7 * j) % 900 + 20 for j in range(10 + i)] for i in range(8)]
STEPS = 6


@pytest.fixture(scope="module")
def engines(tiny_llama):
    model, adapters = tiny_llama
    return _engine(model, adapters, None), _engine(model, adapters, "fp8")


@pytest.mark.parametrize("adapter", [None, "plan"])
def test_fp8_engine_agrees_with_unquantised(engines, adapter):
    """Greedy next tokens of the FP8 engine on the unquantised engine's own continuations (teacher forced, so one
    early flip does not count for every later position)."""
    ref, fp8 = engines
    layer = fp8.engine.model.model.layers[0]
    assert isinstance(layer.self_attn.q_proj, Fp8Linear) and isinstance(layer.mlp.down_proj, Fp8Linear)
    agree, diff = _agreement(ref, fp8, adapter)
    assert agree >= 0.85, f"next-token agreement {agree:.2f}"
    assert 0 < diff < 0.2  # quantised (not the same numbers), and close


def _agreement(ref: LLM, fp8: LLM, adapter: str | None) -> tuple[float, float]:
    """(share of the reference's greedy tokens the FP8 engine also picks, teacher forced; largest first-token
    logprob difference)."""
    greedy = SamplingParams(max_tokens=STEPS, temperature=0.0, ignore_eos=True, logprobs=True)
    want = ref.generate(PROMPTS, greedy, adapter=adapter)
    prefixes = [p + o.token_ids[:i] for p, o in zip(PROMPTS, want) for i in range(STEPS)]
    one = SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True, logprobs=True)
    got = fp8.generate(prefixes, one, adapter=adapter)
    wanted = [t for o in want for t in o.token_ids]
    agree = sum(g.token_ids[0] == t for g, t in zip(got, wanted)) / len(wanted)
    ref_first = ref.generate(PROMPTS, one, adapter=adapter)
    return agree, max(abs(g.logprobs[0] - r.logprobs[0]) for g, r in zip(got[::STEPS], ref_first))


def test_lora_still_changes_fp8_output(engines):
    ref, fp8 = engines
    greedy = SamplingParams(max_tokens=STEPS, temperature=0.0, ignore_eos=True, logprobs=True)
    base = fp8.generate(PROMPTS, greedy)
    planned = fp8.generate(PROMPTS, greedy, adapter="plan")
    assert any(b.token_ids != p.token_ids for b, p in zip(base, planned))
    # the adapter moves the FP8 engine's logprobs as it moves the unquantised engine's
    ref_base, ref_planned = ref.generate(PROMPTS, greedy), ref.generate(PROMPTS, greedy, adapter="plan")
    shift = [p.logprobs[0] - b.logprobs[0] for b, p in zip(base, planned)]
    ref_shift = [p.logprobs[0] - b.logprobs[0] for b, p in zip(ref_base, ref_planned)]
    assert max(abs(s) for s in shift) > 0.01
    assert max(abs(s - r) for s, r in zip(shift, ref_shift)) < 0.1


def test_fp8_fused_layers_match_unfused(tiny_llama):
    """The fused q/k/v and gate/up matmuls (Triton backend, interpreted on CPU) read the same FP8 weights."""
    model, adapters = tiny_llama
    dev = {"device": "cuda"} if torch.cuda.is_available() else {}  # CPU tensors need the interpreter Triton lacks there
    torch_llm = _engine(model, adapters, "fp8", **dev)
    fused_llm = _engine(model, adapters, "fp8", backend="triton", **dev)
    assert fused_llm.engine.fused_layers and isinstance(
        fused_llm.engine.model.model.layers[0].mlp.gate_up_weight, Fp8Weight
    )
    greedy = SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True, logprobs=True)
    want, got = (
        torch_llm.generate(PROMPTS[:3], greedy, adapter="plan"),
        fused_llm.generate(PROMPTS[:3], greedy, adapter="plan"),
    )
    for g, w in zip(got, want):
        assert g.token_ids == w.token_ids
        assert max(abs(a - b) for a, b in zip(g.logprobs, w.logprobs)) < 1e-4


def test_bench_decode_takes_quantization(tmp_path, tiny_llama, caplog):
    out = tmp_path / "decode.json"
    args = ["--model", tiny_llama[0], "--batch", "1", "--prompt-len", "8", "--new-tokens", "3", "--no-hf"]
    with caplog.at_level(logging.INFO, logger="lragent.quant.fp8"):
        assert bench_decode.main([*args, "--quantization", "fp8", "--out", str(out)]) == 0
    assert json.loads(out.read_text())["args"]["quantization"] == "fp8"
    assert any("fp8 weights: 14 projections" in r.getMessage() for r in caplog.records)
    rates = SimpleNamespace(copy_bytes=4e12)
    bf16 = bench_decode.decode_floor_s("dummy:llama-3.1-8b", 1, 128, torch.bfloat16, rates)
    fp8 = bench_decode.decode_floor_s("dummy:llama-3.1-8b", 1, 128, torch.bfloat16, rates, quantization="fp8")
    assert 0.5 < fp8 / bf16 < 0.6  # 7B of the 8B weights are projections: one byte each instead of two


needs_fp8_gpu = pytest.mark.skipif(
    not torch.cuda.is_available() or torch.cuda.get_device_capability() < (8, 9), reason="needs CUDA sm >= 8.9"
)


@needs_fp8_gpu
@pytest.mark.parametrize("m", [1, 7, 300])
def test_scaled_mm_matches_dequant_reference(m):
    """torch._scaled_mm (activations quantised per token) against the same product computed from the dequantised
    operands in float32 (tight), and against the dequantise + F.linear reference (activations exact: loose)."""
    dev = torch.device("cuda")
    assert scaled_mm_supported(dev, torch.bfloat16)
    gen = torch.Generator(device=dev).manual_seed(0)
    w = (torch.randn(4096, 1024, device=dev, generator=gen) * 0.02).to(torch.bfloat16)
    x = torch.randn(m, 1024, device=dev, generator=gen).to(torch.bfloat16)
    fast, ref = Fp8Weight.of(w, scaled_mm=True), Fp8Weight.of(w, scaled_mm=False)
    assert fast.scaled_mm and not ref.scaled_mm
    got = fast.linear(x)
    assert got.dtype == torch.bfloat16 and got.shape == (m, 4096)
    x8, x_scale = quantize_rows_fp8(x)
    emulated = (x8.float() * x_scale) @ dequantize_fp8(fast.data, fast.scale, torch.float32).t()
    torch.testing.assert_close(got.float(), emulated, rtol=2e-2, atol=2e-2 * emulated.abs().max().item())
    want = ref.linear(x).float()
    cos = F.cosine_similarity(got.float().flatten(), want.flatten(), dim=0)
    assert cos > 0.998, cos
    rows = fast.rows(1024, 2048)  # a fused weight's view: same result as its slice of the output
    torch.testing.assert_close(rows.linear(x), got[:, 1024:2048], rtol=1e-2, atol=1e-2 * got.abs().max().item())


@needs_fp8_gpu
def test_fp8_engine_on_gpu_agrees_with_bf16(tiny_llama):
    """The whole GPU path: fused layers (auto backend), CUDA graphs, `_scaled_mm` in every projection."""
    model, adapters = tiny_llama
    gpu = {"device": "cuda", "dtype": "bfloat16", "enforce_eager": False}
    ref, fp8 = _engine(model, adapters, None, "auto", **gpu), _engine(model, adapters, "fp8", "auto", **gpu)
    layer = fp8.engine.model.model.layers[0]
    assert isinstance(layer.self_attn.o_proj, Fp8Linear) and layer.self_attn.o_proj.weight.scaled_mm
    for adapter in (None, "plan"):
        agree, diff = _agreement(ref, fp8, adapter)
        assert agree >= 0.8, f"{adapter}: next-token agreement {agree:.2f}"
        assert diff < 0.3


@pytest.mark.skipif(
    torch.cuda.is_available(),
    reason="runs the kernel interpreted on CPU tensors (no interpreter where there is a GPU: "
    "tests/test_fp8_gemm.py::test_engine_greedy_tokens_same_on_both_paths is the GPU's engine check)",
)
def test_fp8_engine_triton_gemm_matches_old_path(engines, tiny_llama, monkeypatch):
    """LRAGENT_FP8_GEMM=triton (here via `FP8_GEMM`): every projection runs the Triton W8A16 kernel (interpreted on
    CPU, float32), and the greedy tokens equal those of the old path (dequantise + F.linear), LoRA included."""
    model, adapters = tiny_llama
    monkeypatch.setattr(fp8_module, "FP8_GEMM", "triton")
    llm = _engine(model, adapters, "fp8")
    layer = llm.engine.model.model.layers[0]
    assert layer.mlp.down_proj.weight.triton_rows > 1 << 40 and "triton w8a16" in repr(layer.mlp.down_proj)
    old = engines[1]
    assert old.engine.model.model.layers[0].mlp.down_proj.weight.triton_rows == 0  # CPU "auto": never
    greedy = SamplingParams(max_tokens=3, temperature=0.0, ignore_eos=True, logprobs=True)
    for adapter in (None, "plan"):
        got, want = (
            llm.generate(PROMPTS[:2], greedy, adapter=adapter),
            old.generate(PROMPTS[:2], greedy, adapter=adapter),
        )
        for g, w in zip(got, want):
            assert g.token_ids == w.token_ids
            assert max(abs(a - b) for a, b in zip(g.logprobs, w.logprobs)) < 1e-4


# (the Fp8Weight method that fuses, the projection whose adapter makes the layer materialise that input instead)
FUSIONS = {
    "silu_mul into down": ("linear_silu_mul", "down_proj"),
    "add + RMSNorm into gate/up": ("linear_add_rms_norm", "gate_proj"),
}


@pytest.mark.parametrize("fusion", list(FUSIONS))
def test_fp8_fused_prologue_matches_unfused(fusion, tiny_llama, tmp_path, monkeypatch):
    """Triton backend (fused layers) with every projection on the Triton W8A16 kernel: a lone sequence's decode
    rows compute a layer's elementwise step inside the next GEMV (silu(gate) * up in the down projection,
    `Fp8Weight.linear_silu_mul`; the residual add + RMSNorm before the MLP in the gate/up projection,
    `Fp8Weight.linear_add_rms_norm` through `MLP.normed_gate_up`), and generate the tokens and logprobs of the same
    engine with that fusion declined (the elementwise kernel, then the GEMV). Once any loaded adapter targets the
    projection that reads that step's output (down_proj / gate_proj), the output stays materialised for every
    sequence (the adapter's delta reads it, and a captured decode graph serves any adapter): the fusion is not even
    asked for."""
    from lragent.bench.adapters import write_peft_adapter

    method, target = FUSIONS[fusion]
    model, adapters = tiny_llama
    config = ModelConfig.from_file(f"{model}/config.json")
    other = write_peft_adapter(tmp_path / "other", config, ("q_proj", target), seed=3, b_scale=0.05)
    monkeypatch.setattr(fp8_module, "FP8_GEMM", "triton")
    dev = {"device": "cuda"} if torch.cuda.is_available() else {}
    real, fused_rows = getattr(Fp8Weight, method), []

    def spy(self: Fp8Weight, x: torch.Tensor, *args: object) -> object:
        out = real(self, x, *args)
        fused_rows.append(x.shape[0] if out is not None else 0)
        return out

    greedy = SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True, logprobs=True)
    plain = _engine(model, adapters, "fp8", backend="triton", **dev)
    with_other = _engine(model, {**adapters, "other": str(other)}, "fp8", backend="triton", **dev)
    for llm, adapter, asked in ((plain, None, True), (plain, "plan", True), (with_other, "plan", False),
                                (with_other, "other", False)):  # fmt: skip
        assert llm.engine.fused_layers
        fused_rows.clear()
        monkeypatch.setattr(Fp8Weight, method, spy)
        got = llm.generate(PROMPTS[:1], greedy, adapter=adapter)
        monkeypatch.setattr(Fp8Weight, method, lambda self, *args: None)
        want = llm.generate(PROMPTS[:1], greedy, adapter=adapter)
        assert got[0].token_ids == want[0].token_ids
        assert max(abs(a - b) for a, b in zip(got[0].logprobs, want[0].logprobs)) < 1e-5
        # asked at the prefill (declined: many rows) and at each decode step of each layer (fused: one row)
        assert bool(fused_rows) == asked, (adapter, fused_rows)
        assert not asked or (fused_rows.count(1) == 3 * config.num_layers and set(fused_rows) == {0, 1})


def test_fp8_norm_prologue_switch(tiny_llama, monkeypatch):
    """LRAGENT_FP8_NORM_PROLOGUE=0 (`NORM_PROLOGUE`) declines the add + RMSNorm fusion; on by default."""
    model, adapters = tiny_llama
    monkeypatch.setattr(fp8_module, "FP8_GEMM", "triton")
    dev = {"device": "cuda"} if torch.cuda.is_available() else {}
    llm = _engine(model, adapters, "fp8", backend="triton", **dev)
    mlp = llm.engine.model.model.layers[0].mlp
    x = torch.randn(1, ModelConfig.from_file(f"{model}/config.json").hidden_size, device=llm.engine.device)
    norm = llm.engine.model.model.layers[0].post_attention_layernorm
    assert fp8_module.NORM_PROLOGUE and mlp.gate_up_weight.linear_add_rms_norm(x, x, norm.weight, norm.eps)
    monkeypatch.setattr(fp8_module, "NORM_PROLOGUE", False)
    assert mlp.gate_up_weight.linear_add_rms_norm(x, x, norm.weight, norm.eps) is None
