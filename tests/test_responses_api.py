"""`POST /v1/responses` end to end: a real uvicorn server on loopback, the official `openai` client and, when it is
installed, the OpenAI Agents SDK's default model class (`OpenAIResponsesModel`).

One server (embedded SmolLM2-135M on CPU, no adapters) is shared by the module; answers are kept short.
"""

from __future__ import annotations

import asyncio
import json

import httpx
import openai
import pytest
from loopback import serve

from lragent.config import EngineConfig
from lragent.engine.llm_engine import LLMEngine
from lragent.server import ServerSettings, create_app

KEY = "test-key"
MODEL = "smollm2-135m-instruct"
WEATHER = {
    "type": "function",
    "name": "get_weather",
    "description": "The current weather in a city.",
    "parameters": {
        "type": "object",
        "properties": {"city": {"type": "string", "enum": ["Paris", "London", "Rome"]}},
        "required": ["city"],
        "additionalProperties": False,
    },
}
CHAT_WEATHER = {"type": "function", "function": {k: v for k, v in WEATHER.items() if k != "type"}}


class Server:
    def __init__(self, url: str):
        self.url = url

    def client(self, **kw) -> openai.OpenAI:
        return openai.OpenAI(base_url=f"{self.url}/v1", api_key=KEY, max_retries=0, timeout=120, **kw)

    def post(self, body: dict, key: str = KEY) -> httpx.Response:
        headers = {"Authorization": f"Bearer {key}"}
        return httpx.post(f"{self.url}/v1/responses", headers=headers, json=body, timeout=120)


@pytest.fixture(scope="module")
def server():
    engine = LLMEngine(EngineConfig(kv_cache_bytes=32 << 20, max_model_len=1024))
    app = create_app(engine, ServerSettings(api_key=KEY))
    with serve(app) as url:
        yield Server(url)


def _prompt_tokens(server: Server, messages: list[dict], **kw) -> int:
    """Prompt tokens of the same conversation sent to /v1/chat/completions."""
    chat = server.client().chat.completions.create(model=MODEL, messages=messages, max_tokens=1, **kw)
    return chat.usage.prompt_tokens


# ---- non-streamed ---------------------------------------------------------------------------------------------


def test_text_input_and_usage(server):
    client = server.client()
    first = client.responses.create(model=MODEL, input="Name a colour.", max_output_tokens=6, temperature=0)
    assert first.object == "response" and first.id.startswith("resp_") and first.model == MODEL
    assert first.status in ("completed", "incomplete") and first.error is None
    assert [item.type for item in first.output] == ["message"]
    message = first.output[0]
    assert message.role == "assistant" and message.content[0].type == "output_text"
    assert first.output_text == message.content[0].text and first.output_text
    usage = first.usage
    assert usage.input_tokens == _prompt_tokens(server, [{"role": "user", "content": "Name a colour."}])
    assert 0 < usage.output_tokens <= 6 and usage.total_tokens == usage.input_tokens + usage.output_tokens
    if first.status == "incomplete":
        assert first.incomplete_details.reason == "max_output_tokens" and usage.output_tokens == 6
    # the same prompt again: the same greedy text, and its full blocks come from the cache
    again = client.responses.create(model=MODEL, input="Name a colour.", max_output_tokens=6, temperature=0)
    assert again.output_text == first.output_text and again.id != first.id
    assert again.usage.input_tokens_details.cached_tokens >= usage.input_tokens - 16
    assert again.max_output_tokens == 6 and again.temperature == 0 and again.store is False


