"""Prompt log-probabilities (`SamplingParams.prompt_logprobs`, `prompt_logprobs_start`).

The reference is HF transformers + PEFT over the whole prompt in one pass. The engine's values must match it
whatever happens around them: a cached prefix before the scored start (its blocks reused, the scored positions
recomputed), prompts cut into chunks, several requests in one batch, a sharing scheme that reuses another agent's
cache for the unscored part.
"""

from __future__ import annotations

import math

import pytest
import torch

from lragent import LLM, SamplingParams

BLOCK = 8
ONE = dict(max_tokens=1, temperature=0.0, ignore_eos=True)


def make_llm(tiny_llama, sharing: str = "non_shared", **kwargs) -> LLM:
    folder, adapters = tiny_llama
    kwargs.setdefault("warmup", False)
    kwargs.setdefault("kv_cache_bytes", 64 << 20)
    return LLM(model=folder, adapters=adapters, sharing=sharing, block_size=BLOCK, dtype="float32", **kwargs)


@pytest.fixture(scope="module")
def reference(tiny_llama):
    """log_softmax over a whole prompt from HF transformers + PEFT: (prompt, adapter) -> [T, vocab] float64."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    folder, adapters = tiny_llama
    base = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    models = {None: base}

    def run(prompt: list[int], adapter: str | None) -> torch.Tensor:
        if adapter not in models:
            models[adapter] = PeftModel.from_pretrained(
                AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32), adapters[adapter]
            ).eval()
        with torch.no_grad():
            return models[adapter](torch.tensor([prompt])).logits[0].double().log_softmax(-1)

    return run


def prompt_of(n: int, seed: int) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, 1000, (n,), generator=g).tolist()


def check(out, prompt: list[int], ref: torch.Tensor, start: int, k: int = 0) -> None:
    got = out.prompt_logprobs
    assert got is not None and len(got) == len(prompt)
    first = max(start, 1)
    assert all(x is None for x in got[:first])
    for p in range(first, len(prompt)):
        entry = got[p]
        assert entry.token == prompt[p]
        assert math.isclose(entry.logprob, ref[p - 1, prompt[p]].item(), abs_tol=2e-4), p
        more_likely = (ref[p - 1] > ref[p - 1, prompt[p]] + 1e-4).sum().item()  # ties within float noise aside
        assert more_likely + 1 <= entry.rank <= (ref[p - 1] > ref[p - 1, prompt[p]] - 1e-4).sum().item() + 1
        assert len(entry.top) == k
        if k:
            best = ref[p - 1].topk(k)
            assert [t for t, _ in entry.top] == best.indices.tolist()
            assert [v for _, v in entry.top] == pytest.approx(best.values.tolist(), abs=2e-4)


@pytest.mark.parametrize("adapter", [None, "plan"])
def test_matches_hf_peft_over_the_whole_prompt(tiny_llama, reference, adapter):
    prompt = prompt_of(37, seed=1)
    with make_llm(tiny_llama) as llm:
        out = llm.generate(prompt, SamplingParams(**ONE, prompt_logprobs=3), adapter=adapter)[0]
    check(out, prompt, reference(prompt, adapter), 0, k=3)


def test_cached_prefix_is_reused_before_the_start_only(tiny_llama, reference):
    """The scored tail is recomputed; the blocks wholly before `prompt_logprobs_start - 1` come from the cache."""
    context, tail = prompt_of(45, seed=2), prompt_of(6, seed=3)
    prompt = context + tail
    ref = reference(prompt, "action")
    with make_llm(tiny_llama) as llm:
        llm.generate(context, SamplingParams(**ONE), adapter="action")  # fills the cache (40 tokens published)
        scored = SamplingParams(**ONE, prompt_logprobs=0, prompt_logprobs_start=len(context))
        out = llm.generate(prompt, scored, adapter="action")[0]
        check(out, prompt, ref, len(context))
        assert out.metrics.reused_tokens == (len(context) - 1) // BLOCK * BLOCK  # 40: cached, none of it scored
        whole = llm.generate(prompt, SamplingParams(**ONE, prompt_logprobs=0), adapter="action")[0]
        assert whole.metrics.reused_tokens == 0  # every position is scored, so none may come from the cache
        check(whole, prompt, ref, 0)
        plain = llm.generate(prompt, SamplingParams(**ONE), adapter="action")[0]
        assert plain.prompt_logprobs is None and plain.metrics.reused_tokens == 48


def test_chunked_prefill_and_mixed_batch(tiny_llama, reference):
    """Prompts cut into 16-token chunks, batched with requests that score nothing or from another start."""
    prompts = [prompt_of(n, seed=10 + n) for n in (50, 23, 31)]
    params = [
        SamplingParams(**ONE, prompt_logprobs=2),
        SamplingParams(**ONE),
        SamplingParams(**ONE, prompt_logprobs=0, prompt_logprobs_start=20),
    ]
    with make_llm(tiny_llama, max_num_batched_tokens=16) as llm:
        outs = llm.generate(prompts, params, adapter=["plan", "action", "reflect"])
    check(outs[0], prompts[0], reference(prompts[0], "plan"), 0, k=2)
    assert outs[1].prompt_logprobs is None
    check(outs[2], prompts[2], reference(prompts[2], "reflect"), 20)


@pytest.mark.parametrize("sharing", ["base_shared", "base_lr_shared", "full_shared"])
def test_shared_schemes_score_after_another_agents_context(tiny_llama, reference, sharing):
    """A reader scores a tail after the plan's context: the unscored part may come from the plan's cache (as the
    scheme allows), the scored part is the reader's own. From position 0 nothing is reused: exact."""
    context, tail = prompt_of(40, seed=4), prompt_of(5, seed=5)
    prompt = context + tail
    extra = {"allow_unshared_a": True} if sharing == "base_lr_shared" else {}  # the tiny adapters' A differ
    with make_llm(tiny_llama, sharing=sharing, **extra) as llm:
        llm.generate(context, SamplingParams(**ONE), adapter="plan")
        tail_only = SamplingParams(**ONE, prompt_logprobs=0, prompt_logprobs_start=len(context))
        shared = llm.generate(prompt, tail_only, adapter="action")[0]
        whole = llm.generate(prompt, SamplingParams(**ONE, prompt_logprobs=0), adapter="action")[0]
    check(whole, prompt, reference(prompt, "action"), 0)
    assert shared.metrics.reused_tokens + shared.metrics.base_reused_tokens > 0
    assert all(x is None for x in shared.prompt_logprobs[: len(context)])
    assert all(math.isfinite(x.logprob) for x in shared.prompt_logprobs[len(context) :])


@pytest.mark.parametrize(
    "field, value",
    [("prompt_logprobs", -1), ("prompt_logprobs", 21), ("prompt_logprobs", 1.5), ("prompt_logprobs_start", -2)],
)
def test_bad_values_are_refused_by_name(field, value):
    with pytest.raises(ValueError, match=field):
        SamplingParams(**{field: value})
