"""Prompt log-probabilities through the server: /v1/completions with echo + logprobs (the legacy OpenAI API, as
lm-evaluation-harness's `local-completions` scores with it), max_tokens 0 with echo, and vLLM's `prompt_logprobs`
field on completions and chat. Values are checked against the engine's own `LLM.generate` with
`SamplingParams(prompt_logprobs=k)` for the same prompt and adapter."""

from __future__ import annotations

import json

import httpx
import pytest
from loopback import serve

from lragent import LLM, SamplingParams
from lragent.config import EngineConfig
from lragent.engine.llm_engine import LLMEngine
from lragent.server import ServerSettings, create_app

KEY = "test-key"
MAX_LEN = 256
PROMPT = "The capital of France is Paris, and the capital of Italy is"
TOL = 1e-4


def config(adapters: dict[str, str]) -> EngineConfig:
    return EngineConfig(adapters=adapters, sharing="non_shared", kv_cache_bytes=32 << 20, max_model_len=MAX_LEN)


@pytest.fixture(scope="module")
def reference(qv_adapters):
    """The engine's own answer (greedy, one token, prompt scored with 3 alternatives) for PROMPT under "plan"."""
    with LLM.from_config(config(qv_adapters)) as llm:
        ids = llm.tokenizer.encode(PROMPT, add_special_tokens=False)
        params = SamplingParams(max_tokens=1, temperature=0.0, logprobs=True, top_logprobs=3, prompt_logprobs=3)
        out = llm.generate(ids, params, adapter="plan")[0]
        return ids, out, llm.tokenizer


@pytest.fixture(scope="module")
def url(qv_adapters, reference):
    app = create_app(LLMEngine(config(qv_adapters)), ServerSettings(api_key=KEY))
    with serve(app) as base:
        yield base


def post(url: str, path: str, body: dict) -> httpx.Response:
    return httpx.post(f"{url}{path}", json=body, headers={"Authorization": f"Bearer {KEY}"}, timeout=120)


def complete(url: str, **body) -> dict:
    resp = post(url, "/v1/completions", {"model": "plan", "temperature": 0, **body})
    assert resp.status_code == 200, resp.text
    return resp.json()


def refused(url: str, path: str, body: dict, param: str) -> str:
    resp = post(url, path, {"model": "plan", **body})
    assert resp.status_code == 400, resp.text
    error = resp.json()["error"]
    assert error["param"] == param, error
    return error["message"]


def piece(tokenizer, token: int) -> str:
    return tokenizer.decode([token], skip_special_tokens=True)


def test_echo_logprobs_start_with_the_scored_prompt(url, reference):
    """lm-evaluation-harness's request: prompt as token ids, echo, logprobs=k, max_tokens=1, greedy."""
    ids, ref, tok = reference
    body = complete(url, prompt=ids, echo=True, logprobs=3, max_tokens=1)
    [choice] = body["choices"]
    lp = choice["logprobs"]
    n = len(ids)
    assert len(lp["tokens"]) == len(lp["token_logprobs"]) == len(lp["top_logprobs"]) == n + 1
    assert lp["tokens"][:n] == [piece(tok, t) for t in ids]
    assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None  # nothing before it to score from
    for p in range(1, n):
        want = ref.prompt_logprobs[p]
        assert lp["token_logprobs"][p] == pytest.approx(want.logprob, abs=TOL), p
        top = lp["top_logprobs"][p]
        assert list(top) == [piece(tok, t) for t, _ in want.top]
        assert list(top.values()) == pytest.approx([v for _, v in want.top], abs=TOL)
    # then the generated token, the same one the engine picks
    assert choice["text"] == PROMPT + ref.text and lp["tokens"][n] == ref.text
    assert lp["token_logprobs"][n] == pytest.approx(ref.logprobs[0], abs=TOL)
    assert body["usage"] == {**body["usage"], "prompt_tokens": n, "completion_tokens": 1}