def test_items_and_instructions_are_rendered_like_chat_messages(server):
    items = [
        {"role": "user", "content": [{"type": "input_text", "text": "What is 2 + 2?"}]},
        {
            "type": "message",
            "id": "msg_1",
            "role": "assistant",
            "status": "completed",
            "content": [{"type": "output_text", "text": "4", "annotations": []}],
        },
        {"type": "message", "role": "developer", "content": [{"type": "input_text", "text": "Be brief."}]},
        {"role": "user", "content": "And 3 + 3?"},
    ]
    answer = server.client().responses.create(
        model=MODEL, instructions="You are a calculator.", input=items, max_output_tokens=4, temperature=0
    )
    assert answer.instructions == "You are a calculator." and answer.output_text
    chat = [
        {"role": "system", "content": "You are a calculator."},
        {"role": "user", "content": "What is 2 + 2?"},
        {"role": "assistant", "content": "4"},
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "And 3 + 3?"},
    ]
    assert answer.usage.input_tokens == _prompt_tokens(server, chat)


def test_function_call_history(server):
    """A function_call + function_call_output pair (as the Agents SDK sends back) reaches the prompt as the chat
    path's assistant tool call and tool result."""
    items = [
        {"role": "user", "content": "What is the weather in Paris?"},
        {
            "type": "function_call",
            "id": "fc_1",
            "call_id": "call_1",
            "name": "get_weather",
            "arguments": '{"city": "Paris"}',
            "status": "completed",
        },
        {"type": "function_call_output", "call_id": "call_1", "output": "Sunny, 24 C."},
    ]
    answer = server.client().responses.create(
        model=MODEL, input=items, tools=[WEATHER], tool_choice="none", max_output_tokens=4, temperature=0
    )
    assert answer.output[0].type == "message" and answer.tools[0].name == "get_weather"
    call = {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}
    chat = [
        {"role": "user", "content": "What is the weather in Paris?"},
        {"role": "assistant", "content": None, "tool_calls": [call]},
        {"role": "tool", "tool_call_id": "call_1", "content": "Sunny, 24 C."},
    ]
    expected = _prompt_tokens(server, chat, tools=[CHAT_WEATHER], tool_choice="none")
    assert answer.usage.input_tokens == expected
    prompt_without_result = _prompt_tokens(server, chat[:2], tools=[CHAT_WEATHER], tool_choice="none")
    assert expected > prompt_without_result  # the output is in the prompt


def test_named_tool_choice_returns_a_function_call(server):
    answer = server.client().responses.create(
        model=MODEL,
        input="What is the weather in Rome?",
        tools=[WEATHER],
        tool_choice={"type": "function", "name": "get_weather"},
        max_output_tokens=24,
        temperature=0,
    )
    assert answer.status == "completed"
    calls = [item for item in answer.output if item.type == "function_call"]
    assert len(calls) == 1 and calls[0].name == "get_weather" and calls[0].call_id
    assert json.loads(calls[0].arguments)["city"] in ("Paris", "London", "Rome")


def test_text_format_json_schema(server):
    schema = {
        "type": "object",
        "properties": {"colour": {"type": "string", "enum": ["red", "green", "blue"]}, "sure": {"type": "boolean"}},
        "required": ["colour", "sure"],
        "additionalProperties": False,
    }
    fmt = {"format": {"type": "json_schema", "name": "colour", "schema": schema, "strict": True}}
    answer = server.client().responses.create(
        model=MODEL, input="Pick a colour.", text=fmt, max_output_tokens=40, temperature=0
    )
    assert answer.status == "completed"
    value = json.loads(answer.output_text)
    assert value["colour"] in ("red", "green", "blue") and isinstance(value["sure"], bool) and len(value) == 2
    assert answer.text.format.type == "json_schema"


# ---- streamed -------------------------------------------------------------------------------------------------


