"""The server under attack (issue 11): auth, tenant isolation, adapter paths and names, limits, malformed input,
per-request engine errors, graceful shutdown, and a property-based fuzz over the request schemas.

Two in-process servers share the module: `guarded` (two tenants' keys, --tenant-isolation, runtime adapter loading
inside one allowed root) and `plain` (the same keys, no isolation, no runtime loading) as the control. The shutdown
test runs `python -m lragent.server` in a subprocess and sends it a real SIGTERM.
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from loopback import serve as on_loopback

from lragent.config import EngineConfig
from lragent.engine.llm_engine import LLMEngine
from lragent.server import ServerSettings, create_app
from lragent.server.cli import main

MODEL = "smollm2-135m-instruct"
KEY_A, KEY_B = "tenant-a-key", "tenant-b-key"
MAX_LEN = 512
CHAT, COMPLETIONS = "/v1/chat/completions", "/v1/completions"
EXCEPTION_NAMES = ("Traceback", "ValueError", "RecursionError", "UnicodeEncodeError", "KeyError", "TypeError")


class Server:
    def __init__(self, url: str, engine: LLMEngine):
        self.url = url
        self.engine = engine
        self.http = httpx.Client(timeout=120)

    def post(self, path: str, key: str = KEY_A, **kw) -> httpx.Response:
        return self.http.post(f"{self.url}{path}", headers={"Authorization": f"Bearer {key}"}, **kw)

    def raw(self, path: str, body: bytes, key: str = KEY_A) -> httpx.Response:
        headers = {"Authorization": f"Bearer {key}", "Content-Type": "application/json"}
        return self.http.post(f"{self.url}{path}", headers=headers, content=body)

    def get(self, path: str, key: str | None = KEY_A) -> httpx.Response:
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        return self.http.get(f"{self.url}{path}", headers=headers)


def serve(engine: LLMEngine, server_settings: ServerSettings):
    """A real uvicorn on a held loopback port, in a thread; yields the Server, then stops it."""
    app = create_app(engine, server_settings)
    with on_loopback(app) as url:
        yield Server(url, engine)


def small_engine(adapters: dict[str, str]) -> LLMEngine:
    config = EngineConfig(adapters=adapters, sharing="base_lr_shared", kv_cache_bytes=48 << 20, max_model_len=MAX_LEN)
    return LLMEngine(config)


@pytest.fixture(scope="module")
def lora_root(shared_a_adapters) -> Path:
    return Path(shared_a_adapters["plan"]).parent


@pytest.fixture(scope="module")
def guarded(shared_a_adapters, lora_root):
    adapters = {k: v for k, v in shared_a_adapters.items() if k != "reflect"}  # reflect: loaded at runtime
    s = ServerSettings(
        api_keys=(KEY_A, KEY_B),
        max_body_bytes=8 << 20,
        allow_runtime_lora=True,
        lora_roots=(str(lora_root),),
        tenant_isolation=True,
    )
    yield from serve(small_engine(adapters), s)


@pytest.fixture(scope="module")
def plain(shared_a_adapters):
    yield from serve(small_engine({"plan": shared_a_adapters["plan"]}), ServerSettings(api_keys=(KEY_A, KEY_B)))


def error_of(resp: httpx.Response, status: int | None = None) -> dict:
    """The OpenAI error object of a 4xx/5xx answer, after checking its shape and that it leaks no exception."""
    if status is not None:
        assert resp.status_code == status, resp.text[:500]
    err = resp.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"], err
    assert not any(name in err["message"] for name in EXCEPTION_NAMES), err
    return err


def unique_prompt() -> str:
    """A prompt no other test sent (a fresh nonce first), three cache blocks long."""
    return f"[{uuid.uuid4().hex}] " + " ".join(f"fact {i} is about the river delta." for i in range(3))


def cached_tokens(resp: httpx.Response) -> int:
    assert resp.status_code == 200, resp.text[:500]
    return resp.json()["usage"]["prompt_tokens_details"]["cached_tokens"]


# ---- 1. auth ---------------------------------------------------------------------------------------------------


def test_metrics_and_openapi_need_a_key_health_does_not(guarded):
    for path in ("/metrics", "/openapi.json", "/v1/models"):
        assert error_of(guarded.get(path, key=None), 401)["code"] == "invalid_api_key"
        assert guarded.get(path, key="wrong").status_code == 401
        assert guarded.get(path, key=KEY_A).status_code == 200
        assert guarded.get(path, key=KEY_B).status_code == 200  # every tenant's key works
    assert "/v1/completions" in guarded.get("/openapi.json").json()["paths"]
    assert guarded.get("/health", key=None).json() == {"status": "ok"}
    assert guarded.get("/docs", key=None).status_code == 404


def test_settings_keep_the_single_key_spelling():
    assert ServerSettings(api_key="k").keys == ("k",)
    assert ServerSettings(api_key="k", api_keys=("a", "k")).keys == ("k", "a")
    assert ServerSettings().keys == ()
    assert ServerSettings().allow_runtime_lora is False
    with pytest.raises(ValueError, match="lora-root"):
        ServerSettings(allow_runtime_lora=True)
    with pytest.raises(ValueError, match="API key"):
        ServerSettings(tenant_isolation=True)


def test_cli_refuses_unsafe_combinations_before_loading_the_model(tmp_path):
    assert main(["serve", "--enable-runtime-lora"]) == 2  # runtime loading without an allow-list
    assert main(["serve", "--tenant-isolation"]) == 2  # isolation without keys
    assert main(["serve", "--enable-runtime-lora", "--lora-root", str(tmp_path / "missing")]) == 2
    assert main(["serve", "--shutdown-timeout", "-1"]) == 2


# ---- 2. tenant isolation ---------------------------------------------------------------------------------------


def test_tenants_share_no_cache_under_isolation(guarded, plain):
    for server, isolated in ((guarded, True), (plain, False)):
        body = {"model": "plan", "prompt": unique_prompt(), "max_tokens": 1, "temperature": 0}
        assert cached_tokens(server.post(COMPLETIONS, KEY_A, json=body)) == 0
        assert cached_tokens(server.post(COMPLETIONS, KEY_A, json=body)) > 0  # the same tenant reuses its prefix
        seen_by_b = cached_tokens(server.post(COMPLETIONS, KEY_B, json=body))
        assert (seen_by_b == 0) if isolated else (seen_by_b > 0), (isolated, seen_by_b)


def test_cache_salt_separates_requests(guarded, plain):
    for server in (plain, guarded):
        messages = [{"role": "user", "content": unique_prompt()}]
        body = {"model": "plan", "messages": messages, "max_tokens": 1, "temperature": 0}
        assert cached_tokens(server.post(CHAT, json={**body, "cache_salt": "one"})) == 0
        assert cached_tokens(server.post(CHAT, json={**body, "cache_salt": "two"})) == 0
        assert cached_tokens(server.post(CHAT, json={**body, "cache_salt": "one"})) > 0
        assert cached_tokens(server.post(CHAT, json=body)) == 0  # no salt is a namespace of its own
    # under isolation a client salt cannot reach into another tenant's namespace
    body = {"model": "plan", "prompt": unique_prompt(), "max_tokens": 1, "temperature": 0, "cache_salt": "shared"}
    assert cached_tokens(guarded.post(COMPLETIONS, KEY_A, json=body)) == 0
    assert cached_tokens(guarded.post(COMPLETIONS, KEY_B, json=body)) == 0
    for bad in ("", "x" * 257, 7, ["a"]):
        err = error_of(guarded.post(COMPLETIONS, json={**body, "cache_salt": bad}), 400)
        assert err["param"] == "cache_salt", err


# ---- 3. adapters at runtime ------------------------------------------------------------------------------------


def load(server: Server, name: str, path: str) -> httpx.Response:
    return server.post("/v1/load_lora_adapter", json={"lora_name": name, "lora_path": path})


def test_runtime_lora_is_off_unless_enabled(plain, shared_a_adapters):
    assert error_of(load(plain, "x", shared_a_adapters["reflect"]), 403)["type"] == "permission_error"
    error_of(plain.post("/v1/unload_lora_adapter", json={"lora_name": "plan"}), 403)


def test_loads_are_confined_to_the_adapter_roots(guarded, lora_root, qv_adapters, tmp_path_factory):
    outside = {"foreign adapter": qv_adapters["plan"], "system file": "/etc/passwd", "missing": "/no/such/dir"}
    outside["traversal"] = str(lora_root / ".." / Path(qv_adapters["plan"]).parent.name / "plan")
    link = lora_root / f"escape-{uuid.uuid4().hex[:6]}"
    link.symlink_to(qv_adapters["plan"])  # inside the root by name, outside once resolved
    outside["symlink out"] = str(link)
    messages = set()
    for case, path in outside.items():
        err = error_of(load(guarded, "intruder", path), 403)
        assert "outside the allowed adapter roots" in err["message"] and err["param"] == "lora_path", case
        messages.add(err["message"])
    assert len(messages) == 1  # the same answer whether the path exists or not
    # inside the root but broken, reached through a symlink: the error names the client's path, not the real one
    broken = lora_root / f"broken-{uuid.uuid4().hex[:6]}"
    broken.mkdir()
    (broken / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 4, "lora_alpha": 8}))
    alias = lora_root / f"alias-{uuid.uuid4().hex[:6]}"
    alias.symlink_to(broken)
    err = error_of(load(guarded, "broken", str(alias)), 400)
    assert broken.name not in err["message"] and "broken" in err["message"], err
    assert guarded.post(COMPLETIONS, json={"model": "broken", "prompt": "x", "max_tokens": 1}).status_code == 404


def test_models_hide_paths_and_unload_drops_metric_series(guarded, lora_root, shared_a_adapters):
    name = f"critic-{uuid.uuid4().hex[:8]}"
    assert load(guarded, name, shared_a_adapters["reflect"]).status_code == 200
    models = guarded.get("/v1/models").json()["data"]
    assert {m["id"]: m["root"] for m in models if m["parent"]}[name] == name
    assert str(lora_root) not in json.dumps(models) and "/" not in json.dumps([m["root"] for m in models])
    out = guarded.post(COMPLETIONS, json={"model": name, "prompt": "Hello", "max_tokens": 1})
    assert out.status_code == 200, out.text
    assert f'adapter="{name}"' in guarded.get("/metrics").text
    assert guarded.post("/v1/unload_lora_adapter", json={"lora_name": name}).status_code == 200
    assert name not in guarded.get("/metrics").text  # no series left behind by the unloaded adapter


@pytest.mark.parametrize("name", ["a" * 129, "two words", "tab\there", "bell\u0007", "zero\u200bwidth", ""])
def test_adapter_names_are_bounded_and_printable(guarded, shared_a_adapters, name):
    err = error_of(load(guarded, name, shared_a_adapters["reflect"]), 400)
    assert err["param"] == "lora_name", err


def test_adapter_name_with_a_lone_surrogate(guarded, shared_a_adapters):
    body = json.dumps({"lora_name": "x\ud800", "lora_path": shared_a_adapters["reflect"]}).encode()  # sent as an escape
    assert error_of(guarded.raw("/v1/load_lora_adapter", body), 400)["param"] == "lora_name"


# ---- 4 and 8. limits -------------------------------------------------------------------------------------------

BASE = {"model": "plan", "prompt": "Hello", "max_tokens": 1}


@pytest.mark.parametrize(
    ("extra", "param"),
    [
        ({"stop": [f"s{i}" for i in range(17)]}, "stop"),
        ({"stop": "x" * 257}, "stop"),
        ({"stop_token_ids": list(range(65))}, "stop_token_ids"),
        ({"n": 65}, "n"),
        ({"prompt": ["a"] * 33, "n": 2}, "n"),
        ({"logit_bias": {str(i): 1.0 for i in range(301)}}, "logit_bias"),
        ({"prompt": "word " * 1_000_000}, "prompt"),  # 5 MB: ~5 s of tokenising on the event loop before
        ({"top_k": 1 << 70}, "top_k"),
    ],
)
def test_limits_answer_4xx_naming_the_param(guarded, extra, param):
    start = time.perf_counter()
    err = error_of(guarded.post(COMPLETIONS, json={**BASE, **extra}), 400)
    assert err["param"] == param, err
    assert time.perf_counter() - start < 3  # refused before any expensive work


def test_chat_limits(guarded):
    too_many = [{"role": "user", "content": "x"}] * (MAX_LEN + 1)
    err = error_of(guarded.post(CHAT, json={"model": "plan", "messages": too_many, "max_tokens": 1}), 400)
    assert err["param"] == "messages" and err["code"] == "context_length_exceeded"
    huge = [{"role": "user", "content": "word " * 1_000_000}]
    start = time.perf_counter()
    assert error_of(guarded.post(CHAT, json={"model": "plan", "messages": huge}), 400)["param"] == "messages"
    assert time.perf_counter() - start < 3  # refused before the template and the tokenizer run


def test_n64_with_a_million_stop_strings_is_refused(guarded):
    """Finding 7: this request stretched another client's stream 10x; now it never reaches the engine."""
    body = {**BASE, "n": 64, "stop": ["a"] * 1_000_000}
    start = time.perf_counter()
    assert error_of(guarded.post(COMPLETIONS, json=body), 400)["param"] == "stop"
    assert time.perf_counter() - start < 10