def test_text_offsets_follow_the_echoed_text(url, reference):
    ids, ref, _ = reference
    body = complete(url, prompt=PROMPT, echo=True, logprobs=0, max_tokens=3)
    choice = body["choices"][0]
    lp, text = choice["logprobs"], choice["text"]
    assert text.startswith(PROMPT) and len(lp["tokens"]) == len(ids) + body["usage"]["completion_tokens"]
    assert lp["top_logprobs"] is None  # logprobs=0: no alternatives, as for generated tokens
    assert lp["text_offset"][0] == 0 and lp["text_offset"][len(ids)] == len(PROMPT)
    for token, at in zip(lp["tokens"], lp["text_offset"]):
        assert text[at : at + len(token)] == token
    assert "".join(lp["tokens"]) == text


def test_logprobs_1_marks_greedy_tokens_as_lm_eval_reads_them(url, reference):
    """lm-eval's is_greedy: a token is greedy when its logprob equals the max of its top_logprobs (exactly)."""
    ids, ref, _ = reference
    lp = complete(url, prompt=ids, echo=True, logprobs=1, max_tokens=1)["choices"][0]["logprobs"]
    for p in range(1, len(ids)):
        greedy = lp["token_logprobs"][p] == max(lp["top_logprobs"][p].values())
        assert greedy == (ref.prompt_logprobs[p].top[0][0] == ids[p]), p
        assert len(lp["top_logprobs"][p]) == 1


def test_several_prompts_and_samples_each_echo_their_own_scores(url, reference):
    ids, ref, _ = reference
    other = ids[:5]
    body = complete(url, prompt=[ids, other], n=2, echo=True, logprobs=1, max_tokens=2, temperature=1.0, seed=3)
    assert [c["index"] for c in body["choices"]] == [0, 1, 2, 3]
    for choice, prompt in zip(body["choices"], [ids, ids, other, other]):
        scores = choice["logprobs"]["token_logprobs"][: len(prompt)]
        assert scores[0] is None
        assert scores[1:] == pytest.approx([e.logprob for e in ref.prompt_logprobs[1 : len(prompt)]], abs=TOL)


def test_max_tokens_0_with_echo_returns_the_prompt_alone(url, reference):
    ids, ref, _ = reference
    body = complete(url, prompt=PROMPT, echo=True, logprobs=2, max_tokens=0)
    [choice] = body["choices"]
    assert choice["text"] == PROMPT and choice["finish_reason"] == "length"
    assert len(choice["logprobs"]["tokens"]) == len(ids) and body["usage"]["completion_tokens"] == 0
    assert choice["logprobs"]["token_logprobs"][-1] == pytest.approx(ref.prompt_logprobs[-1].logprob, abs=TOL)
    plain = complete(url, prompt=PROMPT, echo=True, max_tokens=0)["choices"][0]
    assert plain["text"] == PROMPT and plain["logprobs"] is None
    assert "0 only with echo" in refused(url, "/v1/completions", {"prompt": PROMPT, "max_tokens": 0}, "max_tokens")


def test_vllm_prompt_logprobs_field(url, reference):
    """vLLM's shape: per position null (the first) or {token id: {logprob, rank, decoded_token}}, own token first."""
    ids, ref, tok = reference
    body = complete(url, prompt=ids, max_tokens=1, prompt_logprobs=2)
    choice = body["choices"][0]
    assert choice["logprobs"] is None and choice["text"] == ref.text  # no echo: the text is the generated one
    got = choice["prompt_logprobs"]
    assert len(got) == len(ids) and got[0] is None
    for p in range(1, len(ids)):
        want, entry = ref.prompt_logprobs[p], got[p]
        top = want.top[:2]
        assert list(entry)[0] == str(ids[p])
        assert set(entry) == {str(ids[p])} | {str(t) for t, _ in top}
        own = entry[str(ids[p])]
        assert own["logprob"] == pytest.approx(want.logprob, abs=TOL) and own["decoded_token"] == piece(tok, ids[p])
        ranks = [r for r, (t, _) in enumerate(top, 1) if t == ids[p]]
        assert own["rank"] == want.rank >= 1 and (not ranks or own["rank"] == ranks[0])
        for rank, (t, v) in enumerate(top, 1):
            assert entry[str(t)]["rank"] == rank and entry[str(t)]["logprob"] == pytest.approx(v, abs=TOL)
    zero = complete(url, prompt=ids, max_tokens=1, prompt_logprobs=0)["choices"][0]["prompt_logprobs"]
    assert all(list(e) == [str(t)] for e, t in zip(zero[1:], ids[1:]))
    assert [e[str(t)]["rank"] for e, t in zip(zero[1:], ids[1:])] == [w.rank for w in ref.prompt_logprobs[1:]]


