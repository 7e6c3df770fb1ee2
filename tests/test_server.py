"""The OpenAI-compatible server, end to end: a real uvicorn server on loopback, the official `openai` client.

One server (embedded SmolLM2-135M on CPU, three shared-A role adapters, base_lr_shared) is shared by the module.
"""

from __future__ import annotations

import asyncio
import json
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import openai
import pytest
from loopback import serve
from prometheus_client.parser import text_string_to_metric_families

from lragent.config import EngineConfig
from lragent.engine.llm_engine import LLMEngine
from lragent.server import ServerSettings, create_app
from lragent.server.cli import build_parser, main, parse_size

KEY = "test-key"
MODEL = "smollm2-135m-instruct"
MAX_LEN = 512
BODY_LIMIT = 64 << 10
TRAJECTORY = (
    "Question: Which magazine was started first, Arthur's Magazine or First for Women?\n"
    "Thought: I need to find when each magazine was started.\n"
    "Action: Retrieve[Arthur's Magazine]\n"
    "Observation: Arthur's Magazine (1844-1846) was an American literary periodical published in Philadelphia "
    "in the 19th century. Edited by Timothy Shay Arthur, it featured work by Edgar A. Poe, J.H. Ingraham, "
    "Sarah Josepha Hale, Thomas G. Spear, and others. In May 1846 it was merged into Godey's Lady's Book.\n"
)


class Server:
    def __init__(self, url: str, engine: LLMEngine):
        self.url = url
        self.engine = engine

    def client(self, **kw) -> openai.OpenAI:
        return openai.OpenAI(
            base_url=f"{self.url}/v1", api_key=kw.pop("api_key", KEY), max_retries=0, timeout=120, **kw
        )

    def post(self, path: str, **kw) -> httpx.Response:
        headers = {"Authorization": f"Bearer {KEY}", **kw.pop("headers", {})}
        return httpx.post(f"{self.url}{path}", headers=headers, timeout=kw.pop("timeout", 120), **kw)

    def metrics(self) -> dict[tuple[str, tuple], float]:
        text = httpx.get(f"{self.url}/metrics", headers={"Authorization": f"Bearer {KEY}"}, timeout=60).text
        return {
            (s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text)
            for s in family.samples
        }

    def metric(self, name: str, **labels) -> float:
        return self.metrics().get((name, tuple(sorted(labels.items()))), 0.0)


def adapter_roots(*adapter_sets: dict[str, str]) -> tuple[str, ...]:
    """The folders holding the fixture adapters: the allow-list for runtime loads."""
    return tuple(sorted({str(Path(p).parent) for adapters in adapter_sets for p in adapters.values()}))


@pytest.fixture(scope="module")
def server(shared_a_adapters, qv_adapters):
    # async scheduling on, as a CUDA server runs by default: steady decode steps are queued ahead of the host
    config = EngineConfig(
        adapters=shared_a_adapters,
        sharing="base_lr_shared",
        kv_cache_bytes=48 << 20,
        max_model_len=MAX_LEN,
        async_scheduling=True,
    )
    engine = LLMEngine(config)
    roots = adapter_roots(shared_a_adapters, qv_adapters)
    settings = ServerSettings(api_key=KEY, max_body_bytes=BODY_LIMIT, allow_runtime_lora=True, lora_roots=roots)
    app = create_app(engine, settings)
    with serve(app) as url:
        yield Server(url, engine)


def wait_idle(server: Server, timeout: float = 30.0) -> dict:
    """Until the engine holds no sequence: nothing running or waiting, no cache block pinned by a request."""
    deadline = time.time() + timeout
    while True:
        m = server.metrics()
        busy = m[("lragent_num_requests_running", ())] + m[("lragent_num_requests_waiting", ())]
        pinned = sum(
            v for (name, labels), v in m.items() if name == "lragent_cache_blocks" and ("state", "in_use") in labels
        )
        if busy == 0 and pinned == 0:
            return m
        assert time.time() < deadline, f"engine still busy: {busy} sequences, {pinned} blocks in use"
        time.sleep(0.1)