def test_streamed_text_events(server):
    client = server.client()
    events = list(
        client.responses.create(model=MODEL, input="Name a colour.", max_output_tokens=6, temperature=0, stream=True)
    )
    kinds = [e.type for e in events]
    assert [e.sequence_number for e in events] == list(range(len(events)))
    final_kind = kinds[-1]
    assert final_kind in ("response.completed", "response.incomplete")
    deltas = [e.delta for e in events if e.type == "response.output_text.delta"]
    assert kinds == [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.content_part.added",
        *["response.output_text.delta"] * len(deltas),
        "response.output_text.done",
        "response.content_part.done",
        "response.output_item.done",
        final_kind,
    ]
    assert events[0].response.status == "in_progress" and events[0].response.output == []
    done = events[kinds.index("response.output_text.done")]
    final = events[-1].response
    assert "".join(deltas) == done.text == final.output_text and done.text
    item_id = events[2].item.id
    assert all(e.item_id == item_id for e in events if e.type == "response.output_text.delta")
    assert final.output[0].id == item_id and final.id == events[0].response.id
    # the streamed answer is the non-streamed one, with the same usage
    plain = client.responses.create(model=MODEL, input="Name a colour.", max_output_tokens=6, temperature=0)
    assert plain.output_text == final.output_text
    assert (plain.usage.input_tokens, plain.usage.output_tokens) == (
        final.usage.input_tokens,
        final.usage.output_tokens,
    )


def test_streamed_function_call_events(server):
    stream = server.client().responses.create(
        model=MODEL,
        input="What is the weather in London?",
        tools=[WEATHER],
        tool_choice={"type": "function", "name": "get_weather"},
        max_output_tokens=24,
        temperature=0,
        stream=True,
    )
    events = list(stream)
    kinds = [e.type for e in events]
    assert kinds[0] == "response.created" and kinds[-1] == "response.completed"
    added = events[kinds.index("response.output_item.added")]
    assert added.item.type == "function_call" and added.item.name == "get_weather"
    deltas = "".join(e.delta for e in events if e.type == "response.function_call_arguments.delta")
    done = events[kinds.index("response.function_call_arguments.done")]
    assert deltas == done.arguments and json.loads(done.arguments)["city"] in ("Paris", "London", "Rome")
    final = events[-1].response
    assert [item.type for item in final.output] == ["function_call"]
    assert final.output[0].arguments == done.arguments and final.output[0].call_id == added.item.call_id


# ---- bad input ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"model": MODEL}, "input"),
        ({"model": MODEL, "input": []}, "input"),
        ({"model": MODEL, "input": [{"type": "image_generation_call", "id": "x"}]}, "input"),
        (
            {"model": MODEL, "input": [{"role": "user", "content": [{"type": "input_image", "image_url": "x"}]}]},
            "input",
        ),
        ({"model": MODEL, "input": [{"type": "function_call_output", "call_id": "nope", "output": "x"}]}, "input"),
        ({"model": MODEL, "input": "hi", "previous_response_id": "resp_123"}, "previous_response_id"),
        ({"model": MODEL, "input": "hi", "store": True}, "store"),
        ({"model": MODEL, "input": "hi", "conversation": "conv_1"}, "conversation"),
        ({"model": MODEL, "input": "hi", "tools": [{"type": "web_search"}]}, "tools"),
        ({"model": MODEL, "input": "hi", "tool_choice": "required"}, "tool_choice"),
        ({"model": MODEL, "input": "hi", "text": {"format": {"type": "json_schema", "name": "x"}}}, "text"),
        ({"model": MODEL, "input": "hi", "include": ["message.output_text.logprobs"]}, "include"),
        ({"model": MODEL, "input": "hi", "max_output_tokens": 0}, "max_output_tokens"),
        ({"model": MODEL, "input": "hi", "max_output_tokens": 5000}, "max_output_tokens"),
        ({"model": MODEL, "input": "hi", "frequency_penalty": 1}, "frequency_penalty"),
        ({"model": MODEL, "input": "hi", "stream": True, "stream_options": {"include_usage": True}}, "stream_options"),
        ({"model": MODEL, "input": "hi", "tool_choice": {"type": "allowed_tools", "tools": []}}, "tool_choice"),
    ],
)
def test_bad_input_is_a_400_naming_the_field(server, body, param):
    reply = server.post(body)
    assert reply.status_code == 400, reply.text
    error = reply.json()["error"]
    assert error["param"] == param and error["type"] == "invalid_request_error", error


