"""`POST /v1/responses`: the OpenAI Responses API, stateless, on top of the chat-completions path.

A request is translated into a chat completion (`instructions` and the input items become chat messages, function
tools and `tool_choice` their chat spellings, `text.format` a `response_format`), run by `OpenAIServing.chat`, and
its JSON body or SSE chunks are translated back into a response object or the Responses API's stream events.

Nothing is stored: `previous_response_id`, `conversation`, `store=true`, `background` and the other server-side
state features are refused with a 400 naming the field, as is every field that would change the result but that
lragent does not implement. Clients send the whole history as input items each turn (the Agents SDK does).
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, StrictBool, ValidationError
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse

from lragent.server.errors import APIError, bad_request
from lragent.server.guard import shown
from lragent.server.protocol import MAX_SALT_CHARS, ChatCompletionRequest, ChatMessage, Int, Number, parse_body
from lragent.server.serving import OpenAIServing

MAX_ITEMS = 4096  # input items per request (each becomes at least one chat message)
_PROBE = {"model": "-", "messages": [{"role": "user", "content": "-"}]}
_TOOL_PROBE = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {}}}}]
_FORMAT_PROBE = {"type": "json_schema", "json_schema": {"name": "f", "schema": {"type": "object"}}}


def chat_supports(field: str, value: Any) -> bool:
    """Whether the chat path honours `field` = `value` (declares it and its own validation does not refuse it)."""
    if field not in ChatCompletionRequest.model_fields:
        return False
    try:
        probe = ChatCompletionRequest.model_validate({**_PROBE, field: value})
    except ValidationError:
        return False
    return all(param != field for param, _ in probe.unsupported())


# Tool calling and response_format come from the chat path: each is on once protocol.ChatCompletionRequest accepts
# it (until then a request using it is a 400 naming `tools` / `text`); to force one, set its flag here (one line).
CHAT_TOOLS = chat_supports("tools", _TOOL_PROBE)
CHAT_RESPONSE_FORMAT = chat_supports("response_format", _FORMAT_PROBE)
# assistant `tool_calls` / tool `tool_call_id` in chat messages; without them, calls and outputs are rendered as text
CHAT_TOOL_MESSAGES = CHAT_TOOLS and {"tool_calls", "tool_call_id"} <= set(ChatMessage.model_fields)


class ResponsesRequest(BaseModel):
    """The body of `POST /v1/responses`: every field of the API is declared; any other field is a 400."""

    model_config = ConfigDict(extra="forbid")

    model: str
    input: str | list[dict[str, Any]]
    instructions: str | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: StrictBool | None = None
    text: dict[str, Any] | None = None
    max_output_tokens: Int | None = None
    temperature: Number | None = None
    top_p: Number | None = None
    stream: StrictBool = False
    stream_options: dict[str, Any] | None = None
    metadata: dict[str, str] | None = None
    user: str | None = None
    safety_identifier: str | None = None
    prompt_cache_key: str | None = None
    prompt_cache_retention: str | None = None
    prompt_cache_options: dict[str, Any] | None = None
    service_tier: str | None = None
    truncation: str | None = None
    include: list[str] | None = None
    store: StrictBool | None = None
    # server-side state and features lragent does not have: refused when set (unsupported())
    previous_response_id: str | None = None
    conversation: Any = None
    background: StrictBool | None = None
    background_options: Any = None
    prompt: Any = None
    reasoning: dict[str, Any] | None = None
    max_tool_calls: Int | None = None
    top_logprobs: Int | None = None
    context_management: Any = None
    moderation: Any = None
    access_programs: Any = None
    image: Any = None
    # lragent extension, as on the chat path: requests with different salts share no cached block
    cache_salt: str | None = Field(default=None, min_length=1, max_length=MAX_SALT_CHARS)
    session_id: str | None = None  # lragent extension, as on the chat path (protocol.session_of)

    def unsupported(self) -> list[tuple[str, str]]:
        out = []
        stateless = "this server is stateless: send the whole conversation as input items"
        if self.previous_response_id is not None:
            out.append(("previous_response_id", f"previous_response_id is not supported ({stateless})"))
        if self.conversation is not None:
            out.append(("conversation", f"conversation is not supported ({stateless})"))
        if self.store:
            out.append(("store", "store=true is not supported: this server stores no responses (send store=false)"))
        if self.background:
            out.append(("background", "background responses are not supported"))
        if self.prompt is not None:
            out.append(("prompt", "stored prompt templates are not supported: send instructions and input"))
        if self.reasoning and any(v is not None for v in self.reasoning.values()):
            out.append(("reasoning", "reasoning options are not supported"))
        if self.truncation not in (None, "disabled"):
            out.append(("truncation", "only truncation='disabled' is supported"))
        if self.include:
            out.append(("include", f"include values are not supported, got {shown(str(self.include[0]))}"))
        if self.top_logprobs:
            out.append(("top_logprobs", "top_logprobs is not supported on /v1/responses"))
        if self.max_tool_calls is not None:
            out.append(("max_tool_calls", "max_tool_calls is not supported"))
        if self.max_output_tokens is not None and self.max_output_tokens < 1:
            out.append(("max_output_tokens", f"max_output_tokens must be at least 1, got {self.max_output_tokens}"))
        if set(self.stream_options or {}) - {"include_obfuscation"}:  # obfuscation padding: accepted, never added
            out.append(("stream_options", "stream_options may only hold include_obfuscation"))
        if (self.text or {}).get("verbosity") not in (None, "medium"):
            out.append(("text", "only text.verbosity='medium' is supported"))
        for name in ("background_options", "context_management", "moderation", "access_programs", "image"):
            if getattr(self, name):
                out.append((name, f"{name} is not supported"))
        return out


# ---- request -> chat completion ------------------------------------------------------------------------------


def _text_of(content: Any, where: str) -> str:
    """A message's or a tool output's text: a string, or a list of text content parts."""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise bad_request(f"{where}: expected a string or a list of content parts", "input")
    parts = []
    for j, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else None
        key = {"input_text": "text", "output_text": "text", "text": "text", "refusal": "refusal"}.get(kind or "")
        if key is None:
            raise bad_request(
                f"{where}[{j}]: content parts of type {shown(str(kind))} are not supported (text only)", "input"
            )
        if not isinstance(part.get(key), str):
            raise bad_request(f"{where}[{j}].{key}: expected a string", "input")
        parts.append(part[key])
    return "".join(parts)


def _arguments_text(name: str, arguments: str) -> str:
    """A function call written into an assistant message (Hermes-style), for chat paths without tool messages."""
    try:
        args: Any = json.loads(arguments)
    except ValueError:
        args = arguments
    return "<tool_call>\n" + json.dumps({"name": name, "arguments": args}) + "\n</tool_call>"


def chat_messages(body: ResponsesRequest) -> list[dict]:
    """`instructions` and the input items as chat messages; every item is checked, a bad one is a 400."""
    messages: list[dict] = [{"role": "system", "content": body.instructions}] if body.instructions else []
    if isinstance(body.input, str):
        return [*messages, {"role": "user", "content": body.input}]
    if not body.input:
        raise bad_request("input is empty: give a string or at least one input item", "input")
    if len(body.input) > MAX_ITEMS:
        raise bad_request(f"at most {MAX_ITEMS} input items per request, got {len(body.input)}", "input")
    calls: set[str] = set()
    for i, item in enumerate(body.input):
        where = f"input[{i}]"
        kind = item.get("type", "message" if "role" in item else None)
        if kind == "message":
            role = item.get("role")
            if role not in ("user", "assistant", "system", "developer"):
                raise bad_request(
                    f"{where}.role: expected user, assistant, system or developer, got {shown(str(role))}", "input"
                )
            text = _text_of(item.get("content"), f"{where}.content")
            messages.append({"role": "system" if role == "developer" else role, "content": text})
        elif kind == "function_call":
            call_id, name, arguments = (item.get(k) for k in ("call_id", "name", "arguments"))
            for key, value in (("call_id", call_id), ("name", name), ("arguments", arguments)):
                if not isinstance(value, str) or (key != "arguments" and not value):
                    raise bad_request(f"{where}.{key}: expected a non-empty string", "input")
            calls.add(call_id)
            if CHAT_TOOL_MESSAGES:
                call = {"id": call_id, "type": "function", "function": {"name": name, "arguments": arguments}}
                last = messages[-1] if messages else None
                if last is not None and last["role"] == "assistant":  # the text and calls of one answer
                    last.setdefault("tool_calls", []).append(call)  # (parallel calls: one assistant message)
                else:
                    messages.append({"role": "assistant", "content": None, "tool_calls": [call]})
            else:
                messages.append({"role": "assistant", "content": _arguments_text(name, arguments)})
        elif kind == "function_call_output":
            call_id = item.get("call_id")
            if not isinstance(call_id, str) or call_id not in calls:
                raise bad_request(
                    f"{where}.call_id: no earlier function_call item has call_id {shown(str(call_id))}", "input"
                )
            output = _text_of(item.get("output"), f"{where}.output")
            message = {"role": "tool", "content": output}
            if CHAT_TOOL_MESSAGES:
                message["tool_call_id"] = call_id
            messages.append(message)
        else:
            known = "message, function_call, function_call_output"
            raise bad_request(
                f"{where}.type: unsupported input item type {shown(str(kind))} (supported: {known})", "input"
            )
    return messages


def _chat_tools(body: ResponsesRequest) -> list[dict] | None:
    if not body.tools:
        return None
    if not CHAT_TOOLS:
        raise bad_request("tools: tool calling is not supported by this server yet", "tools")
    tools = []
    for i, tool in enumerate(body.tools):
        if tool.get("type") != "function":
            raise bad_request(
                f"tools[{i}].type: only function tools are supported, got {shown(str(tool.get('type')))}", "tools"
            )
        if not isinstance(tool.get("name"), str) or not tool["name"]:
            raise bad_request(f"tools[{i}].name: expected a non-empty string", "tools")
        function = {k: tool[k] for k in ("name", "description", "parameters", "strict") if tool.get(k) is not None}
        tools.append({"type": "function", "function": function})
    return tools


def _chat_tool_choice(body: ResponsesRequest) -> str | dict | None:
    choice = body.tool_choice
    if choice is None or choice in ("auto", "none"):
        return choice if body.tools else None
    if choice == "required" or (isinstance(choice, dict) and choice.get("type") == "function"):
        if not body.tools:
            raise bad_request("tool_choice asks for a tool call but no tools are given", "tool_choice")
        if choice == "required":
            return choice
        if not isinstance(choice.get("name"), str):
            raise bad_request("tool_choice.name: expected the name of a function tool", "tool_choice")
        return {"type": "function", "function": {"name": choice["name"]}}
    raise bad_request(
        f"tool_choice: expected 'auto', 'none', 'required' or a function tool, got {shown(json.dumps(choice))}",
        "tool_choice",
    )


def text_format(body: ResponsesRequest) -> dict:
    """`text.format` checked: {'type': 'text'}, {'type': 'json_object'} or a json_schema format."""
    fmt = (body.text or {}).get("format") or {"type": "text"}
    kind = fmt.get("type") if isinstance(fmt, dict) else None
    if kind in ("text", "json_object"):
        return {"type": kind}
    if kind != "json_schema":
        raise bad_request(
            f"text.format.type: expected text, json_object or json_schema, got {shown(str(kind))}", "text"
        )
    if not isinstance(fmt.get("schema"), dict):
        raise bad_request("text.format.schema: expected a JSON schema object", "text")
    if not isinstance(fmt.get("name", ""), str):
        raise bad_request("text.format.name: expected a string", "text")
    return fmt


def chat_request(body: ResponsesRequest) -> dict:
    """The chat completion body (a dict, validated by the chat path's own model)."""
    fmt = text_format(body)
    chat: dict[str, Any] = {
        "model": body.model,
        "messages": chat_messages(body),
        "max_completion_tokens": body.max_output_tokens,
        "temperature": body.temperature,
        "top_p": body.top_p,
        "stream": body.stream,
        "stream_options": {"include_usage": True} if body.stream else None,
        "user": body.user,
        "tools": _chat_tools(body),
        "tool_choice": _chat_tool_choice(body),
        "parallel_tool_calls": body.parallel_tool_calls if body.tools else None,
    }
    if fmt["type"] != "text":
        if not CHAT_RESPONSE_FORMAT:
            raise bad_request(f"text.format {fmt['type']!r} is not supported by this server yet", "text")
        if fmt["type"] == "json_object":
            chat["response_format"] = fmt
        else:
            spec = {k: fmt[k] for k in ("name", "description", "schema", "strict") if fmt.get(k) is not None}
            chat["response_format"] = {"type": "json_schema", "json_schema": {"name": "output", **spec}}
    return {k: v for k, v in chat.items() if v is not None}


_PARAMS = {
    "messages": "input",
    "max_tokens": "max_output_tokens",
    "max_completion_tokens": "max_output_tokens",
    "response_format": "text",
}
_WORDS = {
    "max_completion_tokens": "max_output_tokens",
    "max_tokens": "max_output_tokens",
    "response_format": "text.format",
}


def _renamed(exc: APIError) -> APIError:
    """A chat-path error in the Responses API's field names."""
    message, param = exc.message, _PARAMS.get(exc.param or "", exc.param)
    if message.split(":", 1)[0] in ("json_schema", "json_object"):  # the grammar engine refused the schema
        param = "text"
    for old, new in _WORDS.items():
        if old in message:
            message = message.replace(old, new)
    return APIError(exc.status, message, param, exc.code)


# ---- chat completion -> response -----------------------------------------------------------------------------


def _usage(chat_usage: dict | None) -> dict | None:
    if not chat_usage:
        return None
    details = chat_usage.get("prompt_tokens_details") or {}
    return {
        "input_tokens": chat_usage["prompt_tokens"],
        "input_tokens_details": {
            "cached_tokens": details.get("cached_tokens", 0),
            "base_cached_tokens": details.get("base_cached_tokens", 0),  # lragent extension, as on the chat path
        },
        "output_tokens": chat_usage["completion_tokens"],
        "output_tokens_details": {"reasoning_tokens": 0},
        "total_tokens": chat_usage["total_tokens"],
    }


def _message_item(item_id: str, text: str, status: str) -> dict:
    part = {"type": "output_text", "text": text, "annotations": [], "logprobs": []}
    return {"id": item_id, "type": "message", "role": "assistant", "status": status, "content": [part]}


def _call_item(item_id: str, call: dict, status: str = "completed") -> dict:
    function = call.get("function") or {}
    return {
        "id": item_id,
        "type": "function_call",
        "call_id": call.get("id") or f"call_{uuid.uuid4().hex[:24]}",
        "name": function.get("name") or "",
        "arguments": function.get("arguments") or "",
        "status": status,
    }


def _item_id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex}"


