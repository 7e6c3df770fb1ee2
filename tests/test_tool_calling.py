"""Tool calling, JSON mode and the vLLM guided extras on /v1/chat/completions (issue 14, items 1 and 2).

A real uvicorn server on loopback with the embedded SmolLM2-135M on CPU, driven by the official `openai` client.
SmolLM2's chat template renders no tools, so the fallback section (tools as JSON in the system prompt) is used;
required / named calls are constrained by the function's schema, so even this small model returns valid calls.
"""

from __future__ import annotations

import json

import httpx
import openai
import pytest
from loopback import serve
from transformers import AutoTokenizer

from lragent.config import EngineConfig
from lragent.engine.llm_engine import LLMEngine
from lragent.server import ServerSettings, create_app
from lragent.server.call_scanner import CallScanner
from lragent.server.tools import ToolStream, parse_tool_calls, plan_tools

MAX_LEN = 512
CHAT = "/v1/chat/completions"
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather of a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string", "maxLength": 12}, "unit": {"enum": ["c", "f"]}},
            "required": ["city", "unit"],
        },
    },
}
SEARCH = {
    "type": "function",
    "function": {
        "name": "search",
        "parameters": {
            "type": "object",
            "properties": {"query": {"type": "string", "maxLength": 16}},
            "required": ["query"],
        },
    },
}
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]
PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 10},
        "age": {"type": "integer", "minimum": 0, "maximum": 150},
    },
    "required": ["name", "age"],
    "additionalProperties": False,
}


@pytest.fixture(scope="module")
def server():
    config = EngineConfig(sharing="base_shared", kv_cache_bytes=32 << 20, max_model_len=MAX_LEN)
    app = create_app(LLMEngine(config), ServerSettings())
    with serve(app) as url:
        yield url


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server}/v1", api_key="none", max_retries=0, timeout=120)


def model(client) -> str:
    return client.models.list().data[0].id


def check_person(value: dict) -> None:
    assert set(value) == {"name", "age"} and isinstance(value["name"], str) and isinstance(value["age"], int)


def check_weather(arguments: str) -> None:
    args = json.loads(arguments)
    assert set(args) == {"city", "unit"} and isinstance(args["city"], str) and args["unit"] in ("c", "f")


def assemble(chunks) -> tuple[str, list[dict], str | None]:
    """Content, tool calls and finish reason of a streamed answer, assembled as OpenAI clients do."""
    content, calls, reason = "", {}, None
    for chunk in chunks:
        for choice in chunk.choices:
            content += choice.delta.content or ""
            for d in choice.delta.tool_calls or []:
                call = calls.setdefault(d.index, {"id": None, "name": "", "arguments": ""})
                call["id"] = d.id or call["id"]
                if d.function is not None:
                    call["name"] += d.function.name or ""
                    call["arguments"] += d.function.arguments or ""
            reason = choice.finish_reason or reason
    return content, [calls[i] for i in sorted(calls)], reason


# ---- JSON mode ------------------------------------------------------------------------------------------------


def test_json_object_and_strict_json_schema_streamed_and_not(client):
    m, ask = model(client), [{"role": "user", "content": "Describe a person as JSON."}]
    out = client.chat.completions.create(
        model=m, messages=ask, max_tokens=40, temperature=0, response_format={"type": "json_object"}
    )
    text = out.choices[0].message.content
    assert text.startswith("{")  # any JSON object: it may run past max_tokens, then it is a prefix of one
    if out.choices[0].finish_reason == "stop":
        assert isinstance(json.loads(text), dict)
    fmt = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON, "strict": True}}
    out = client.chat.completions.create(model=m, messages=ask, max_tokens=40, temperature=0, response_format=fmt)
    assert out.choices[0].finish_reason == "stop"
    check_person(json.loads(out.choices[0].message.content))
    chunks = list(
        client.chat.completions.create(
            model=m, messages=ask, max_tokens=40, temperature=0, response_format=fmt, stream=True
        )
    )
    text, calls, reason = assemble(chunks)
    assert text == out.choices[0].message.content and not calls and reason == "stop"


