"""Async scheduling: a decode step queued before the previous one's tokens reach the host must change nothing a
request sees. Each test runs the same requests through an engine that decodes one step ahead and one that waits for
every step, and compares every token, log-prob and finish reason; the ahead engine must really have run ahead.
On the CPU the steps run one after another (no overlap), but the bookkeeping is the same as on CUDA: positions,
block slots and sampling seeds one token ahead, ids read from the previous step's draws on the device, sequences that
finish or are aborted while a step for them is queued."""

from __future__ import annotations

import pytest

from lragent import SamplingParams
from lragent.config import EngineConfig
from lragent.engine.llm_engine import LLMEngine
from lragent.engine.model_runner import ModelRunner


def make_engine(tiny_llama, ahead: bool, **kwargs) -> LLMEngine:
    folder, adapters = tiny_llama
    kwargs.setdefault("sharing", "base_lr_shared")
    kwargs.setdefault("allow_unshared_a", True)
    config = EngineConfig(model=folder, adapters=adapters, block_size=8, warmup=False, async_scheduling=ahead, **kwargs)
    return LLMEngine(config)


def count_ahead(monkeypatch) -> list[int]:
    """The number of steps launched ahead of their input tokens (one entry per launch)."""
    launches: list[int] = []
    launch = ModelRunner.launch

    def counted(self, batch, after=None):
        if after is not None:
            assert batch.ahead == 1
            launches.append(len(batch.seqs))
        return launch(self, batch, after)

    monkeypatch.setattr(ModelRunner, "launch", counted)
    return launches


def drive(engine: LLMEngine, requests, arrivals: dict[int, list] | None = None, aborts: dict[int, str] | None = None):
    """Run to completion; `arrivals`: step number -> requests added before that step; `aborts`: step -> request
    index aborted before it. Returns per request (tokens, logprobs, finish reason, error) and every output seen."""
    ids = [engine.add_request(prompt, params, adapter) for prompt, params, adapter in requests]
    seen: dict[str, list] = {}
    step = 0
    while engine.has_unfinished() or (arrivals and any(k >= step for k in arrivals)):
        for prompt, params, adapter in (arrivals or {}).get(step, []):
            ids.append(engine.add_request(prompt, params, adapter))
        if aborts and step in aborts:
            engine.abort(ids[int(aborts[step])])
        for out in engine.step():
            seen.setdefault(out.request_id, []).append(out)
        step += 1
        assert step < 500
    final = {}
    for rid in ids:
        outs = seen.get(rid, [])
        last = outs[-1] if outs else None
        final[rid] = None if last is None else (last.token_ids, last.logprobs, last.finish_reason, last.error)
    return [final[rid] for rid in ids], seen, ids


def same(ahead, sync) -> bool:
    """Equal tokens, finish reasons and errors; log-probs equal up to float rounding (a sequence that finished while
    a step for it was queued is in that step's batch, so its neighbours ran in a batch one larger)."""
    assert len(ahead) == len(sync)
    for a, b in zip(ahead, sync):
        if (a is None) != (b is None):
            return False
        if a is not None and (a[0], a[2], a[3]) != (b[0], b[2], b[3]) or a[1] != pytest.approx(b[1], abs=1e-5):
            return False
    return True


def both(tiny_llama, monkeypatch, requests, **kwargs):
    sync = drive(make_engine(tiny_llama, False), requests, **kwargs)[0]
    launches = count_ahead(monkeypatch)
    engine = make_engine(tiny_llama, True)
    ahead = drive(engine, requests, **kwargs)[0]
    return sync, ahead, launches, engine


GREEDY = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True)
SAMPLED = SamplingParams(
    max_tokens=24, temperature=0.9, top_p=0.8, top_k=40, seed=7, ignore_eos=True, logprobs=True, top_logprobs=2
)


def prompts(n: int, length: int = 11) -> list[list[int]]:
    return [[(7 * i + 13 * j) % 997 + 1 for j in range(length + i)] for i in range(n)]


@pytest.mark.parametrize("params", [GREEDY, SAMPLED], ids=["greedy", "sampled"])
def test_running_ahead_gives_the_same_tokens(tiny_llama, monkeypatch, params):
    requests = [(p, params, a) for p, a in zip(prompts(3), ("plan", "action", None))]
    sync, ahead, launches, engine = both(tiny_llama, monkeypatch, requests)
    assert same(ahead, sync)
    assert all(len(r[0]) == 24 for r in ahead)
    assert len(launches) >= 15  # steady decode ran ahead (the last steps of a max_tokens run do not)
    assert engine.block_manager.base.usage()["blocks_in_use"] == 0