def test_auth_model_and_store_false(server):
    assert server.post({"model": MODEL, "input": "hi"}, key="wrong").status_code == 401
    reply = server.post({"model": "nope", "input": "hi"})
    assert reply.status_code == 404 and reply.json()["error"]["param"] == "model"
    with pytest.raises(openai.BadRequestError) as err:
        server.client().responses.create(model=MODEL, input="hi", previous_response_id="resp_1")
    assert "previous_response_id" in err.value.message
    ok = server.client().responses.create(
        model=MODEL, input="hi", store=False, max_output_tokens=1, metadata={"a": "b"}
    )
    assert ok.store is False and ok.metadata == {"a": "b"} and ok.usage.output_tokens == 1


# ---- the OpenAI Agents SDK ------------------------------------------------------------------------------------


def test_openai_agents_sdk(server):
    import agents  # pinned in requirements.lock

    agents.set_tracing_disabled(True)  # no trace export (nothing outside can be reached)
    client = openai.AsyncOpenAI(base_url=f"{server.url}/v1", api_key=KEY, max_retries=0, timeout=120)
    model = agents.OpenAIResponsesModel(model=MODEL, openai_client=client)
    settings = agents.ModelSettings(max_tokens=8, temperature=0)
    agent = agents.Agent(name="plain", instructions="Answer in a few words.", model=model, model_settings=settings)

    @agents.function_tool
    def get_weather(city: str) -> str:
        """The current weather in a city."""
        return f"Sunny in {city}."

    tool_agent = agents.Agent(
        name="weather",
        instructions="Use the tool.",
        model=model,
        tools=[get_weather],
        tool_use_behavior="stop_on_first_tool",
        model_settings=agents.ModelSettings(max_tokens=32, temperature=0, tool_choice="get_weather"),
    )

    async def run() -> tuple:
        plain = await agents.Runner.run(agent, "Name a colour.")
        streamed = agents.Runner.run_streamed(agent, "Name a colour.")
        deltas = [
            e.data.delta
            async for e in streamed.stream_events()
            if e.type == "raw_response_event" and e.data.type == "response.output_text.delta"
        ]
        tool = await agents.Runner.run(tool_agent, "What is the weather in Paris?")
        return plain, streamed, deltas, tool

    plain, streamed, deltas, tool = asyncio.run(run())
    assert isinstance(plain.final_output, str) and plain.final_output
    assert streamed.final_output == "".join(deltas) == plain.final_output
    assert plain.context_wrapper.usage.input_tokens > 10
    assert tool.final_output.startswith("Sunny in ")


def test_openai_agents_sdk_tools_with_output_type(server):
    """An agent with tools and an output_type: the SDK sends tools (tool_choice auto) with a JSON schema text format,
    which the server answers with either a function call or the typed answer (one schema allows both)."""
    import agents
    from pydantic import BaseModel

    class Weather(BaseModel):
        city: str
        sunny: bool

    agents.set_tracing_disabled(True)
    client = openai.AsyncOpenAI(base_url=f"{server.url}/v1", api_key=KEY, max_retries=0, timeout=120)

    @agents.function_tool
    def get_weather(city: str) -> str:
        """The current weather in a city."""
        return f"Sunny in {city}."

    agent = agents.Agent(
        name="weather",
        instructions="Answer with the weather.",
        model=agents.OpenAIResponsesModel(model=MODEL, openai_client=client),
        tools=[get_weather],
        output_type=Weather,
        tool_use_behavior="stop_on_first_tool",
        model_settings=agents.ModelSettings(max_tokens=48, temperature=0),
    )
    result = asyncio.run(agents.Runner.run(agent, "What is the weather in Paris?", max_turns=2))
    out = result.final_output
    assert isinstance(out, Weather) or (isinstance(out, str) and out.startswith("Sunny in ")), out