# ---- 5. malformed input ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "body",
    [
        b'{"model": "plan", "prompt": [-1], "echo": true, "max_tokens": 1}',
        b'{"model": "plan", "prompt": [100000000000000000000], "echo": true, "max_tokens": 1}',
        b'{"model": "plan", "prompt": [[5, 49152]], "echo": true, "max_tokens": 1}',
        b'{"model": "plan", "prompt": "\\ud800", "max_tokens": 1}',
        b'{"model": "\\udfff", "prompt": "hi", "max_tokens": 1}',
        b'{"model": "plan", "prompt": "hi", "max_tokens": 1, "stop": ["\\ud800"]}',
        b'{"model": "plan", "prompt": "hi", "max_tokens": ' + b"9" * 5000 + b"}",
        b'{"model": "plan", "prompt": "hi", "seed": -' + b"1" * 4301 + b"}",
        b'{"model": "plan", "prompt": "hi", "temperature": NaN}',
        b'{"model": "plan", "prompt": "hi", "temperature": Infinity}',
        b'{"model": "plan", "prompt": "hi", "top_p": -Infinity}',
        b'{"model": "plan", "prompt": "hi", "temperature": 1e999}',
        b"[" * 200_000 + b"]" * 200_000,
        b'{"model": "plan", "prompt": ' + b"[" * 200_000 + b"]" * 200_000 + b"}",
        b'{"model": "plan", "prompt": "hi", "x": ' + b'{"a":' * 65 + b"1" + b"}" * 65 + b"}",
        b"\xff\xfe{}",
        b'{"model": "plan", "prompt": "hi"',
    ],
)
def test_malformed_completions_get_4xx(guarded, body):
    resp = guarded.raw(COMPLETIONS, body)
    assert 400 <= resp.status_code < 500, resp.text[:300]
    error_of(resp)