def test_a_sequence_that_stops_while_a_step_is_queued(tiny_llama, monkeypatch):
    """A stop token ends one sequence while the step after it is already queued: that step's work for it is dropped,
    its blocks are freed, the others go on unchanged."""
    drawn = SamplingParams(max_tokens=24, temperature=1.0, seed=3, ignore_eos=True)
    probe = drive(make_engine(tiny_llama, False), [(prompts(1)[0], drawn, "plan")])[0][0][0]
    first = next(i for i in range(4, 24) if probe[i] not in probe[:i])  # a token first drawn late enough
    stop = SamplingParams(max_tokens=24, temperature=1.0, seed=3, stop_token_ids=[probe[first]])
    requests = [(prompts(1)[0], stop, "plan"), (prompts(2)[1], GREEDY, "action")]
    sync, ahead, launches, engine = both(tiny_llama, monkeypatch, requests)
    assert same(ahead, sync)
    assert ahead[0][2] == "stop" and ahead[0][0] == probe[: first + 1]
    assert launches and max(launches) == 2 and 1 in launches  # ran ahead with both, then with the survivor
    assert engine.block_manager.base.usage()["blocks_in_use"] == 0


def test_requests_arriving_and_aborted_mid_decode(tiny_llama, monkeypatch):
    """A new request stops the running ahead (it is prefilled first, as the waiting engine would); an abort while a
    step is queued leaves no output after it and no block held."""
    ps = prompts(4)
    requests = [(ps[0], GREEDY, "plan"), (ps[1], SAMPLED, "action")]
    arrivals = {6: [(ps[2], GREEDY, "reflect")], 9: [(ps[3], SAMPLED, None)]}
    sync_engine = make_engine(tiny_llama, False)
    sync, _, _ = drive(sync_engine, requests, arrivals=arrivals, aborts={12: "1"})
    launches = count_ahead(monkeypatch)
    engine = make_engine(tiny_llama, True)
    ahead, seen, ids = drive(engine, requests, arrivals=arrivals, aborts={12: "1"})
    assert same(ahead[:1] + ahead[2:], sync[:1] + sync[2:])
    assert len(ahead[1][0]) < 24 and ahead[1][2] is None  # aborted: no final output, fewer tokens
    assert sync[1][0][: len(ahead[1][0])] == ahead[1][0]  # (the sync engine reached the abort a step later)
    assert launches
    assert engine.block_manager.base.usage()["blocks_in_use"] == 0
    assert not engine.has_unfinished()


def test_a_full_cache_still_preempts_instead_of_running_ahead(tiny_llama, monkeypatch):
    """With too few blocks for every sequence to grow, the queued step is not taken: the waiting path preempts and
    recomputes, and the tokens are those of the engine that never runs ahead."""
    ps = prompts(3, length=20)
    requests = [(p, GREEDY, a) for p, a in zip(ps, ("plan", "action", "reflect"))]
    small = {"kv_cache_bytes": _bytes_for_blocks(tiny_llama, 14)}
    sync = drive(make_engine(tiny_llama, False, **small), requests)[0]
    launches = count_ahead(monkeypatch)
    engine = make_engine(tiny_llama, True, **small)
    ahead = drive(engine, requests)[0]
    assert same(ahead, sync)
    assert launches
    assert engine.block_manager.base.usage()["blocks_in_use"] == 0


def _bytes_for_blocks(tiny_llama, blocks: int) -> int:
    engine = make_engine(tiny_llama, False)
    try:
        stats = engine.cache_stats()
        return stats["bytes_allocated"] // stats["pools"]["key"]["blocks_total"] * blocks
    finally:
        engine.close()


def test_steps_that_need_the_token_on_the_host_wait_for_it(tiny_llama, monkeypatch):
    """A length limit ends the sequence with the in-flight token: no step runs ahead of such a sequence, and the
    outputs still match. (Penalties do run ahead: their history is on the device, tests/test_penalty_history.py.)"""
    params = SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True)
    requests = [(p, params, "plan") for p in prompts(2)]
    sync, ahead, launches, _ = both(tiny_llama, monkeypatch, requests)
    assert same(ahead, sync)
    assert launches == []


def test_a_request_failing_in_a_queued_step_fails_alone(tiny_llama, monkeypatch):
    """A launch that raises for one request's rows (a kernel assertion): the queued step is dropped, the waiting path
    runs the batch again one by one, that request fails, and the others' tokens are those of a run without it (then
    run ahead again)."""
    ps = prompts(3)
    good = [(ps[0], GREEDY, "plan"), (ps[2], SAMPLED, "action")]
    want = drive(make_engine(tiny_llama, False), good)[0]
    launches = count_ahead(monkeypatch)
    launch = ModelRunner.launch
    bad = [999] + ps[1][1:]

    def faulty(self, batch, after=None):
        if any(s.prompt_ids == bad for s in batch.seqs) and not batch.is_prefill:
            raise RuntimeError("device-side assertion on these rows")
        return launch(self, batch, after)

    monkeypatch.setattr(ModelRunner, "launch", faulty)
    got = drive(make_engine(tiny_llama, True), good[:1] + [(bad, GREEDY, "reflect")] + good[1:])[0]
    assert same([got[0], got[2]], want)
    assert got[1][2] == "error" and "RuntimeError" in got[1][3] and len(got[1][0]) == 1  # (its prefill drew one)
    assert launches and max(launches) == 2


