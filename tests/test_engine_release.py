"""Releasing an engine: `close()`, `with LLM(...)` and `del` free the model, cache pools and adapters.

On CUDA the caching allocator used to keep an engine's memory reserved after it was gone, so the next engine in the
process sized its cache from what was left: the GPU test starts three engines in a row and wants the same budget.
"""

from __future__ import annotations

import gc
import sys
import weakref

import pytest
import torch

from lragent import LLM, AdapterError, SamplingParams
from lragent.engine.llm_engine import LLMEngine

GREEDY = SamplingParams(max_tokens=3, temperature=0.0, ignore_eos=True)


def make_llm(tiny_llama: tuple[str, dict[str, str]], **kwargs) -> LLM:
    folder, adapters = tiny_llama
    kwargs.setdefault("warmup", False)  # on CUDA: these engines test release, not the start-up warm-up
    return LLM(model=folder, adapters=adapters, sharing="base_shared", block_size=8, **kwargs)


def engine_refs(llm: LLM) -> dict[str, weakref.ref]:
    """Weak references to what holds the memory: the engine's model, KV cache (and its key pool), LoRA bank."""
    engine = llm.engine
    parts = {"model": engine.model, "cache": engine.cache, "key pool": engine.cache.key, "bank": engine.bank}
    return {name: weakref.ref(obj) for name, obj in parts.items()}


def alive(refs: dict[str, weakref.ref]) -> list[str]:
    gc.collect()
    return [name for name, ref in refs.items() if ref() is not None]


def test_close_frees_model_and_cache(tiny_llama):
    llm = make_llm(tiny_llama)
    assert len(llm.generate([1, 2, 3], adapter="plan", sampling_params=GREEDY)[0].token_ids) == 3
    refs = engine_refs(llm)
    llm.close()
    assert alive(refs) == []
    llm.close()  # a second close is a no-op
    with pytest.raises(RuntimeError, match="the engine is closed"):
        llm.generate([1, 2, 3], adapter="plan", sampling_params=GREEDY)
    with pytest.raises(RuntimeError, match="the engine is closed"):
        llm.engine.add_request([1, 2, 3])
    with pytest.raises(RuntimeError, match="the engine is closed"):
        llm.engine.step()
    with pytest.raises(RuntimeError, match="the engine is closed"):
        llm.cache_stats()


def test_the_release_finds_the_cache_already_dropped(tiny_llama, monkeypatch):
    """close() hands the cached memory back only once nothing pins the pools (a local left holding the runner did:
    on an H200 the freed cache then stayed reserved, ~70 GB, until the engine object was collected)."""
    import lragent.engine.memory as memory

    llm = make_llm(tiny_llama)
    llm.generate([[1, 2, 3], [4, 5, 6]], adapter=["plan", "action"], sampling_params=GREEDY)
    refs = engine_refs(llm)
    seen: list[list[str]] = []
    monkeypatch.setattr(memory, "release_cached_memory", lambda device: seen.append(alive(refs)))
    llm.close()
    assert seen == [[]]


def test_close_aborts_requests_in_flight(tiny_llama):
    llm = make_llm(tiny_llama)
    engine = llm.engine
    ids = [engine.add_request([1, 2, 3, 4], GREEDY, adapter) for adapter in ("plan", "action", None)]
    engine.step()  # running, with blocks held
    assert engine.has_unfinished()
    refs = engine_refs(llm)
    llm.close()
    assert alive(refs) == []
    assert not any(engine.abort(request_id) for request_id in ids)  # nothing is left to abort


def test_context_manager_closes_on_exit(tiny_llama):
    with make_llm(tiny_llama) as llm:
        assert len(llm.generate([[1, 2, 3], [1, 2, 4]], adapter=["plan", "action"], sampling_params=GREEDY)) == 2
        refs = engine_refs(llm)
    assert alive(refs) == []
    with pytest.raises(RuntimeError, match="the engine is closed"):
        llm.generate([1, 2, 3], sampling_params=GREEDY)


