"""Non-Shared greedy output equals HF transformers + PEFT token for token on the embedded model."""

from __future__ import annotations

import pytest
import torch

from lragent import LLM, SamplingParams

PROMPTS = [
    "Question: Which river flows through Paris?\nThought:",
    "The three primary colours are",
    "def fibonacci(n):",
]
MAX_NEW = 12


def hf_greedy(model_dir, adapters: dict[str, str], prompts: list[str], roles: list[str]) -> list[list[int]]:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    names = list(adapters)
    model = PeftModel.from_pretrained(base, adapters[names[0]], adapter_name=names[0])
    for name in names[1:]:
        model.load_adapter(adapters[name], adapter_name=name)
    model.eval()
    outs = []
    for prompt, role in zip(prompts, roles):
        model.set_adapter(role)
        ids = torch.tensor([tok.encode(prompt, add_special_tokens=False)])
        with torch.no_grad():
            gen = model.generate(ids, max_new_tokens=MAX_NEW, do_sample=False, min_new_tokens=MAX_NEW)
        outs.append(gen[0, ids.shape[1] :].tolist())
    return outs


@pytest.mark.parametrize("kind", ["qv", "all_modules"])
def test_non_shared_matches_hf_peft(kind, request, model_dir):
    adapters = request.getfixturevalue("qv_adapters" if kind == "qv" else "all_module_adapters")
    roles = [list(adapters)[i % len(adapters)] for i in range(len(PROMPTS))]
    expected = hf_greedy(model_dir, adapters, PROMPTS, roles)
    llm = LLM(adapters=adapters, sharing="non_shared", block_size=8)
    params = SamplingParams(max_tokens=MAX_NEW, temperature=0.0, ignore_eos=True)
    got = llm.generate(PROMPTS, adapter=roles, sampling_params=params)  # mixed adapters in one batch
    assert [o.token_ids for o in got] == expected
    # the adapters really change the output (B is not zero)
    plain = llm.generate(PROMPTS, adapter=None, sampling_params=params)
    assert [o.token_ids for o in plain] != expected