# ---- the basics -----------------------------------------------------------------------------------------------


def test_health_models_and_auth(server):
    assert httpx.get(f"{server.url}/health").json() == {"status": "ok"}
    models = {m.id: m for m in server.client().models.list().data}
    assert set(models) == {MODEL, "plan", "action", "reflect"}
    assert models["plan"].parent == MODEL and models[MODEL].parent is None
    with pytest.raises(openai.AuthenticationError) as err:
        server.client(api_key="wrong").models.list()
    assert err.value.status_code == 401 and err.value.body["code"] == "invalid_api_key"
    assert httpx.get(f"{server.url}/v1/models").status_code == 401


def test_chat_completion(server):
    client = server.client()
    messages = [{"role": "user", "content": "Name a colour."}]
    first = client.chat.completions.create(model="plan", messages=messages, max_tokens=5, temperature=0)
    choice = first.choices[0]
    assert choice.message.role == "assistant" and choice.message.content
    assert choice.finish_reason in ("stop", "length")
    assert first.model == "plan" and first.object == "chat.completion"
    assert 0 < first.usage.completion_tokens <= 5 and first.usage.prompt_tokens > 10
    # the same prompt again: every full block of it comes from the cache
    again = client.chat.completions.create(model="plan", messages=messages, max_tokens=5, temperature=0)
    assert again.choices[0].message.content == choice.message.content
    assert again.usage.prompt_tokens_details.cached_tokens >= first.usage.prompt_tokens - 16
    base = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=3, temperature=0, logprobs=True)
    entries = base.choices[0].logprobs.content
    assert len(entries) == base.usage.completion_tokens and all(e.logprob <= 0 for e in entries)


def test_text_completion(server):
    client = server.client()
    out = client.completions.create(model="action", prompt="The capital of France is", max_tokens=4, temperature=0)
    assert out.object == "text_completion" and out.choices[0].text and out.usage.completion_tokens <= 4
    ids = server.engine.tokenizer.encode("The capital of France is", add_special_tokens=False)
    by_ids = client.completions.create(model="action", prompt=ids, max_tokens=4, temperature=0, echo=True)
    assert by_ids.choices[0].text == "The capital of France is" + out.choices[0].text
    scored = client.completions.create(model="action", prompt=ids, max_tokens=4, temperature=0, logprobs=0)
    assert len(scored.choices[0].logprobs.token_logprobs) == scored.usage.completion_tokens
    assert "".join(scored.choices[0].logprobs.tokens) == out.choices[0].text
    sampled = client.completions.create(
        model="reflect", prompt=["Once upon a time", "In a galaxy"], n=2, max_tokens=3, temperature=1.0, seed=7
    )
    assert [c.index for c in sampled.choices] == [0, 1, 2, 3]
    repeat = client.completions.create(
        model="reflect", prompt=["Once upon a time", "In a galaxy"], n=2, max_tokens=3, temperature=1.0, seed=7
    )
    assert [c.text for c in repeat.choices] == [c.text for c in sampled.choices]  # seeded


def test_best_of_returns_the_best_samples_and_bills_them_all(server):
    client = server.client()
    kw = dict(model="reflect", prompt="Once upon a time", max_tokens=4, temperature=1.3, seed=5, logprobs=0)
    every = client.completions.create(n=3, **kw)
    best = client.completions.create(n=1, best_of=3, **kw)
    [choice] = best.choices
    ranked = sorted(every.choices, key=lambda c: sum(c.logprobs.token_logprobs), reverse=True)
    assert choice.index == 0 and choice.text == ranked[0].text
    assert best.usage.completion_tokens == every.usage.completion_tokens  # every sample drawn is counted
    for extra, field in [(dict(n=2, best_of=1), "best_of"), (dict(n=1, best_of=2, stream=True), "best_of")]:
        r = server.post("/v1/completions", json={**kw, **extra})
        assert r.status_code == 400 and r.json()["error"]["param"] == field, (extra, r.text)
    r = server.post("/v1/completions", json={**kw, "best_of": 2, "temperature": 0})
    assert r.status_code == 400 and "needs sampling" in r.json()["error"]["message"]


