"""The sharing schemes on a plan -> action -> reflect turn sequence over one shared trajectory."""

from __future__ import annotations

import pytest

from lragent import LLM, SamplingParams

SCHEMES = ["non_shared", "full_shared", "base_shared", "base_lr_shared", "stacked_lr"]
GREEDY = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)


def run_turns(llm: LLM, context: list[int], roles=("plan", "action", "reflect"), extra: int = 5):
    """Each agent reads the whole trajectory so far and appends its output plus a few new tokens."""
    traj = list(context)
    outs = []
    for i, role in enumerate(roles):
        out = llm.generate([traj], adapter=role, sampling_params=GREEDY)[0]
        outs.append(out)
        traj = traj + out.token_ids + [100 + i] * extra
    return outs, traj


@pytest.fixture(scope="module")
def context(model_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    text = "Question: Who wrote the novel set in West Egg? Observation: " + "The Great Gatsby is a novel. " * 8
    return tok.encode(text, add_special_tokens=False)


def test_same_adapter_everywhere_gives_identical_outputs(context, qv_adapters):
    same = {role: qv_adapters["plan"] for role in ("plan", "action", "reflect")}
    results = {}
    for scheme in SCHEMES:
        llm = LLM(adapters=same, sharing=scheme, block_size=4)
        outs, _ = run_turns(llm, context)
        results[scheme] = [o.token_ids for o in outs]
    assert all(results[s] == results["non_shared"] for s in SCHEMES), results


def test_reuse_accounting(context, qv_adapters, shared_a_adapters):
    block = 4
    prompts_len = []
    by_scheme = {}
    for scheme in SCHEMES:
        adapters = shared_a_adapters if scheme == "base_lr_shared" else qv_adapters
        llm = LLM(adapters=adapters, sharing=scheme, block_size=block)
        outs, _ = run_turns(llm, context)
        by_scheme[scheme] = outs
        prompts_len = [o.metrics.prompt_tokens for o in outs]
    new_tokens = [prompts_len[0]] + [prompts_len[i] - prompts_len[i - 1] for i in range(1, 3)]
    # stacked_lr with independent adapters reuses as much as base_lr_shared with shared-A ones
    for scheme in ("full_shared", "base_lr_shared", "stacked_lr"):
        for i, out in enumerate(by_scheme[scheme]):
            assert out.metrics.computed_tokens < new_tokens[i] + block, (scheme, i, out.metrics)
            assert out.metrics.reused_tokens + out.metrics.computed_tokens == out.metrics.prompt_tokens
    for i, out in enumerate(by_scheme["base_shared"]):
        # every agent recomputes what it has not seen itself (LR prefill), but keys/base values come from the cache
        assert out.metrics.computed_tokens == out.metrics.prompt_tokens - out.metrics.reused_tokens
        assert out.metrics.reused_tokens == 0  # a new agent has no LR of its own for earlier tokens
        if i > 0:
            assert out.metrics.base_reused_tokens > prompts_len[i - 1] - block
    for out in by_scheme["non_shared"]:
        assert out.metrics.reused_tokens == 0  # each agent's first turn: nothing of its own is cached


def test_base_shared_cache_bytes_at_most_04x_non_shared(tiny_llama):
    """Bytes per token per layer are SmolLM2's (3 kv heads x 64, rank 8), so the ratio is the embedded model's."""
    model, adapters = tiny_llama
    context = [(7 * i) % 900 + 50 for i in range(2048)]
    params = SamplingParams(max_tokens=1, temperature=0.0)
    used = {}
    for scheme in ("non_shared", "base_shared"):
        llm = LLM(model=model, adapters=adapters, sharing=scheme, block_size=16, kv_cache_bytes=256 << 20)
        for role in ("plan", "action", "reflect"):
            llm.generate([context], adapter=role, sampling_params=params)
        used[scheme] = llm.cache_stats()["bytes_used"]
    assert used["base_shared"] <= 0.4 * used["non_shared"], used


def test_second_turn_of_same_agent_reuses_its_own_cache(context, qv_adapters):
    llm = LLM(adapters=qv_adapters, sharing="non_shared", block_size=4)
    first = llm.generate([context], adapter="plan", sampling_params=GREEDY)[0]
    again = llm.generate([context + first.token_ids + [5, 6, 7]], adapter="plan", sampling_params=GREEDY)[0]
    assert again.metrics.reused_tokens >= len(context) + len(first.token_ids) - 4
    other = llm.generate([context], adapter="action", sampling_params=GREEDY)[0]
    assert other.metrics.reused_tokens == 0  # non_shared: another agent never reads plan's cache


def test_tiny_cache_eviction_and_preemption_keep_outputs(context, qv_adapters):
    prompts = [context[: 40 + 7 * i] for i in range(6)]
    roles = ["plan", "action", "reflect"] * 2
    params = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True)
    # non_shared is exact whatever the cache history (the sharing schemes depend on who produced a block)
    big = LLM(adapters=qv_adapters, sharing="non_shared", block_size=4)
    want = [o.token_ids for o in big.generate(prompts, adapter=roles, sampling_params=params)]
    # room for ~2.5 sequences at a time: admission waits, decode preempts and recomputes, cached blocks get evicted
    tiny = LLM(adapters=qv_adapters, sharing="non_shared", block_size=4, kv_cache_bytes=64 * 4 * 30 * 1600)
    outs = tiny.generate(prompts, adapter=roles, sampling_params=params)
    assert [o.token_ids for o in outs] == want
    stats = tiny.cache_stats()
    assert sum(o.metrics.preemptions for o in outs) > 0 or stats["pools"]["key"]["evicted_blocks"] > 0


def test_chunked_prefill_matches_one_shot(context, qv_adapters):
    params = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
    # non_shared: exact whatever the order in which blocks get published (chunking changes that order)
    one = LLM(adapters=qv_adapters, sharing="non_shared", block_size=4)
    chunked = LLM(adapters=qv_adapters, sharing="non_shared", block_size=4, max_num_batched_tokens=16)
    a = one.generate([context, context[:30]], adapter=["plan", "action"], sampling_params=params)
    b = chunked.generate([context, context[:30]], adapter=["plan", "action"], sampling_params=params)
    assert [o.token_ids for o in a] == [o.token_ids for o in b]