def test_guided_extras_are_honoured(client):
    m = model(client)
    ask = [{"role": "user", "content": "Is the sky blue?"}]
    cases = [
        ({"guided_choice": ["yes", "no"]}, lambda t: t in ("yes", "no")),
        ({"guided_regex": "[0-9]{3}"}, lambda t: len(t) == 3 and t.isdigit()),
        ({"guided_json": PERSON}, lambda t: check_person(json.loads(t)) is None),
        ({"guided_grammar": 'root ::= "maybe" | "sure"'}, lambda t: t in ("maybe", "sure")),
        ({"structured_outputs": {"choice": ["up", "down"]}}, lambda t: t in ("up", "down")),
        ({"structured_outputs": {"json": PERSON}, "guided_decoding_backend": "xgrammar"}, lambda t: json.loads(t)),
    ]
    for extra, ok in cases:
        out = client.chat.completions.create(model=m, messages=ask, max_tokens=40, temperature=0, extra_body=extra)
        assert ok(out.choices[0].message.content), (extra, out.choices[0].message.content)


# ---- tool calling ---------------------------------------------------------------------------------------------


def test_named_tool_choice_streamed_and_not(client):
    m = model(client)
    choice = {"type": "function", "function": {"name": "get_weather"}}
    kw = dict(model=m, messages=ASK, tools=[WEATHER, SEARCH], tool_choice=choice, max_tokens=40, temperature=0)
    out = client.chat.completions.create(**kw)
    msg = out.choices[0]
    assert msg.finish_reason == "tool_calls" and msg.message.content is None
    (call,) = msg.message.tool_calls
    assert call.type == "function" and call.function.name == "get_weather" and call.id.startswith("call_")
    check_weather(call.function.arguments)
    text, calls, reason = assemble(client.chat.completions.create(**kw, stream=True))
    assert text == "" and reason == "tool_calls" and len(calls) == 1
    assert calls[0]["name"] == "get_weather" and calls[0]["arguments"] == call.function.arguments


def test_required_tool_choice_streamed_and_not(client):
    m = model(client)
    kw = dict(
        model=m,
        messages=ASK,
        tools=[WEATHER, SEARCH],
        tool_choice="required",
        parallel_tool_calls=False,
        max_tokens=60,
        temperature=0,
    )
    out = client.chat.completions.create(**kw)
    assert out.choices[0].finish_reason == "tool_calls"
    (call,) = out.choices[0].message.tool_calls
    assert call.function.name in ("get_weather", "search")
    if call.function.name == "get_weather":
        check_weather(call.function.arguments)
    else:
        assert set(json.loads(call.function.arguments)) == {"query"}
    _, calls, reason = assemble(client.chat.completions.create(**kw, stream=True))
    assert reason == "tool_calls" and [(c["name"], c["arguments"]) for c in calls] == [
        (call.function.name, call.function.arguments)
    ]


def call_deltas(chunks) -> dict[int, list]:
    """Each call's `delta.tool_calls` entries, in the order they came."""
    calls: dict[int, list] = {}
    for chunk in chunks:
        for choice in chunk.choices:
            for d in choice.delta.tool_calls or []:
                calls.setdefault(d.index, []).append(d)
    return calls


def check_streamed_calls(chunks, expected) -> None:
    """The calls streamed as OpenAI streams them: a first delta with id, type, name and empty arguments, then
    fragments of the arguments alone (more than one: token by token), which join into the non-streamed call's."""
    calls = call_deltas(chunks)
    assert sorted(calls) == list(range(len(expected)))
    for i, call in enumerate(expected):
        first, *rest = calls[i]
        assert first.id.startswith("call_") and first.type == "function" and first.function.name == call.function.name
        assert first.function.arguments == "" and len(rest) > 1
        assert all(d.id is None and d.function.name is None and d.function.arguments for d in rest)
        assert "".join(d.function.arguments for d in rest) == call.function.arguments