@pytest.mark.parametrize(
    "body",
    [
        b'{"model": "plan", "messages": [{"role": "user", "content": "\\ud800"}], "max_tokens": 1}',
        b'{"model": "plan", "messages": [{"role": "user", "content": [{"type": "text", "text": "\\udc00"}]}]}',
        b'{"model": "plan", "messages": [{"role": "user", "content": "hi", "name": "\\ud83d"}], "max_tokens": 1}',
        b'{"model": "plan", "messages": [{"role": "user", "content": "hi"}], "temperature": NaN}',
        b'{"model": "plan", "messages": ' + b"[" * 100 + b"]" * 100 + b"}",
    ],
)
def test_malformed_chat_gets_4xx(guarded, body):
    resp = guarded.raw(CHAT, body)
    assert 400 <= resp.status_code < 500, resp.text[:300]
    error_of(resp)


def test_unexpected_exceptions_are_500s_without_their_text(guarded, monkeypatch):
    from lragent.server.serving import OpenAIServing

    def broken(self, body):
        raise RuntimeError("secret detail at /srv/private/weights.bin")

    monkeypatch.setattr(OpenAIServing, "completion_prompts", broken)
    # on its own connection: after an unexpected exception the server closes the connection it answered on, and a
    # pooled one reused by the next test could be reset under it
    with httpx.Client(timeout=120) as own:
        resp = own.post(f"{guarded.url}{COMPLETIONS}", json=BASE, headers={"Authorization": f"Bearer {KEY_A}"})
    err = error_of(resp, 500)
    assert "secret" not in err["message"] and "/srv" not in err["message"]
    assert err["message"].startswith("internal server error (reference ")


