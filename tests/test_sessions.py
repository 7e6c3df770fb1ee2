"""Trajectory affinity hint: an optional session id (`X-Session-ID` header, else a `session_id` field) labels
per-session cache-reuse counters in /metrics. The label set is capped; the id is never needed for sharing.

One loopback server (embedded SmolLM2-135M on CPU, three shared-A role adapters, base_lr_shared, at most three
tracked sessions) is shared by the module.
"""

from __future__ import annotations

import httpx
import pytest
from loopback import serve
from prometheus_client.parser import text_string_to_metric_families

from lragent.config import EngineConfig
from lragent.engine.llm_engine import LLMEngine
from lragent.server import ServerSettings, create_app

MODEL = "smollm2-135m-instruct"
MAX_SESSIONS = 3
TRAJECTORY = (
    "Question: Which magazine was started first, Arthur's Magazine or First for Women?\n"
    "Thought: I need to find when each magazine was started.\n"
    "Action: Retrieve[Arthur's Magazine]\n"
    "Observation: Arthur's Magazine (1844-1846) was an American literary periodical published in Philadelphia "
    "in the 19th century. Edited by Timothy Shay Arthur, it featured work by Edgar A. Poe and others.\n"
)


@pytest.fixture(scope="module")
def url(shared_a_adapters):
    config = EngineConfig(adapters=shared_a_adapters, sharing="base_lr_shared", kv_cache_bytes=32 << 20,
                          max_model_len=512)  # fmt: skip
    app = create_app(LLMEngine(config), ServerSettings(max_sessions=MAX_SESSIONS))
    with serve(app) as url:
        yield url


def post(url: str, path: str, body: dict, session: str | bytes | None = None) -> httpx.Response:
    headers = {} if session is None else {"X-Session-ID": session}
    return httpx.post(f"{url}{path}", json=body, headers=headers, timeout=120)


def sessions(url: str) -> dict[str, dict[str, float]]:
    """session label -> {metric name: value} of the per-session counters."""
    out: dict[str, dict[str, float]] = {}
    for family in text_string_to_metric_families(httpx.get(f"{url}/metrics", timeout=60).text):
        for s in family.samples:
            if s.name.startswith("lragent_session_") and s.name.endswith("_total"):
                out.setdefault(s.labels["session"], {})[s.name] = s.value
    return out


def completion(prompt: str, model: str = MODEL, **kw) -> dict:
    return {"model": model, "prompt": prompt, "max_tokens": 1, "temperature": 0, **kw}


def test_header_counts_reuse(url):
    first = post(url, "/v1/completions", completion(TRAJECTORY), session="traj-1")
    assert first.status_code == 200, first.text
    after_one = sessions(url)["traj-1"]
    assert after_one["lragent_session_requests_total"] == 1
    assert after_one["lragent_session_prompt_tokens_total"] == first.json()["usage"]["prompt_tokens"]
    again = post(url, "/v1/completions", completion(TRAJECTORY + "Thought:"), session="traj-1")
    cached = again.json()["usage"]["prompt_tokens_details"]["cached_tokens"]
    assert cached > 0
    after_two = sessions(url)["traj-1"]
    assert after_two["lragent_session_requests_total"] == 2
    reused = after_two["lragent_session_prompt_tokens_reused_total"]
    assert reused - after_one["lragent_session_prompt_tokens_reused_total"] == cached


def test_field_on_every_endpoint_and_header_wins(url):
    chat = {"model": MODEL, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 1, "session_id": "traj-2"}
    assert post(url, "/v1/chat/completions", chat).status_code == 200
    assert post(url, "/v1/completions", completion("Hello", session_id="traj-2")).status_code == 200
    resp = {"model": MODEL, "input": "Hi", "max_output_tokens": 1, "session_id": "traj-2"}
    assert post(url, "/v1/responses", resp).status_code == 200
    assert post(url, "/v1/responses", {**resp, "session_id": "ignored"}, session="traj-2").status_code == 200
    seen = sessions(url)
    assert seen["traj-2"]["lragent_session_requests_total"] == 4
    assert "ignored" not in seen


@pytest.mark.parametrize(
    "session, field, param",
    [
        ("x" * 129, None, "X-Session-ID"),
        (b"caf\xc3\xa9", None, "X-Session-ID"),
        (None, "tab\there", "session_id"),
        (None, "", "session_id"),
        (None, "_other", "session_id"),
        (None, "y" * 129, "session_id"),
    ],
)
def test_invalid_ids_refused(url, session, field, param):
    body = completion("Hello") if field is None else completion("Hello", session_id=field)
    out = post(url, "/v1/completions", body, session=session)
    assert out.status_code == 400, out.text
    assert out.json()["error"]["param"] == param and param in out.json()["error"]["message"]
    bad_chat = {"model": MODEL, "messages": [{"role": "user", "content": "Hi"}], "session_id": 7}
    assert post(url, "/v1/chat/completions", bad_chat).json()["error"]["param"] == "session_id"


def test_label_cap_folds_old_sessions(url):
    before = sessions(url)
    total_before = sum(v["lragent_session_requests_total"] for v in before.values())
    names = [f"cap-{i}" for i in range(MAX_SESSIONS + 3)]
    for name in names:
        assert post(url, "/v1/completions", completion("Hello", session_id=name)).status_code == 200
    after = sessions(url)
    assert len(set(after) - {"_other"}) == MAX_SESSIONS
    assert set(names[-MAX_SESSIONS:]) <= set(after)  # the most recent keep their series
    assert sum(v["lragent_session_requests_total"] for v in after.values()) == total_before + len(names)
    assert after["_other"]["lragent_session_requests_total"] >= 3


def test_sharing_needs_no_session(url):
    """Cross-agent reuse without any session id: the engine finds shared prefixes itself."""
    prompt = "Observation: the second magazine was founded in 1989 in New York City.\n" + TRAJECTORY
    first = post(url, "/v1/completions", completion(prompt, model="plan"))
    second = post(url, "/v1/completions", completion(prompt + "Action:", model="reflect"))
    assert first.status_code == second.status_code == 200
    prompt_tokens = first.json()["usage"]["prompt_tokens"]
    assert second.json()["usage"]["prompt_tokens_details"]["cached_tokens"] >= prompt_tokens - 16