def test_constrained_calls_stream_their_arguments_token_by_token(client):
    m = model(client)
    named = {"type": "function", "function": {"name": "get_weather"}}
    for choice in ("required", named):
        kw = dict(model=m, messages=ASK, tools=[WEATHER, SEARCH], tool_choice=choice, max_tokens=60, temperature=0)
        out = client.chat.completions.create(**kw)
        assert out.choices[0].finish_reason == "tool_calls"
        chunks = list(client.chat.completions.create(**kw, stream=True))
        check_streamed_calls(chunks, out.choices[0].message.tool_calls)
        assert chunks[-1].choices[0].finish_reason == "tool_calls"


def test_auto_tool_choice_with_response_format(client, model_dir):
    """The OpenAI Agents SDK's agent with tools and an output_type: tool_choice auto plus a JSON schema. One schema
    allows a JSON array of calls or the answer object; a logit bias on the first character picks each branch."""
    m = model(client)
    fmt = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON, "strict": True}}
    kw = dict(model=m, messages=ASK, tools=[WEATHER, SEARCH], tool_choice="auto", max_tokens=60, temperature=0,
              response_format=fmt)  # fmt: skip
    tok = AutoTokenizer.from_pretrained(model_dir)
    (bracket,) = tok.encode("[", add_special_tokens=False)
    (brace,) = tok.encode("{", add_special_tokens=False)
    calls_out = client.chat.completions.create(**kw, logit_bias={str(bracket): 100})
    choice = calls_out.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None, choice
    assert choice.message.tool_calls and all(c.function.name in ("get_weather", "search") for c in
                                             choice.message.tool_calls)  # fmt: skip
    chunks = list(client.chat.completions.create(**kw, logit_bias={str(bracket): 100}, stream=True))
    text, calls, reason = assemble(chunks)
    assert text == "" and reason == "tool_calls"
    check_streamed_calls(chunks, choice.message.tool_calls)
    assert [(c["name"], c["arguments"]) for c in calls] == [
        (c.function.name, c.function.arguments) for c in choice.message.tool_calls
    ]
    answer = client.chat.completions.create(**kw, logit_bias={str(brace): 100})
    assert answer.choices[0].finish_reason == "stop" and not answer.choices[0].message.tool_calls
    check_person(json.loads(answer.choices[0].message.content))
    text, calls, reason = assemble(client.chat.completions.create(**kw, logit_bias={str(brace): 100}, stream=True))
    assert text == answer.choices[0].message.content and not calls and reason == "stop"
    # a schema with $defs (pydantic's, as the Agents SDK sends): its definitions move to the wrapper's root
    nested = {"type": "object", "properties": {"who": {"$ref": "#/$defs/P"}}, "required": ["who"],
              "additionalProperties": False, "$defs": {"P": PERSON}}  # fmt: skip
    fmt = {"type": "json_schema", "json_schema": {"name": "n", "schema": nested}}
    out = client.chat.completions.create(**{**kw, "response_format": fmt}, logit_bias={str(brace): 100})
    assert out.choices[0].finish_reason == "stop", out
    check_person(json.loads(out.choices[0].message.content)["who"])
    # json_object with auto: an object or calls, either way valid
    out = client.chat.completions.create(**{**kw, "response_format": {"type": "json_object"}})
    if out.choices[0].finish_reason == "stop" and not out.choices[0].message.tool_calls:
        assert isinstance(json.loads(out.choices[0].message.content), dict)