# ---- a request the engine fails alone --------------------------------------------------------------------------


def sse_events(resp: httpx.Response) -> list:
    return [json.loads(line[6:]) if line != "data: [DONE]" else "[DONE]" for line in resp.iter_lines() if line]


def test_engine_error_ends_only_that_request(guarded, monkeypatch):
    """The engine finishes a failing request with finish_reason "error": an error event + [DONE] on a stream, a
    500 error object otherwise, while another client's stream is served in full."""
    engine, original = guarded.engine, guarded.engine.step

    def step():
        outputs = original()
        for i, out in enumerate(outputs):
            if out.adapter == "action" and not out.finished:  # what the engine reports for a request it failed
                engine.abort(out.request_id)
                message = "the engine failed on this request (FloatingPointError)"
                outputs[i] = dataclasses.replace(out, finished=True, finish_reason="error", error=message)
        return outputs

    monkeypatch.setattr(engine, "step", step)
    good = {"model": "plan", "prompt": "Count: 1, 2,", "max_tokens": 6, "ignore_eos": True, "stream": True}
    bad = {"model": "action", "prompt": "Hello", "max_tokens": 5, "ignore_eos": True}

    def stream(body: dict) -> list:
        with guarded.http.stream("POST", f"{guarded.url}{COMPLETIONS}", json=body, headers=auth()) as resp:
            assert resp.status_code == 200
            return sse_events(resp)

    with ThreadPoolExecutor(2) as pool:
        good_events = pool.submit(stream, good)
        bad_events = stream({**bad, "stream": True})
        err = error_of(guarded.post(COMPLETIONS, json=bad), 500)
        assert err["message"] == "the engine failed on this request (FloatingPointError)"
        # a tiny temperature (finding 1) is served too, by the real engine
        tiny = guarded.post(COMPLETIONS, json={**good, "stream": False, "temperature": 1e-38})
        assert tiny.status_code == 200, tiny.text
        events = good_events.result(60)
    assert bad_events[-1] == "[DONE]" and "FloatingPointError" in bad_events[-2]["error"]["message"]
    assert events[-1] == "[DONE]" and events[-2]["choices"][0]["finish_reason"] == "length"
    assert not any("error" in e for e in events[:-1])