def test_context_manager_closes_when_the_body_raises(tiny_llama):
    with pytest.raises(KeyError):
        with make_llm(tiny_llama) as llm:
            refs = engine_refs(llm)
            raise KeyError("boom")  # the body's error propagates; the engine is still released
    assert alive(refs) == []


@pytest.fixture
def closes(monkeypatch) -> list[LLMEngine]:
    """The engines `LLMEngine.close` was called on (it still runs)."""
    calls: list[LLMEngine] = []
    close = LLMEngine.close

    def recording(engine: LLMEngine) -> None:
        calls.append(engine)
        close(engine)

    monkeypatch.setattr(LLMEngine, "close", recording)
    return calls


def test_del_closes_and_frees_the_engine(tiny_llama, closes):
    llm = make_llm(tiny_llama)
    llm.generate([1, 2, 3], adapter="reflect", sampling_params=GREEDY)
    refs = {"engine": weakref.ref(llm.engine), **engine_refs(llm)}
    del llm
    assert len(closes) == 1
    closes.clear()
    assert alive(refs) == []


def test_del_leaves_an_engine_still_in_use_open(tiny_llama, closes):
    engine = make_llm(tiny_llama).engine  # the LLM is dropped at once; the engine goes on serving
    assert closes == []
    request_id = engine.add_request([1, 2, 3], GREEDY, "plan")
    while engine.has_unfinished():
        outs = {out.request_id: out for out in engine.step()}
    assert len(outs[request_id].token_ids) == 3
    refs = {"engine": weakref.ref(engine), "cache": weakref.ref(engine.cache)}
    del engine, outs
    assert alive(refs) == []


def test_a_model_the_caller_holds_does_not_pin_the_cache(tiny_llama):
    llm = make_llm(tiny_llama)
    model = llm.engine.model
    refs = engine_refs(llm)
    llm.close()
    assert alive(refs) == ["model"]
    assert model.runtime is None
    del model
    assert alive(refs) == []


def test_a_failed_construction_is_dropped_quietly(tiny_llama, tmp_path, monkeypatch):
    """`__del__` of an LLM whose engine never got built must not raise (it would print "Exception ignored")."""
    unraisable: list = []
    monkeypatch.setattr(sys, "unraisablehook", unraisable.append)
    folder, _ = tiny_llama
    with pytest.raises(AdapterError):
        LLM(model=folder, adapters={"x": str(tmp_path)}, sharing="base_shared")
    gc.collect()
    assert unraisable == []


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_three_engines_in_a_row_get_the_same_budget(tiny_llama):
    """Each engine is closed before the next starts: the third sizes its cache like the first, and closing hands
    the memory back (the decode graphs' private pools included) instead of leaving it cached."""
    gc.collect()
    torch.cuda.empty_cache()
    reserved_before = torch.cuda.memory_reserved()
    budgets, allocated_after, reserved_after = [], [], []
    for _ in range(3):
        with make_llm(
            tiny_llama,
            device="cuda",
            gpu_memory_utilization=0.5,
            max_model_len=512,
            max_num_seqs=8,
            cuda_graph_max_batch=8,
        ) as llm:
            # decode steps of 2 rows replay a captured CUDA graph, so its memory pool exists when the engine closes
            outs = llm.generate([[1, 2, 3], [4, 5, 6]], adapter=["plan", "action"], sampling_params=GREEDY)
            assert [len(o.token_ids) for o in outs] == [3, 3]
            budgets.append(llm.cache_stats()["bytes_allocated"])
        allocated_after.append(torch.cuda.memory_allocated())
        reserved_after.append(torch.cuda.memory_reserved())
    assert budgets[0] > 1 << 30
    assert abs(budgets[2] - budgets[0]) <= 0.02 * budgets[0], budgets
    assert allocated_after[2] - allocated_after[0] < 16 << 20, allocated_after  # nothing accumulates per engine
    assert max(reserved_after) - reserved_before < 256 << 20, (reserved_before, reserved_after)