def test_tool_choice_none_and_a_tool_history(client):
    m = model(client)
    out = client.chat.completions.create(
        model=m, messages=ASK, tools=[WEATHER], tool_choice="none", max_tokens=8, temperature=0
    )
    assert out.choices[0].message.tool_calls is None and out.choices[0].message.content
    history = ASK + [
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": "call_1",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
                }
            ],
        },
        {"role": "tool", "tool_call_id": "call_1", "content": '{"temp": 21, "sky": "sunny"}'},
    ]
    out = client.chat.completions.create(model=m, messages=history, tools=[WEATHER], max_tokens=8, temperature=0)
    assert out.choices[0].finish_reason in ("stop", "length", "tool_calls")
    # the answer's message, sent back as the official client returns it, is accepted in the next turn
    again = history + [out.choices[0].message.model_dump(exclude_none=False), {"role": "user", "content": "Thanks"}]
    if out.choices[0].message.tool_calls:
        again.insert(-1, {"role": "tool", "tool_call_id": out.choices[0].message.tool_calls[0].id, "content": "ok"})
    client.chat.completions.create(model=m, messages=again, tools=[WEATHER], max_tokens=2, temperature=0)


# ---- bad input ------------------------------------------------------------------------------------------------


def error(server: str, body: dict) -> dict:
    resp = httpx.post(f"{server}{CHAT}", json={"model": "smollm2-135m-instruct", "max_tokens": 2, **body}, timeout=60)
    assert resp.status_code == 400, resp.text[:300]
    return resp.json()["error"]


def test_bad_input_is_refused_naming_the_field(server):
    bad_tool = {"type": "function", "function": {"name": "f", "parameters": {"type": "nope"}}}
    named = {"type": "function", "function": {"name": "ghost"}}
    orphan = ASK + [{"role": "tool", "tool_call_id": "call_x", "content": "1"}]
    schema = {"type": "json_schema", "json_schema": {"name": "s", "schema": {"type": "object", "minProperties": "x"}}}
    unsat = {
        "type": "json_schema",
        "json_schema": {"name": "s", "schema": {"type": "string", "minLength": 5, "maxLength": 2}},
    }
    cases = [
        ({"messages": ASK, "tools": [bad_tool]}, "tools", "parameters"),
        ({"messages": ASK, "tools": [WEATHER], "tool_choice": named}, "tool_choice", "ghost"),
        ({"messages": ASK, "tool_choice": "required"}, "tool_choice", "needs tools"),
        ({"messages": orphan, "tools": [WEATHER]}, "messages", "tool_call_id"),
        ({"messages": ASK, "response_format": schema}, "response_format", "schema"),
        ({"messages": ASK, "response_format": unsat}, "response_format", "json_schema"),
        ({"messages": ASK, "response_format": {"type": "json_schema"}}, "response_format", "schema"),
        ({"messages": ASK, "response_format": {"type": "xml"}}, "response_format", "response_format"),
        ({"messages": ASK, "guided_regex": "("}, "guided_regex", "regex"),
        ({"messages": ASK, "guided_choice": ["a"], "guided_regex": "a"}, "guided_choice", "combined"),
        ({"messages": ASK, "structured_outputs": {"structural_tag": "x"}}, "structured_outputs", "structural_tag"),
        ({"messages": ASK, "guided_whitespace_pattern": " "}, "guided_whitespace_pattern", "unknown field"),
        ({"messages": ASK, "functions": [{"name": "f"}]}, "functions", "unknown field"),
        ({"messages": ASK, "frobnicate": 1}, "frobnicate", "unknown field"),
        ({"messages": [{"role": "user", "content": "x", "mood": "happy"}]}, "messages", "mood"),
        (
            {
                "messages": ASK,
                "tools": [WEATHER],
                "tool_choice": "required",
                "response_format": {"type": "json_object"},
            },
            "response_format",
            "combined",
        ),
        (
            {"messages": ASK, "tools": [WEATHER], "guided_regex": "[0-9]+"},
            "guided_regex",
            "only a JSON output",
        ),
        (
            {
                "messages": ASK,
                "tools": [WEATHER],
                "response_format": {"type": "json_schema", "json_schema": {"name": "a", "schema": {"type": "array"}}},
            },
            "response_format",
            "root",
        ),
    ]
    for body, param, words in cases:
        err = error(server, body)
        assert err["param"] == param and words in err["message"], (body, err)
    # harmless extras that common clients send are accepted
    ok = {"user": "u", "metadata": {"k": "v"}, "store": False, "service_tier": "auto", "parallel_tool_calls": True}
    resp = httpx.post(
        f"{server}{CHAT}", json={"model": "smollm2-135m-instruct", "messages": ASK, "max_tokens": 1, **ok}, timeout=60
    )
    assert resp.status_code == 200, resp.text[:300]