def test_vllm_prompt_logprobs_on_chat(url):
    messages = [{"role": "user", "content": "Name a colour."}]
    resp = post(url, "/v1/chat/completions", {"model": "plan", "messages": messages, "max_tokens": 1,
                                             "temperature": 0, "prompt_logprobs": 1})  # fmt: skip
    assert resp.status_code == 200, resp.text
    body = resp.json()
    got = body["prompt_logprobs"]
    assert len(got) == body["usage"]["prompt_tokens"] and got[0] is None
    assert all(1 <= len(e) <= 2 and all(v["logprob"] <= 0 for v in e.values()) for e in got[1:])


def stream(url: str, body: dict) -> list[dict]:
    headers = {"Authorization": f"Bearer {KEY}"}
    with httpx.stream("POST", f"{url}/v1/completions", json=body, headers=headers, timeout=120) as resp:
        assert resp.status_code == 200
        lines = [line[6:] for line in resp.iter_lines() if line.startswith("data: ")]
    assert lines[-1] == "[DONE]"
    return [json.loads(line) for line in lines[:-1]]


def test_streamed_echo_logprobs_match_the_full_response(url, reference):
    ids, _, _ = reference
    kw = dict(model="plan", prompt=PROMPT, echo=True, logprobs=2, max_tokens=4, temperature=0, ignore_eos=True)
    full = complete(url, **kw)["choices"][0]
    chunks = [c["choices"][0] for c in stream(url, {**kw, "stream": True})]
    first = chunks[0]["logprobs"]
    assert chunks[0]["text"].startswith(PROMPT) and first["token_logprobs"][0] is None  # the prompt, scored, first
    assert len(first["tokens"]) > len(ids)
    assert "".join(c["text"] for c in chunks) == full["text"]
    for key in ("tokens", "token_logprobs", "top_logprobs", "text_offset"):
        joined = [x for c in chunks if c["logprobs"] for x in c["logprobs"][key]]
        if key == "token_logprobs":
            assert joined[0] is None and joined[1:] == pytest.approx(full["logprobs"][key][1:], abs=TOL)
        elif key == "top_logprobs":
            assert joined[0] is None and [list(t) for t in joined[1:]] == [list(t) for t in full["logprobs"][key][1:]]
        else:
            assert joined == full["logprobs"][key], key
    assert chunks[-1]["finish_reason"] == full["finish_reason"]


@pytest.mark.parametrize(
    "path, body, param",
    [
        ("/v1/completions", {"prompt": PROMPT, "prompt_logprobs": 1, "stream": True}, "prompt_logprobs"),
        ("/v1/completions", {"prompt": PROMPT, "prompt_logprobs": 21}, "prompt_logprobs"),
        ("/v1/completions", {"prompt": PROMPT, "prompt_logprobs": -1}, "prompt_logprobs"),
        ("/v1/completions", {"prompt": PROMPT, "prompt_logprobs": "2"}, "prompt_logprobs"),
        ("/v1/completions", {"prompt": PROMPT, "echo": True, "logprobs": 6}, "logprobs"),
        ("/v1/completions", {"prompt": PROMPT, "echo": True, "max_tokens": 0, "n": 1, "best_of": 2}, "best_of"),
        ("/v1/completions", {"prompt": PROMPT, "max_tokens": -1, "echo": True}, "max_tokens"),
        (
            "/v1/chat/completions",
            {"messages": [{"role": "user", "content": "hi"}], "prompt_logprobs": 1, "stream": True},
            "prompt_logprobs",
        ),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 0}, "max_tokens"),
    ],
)
def test_unsupported_combinations_are_refused_by_name(url, path, body, param):
    refused(url, path, {"max_tokens": 1, **body} if "max_tokens" not in body else body, param)
