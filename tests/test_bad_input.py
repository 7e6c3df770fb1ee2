"""Every bad input gets a clear error, and the engine keeps working afterwards."""

from __future__ import annotations

import pytest

from lragent import LLM, AdapterError, SamplingParams
from lragent.bench.adapters import write_peft_adapter
from lragent.model_config import ModelConfig

OK = SamplingParams(max_tokens=3, temperature=0.0)


@pytest.fixture(scope="module")
def llm(qv_adapters):
    return LLM(adapters=qv_adapters, sharing="base_shared", block_size=8, max_model_len=256)


def still_works(llm):
    assert len(llm.generate(["Hello"], adapter="plan", sampling_params=OK)[0].token_ids) == 3


def test_unknown_adapter(llm):
    with pytest.raises(AdapterError, match="unknown adapter 'nope'.*plan"):
        llm.generate(["Hi", "Hi"], adapter=["plan", "nope"], sampling_params=OK)
    assert not llm.engine.has_unfinished()  # nothing was queued for the valid prompt either
    still_works(llm)


def test_adapter_for_another_base_model(tmp_path, model_config):
    other = ModelConfig.from_dict(
        {
            "model_type": "llama",
            "vocab_size": 100,
            "hidden_size": 256,
            "intermediate_size": 512,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
        }
    )
    path = write_peft_adapter(tmp_path / "foreign", other, ("q_proj", "v_proj"))
    with pytest.raises(AdapterError, match="another base model"):
        LLM(adapters={"foreign": str(path)}, sharing="non_shared")


def test_not_a_peft_folder(tmp_path):
    with pytest.raises(AdapterError, match="adapter_config.json"):
        LLM(adapters={"x": str(tmp_path)}, sharing="non_shared")


def test_non_shared_a_refused_in_base_lr_shared(qv_adapters):
    with pytest.raises(AdapterError, match=r"v_proj A .*differs in layers 0, 1, 2"):
        LLM(adapters=qv_adapters, sharing="base_lr_shared")


def test_shared_a_accepted_and_runtime_load_checked(shared_a_adapters, qv_adapters):
    llm = LLM(adapters=shared_a_adapters, sharing="base_lr_shared", block_size=8)
    with pytest.raises(AdapterError, match="shared-A"):
        llm.load_adapter("intruder", qv_adapters["plan"])
    assert "intruder" not in llm.adapters


def test_key_adapter_refused_where_keys_are_shared(all_module_adapters):
    with pytest.raises(AdapterError, match="k_proj.*keys"):  # stacked_lr shares keys and has no key LR
        LLM(adapters=all_module_adapters, sharing="stacked_lr")
    with pytest.raises(AdapterError, match=r"k_proj A.*differs in layers"):  # base_lr_shared: only with shared A
        LLM(adapters=all_module_adapters, sharing="base_lr_shared")


def test_prompt_longer_than_context(llm):
    with pytest.raises(ValueError, match="context length is 256"):
        llm.generate([[5] * 300], adapter="plan", sampling_params=OK)
    still_works(llm)


@pytest.mark.parametrize(
    "kwargs",
    [dict(max_tokens=0), dict(max_tokens=-3), dict(temperature=-1.0), dict(top_p=0.0), dict(top_p=1.5), dict(top_k=-5)],
)
def test_invalid_sampling_values(kwargs):
    with pytest.raises(ValueError):
        SamplingParams(**kwargs)


@pytest.mark.parametrize("prompt", [[], [1, "x"], [10**9], 3.5])
def test_malformed_prompts(llm, prompt):
    with pytest.raises((ValueError, TypeError)):
        llm.generate([prompt], adapter="plan", sampling_params=OK)
    still_works(llm)


def test_unknown_scheme_and_model():
    with pytest.raises(ValueError, match="unknown sharing scheme"):
        LLM(sharing="half_shared")
    with pytest.raises(FileNotFoundError, match="unknown model"):
        LLM(model="/no/such/model")
    with pytest.raises(ValueError, match="unknown dummy preset"):
        LLM(model="dummy:gpt-9")


def test_cache_full_queues_instead_of_crashing(qv_adapters):
    """16 requests against a cache that holds about two: all finish, in order, with full outputs."""
    llm = LLM(adapters=qv_adapters, sharing="non_shared", block_size=4, kv_cache_bytes=2 * 4 * 30 * 192 * 4 * 24)
    prompts = [[20 + i] * (30 + i) for i in range(16)]
    outs = llm.generate(
        prompts, adapter="plan", sampling_params=SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
    )
    assert [len(o.token_ids) for o in outs] == [12] * 16
    assert llm.cache_stats()["pools"]["key"]["blocks_in_use"] == 0