def test_streaming_matches_non_streaming(server):
    steps = []
    server.engine.add_step_listener(steps.append)
    client = server.client()
    messages = [{"role": "user", "content": "Write one sentence about the sea."}]
    kw = dict(model="plan", messages=messages, max_tokens=8, temperature=0)
    full = client.chat.completions.create(**kw)
    chunks = list(client.chat.completions.create(**kw, stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == full.choices[0].message.content
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == full.choices[0].finish_reason
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == full.usage.completion_tokens
    assert all(c.usage is None for c in chunks[:-1])
    assert chunks[-1].usage.prompt_tokens_details.cached_tokens > 0  # same prompt as `full`

    # a stop string cut out of the greedy text: the stream must never leak past it
    words = full.choices[0].message.content.split()
    if len(words) >= 3:
        stop = " " + words[2]
        cut = client.chat.completions.create(**kw, stop=[stop])
        streamed = "".join(
            c.choices[0].delta.content or "" for c in client.chat.completions.create(**kw, stop=[stop], stream=True)
        )
        assert cut.choices[0].finish_reason == "stop" and stop not in cut.choices[0].message.content
        assert streamed == cut.choices[0].message.content

    pieces = list(
        client.completions.create(model="action", prompt="One, two,", max_tokens=6, temperature=0, stream=True)
    )
    plain = client.completions.create(model="action", prompt="One, two,", max_tokens=6, temperature=0)
    assert "".join(p.choices[0].text for p in pieces) == plain.choices[0].text
    server.engine.remove_step_listener(steps.append)
    assert any(s.ahead for s in steps)  # decode steps were queued ahead of the host


# ---- sharing across agents ------------------------------------------------------------------------------------


def test_agents_share_one_trajectory(server):
    """plan reads the trajectory first; then action and reflect, concurrently, read it plus plan's output."""
    before = server.metrics()
    client = openai.AsyncOpenAI(base_url=f"{server.url}/v1", api_key=KEY, max_retries=0, timeout=120)

    def turn(role: str, text: str):
        return client.completions.create(
            model=role, prompt=text, max_tokens=4, temperature=0, extra_body={"ignore_eos": True}
        )

    async def run():
        plan = await turn("plan", TRAJECTORY + "Thought:")
        shared = TRAJECTORY + "Thought:" + plan.choices[0].text + "\nAction:"
        return plan, await asyncio.gather(turn("action", shared), turn("reflect", shared))

    plan, (action, reflect) = asyncio.run(run())
    n_traj = plan.usage.prompt_tokens
    for out in (action, reflect):  # everything plan computed (full blocks) is reused by another adapter
        assert out.usage.prompt_tokens_details.cached_tokens >= n_traj - 16, out.usage
    after = server.metrics()

    def delta(name, role):
        key = (name, (("adapter", role),))
        return after.get(key, 0) - before.get(key, 0)

    for role in ("action", "reflect"):
        assert delta("lragent_prompt_tokens_reused_total", role) >= n_traj - 16
        computed = delta("lragent_prompt_tokens_computed_total", role)
        assert computed < delta("lragent_prompt_tokens_total", role) - n_traj + 16 + 1
    assert delta("lragent_prompt_tokens_reused_total", "plan") < n_traj  # plan was first
    assert after[("lragent_prefix_cache_hit_rate", ())] > 0
    assert after[("lragent_cache_bytes", (("pool", "lr"), ("state", "allocated")))] > 0
    assert after[("lragent_time_to_first_token_seconds_count", (("adapter", "action"),))] >= 1
    assert after[("lragent_inter_token_latency_seconds_count", (("adapter", "reflect"),))] >= 3


# ---- bad input ------------------------------------------------------------------------------------------------


def _error(resp: httpx.Response, status: int) -> dict:
    assert resp.status_code == status, resp.text
    err = resp.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    return err


def test_bad_input_gets_error_objects_while_others_are_served(server):
    client = server.client()
    good = ThreadPoolExecutor(1).submit(
        lambda: list(
            client.completions.create(
                model="plan",
                prompt="Count: 1, 2, 3,",
                max_tokens=12,
                temperature=0,
                stream=True,
                extra_body={"ignore_eos": True},
            )
        )
    )
    chat = "/v1/chat/completions"
    msgs = [{"role": "user", "content": "hi"}]
    json_headers = {"Content-Type": "application/json"}
    assert (
        "JSON"
        in _error(server.post(chat, content=b'{"model": "plan", "messages": [', headers=json_headers), 400)["message"]
    )
    _error(server.post(chat, content=b"[1, 2]", headers=json_headers), 400)
    _error(server.post(chat, content=b"", headers=json_headers), 400)
    err = _error(server.post(chat, json={"model": "nope", "messages": msgs}), 404)
    assert err["code"] == "model_not_found" and err["param"] == "model"
    long_prompt = "word " * (MAX_LEN + 50)
    err = _error(server.post("/v1/completions", json={"model": "plan", "prompt": long_prompt}), 400)
    assert err["code"] == "context_length_exceeded"
    for bad in (-1, 0, 10**12):
        err = _error(server.post(chat, json={"model": "plan", "messages": msgs, "max_tokens": bad}), 400)
        assert err["param"] == "max_tokens", err
    cases = {
        "temperature": -0.5,
        "top_p": 0,
        "top_k": -5,
        "n": 0,
        "seed": 1 << 70,
        "stop": [""],
        "max_tokens": "many",
        "presence_penalty": 2.5,
        "logit_bias": {"12": 500},
        "top_logprobs": 3,
        "tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "nope"}}}],  # bad schema
    }
    for param, value in cases.items():
        err = _error(server.post(chat, json={"model": "plan", "messages": msgs, "max_tokens": 2, param: value}), 400)
        assert err["param"] == param or param in err["message"], (param, err)
    _error(server.post(chat, json={"model": "plan", "messages": []}), 400)
    _error(server.post(chat, json={"model": "plan", "messages": [{"role": "wizard", "content": "x"}]}), 400)
    _error(server.post(chat, json={"model": "plan"}), 400)
    _error(server.post("/v1/completions", json={"model": "plan", "prompt": [1, 10**9]}), 400)
    err = _error(server.post(chat, content=b" " * (2 * BODY_LIMIT), headers=json_headers), 413)
    assert err["code"] == "request_too_large"
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model="plan", messages=msgs, max_tokens=-3)
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="ghost", prompt="x", max_tokens=2)
    chunks = good.result(timeout=120)  # the well-behaved client was served all along
    assert chunks[-1].choices[0].finish_reason == "length"
    assert sum(len(c.choices[0].text) > 0 for c in chunks) >= 6
    assert server.metric("lragent_http_errors_total", status="400") >= 10
    assert httpx.get(f"{server.url}/health").status_code == 200