def test_parsers():
    assert parse_tool_calls('Sure.\n<tool_call>\n{"name": "f", "arguments": {"a": 1}}\n</tool_call>')[1][0].name == "f"
    assert parse_tool_calls("<tool_call>{bad json</tool_call>") == ("<tool_call>{bad json</tool_call>", [])
    content, calls = parse_tool_calls(
        '<|python_tag|>{"name": "f", "parameters": {"a": 1}}; {"name": "g", "parameters": {}}', "llama3_json"
    )
    assert content is None and [c.name for c in calls] == ["f", "g"] and json.loads(calls[0].arguments) == {"a": 1}
    content, calls = parse_tool_calls('[TOOL_CALLS][{"name": "f", "arguments": {"x": "y"}}]', "mistral")
    assert content is None and calls[0].name == "f"
    assert parse_tool_calls("just text", "mistral") == ("just text", [])


def test_auto_mode_stream_holds_back_a_call_and_emits_it_whole():
    plan = plan_tools([WEATHER], "auto", None, "hermes")
    stream = ToolStream(plan)
    pieces = [
        "Let me check.",
        " <tool",
        '_call>\n{"name": "get_weather", ',
        '"arguments": {"city": "Paris", "unit": "c"}}',
    ]
    deltas = [d for p in pieces for d in stream.delta(p)]
    last, called = stream.finish("\n</tool_call>")
    content = "".join(d.get("content", "") for d in deltas + last)
    assert called and content == "Let me check." and not any("tool_calls" in d for d in deltas)
    (call,) = last[-1]["tool_calls"]
    assert call["function"]["name"] == "get_weather" and json.loads(call["function"]["arguments"])["city"] == "Paris"
    text_only = ToolStream(plan)
    assert text_only.delta("Hello <b>") == [{"content": "Hello <b>"}] and text_only.finish("!") == (
        [{"content": "!"}],
        False,
    )


def test_tool_call_parser_flag():
    from lragent.server.cli import build_parser, server_settings

    args = build_parser().parse_args(["--tool-call-parser", "llama3_json"])
    assert server_settings(args).tool_call_parser == "llama3_json"
    assert build_parser().parse_args([]).tool_call_parser == "hermes"
    with pytest.raises(ValueError, match="tool-call parser"):
        ServerSettings(tool_call_parser="xml")


def stream_in_pieces(plan, text: str, size: int) -> tuple[list[dict], bool]:
    """All deltas of `text` fed `size` characters at a time, and whether the output was tool calls."""
    stream = ToolStream(plan)
    deltas = [d for k in range(0, len(text) - size, size) for d in stream.delta(text[k : k + size])]
    last, called = stream.finish(text[len(stream.text) :])
    return deltas + last, called


def joined_calls(deltas: list[dict]) -> list[tuple[str, str]]:
    calls: dict[int, list[str]] = {}
    for d in deltas:
        for c in d.get("tool_calls", []):
            entry = calls.setdefault(c["index"], ["", ""])
            entry[0] += c["function"].get("name", "")
            entry[1] += c["function"]["arguments"]
    return [tuple(calls[i]) for i in sorted(calls)]


