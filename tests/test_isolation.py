"""Failure isolation and cache integrity in the engine (hardening issue): one request never fails or poisons
another, cached entries are keyed by what they were computed from, tenants (cache salts) share nothing.

Runs on the 2-layer random Llama (`tiny_llama`, token-id prompts) so each engine builds in a fraction of a second.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lragent import LLM, AdapterError, SamplingParams
from lragent.bench.adapters import write_peft_adapter
from lragent.model_config import ModelConfig

GREEDY = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)
PREFIX = [(7 * i + 3) % 997 + 1 for i in range(70)]


def engine(tiny_llama, sharing="base_lr_shared", adapters=None, **kw) -> LLM:
    model, roles = tiny_llama
    return LLM(model=model, adapters=roles if adapters is None else adapters, sharing=sharing, block_size=8, **kw)


@pytest.fixture(scope="module")
def shared_a(tiny_llama, tmp_path_factory) -> dict[str, str]:
    """plan/action with one shared v_proj A, and `other` whose A differs."""
    model, _ = tiny_llama
    config = ModelConfig.from_file(f"{model}/config.json")
    root, shared = tmp_path_factory.mktemp("iso"), {}
    out = {
        r: str(write_peft_adapter(root / r, config, seed=40 + i, shared_value_a=shared))
        for i, r in enumerate(("plan", "action"))
    }
    out["other"] = str(write_peft_adapter(root / "other", config, seed=99))
    return out


def poison(llm: LLM, name: str) -> None:
    """What load-time validation now refuses, done behind its back (as an fp16 overflow could): NaN weights."""
    slot = llm.engine.registry.slot_of(name)
    for (_layer, module), down in llm.engine.bank.down.items():
        if (slot, module) in llm.engine.bank.active:
            down[slot].fill_(float("nan"))


@pytest.mark.parametrize("sharing", ["base_shared", "base_lr_shared", "full_shared", "non_shared"])
def test_poisoned_request_fails_alone_and_never_poisons_the_shared_cache(tiny_llama, shared_a, sharing):
    roles = {k: shared_a[k] for k in ("plan", "action")}
    clean = engine(tiny_llama, sharing, roles)
    want = [o.token_ids for o in clean.generate([PREFIX + [5], PREFIX + [6]], [None, "action"], GREEDY)]

    llm = engine(tiny_llama, sharing, roles)
    poison(llm, "plan")
    outs = llm.generate([PREFIX, PREFIX + [5], PREFIX + [6]], ["plan", None, "action"], GREEDY)
    assert outs[0].finish_reason == "error" and "non-finite" in outs[0].error
    assert [o.token_ids for o in outs[1:]] == want  # the same batch is unaffected
    later = llm.generate([PREFIX + [5], PREFIX + [6]], [None, "action"], GREEDY)  # reading the prefix afterwards
    assert [o.token_ids for o in later] == want
    assert all(o.finish_reason == "length" and all(math.isfinite(lp) for lp in o.logprobs) for o in later)


def test_a_request_failing_in_the_step_fails_alone(tiny_llama, monkeypatch):
    llm = engine(tiny_llama, "non_shared")  # exact whatever the cache history: outputs comparable across runs
    want = [o.token_ids for o in llm.generate([PREFIX[:20], PREFIX[:30]], ["plan", "action"], GREEDY)]
    run = llm.engine.runner.run

    def faulty(batch):  # a kernel assertion on the rows of one request
        if any(s.prompt_ids[:1] == [999] for s in batch.seqs):
            raise RuntimeError("device-side assertion on these rows")
        return run(batch)

    monkeypatch.setattr(llm.engine.runner, "run", faulty)
    outs = llm.generate([PREFIX[:20], [999, 1, 2], PREFIX[:30]], ["plan", "plan", "action"], GREEDY)
    assert outs[1].finish_reason == "error" and "RuntimeError" in outs[1].error and not outs[1].token_ids
    assert [outs[0].token_ids, outs[2].token_ids] == want
    assert not llm.engine.has_unfinished()
    monkeypatch.undo()
    assert llm.generate([PREFIX[:20]], "plan", GREEDY)[0].token_ids == want[0]


def test_tiny_temperature_is_greedy_and_cannot_fail_the_batch(tiny_llama):
    llm = engine(tiny_llama, "base_shared")
    greedy = llm.generate([PREFIX[:25]], "plan", GREEDY)[0].token_ids
    for t in (1e-38, 5e-324, 1e-6):
        params = SamplingParams(max_tokens=6, temperature=t, ignore_eos=True, seed=3)
        outs = llm.generate([PREFIX[:25], PREFIX[:9]], ["plan", "action"], [params, GREEDY])
        assert outs[0].token_ids == greedy and outs[1].finish_reason == "length"


@pytest.mark.parametrize(
    "kwargs",
    [
        {"stop_token_ids": "x"},
        {"stop_token_ids": [1.5]},
        {"stop": [3]},
        {"stop": ""},
        {"temperature": float("nan")},
        {"temperature": float("inf")},
        {"top_p": float("nan")},
        {"temperature": True},
        {"max_tokens": 2.0},
        {"seed": 1 << 70},
        {"top_k": "5"},
        {"logprobs": "yes"},
    ],
)
def test_bad_sampling_params_are_refused_naming_the_field(kwargs):
    field = next(iter(kwargs))
    with pytest.raises(ValueError, match=f"^{field}"):
        SamplingParams(**kwargs)


def test_batches_are_atomic(tiny_llama):
    llm = engine(tiny_llama, "base_shared")
    for bad in ([-1], [10**20], "text without a tokenizer"):
        with pytest.raises((ValueError, TypeError)):
            llm.generate([PREFIX[:10], bad], "plan", GREEDY)
        assert not llm.engine.has_unfinished()
    with pytest.raises(TypeError):
        llm.generate([PREFIX[:10], PREFIX[:12]], "plan", [GREEDY, {"max_tokens": 2}])
    assert not llm.engine.has_unfinished()
    assert len(llm.generate([PREFIX[:10]], "plan", GREEDY)[0].token_ids) == 6


def test_failed_load_leaves_no_phantom_adapter(tiny_llama, tmp_path):
    model, roles = tiny_llama
    config = ModelConfig.from_file(f"{model}/config.json")
    big = write_peft_adapter(tmp_path / "big", config, rank=32)
    llm = engine(tiny_llama, "base_shared", {"plan": roles["plan"]}, max_loras=2, max_lora_rank=8)
    for _ in range(4):  # more failures than free slots
        with pytest.raises(AdapterError, match="max_lora_rank"):
            llm.load_adapter("critic", str(big))
    assert llm.adapters == ["plan"]
    with pytest.raises(AdapterError, match="unknown adapter 'critic'"):
        llm.generate([PREFIX[:10]], "critic", GREEDY)
    llm.load_adapter("critic", roles["action"])  # the name and a slot are free
    assert len(llm.generate([PREFIX[:10]], "critic", GREEDY)[0].token_ids) == 6
    llm.unload_adapter("critic")


def test_lr_cache_is_keyed_by_the_shared_a(tiny_llama, shared_a):
    """base_lr_shared: after every adapter is unloaded and one with another v_proj A is loaded, it must not read the
    LR entries computed with the old A (stale cache); the same A reloaded may."""
    llm = engine(tiny_llama, "base_lr_shared", {"plan": shared_a["plan"]})
    llm.generate([PREFIX], "plan", GREEDY)
    llm.unload_adapter("plan")
    llm.load_adapter("plan", shared_a["other"])  # same name, different A
    out = llm.generate([PREFIX + [1]], "plan", GREEDY)[0]
    fresh = engine(tiny_llama, "base_lr_shared", {"plan": shared_a["other"]})
    assert out.metrics.reused_tokens == 0 and out.metrics.base_reused_tokens > 0  # keys/base values still shared
    assert out.token_ids == fresh.generate([PREFIX + [1]], "plan", GREEDY)[0].token_ids
    llm.unload_adapter("plan")
    llm.load_adapter("action", shared_a["action"])  # the control: the A the cache was first computed with
    llm.load_adapter("plan", shared_a["plan"])
    assert llm.generate([PREFIX + [2]], "action", GREEDY)[0].metrics.reused_tokens > 0


def test_cache_salt_separates_tenants(tiny_llama):
    llm = engine(tiny_llama, "base_shared")
    first = llm.generate([PREFIX], "plan", GREEDY, cache_salt="tenant-a")[0]
    other = llm.generate([PREFIX + [3]], "plan", GREEDY, cache_salt="tenant-b")[0]
    unsalted = llm.generate([PREFIX + [3]], "action", GREEDY)[0]
    again = llm.generate([PREFIX + [4]], "action", GREEDY, cache_salt="tenant-a")[0]
    assert first.metrics.base_reused_tokens == 0
    assert other.metrics.base_reused_tokens == 0 and other.metrics.reused_tokens == 0
    assert unsalted.metrics.base_reused_tokens == 0
    assert again.metrics.base_reused_tokens >= 64  # the control: the same tenant does share
    with pytest.raises(TypeError):
        llm.generate([PREFIX], "plan", GREEDY, cache_salt=5)


_params = st.fixed_dictionaries(
    {},
    optional={
        "max_tokens": st.one_of(st.integers(-2, 3), st.floats(), st.none()),
        "temperature": st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.integers(-1, 200), st.booleans()),
        "top_p": st.one_of(st.floats(allow_nan=True), st.integers(-1, 2)),
        "top_k": st.one_of(st.integers(-3, 2000), st.floats(), st.text(max_size=3)),
        "seed": st.one_of(st.none(), st.integers(-(1 << 70), 1 << 70)),
        "stop": st.one_of(st.text(max_size=4), st.lists(st.one_of(st.text(max_size=4), st.integers()), max_size=3)),
        "stop_token_ids": st.one_of(st.lists(st.integers(-5, 2000), max_size=3), st.text(max_size=3)),
        "logprobs": st.one_of(st.booleans(), st.integers(0, 2)),
    },
)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(kwargs=_params, prompt=st.lists(st.integers(-3, 1100), min_size=0, max_size=12))
def test_fuzz_python_api_never_breaks_the_engine(fuzz_llm, kwargs, prompt):
    """Any SamplingParams / prompt either is refused with ValueError/TypeError up front or runs to a finish; in
    both cases a concurrent greedy request in the same batch gets exactly its reference output."""
    if isinstance(kwargs.get("max_tokens"), int) and kwargs["max_tokens"] > 2:
        kwargs["max_tokens"] = 2
    try:
        params = SamplingParams(**kwargs)
    except (ValueError, TypeError):
        return
    llm, want = fuzz_llm
    try:
        outs = llm.generate([prompt, PREFIX[:12]], ["plan", "action"], [params, GREEDY])
    except (ValueError, TypeError):
        assert not llm.engine.has_unfinished()
        outs = llm.generate([PREFIX[:12]], "action", GREEDY)
    assert outs[-1].token_ids == want and outs[0].finish_reason in ("stop", "length")


@pytest.fixture(scope="module")
def fuzz_llm(tiny_llama):
    llm = engine(tiny_llama, "base_shared")
    return llm, llm.generate([PREFIX[:12]], "action", GREEDY)[0].token_ids


def test_sampler_contains_a_broken_row():
    from lragent.engine.sampler import SamplingBatch, sample

    logits = torch.randn(3, 50)
    logits[1, 4] = float("nan")
    params = [SamplingParams(temperature=0.7, seed=1), SamplingParams(temperature=0.7, seed=2), SamplingParams()]
    batch = SamplingBatch.build(params, [1, 2, 3], [0, 0, 0], None, None, 50, torch.device("cpu"))
    tokens, lps, _ = sample(logits, batch)
    assert math.isnan(lps[1]) and math.isfinite(lps[0]) and math.isfinite(lps[2]) and len(tokens) == 3


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_stores_flag_exactly_the_blocks_that_received_nonfinite_rows(backend, dtype):
    """The stores mark a block when a row they write holds NaN / inf as stored (fp16: 1e5 overflows to inf); the
    check reads the marks; a block returned unpublished to the free list is cleared for its next owner."""
    from types import SimpleNamespace

    from lragent.cache.kv_cache import CacheLayout, KVCache
    from lragent.kernels import make_backend

    config = ModelConfig.from_dict(
        {
            "model_type": "llama",
            "vocab_size": 10,
            "hidden_size": 64,
            "intermediate_size": 8,
            "num_hidden_layers": 3,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
        }
    )
    # Triton runs interpreted on CPU tensors (CI); where a GPU exists there is no interpreter: run it there
    dev = torch.device("cuda" if backend == "triton" and torch.cuda.is_available() else "cpu")
    cache = KVCache(config, CacheLayout(4, {"kv": 40, "lr": 40}, 8), dtype, dev)
    store = make_backend(backend, dev).store
    gen = torch.Generator().manual_seed(0)
    slots = torch.tensor([28, 29, 44, 45, 48, 60, 61, 120, 121, 122])  # blocks 7, 7, 11, 11, 12, 15, 15, 30, 30, 30
    key, value = torch.randn(10, 2, 16, generator=gen), torch.randn(10, 2, 16, generator=gen)
    lr = torch.randn(10, 8, generator=gen)
    key[1, 0, 3] = float("nan")  # block 7
    value[4, 1, 0] = float("-inf")  # block 12
    lr[8, 2] = float("inf")  # LR block 30
    if dtype is torch.float16:
        key[5, 1, 1] = 1e5  # block 15: finite in float32, inf once stored in float16
    slots, key, value, lr = slots.to(dev), key.to(dev), value.to(dev), lr.to(dev)
    meta = SimpleNamespace(base_slots=slots, lr_slots=slots)
    for layer in range(3):
        store(cache, layer, key if layer == 1 else key.nan_to_num(0.0).clamp(-9, 9), value, lr, meta)
    everything = {"kv": list(range(40)), "lr": list(range(40))}
    want_kv = {7, 12} | ({15} if dtype is torch.float16 else set())
    assert cache.nonfinite_blocks(everything) == {"kv": want_kv, "lr": {30}}
    cache.clear_flags({"kv": [7, 12, 15], "lr": [30]})
    assert cache.nonfinite_blocks(everything) == {"kv": set(), "lr": set()}


def test_n_samples_share_the_prompt_and_draw_like_separate_seeded_requests(tiny_llama):
    """n > 1: the first sample computes the prompt, the others reuse its cached blocks (they compute at most the
    last partial block); sample j draws exactly what a lone request with seed + j draws."""
    llm = engine(tiny_llama, "non_shared")  # exact whatever the cache history
    params = SamplingParams(max_tokens=5, temperature=1.0, top_p=0.95, seed=11, n=4, ignore_eos=True)
    outs = llm.generate([PREFIX], "plan", params)
    assert len(outs) == 4
    assert outs[0].metrics.computed_tokens == len(PREFIX)
    assert all(o.metrics.computed_tokens <= 8 and o.metrics.reused_tokens >= 64 for o in outs[1:])
    assert len({tuple(o.token_ids) for o in outs}) > 1
    for j, out in enumerate(outs):
        alone = engine(tiny_llama, "non_shared")
        lone = SamplingParams(max_tokens=5, temperature=1.0, top_p=0.95, seed=11 + j, ignore_eos=True)
        assert alone.generate([PREFIX], "plan", lone)[0].token_ids == out.token_ids
    with pytest.raises(ValueError, match="^n must"):
        SamplingParams(n=0)