# ---- adapters at runtime --------------------------------------------------------------------------------------


def test_load_and_unload_adapters(server, shared_a_adapters, qv_adapters):
    client = server.client()
    ok = server.post("/v1/load_lora_adapter", json={"lora_name": "critic", "lora_path": shared_a_adapters["plan"]})
    assert ok.status_code == 200, ok.text
    assert "critic" in {m.id for m in client.models.list().data}
    assert client.completions.create(model="critic", prompt="Hello", max_tokens=2, temperature=0).choices[0].text
    # a different v_proj A breaks base_lr_shared: refused with the engine's reason
    err = _error(
        server.post("/v1/load_lora_adapter", json={"lora_name": "rogue", "lora_path": qv_adapters["plan"]}), 400
    )
    assert "shared-A" in err["message"] and "rogue" in err["message"]
    missing = str(Path(shared_a_adapters["plan"]).parent / "nonexistent")  # inside an allowed root
    err = _error(server.post("/v1/load_lora_adapter", json={"lora_name": "ghost", "lora_path": missing}), 400)
    assert "adapter_config.json" in err["message"]
    _error(server.post("/v1/load_lora_adapter", json={"lora_name": "ghost", "lora_path": "/nonexistent/x"}), 403)
    _error(
        server.post("/v1/load_lora_adapter", json={"lora_name": "critic", "lora_path": shared_a_adapters["plan"]}), 400
    )
    _error(server.post("/v1/load_lora_adapter", json={"lora_name": MODEL, "lora_path": shared_a_adapters["plan"]}), 400)
    _error(server.post("/v1/load_lora_adapter", json={"lora_name": "x"}), 400)
    assert server.post("/v1/unload_lora_adapter", json={"lora_name": "critic"}).status_code == 200
    _error(server.post("/v1/unload_lora_adapter", json={"lora_name": "critic"}), 404)
    assert "critic" not in {m.id for m in client.models.list().data}
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="critic", prompt="Hello", max_tokens=2)