class Translator:
    """One response: its fixed fields (echoed from the request), then its output, status and usage."""

    def __init__(self, body: ResponsesRequest, fmt: dict):
        self.body = body
        self.id = f"resp_{uuid.uuid4().hex}"
        self.created = int(time.time())
        text_config: dict[str, Any] = {"format": fmt, "verbosity": (body.text or {}).get("verbosity") or "medium"}
        self.fixed = {
            "instructions": body.instructions,
            "max_output_tokens": body.max_output_tokens,
            "model": body.model,
            "parallel_tool_calls": True if body.parallel_tool_calls is None else body.parallel_tool_calls,
            "previous_response_id": None,
            "reasoning": None,
            "service_tier": body.service_tier or "default",
            "store": False,
            "background": False,
            "temperature": 1.0 if body.temperature is None else body.temperature,
            "text": text_config,
            "tool_choice": body.tool_choice or "auto",
            "tools": list(body.tools or []),
            "top_p": 1.0 if body.top_p is None else body.top_p,
            "truncation": "disabled",
            "metadata": dict(body.metadata or {}),
            "user": body.user,
            "safety_identifier": body.safety_identifier,
            "prompt_cache_key": body.prompt_cache_key,
        }

    def response(self, status: str, output: list[dict], usage: dict | None, error: dict | None = None) -> dict:
        incomplete = {"reason": "max_output_tokens"} if status == "incomplete" else None
        return {
            "id": self.id,
            "object": "response",
            "created_at": self.created,
            "status": status,
            "completed_at": int(time.time()) if status == "completed" else None,
            "error": error,
            "incomplete_details": incomplete,
            "output": output,
            "usage": usage,
            **self.fixed,
        }

    def from_chat(self, chat: dict) -> dict:
        """The response for a finished (non-streamed) chat completion."""
        choice = chat["choices"][0]
        status = "incomplete" if choice.get("finish_reason") == "length" else "completed"
        message = choice.get("message") or {}
        calls = message.get("tool_calls") or []
        output = []
        if message.get("content") or not calls:
            output.append(_message_item(_item_id("msg"), message.get("content") or "", status))
        output += [_call_item(_item_id("fc"), call) for call in calls]
        return self.response(status, output, _usage(chat.get("usage")))

    async def events(self, chunks: AsyncIterator[Any]) -> AsyncIterator[str]:
        """The Responses API's SSE events for a stream of chat-completion chunks."""
        state = _StreamState(self)
        yield state.event("response.created", response=self.response("in_progress", [], None))
        yield state.event("response.in_progress", response=self.response("in_progress", [], None))
        try:
            async for raw in chunks:
                for data in _sse_data(raw):
                    if data == "[DONE]":
                        continue
                    chunk = json.loads(data)
                    if "error" in chunk:  # the chat path's error event: the engine failed or is shutting down
                        for event in state.fail(chunk["error"]):
                            yield event
                        return
                    for event in state.chunk(chunk):
                        yield event
        finally:
            close = getattr(chunks, "aclose", None)
            if close is not None:
                await close()
        for event in state.finish():
            yield event


