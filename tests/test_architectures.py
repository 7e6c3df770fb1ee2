"""Llama (with llama3 RoPE scaling), Mistral and Qwen2 (q/k/v bias) checkpoints, with PEFT adapters (rsLoRA too):
the log-probabilities our engine assigns to its own greedy tokens equal HF transformers + PEFT's, teacher-forced."""

from __future__ import annotations

import pytest
import torch

from lragent import LLM, SamplingParams
from lragent.bench.adapters import write_peft_adapter
from lragent.model_config import ModelConfig

COMMON = dict(
    vocab_size=300,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=3,
    num_attention_heads=8,
    num_key_value_heads=2,
    max_position_embeddings=512,
    tie_word_embeddings=False,
    initializer_range=0.2,
)


def tiny_checkpoint(kind: str, folder):
    import transformers

    if kind == "llama3":
        config = transformers.LlamaConfig(
            **COMMON,
            rope_scaling={
                "rope_type": "llama3",
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 64,
            },
        )
        model = transformers.LlamaForCausalLM(config)
    elif kind == "mistral":
        model = transformers.MistralForCausalLM(transformers.MistralConfig(**COMMON, sliding_window=None))
    else:
        model = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**COMMON, use_sliding_window=False))
        with torch.no_grad():  # make the q/k/v biases matter
            for layer in model.model.layers:
                for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                    proj.bias.normal_(0, 0.5)
    model.save_pretrained(folder)
    return model


@pytest.mark.parametrize("kind", ["llama3", "mistral", "qwen2"])
def test_engine_matches_hf_peft_logprobs(kind, tmp_path):
    from peft import PeftModel

    torch.manual_seed(0)
    hf = tiny_checkpoint(kind, tmp_path / "model").float().eval()
    config = ModelConfig.from_file(tmp_path / "model" / "config.json")
    if kind == "llama3":
        assert config.rope_scaling["rope_type"] == "llama3"
    assert config.attention_bias == (kind == "qwen2")
    adapter = write_peft_adapter(
        tmp_path / "ad",
        config,
        ("q_proj", "v_proj", "o_proj", "up_proj"),
        rank=4,
        alpha=8,
        b_scale=0.3,
        use_rslora=kind == "mistral",
    )
    llm = LLM(model=str(tmp_path / "model"), adapters={"a": str(adapter)}, sharing="non_shared", block_size=4)
    prompt = [int(t) for t in torch.randint(0, 300, (37,))]  # crosses RoPE's low/high frequency bands
    params = SamplingParams(max_tokens=80, temperature=0.0, ignore_eos=True, logprobs=True)
    out = llm.generate([prompt], adapter="a", sampling_params=params)[0]
    peft_model = PeftModel.from_pretrained(hf, str(adapter)).eval()
    ids = torch.tensor([prompt + out.token_ids])
    with torch.no_grad():
        logp = torch.log_softmax(peft_model(ids).logits[0].float(), -1)
    n = len(prompt)
    want = logp[n - 1 : n - 1 + len(out.token_ids)].gather(-1, torch.tensor(out.token_ids)[:, None])[:, 0]
    torch.testing.assert_close(torch.tensor(out.logprobs), want, rtol=0, atol=2e-4)
    # greedy: each chosen token is HF's argmax up to float ties
    best = logp[n - 1 : n - 1 + len(out.token_ids)].max(-1).values
    assert torch.all(best - want < 1e-4)


def test_dummy_preset_runs_on_token_ids():
    llm = LLM(model="dummy:smollm2-135m", sharing="non_shared", kv_cache_bytes=64 << 20)
    assert llm.tokenizer is None
    out = llm.generate([[1, 2, 3, 4]], sampling_params=SamplingParams(max_tokens=3, ignore_eos=True))[0]
    assert len(out.token_ids) == 3 and out.text == ""
    with pytest.raises(ValueError, match="token ids"):
        llm.generate(["text needs a tokenizer"])