# ---- cancellation ---------------------------------------------------------------------------------------------


def test_disconnect_mid_stream_frees_the_sequence(server):
    wait_idle(server)
    aborted = server.metric("lragent_requests_total", adapter="reflect", finish_reason="abort")
    body = {
        "model": "reflect",
        "messages": [{"role": "user", "content": "Tell me a long story."}],
        "max_tokens": 400,
        "temperature": 0,
        "ignore_eos": True,
        "stream": True,
    }
    with httpx.Client(timeout=60) as http:
        with http.stream(
            "POST", f"{server.url}/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {KEY}"}
        ) as resp:
            assert resp.status_code == 200
            events = 0
            for line in resp.iter_lines():
                events += line.startswith("data: ")
                if events >= 3:
                    break  # leave mid-stream: closing the connection is the only signal
    start = time.time()
    wait_idle(server, timeout=20)  # the engine dropped the sequence and its blocks
    assert time.time() - start < 20
    assert server.metric("lragent_requests_total", adapter="reflect", finish_reason="abort") == aborted + 1


def test_disconnect_while_waiting_for_a_non_streamed_answer(server):
    wait_idle(server)
    body = {"model": "action", "prompt": "A very long list:", "max_tokens": 400, "temperature": 0, "ignore_eos": True}
    with pytest.raises(httpx.ReadTimeout):
        server.post("/v1/completions", json=body, timeout=httpx.Timeout(60, read=1.5))
    wait_idle(server, timeout=20)
    assert server.metric("lragent_requests_total", adapter="action", finish_reason="abort") >= 1


# ---- the command line -----------------------------------------------------------------------------------------


def test_cli_parsing():
    args = build_parser().parse_args(
        ["--adapter", "plan=/a", "--adapter", "act=/b", "--kv-cache-bytes", "256M", "--port", "9"]
    )
    assert args.adapter == [("plan", "/a"), ("act", "/b")] and args.kv_cache_bytes == 256 << 20 and args.port == 9
    assert parse_size("1.5G") == int(1.5 * (1 << 30)) and parse_size("4096") == 4096
    with pytest.raises(SystemExit):
        build_parser().parse_args(["--adapter", "no-equals-sign"])
    assert main(["serve", "--adapter", "a=/x", "--adapter", "a=/y"]) == 2
    assert main(["--sharing", "base_lr_shared", "--block-size", "3"]) == 2
    assert main(["--adapter-set", "no-such-set"]) == 2
    assert json.dumps(vars(build_parser().parse_args([])))  # defaults are plain values


# ---- the engine loop alone (no model) -------------------------------------------------------------------------