def test_tool_stream_sends_arguments_as_they_grow():
    """Required (two calls, brackets and escapes inside strings), named (leading whitespace) and the array branch of
    json_auto, fed one and three characters at a time: each call's header goes out once, before its fragments, and
    the fragments join into exactly the non-streamed arguments."""
    named = {"type": "function", "function": {"name": "search"}}
    two = (
        '[{"name": "search", "arguments": {"query": "a ]} \\" [{"}}, '
        '{"name": "get_weather", "arguments": {"city": "Nice", "unit": "c"}}]'
    )
    json_auto = plan_tools([WEATHER, SEARCH], "auto", None, "hermes")
    json_auto.output_schema = PERSON
    cases = [
        (plan_tools([WEATHER, SEARCH], "required", None, "hermes"), two),
        (plan_tools([WEATHER, SEARCH], named, None, "hermes"), '  {"query": "x\\"y"}'),
        (json_auto, '[{"name": "get_weather", "arguments": {"city": "Oslo", "unit": "f"}}]'),
    ]
    for plan, text in cases:
        _, expected = plan.parse(text)
        assert expected and all(json.loads(c.arguments) for c in expected)
        for size in (1, 3):
            deltas, called = stream_in_pieces(plan, text, size)
            assert called and joined_calls(deltas) == [(c.name, c.arguments) for c in expected]
            assert not any(d.get("content") for d in deltas)
            heads = [c for d in deltas for c in d.get("tool_calls", []) if "id" in c]
            assert [h["index"] for h in heads] == list(range(len(expected))) and all(
                h["function"]["arguments"] == "" and h["type"] == "function" for h in heads
            )
            fragments = [c for d in deltas for c in d.get("tool_calls", []) if "id" not in c]
            assert len(fragments) > len(expected)  # the arguments came in pieces, not whole
    # json_auto's answer object streams as content
    deltas, called = stream_in_pieces(json_auto, '{"name": "Ann", "age": 3}', 4)
    assert not called and "".join(d["content"] for d in deltas) == '{"name": "Ann", "age": 3}'


def test_tool_stream_holds_what_it_cannot_send_safely():
    # a tool whose parameters need not be an object: its calls could still turn out invalid, so they come whole
    loose = {"type": "function", "function": {"name": "echo", "parameters": {"anyOf": [{"type": "object"}, {}]}}}
    plan = plan_tools([loose, SEARCH], "required", None, "hermes")
    assert not plan.streams_calls
    stream = ToolStream(plan)
    assert stream.delta('[{"name": "search", "arguments": {"query": "q"') == []
    last, called = stream.finish("}}]")
    assert called and last == [
        {"tool_calls": [{"index": 0, "id": last[0]["tool_calls"][0]["id"], "type": "function",
                         "function": {"name": "search", "arguments": '{"query": "q"}'}}]}
    ]  # fmt: skip
    named = plan_tools([loose, SEARCH], {"type": "function", "function": {"name": "echo"}}, None, "hermes")
    stream = ToolStream(named)
    assert not named.streams_calls and stream.delta('{"x": ') == []
    last, called = stream.finish("1}")
    assert called and joined_calls(last) == [("echo", '{"x": 1}')]
    # cut short by max_tokens after a call began: no content is sent after the call's fragments
    stream = ToolStream(plan_tools([WEATHER, SEARCH], "required", None, "hermes"))
    sent = stream.delta('[{"name": "search", "arguments": {"query": "abc')
    assert joined_calls(sent) == [("search", '{"query": "abc')]
    assert stream.finish("d") == ([{"tool_calls": [{"index": 0, "function": {"arguments": "d"}}]}], False)
    # before any call began, a cut-short output is content, as when not streamed
    stream = ToolStream(plan_tools([WEATHER, SEARCH], "required", None, "hermes"))
    assert stream.delta('[{"name": "sea') == [] and stream.finish("r") == ([{"content": '[{"name": "sear'}], False)


def test_call_scanner_finds_spans_and_flags_other_text():
    scanner = CallScanner()
    text = '[{"arguments": {"a": "}"}, "name": "f"}, {"name": "g\\u00e9", "arguments": {}}]'
    for c in text:
        scanner.feed(c)
    assert not scanner.bad and [c.name for c in scanner.calls] == ["f", "g\u00e9"]
    first = scanner.calls[0]
    assert text[first.args_start : first.args_end] == '{"a": "}"}'
    for bad in ('{"name": "f"}', '["f"]', "[1]", "[{}] x", '[{"name": "\\q"}]', "[}"):
        scanner = CallScanner()
        scanner.feed(bad)
        assert scanner.bad, bad