@pytest.mark.parametrize("params", [{"temperature": 1e-38}, {"top_p": 1e-50}, {"top_p": 1e-300, "temperature": 0.5}])
def test_extreme_but_valid_sampling_values_are_served(guarded, params):
    """Values that pass validation must not fail in the engine: a tiny temperature is greedy (finding 1); a top_p
    below float32's range (it rounds to 0 against the probabilities) must still keep the most likely token."""
    out = guarded.post(COMPLETIONS, json={**BASE, **params})
    assert out.status_code == 200, out.text


def auth(key: str = KEY_A) -> dict:
    return {"Authorization": f"Bearer {key}"}


# ---- 7. fuzz ---------------------------------------------------------------------------------------------------
# A plausible request (whose values include the edge cases: surrogates, huge ints, bad ids, tiny temperatures),
# then up to two fields replaced by arbitrary JSON. Token limits are always sent and tiny when valid.

SURROGATE = st.integers(0xD800, 0xDFFF).map(chr)  # st.text() never draws these
WEIRD_TEXT = st.lists(st.characters() | SURROGATE, max_size=12).map("".join)
TEXT = st.text(max_size=16) | WEIRD_TEXT
HUGE_INT = st.integers(min_value=-(10**30), max_value=10**30) | st.sampled_from([10**20, -1, 1 << 63, 10**4000])
SCALAR = st.none() | st.booleans() | HUGE_INT | st.floats(allow_nan=False, allow_infinity=False) | WEIRD_TEXT
ANY_JSON = st.recursive(
    SCALAR, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(WEIRD_TEXT, inner, max_size=3), max_leaves=8
)
TOKEN_LIMIT = st.one_of(st.integers(1, 2), st.integers(1, 2), st.sampled_from([0, -1, "2", 2.0, [1], True, 10**30]))
MODEL_NAME = st.sampled_from(["plan", "action", MODEL]) | st.sampled_from(["nope", ""]) | WEIRD_TEXT