class FlakyEngine:
    """Stands in for LLMEngine: one token per step; the step after `fail_at` raises once."""

    def __init__(self, fail_at: int):
        self.registry = type("Registry", (), {"adapters": {}})()
        self.max_model_len = 64
        self.seqs: dict[str, int] = {}
        self.steps, self.fail_at = 0, fail_at

    def add_request(self, ids, params, adapter, request_id):
        if not ids:
            raise ValueError("the prompt is empty")
        self.seqs[request_id] = [0, params.max_tokens]

    def abort(self, request_id):
        return self.seqs.pop(request_id, None) is not None

    def has_unfinished(self):
        return bool(self.seqs)

    def step(self):
        self.steps += 1
        if self.steps == self.fail_at:
            raise RuntimeError("boom")
        from lragent.engine.llm_engine import RequestOutput
        from lragent.engine.sequence import RequestMetrics

        outs = []
        for rid in list(self.seqs):
            self.seqs[rid][0] += 1
            n, limit = self.seqs[rid]
            done = n >= limit
            reason = "length" if done else None
            outs.append(RequestOutput(rid, "", [1], [7] * n, [7], "", done, reason, RequestMetrics()))
            if done:
                del self.seqs[rid]
        return outs


def test_engine_loop_reports_errors_and_keeps_running():
    from lragent.sampling import SamplingParams
    from lragent.server.engine_loop import AsyncEngine, EngineRequest

    loop = AsyncEngine(FlakyEngine(fail_at=2))
    loop.start()

    async def drain(queue):
        items = []
        while not items or (items[-1].error is None and not items[-1].output.finished):
            items.append(await asyncio.wait_for(queue.get(), 10))
        return items

    async def run():
        params = SamplingParams(max_tokens=3)
        with pytest.raises(ValueError, match="empty"):  # a bad request adds nothing
            await loop.submit([EngineRequest([1], params, None, "a", 0), EngineRequest([], params, None, "b", 1)])
        assert await loop.call(lambda engine: dict(engine.seqs)) == {}
        first = await drain(await loop.submit([EngineRequest([1], params, None, "c", 0)]))
        assert first[-1].error == "engine error (RuntimeError)"  # the failing step ends the requests in flight
        second = await drain(await loop.submit([EngineRequest([1], params, None, "d", 0)]))
        assert [len(i.output.token_ids) for i in second] == [1, 2, 3] and second[-1].output.finished
        endless = await loop.submit([EngineRequest([1], SamplingParams(max_tokens=10**9), None, "e", 0)])
        await endless.get()
        loop.abort_nowait(["e"])  # what a disconnect does: the sequence is gone
        assert await loop.call(lambda engine: "e" in engine.seqs) is False

    try:
        asyncio.run(run())
    finally:
        loop.stop()
    assert not loop.alive


def test_sampling_extras_are_honoured(server):
    """logit_bias, penalties, min_p, repetition_penalty and top_logprobs reach the sampler (no field ignored)."""
    client = server.client()
    msgs = [{"role": "user", "content": "Say something."}]
    forced = client.chat.completions.create(
        model="plan", messages=msgs, max_tokens=3, temperature=0.0, logit_bias={"28": 100}
    )
    token = server.engine.tokenizer.decode([28])
    assert forced.choices[0].message.content == token * 3
    out = client.chat.completions.create(
        model="plan", messages=msgs, max_tokens=3, temperature=0.8, seed=1, logprobs=True, top_logprobs=3,
        presence_penalty=0.5, frequency_penalty=0.5, extra_body={"min_p": 0.05, "repetition_penalty": 1.2},
    )  # fmt: skip
    content = out.choices[0].logprobs.content
    assert len(content) == 3 and all(len(c.top_logprobs) == 3 for c in content)
    assert all(c.top_logprobs[0].logprob >= c.top_logprobs[1].logprob >= c.top_logprobs[2].logprob for c in content)
    legacy = client.completions.create(model="plan", prompt="Hello", max_tokens=2, temperature=0.0, logprobs=2)
    tops = legacy.choices[0].logprobs.top_logprobs
    assert len(tops) == 2 and all(len(t) <= 2 and t for t in tops)
    assert legacy.choices[0].logprobs.token_logprobs[0] == pytest.approx(max(tops[0].values()), abs=1e-4)
