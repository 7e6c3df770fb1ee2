"""vLLM-shaped Python API: positional sampling params, LoRARequest, `outputs[0]`, AsyncLLM streaming.

Runs on the 2-layer random Llama (`tiny_llama`, token-id prompts)."""

from __future__ import annotations

import asyncio

import pytest

from lragent import LLM, LoRARequest, SamplingParams
from lragent.async_llm import AsyncLLM

GREEDY = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)
PROMPT = [(5 * i + 2) % 997 + 1 for i in range(20)]


@pytest.fixture(scope="module")
def llm(tiny_llama):
    model, roles = tiny_llama
    with LLM(model=model, adapters={"plan": roles["plan"]}, sharing="non_shared", block_size=8) as engine:
        yield engine


def test_sampling_params_positional_and_older_order(llm):
    new = llm.generate([PROMPT], GREEDY, adapter="plan")[0].token_ids
    assert len(new) == 6
    assert llm.generate([PROMPT], "plan", GREEDY)[0].token_ids == new  # the older order, told apart by type
    assert llm.generate([PROMPT], sampling_params=GREEDY, adapter="plan")[0].token_ids == new
    assert llm.generate(PROMPT, [GREEDY], ["plan"])[0].token_ids == new
    assert llm.generate([PROMPT], GREEDY)[0].token_ids != new  # the base model
    with pytest.raises(TypeError, match="one of each"):
        llm.generate([PROMPT], GREEDY, GREEDY)
    with pytest.raises(TypeError, match="one of each"):
        llm.generate([PROMPT], "plan", "plan")


def test_outputs_view(llm):
    params = SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True, n=2, logprobs=True)
    outs = llm.generate([PROMPT], params)
    assert len(outs) == 2  # n samples stay a flat list, one RequestOutput each
    for out in outs:
        [view] = out.outputs
        assert (view.index, view.token_ids, view.text, view.finish_reason) == (0, out.token_ids, out.text, "length")
        assert view.logprobs == out.logprobs and len(view.logprobs) == 4
        assert view.cumulative_logprob == pytest.approx(sum(out.logprobs))


def test_lora_request_loads_and_uses_the_adapter(llm, tiny_llama):
    _, roles = tiny_llama
    want = LLM(model=tiny_llama[0], adapters={"action": roles["action"]}, sharing="non_shared", block_size=8)
    expected = want.generate([PROMPT], GREEDY, adapter="action")[0].token_ids
    want.close()
    assert "action" not in llm.adapters
    request = LoRARequest("action", 7, roles["action"])
    assert llm.generate([PROMPT], GREEDY, lora_request=request)[0].token_ids == expected
    assert "action" in llm.adapters
    assert llm.generate([PROMPT], GREEDY, lora_request=request)[0].token_ids == expected  # loaded once, reused
    outs = llm.generate([PROMPT, PROMPT], GREEDY, lora_request=[request, None])
    assert outs[0].token_ids == expected and outs[1].token_ids == llm.generate([PROMPT], GREEDY)[0].token_ids
    with pytest.raises(ValueError, match="another folder"):
        llm.generate([PROMPT], GREEDY, lora_request=LoRARequest("action", 7, roles["reflect"]))
    with pytest.raises(ValueError, match="not both"):
        llm.generate([PROMPT], GREEDY, "plan", lora_request=request)
    with pytest.raises(ValueError, match="lora_int_id"):
        LoRARequest("x", 0, roles["plan"])
    llm.unload_adapter("action")


def test_async_llm_streams_and_aborts(llm, tiny_llama):
    model, roles = tiny_llama
    params = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
    want = llm.generate([PROMPT], params, adapter="plan")[0]

    async def main(engine: AsyncLLM):
        steps = [out async for out in engine.generate(PROMPT, params, "r1", adapter="plan")]
        assert len(steps) > 1 and all(not s.finished for s in steps[:-1]) and steps[-1].finished
        assert [len(s.token_ids) for s in steps] == sorted({len(s.token_ids) for s in steps})  # grows each step
        assert [t for s in steps for t in s.new_token_ids] == want.token_ids
        assert steps[-1].outputs[0].token_ids == want.token_ids and steps[-1].outputs[0].text == want.text

        # two requests at once, one aborted after its first tokens: the other finishes, the aborted stream ends
        long = SamplingParams(max_tokens=200, temperature=0.0, ignore_eos=True)
        seen: list[int] = []

        async def aborted():
            async for out in engine.generate(PROMPT, long, "r2"):
                seen.append(len(out.token_ids))
                if len(out.token_ids) >= 2:
                    await engine.abort("r2")

        async def other():
            return [o async for o in engine.generate(PROMPT, params, "r3", lora_request=LoRARequest("plan", 1))]

        _, others = await asyncio.gather(aborted(), other())
        assert seen and max(seen) < 200
        assert others[-1].token_ids == want.token_ids
        stats = await engine.cache_stats()
        assert stats["pools"]["key"]["blocks_in_use"] == 0  # the aborted request freed its blocks

    with AsyncLLM(model=model, adapters={"plan": roles["plan"]}, sharing="non_shared", block_size=8) as engine:
        asyncio.run(main(engine))


def test_best_of_keeps_the_n_samples_of_highest_cumulative_logprob(llm):
    sampled = dict(max_tokens=5, temperature=1.2, seed=11, ignore_eos=True)
    every = llm.generate([PROMPT], SamplingParams(n=4, **sampled), adapter="plan")  # the same four draws
    ranked = sorted(every, key=lambda o: sum(o.logprobs), reverse=True)
    assert len({tuple(o.token_ids) for o in every}) > 1  # the samples differ, so the choice matters
    best = llm.generate([PROMPT, PROMPT[::-1]], SamplingParams(n=2, best_of=4, **sampled), adapter="plan")
    assert len(best) == 4  # n per prompt, prompt by prompt
    assert [o.token_ids for o in best[:2]] == [o.token_ids for o in ranked[:2]]
    assert sum(best[0].logprobs) >= sum(best[1].logprobs)
    assert not llm.engine.has_unfinished()  # the samples not returned are finished too


@pytest.mark.parametrize(
    "kw, match",
    [(dict(n=3, best_of=2), "best_of must be an integer in"), (dict(best_of=0), "best_of must be"),
     (dict(n=1, best_of=3, temperature=0.0), "needs sampling"), (dict(best_of=1.5), "best_of must be")],
)  # fmt: skip
def test_bad_best_of_is_refused(kw, match):
    with pytest.raises(ValueError, match=match):
        SamplingParams(**kw)