GENERATION = {
    "temperature": st.sampled_from([0, 0.7, 1e-38, 1e-300, -0.5, 1e300]) | st.floats(0, 2),
    "top_p": st.floats(0, 1.5),
    "top_k": st.integers(-3, 100_000) | HUGE_INT,
    "n": st.sampled_from([1, 2, 0, -1, 65]),
    "stop": TEXT | st.lists(TEXT, max_size=4),
    "stop_token_ids": st.lists(st.integers(0, 60_000) | HUGE_INT, max_size=3),
    "seed": HUGE_INT,
    "stream": st.booleans(),
    "stream_options": st.fixed_dictionaries({"include_usage": st.booleans()}),
    "logit_bias": st.just({}) | st.dictionaries(TEXT, st.floats(-5, 5), max_size=2),
    "presence_penalty": st.sampled_from([0, 0.5]),
    "ignore_eos": st.booleans(),
    "include_stop_str_in_output": st.booleans(),
    "min_tokens": st.sampled_from([0, 1]),
    "user": TEXT,
    "cache_salt": TEXT,
}
TOKEN_IDS = st.lists(st.integers(-2, 50_000) | HUGE_INT, max_size=4)
COMPLETION = {
    **GENERATION,
    "echo": st.booleans(),
    "logprobs": st.sampled_from([None, 0, 1, 6]),
    "suffix": st.none() | TEXT,
    "best_of": st.sampled_from([None, 1, 2]),
}
CONTENT_PART = st.fixed_dictionaries({"type": st.sampled_from(["text", "image_url"]), "text": TEXT})
MESSAGE = st.fixed_dictionaries(
    {
        "role": st.sampled_from(["user", "system", "assistant", "developer", "tool", "wizard"]),
        "content": st.none() | TEXT | st.lists(CONTENT_PART, max_size=2),
    },
    optional={"name": TEXT},
)
CHAT_FIELDS = {
    **GENERATION,
    "logprobs": st.booleans(),
    "top_logprobs": st.sampled_from([None, 0, 2]),
    "tools": st.sampled_from([None, [], [{"type": "function"}]]),
    "response_format": st.sampled_from([{"type": "text"}, {"type": "json_object"}]),
}
PROMPT = TEXT | st.lists(TEXT, min_size=1, max_size=2) | TOKEN_IDS | st.lists(TOKEN_IDS, max_size=2)


def request_body(required: dict, optional: dict, token_limits: tuple[str, ...]) -> st.SearchStrategy:
    """A plausible body, up to two fields swapped for arbitrary JSON, then the (always present) token limits."""
    body = st.fixed_dictionaries(required, optional=optional)
    names = sorted({*required, *optional})
    mutations = st.dictionaries(st.sampled_from(names), ANY_JSON, max_size=2)
    limits = st.fixed_dictionaries({k: TOKEN_LIMIT for k in token_limits})
    return st.builds(lambda b, m, lim: {**b, **m, **lim}, body, mutations, limits)


FUZZ = st.one_of(
    st.tuples(st.just(COMPLETIONS), request_body({"model": MODEL_NAME, "prompt": PROMPT}, COMPLETION, ("max_tokens",))),
    st.tuples(
        st.just(CHAT),
        request_body(
            {"model": MODEL_NAME, "messages": st.lists(MESSAGE, max_size=3)},
            CHAT_FIELDS,
            ("max_tokens", "max_completion_tokens"),
        ),
    ),
    st.tuples(st.sampled_from([COMPLETIONS, CHAT]), ANY_JSON),
)