def test_a_queued_step_whose_result_fails_is_run_again(tiny_llama, monkeypatch):
    """If a queued step's draws cannot be read, its sequences run again one by one: same tokens."""
    from lragent.engine.model_runner import LaunchedStep

    requests = [(p, SAMPLED, a) for p, a in zip(prompts(2), ("plan", "action"))]
    want = drive(make_engine(tiny_llama, False), requests)[0]
    result, failures = LaunchedStep.result, []

    def flaky(self):
        if self.batch.ahead and len(failures) < 2:
            failures.append(len(self.batch.seqs))
            raise RuntimeError("lost draws")
        return result(self)

    monkeypatch.setattr(LaunchedStep, "result", flaky)
    got = drive(make_engine(tiny_llama, True), requests)[0]
    assert failures == [2, 2]
    assert same(got, want)


def test_stop_strings_constraints_and_samples_on_the_embedded_model(qv_adapters, monkeypatch):
    """With a tokenizer: a stop string ends a sequence while a step for it is queued, a JSON-constrained request
    keeps its batch waiting for each token (its mask follows the token) until it finishes, n = 2 samples follow the
    first one's prompt blocks; every text and token as without async scheduling."""
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}
    requests = [
        ("Name three colours.", SamplingParams(max_tokens=40, temperature=0.9, seed=5, stop=[" and", "."]), "plan"),
        ("Give a JSON object.", SamplingParams(max_tokens=24, temperature=0.0, json_schema=schema), "action"),
        ("Count: one, two,", SamplingParams(max_tokens=40, temperature=0.0, n=2, seed=2), None),
    ]

    def run(ahead: bool):
        from lragent import LLM

        llm = LLM(
            adapters=qv_adapters, sharing="base_lr_shared", allow_unshared_a=True, max_model_len=512, warmup=False,
            async_scheduling=ahead,
        )  # fmt: skip
        prompts, params, adapters = (list(x) for x in zip(*requests))
        outs = [(o.token_ids, o.text, o.finish_reason) for o in llm.generate(prompts, adapters, params)]
        llm.close()
        return outs

    sync = run(False)
    launches = count_ahead(monkeypatch)
    ahead = run(True)
    assert ahead == sync and len(ahead) == 4  # (n = 2: two outputs for the last prompt)
    assert {o[2] for o in ahead} == {"stop", "length"} and ahead[1][1].startswith("{")
    assert launches


def test_step_listeners_get_the_collected_steps_timings(tiny_llama, monkeypatch):
    """A step listener hears of each collected step with that step's own timings (its launch and the wait for its
    tokens), not those of the step launched after it."""
    from lragent.engine.model_runner import LaunchedStep

    engine = make_engine(tiny_llama, True)
    heard, collected = [], []
    engine.add_step_listener(heard.append)
    result = LaunchedStep.result

    def recorded(self):
        out = result(self)
        if not self.batch.is_prefill:
            collected.append(self)
        return out

    monkeypatch.setattr(LaunchedStep, "result", recorded)
    drive(engine, [(p, GREEDY, a) for p, a in zip(prompts(2), ("plan", "action"))])
    decode = [s for s in heard if not s.is_prefill]
    assert len(decode) == len(collected) >= 20
    for stats, step in zip(decode, collected):
        assert stats.forward_s == step.launch_s + step.wait_s and stats.prepare_s == step.prepare_s
        assert stats.num_seqs == len(step.batch.seqs) and stats.ahead == bool(step.batch.ahead)
    assert any(step.batch.ahead for step in collected)


def test_a_step_left_queued_after_the_last_request_does_not_delay_the_next(tiny_llama):
    """When every sequence of the queued step has finished, the next request is scheduled by the very next step."""
    drawn = SamplingParams(max_tokens=24, temperature=1.0, seed=3, ignore_eos=True)
    probe = drive(make_engine(tiny_llama, False), [(prompts(1)[0], drawn, "plan")])[0][0][0]
    first = next(i for i in range(4, 24) if probe[i] not in probe[:i])
    engine = make_engine(tiny_llama, True)
    stop = SamplingParams(max_tokens=24, temperature=1.0, seed=3, stop_token_ids=[probe[first]])
    assert drive(engine, [(prompts(1)[0], stop, "plan")])[0][0][2] == "stop"
    assert engine._inflight is not None  # (the scenario: a step still queued for the finished sequence)
    engine.add_request(prompts(2)[1], GREEDY, "action")
    first = engine.step()  # the new request's prefill: its first token
    assert len(first) == 1 and len(first[0].new_token_ids) == 1