def _sse_data(raw: Any) -> list[str]:
    text = raw.decode() if isinstance(raw, (bytes, bytearray)) else str(raw)
    return [line[len("data:") :].strip() for line in text.splitlines() if line.startswith("data:")]


class _StreamState:
    """Output items as they are streamed: at most one message (first) and then the function calls in order."""

    def __init__(self, translator: Translator):
        self.t = translator
        self.seq = 0
        self.output: list[dict] = []  # finished items
        self.message: dict | None = None  # the open message item
        self.call: dict | None = None  # the open function_call item
        self.call_index: int | None = None  # its index in the chat chunks' tool_calls
        self.finish_reason: str | None = None
        self.usage: dict | None = None

    def event(self, kind: str, **fields: Any) -> str:
        data = {"type": kind, "sequence_number": self.seq, **fields}
        self.seq += 1
        return f"event: {kind}\ndata: {json.dumps(data, separators=(',', ':'))}\n\n"

    @property
    def index(self) -> int:
        """The output index of the open item."""
        return len(self.output)

    def open_message(self) -> list[str]:
        self.message = {
            "id": _item_id("msg"),
            "type": "message",
            "role": "assistant",
            "status": "in_progress",
            "content": [],
            "text": "",
        }
        item = {k: v for k, v in self.message.items() if k != "text"}
        part = {"type": "output_text", "text": "", "annotations": [], "logprobs": []}
        ids = {"item_id": self.message["id"], "output_index": self.index}
        return [
            self.event("response.output_item.added", output_index=self.index, item=item),
            self.event("response.content_part.added", **ids, content_index=0, part=part),
        ]

    def close_message(self, status: str) -> list[str]:
        if self.message is None:
            return []
        msg, self.message = self.message, None
        item = _message_item(msg["id"], msg["text"], status)
        ids = {"item_id": msg["id"], "output_index": self.index, "content_index": 0}
        events = [
            self.event("response.output_text.done", **ids, text=msg["text"], logprobs=[]),
            self.event("response.content_part.done", **ids, part=item["content"][0]),
            self.event("response.output_item.done", output_index=self.index, item=item),
        ]
        self.output.append(item)
        return events

    def close_call(self, status: str) -> list[str]:
        if self.call is None:
            return []
        item = {**self.call, "status": status}
        self.call, self.call_index = None, None
        events = [
            self.event(
                "response.function_call_arguments.done",
                item_id=item["id"],
                output_index=self.index,
                arguments=item["arguments"],
            ),
            self.event("response.output_item.done", output_index=self.index, item=item),
        ]
        self.output.append(item)
        return events

    def chunk(self, chunk: dict) -> list[str]:
        events: list[str] = []
        if chunk.get("usage"):
            self.usage = _usage(chunk["usage"])
        for choice in chunk.get("choices") or []:
            delta = choice.get("delta") or {}
            text = delta.get("content")
            if text:
                events += self.close_call("completed")
                if self.message is None:
                    events += self.open_message()
                self.message["text"] += text
                events.append(
                    self.event(
                        "response.output_text.delta",
                        item_id=self.message["id"],
                        output_index=self.index,
                        content_index=0,
                        delta=text,
                        logprobs=[],
                    )
                )
            for call in delta.get("tool_calls") or []:
                events += self.tool_call_delta(call)
            if choice.get("finish_reason"):
                self.finish_reason = choice["finish_reason"]
        return events

    def tool_call_delta(self, call: dict) -> list[str]:
        events: list[str] = []
        index = call.get("index", 0)
        function = call.get("function") or {}
        if self.call is None or index != self.call_index:
            events += self.close_message("completed") + self.close_call("completed")
            self.call = _call_item(
                _item_id("fc"), {"id": call.get("id"), "function": {"name": function.get("name")}}, "in_progress"
            )
            self.call_index = index
            events.append(self.event("response.output_item.added", output_index=self.index, item=dict(self.call)))
        elif function.get("name"):
            self.call["name"] += function["name"]
        if function.get("arguments"):
            self.call["arguments"] += function["arguments"]
            events.append(
                self.event(
                    "response.function_call_arguments.delta",
                    item_id=self.call["id"],
                    output_index=self.index,
                    delta=function["arguments"],
                )
            )
        return events

    def finish(self) -> list[str]:
        status = "incomplete" if self.finish_reason == "length" else "completed"
        events: list[str] = []
        if self.message is None and self.call is None and not self.output:
            events += self.open_message()  # no text and no call: an empty message, as the non-streamed response
        events += self.close_message(status) + self.close_call(status)
        final = self.t.response(status, self.output, self.usage)
        return [*events, self.event(f"response.{status}", response=final)]

    def fail(self, error: dict) -> list[str]:
        code, message = error.get("code") or "server_error", error.get("message") or "the generation failed"
        return [
            self.event("error", code=code, message=message, param=error.get("param")),
            self.event(
                "response.failed",
                response=self.t.response("failed", self.output, self.usage, {"code": code, "message": message}),
            ),
        ]


# ---- the endpoint --------------------------------------------------------------------------------------------


async def create_response(
    serving: OpenAIServing, body: ResponsesRequest, request: Request, salt: str | None, session: str | None = None
):
    """`POST /v1/responses`; `salt` is the cache salt the server derived (tenant and/or `cache_salt`), `session` the
    checked session id (per-session metrics only)."""
    for param, reason in body.unsupported():
        raise bad_request(reason, param)
    translator = Translator(body, text_format(body))
    chat_body = chat_request(body)
    try:
        chat = parse_body(ChatCompletionRequest, chat_body)
        response: Response = await serving.chat(chat, request, salt, session)
    except APIError as exc:
        raise _renamed(exc) from None
    if isinstance(response, StreamingResponse):  # the chat path's EventStream: same stream, translated events
        response.body_iterator = translator.events(response.body_iterator)
        return response
    if not isinstance(response, JSONResponse):  # 499: the client went away
        return response
    return JSONResponse(translator.from_chat(json.loads(bytes(response.body))))