def encode(body) -> bytes:
    """JSON as a client would send it: lone surrogates as \\u escapes, big integers written out in full."""
    return json.dumps(body, allow_nan=False).encode()


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(case=FUZZ)
@example(case=(COMPLETIONS, {"model": "\ud800", "prompt": "hi", "max_tokens": 1}))  # the audit's findings, always
@example(case=(COMPLETIONS, {"model": "plan", "prompt": [-1], "echo": True, "max_tokens": 1}))
@example(case=(COMPLETIONS, {"model": "plan", "prompt": ["ok", "\udc00"], "max_tokens": 1}))
@example(case=(CHAT, {"model": "plan", "messages": [{"role": "user", "content": "\ud800"}], "max_tokens": 1}))
def test_fuzz_request_schemas_never_5xx(guarded, case):
    path, body = case
    raw = encode(body)
    resp = guarded.raw(path, raw)
    assert resp.status_code < 500, (resp.status_code, resp.text[:300], raw[:300])
    if resp.status_code >= 400:
        error_of(resp)
    elif resp.headers["content-type"].startswith("text/event-stream"):
        events = [line for line in resp.text.splitlines() if line]
        assert events[-1] == "data: [DONE]" and not any('"error"' in e for e in events), events[-3:]


def test_server_still_serves_after_the_fuzz(guarded):
    out = guarded.post(COMPLETIONS, json={"model": "plan", "prompt": "Hello", "max_tokens": 2, "temperature": 0})
    assert out.status_code == 200 and out.json()["usage"]["completion_tokens"] >= 1
    assert guarded.get("/health", key=None).status_code == 200


# ---- 6. graceful shutdown --------------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_sigterm_drains_then_ends_streams_with_an_error_and_done(model_dir, tmp_path):
    """SIGTERM with a short and a long stream in flight: the short one finishes normally within the grace
    period, new requests get 503, the long one ends with an error event and [DONE], and the process exits."""
    grace, port = 4.0, free_port()
    cmd = [sys.executable, "-m", "lragent.server", "--model", MODEL, "--max-model-len", "512"]
    cmd += ["--kv-cache-bytes", "64M", "--port", str(port), "--shutdown-timeout", str(grace), "--log-level", "warning"]
    log = tmp_path / "server.log"
    with log.open("w") as sink:
        proc = subprocess.Popen(cmd, env={**os.environ, "OMP_NUM_THREADS": "1"}, stderr=sink)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(proc, url, log)
        long_body = {"model": MODEL, "prompt": "Once", "max_tokens": 480, "ignore_eos": True, "stream": True}
        short_body = {**long_body, "max_tokens": 15}
        with ThreadPoolExecutor(2) as pool:
            started = [threading.Event(), threading.Event()]
            long_run = pool.submit(read_stream, url, long_body, started[0])
            short_run = pool.submit(read_stream, url, short_body, started[1])
            assert all(e.wait(60) for e in started), "the streams did not start"
            proc.send_signal(signal.SIGTERM)
            sent = time.monotonic()
            time.sleep(0.5)  # the signal is handled between two event-loop turns
            refused = httpx.post(f"{url}/v1/completions", json={**short_body, "stream": False}, timeout=10)
            assert error_of(refused, 503)["message"] == "the server is shutting down"
            (short_events, short_end), (long_events, _) = short_run.result(60), long_run.result(60)
        rc = proc.wait(timeout=grace + 20)
        took = time.monotonic() - sent
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert short_end > sent, "the short request should still have been running at SIGTERM"
    assert short_events[-1] == "[DONE]" and short_events[-2]["choices"][0]["finish_reason"] == "length"
    assert not any("error" in e for e in short_events[:-1])
    assert long_events[-1] == "[DONE]", long_events[-3:]
    assert long_events[-2]["error"]["message"] == "the server is shutting down", long_events[-3:]
    assert len(long_events) < 480  # it was cut, not finished
    assert rc == 0 and grace - 0.5 < took < grace + 15, (rc, took)


def wait_healthy(proc: subprocess.Popen, url: str, log: Path, timeout: float = 90) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, log.read_text()[-3000:]
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.1)
    raise AssertionError("the server did not become healthy")


def read_stream(url: str, body: dict, started: threading.Event) -> tuple[list, float]:
    """Every SSE event of one streamed completion, and when it ended; `started` is set once tokens flow."""
    events = []
    with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=60) as resp:
        assert resp.status_code == 200
        for line in resp.iter_lines():
            if line:
                events.append(json.loads(line[6:]) if line != "data: [DONE]" else "[DONE]")
                if len(events) >= 2:
                    started.set()
    started.set()
    return events, time.monotonic()
