"""Tool calling for /v1/chat/completions: which tools the prompt shows, how the output is constrained, how calls are
parsed out of the completion text (whole, or incrementally while streaming).

Three output formats, chosen by `--tool-call-parser` (one per model family):

    hermes       <tool_call>{"name": ..., "arguments": {...}}</tool_call>   (Qwen2.5, Hermes, SmolLM2 fallback)
    llama3_json  {"name": ..., "parameters": {...}}  (optionally after <|python_tag|>; several joined by ";")
    mistral      [TOOL_CALLS][{"name": ..., "arguments": {...}}, ...]

`tool_choice="auto"` leaves the output free and parses it with the chosen format; `"required"` and a named function
constrain it with a JSON schema built from the tools' parameters (any parser): a named call's output is its arguments
object, a required call's output a JSON array of {"name", "arguments"} objects, so even a small model returns calls
that validate. `parse_tool_calls` is a pure function, reusable by other endpoints (the Responses API).

`"auto"` together with a JSON `response_format` (what the OpenAI Agents SDK sends for an agent with tools and an
output type) is one JSON schema, `anyOf` [the required-calls array, the response schema]: the output is either a
JSON array of {"name", "arguments"} calls or the answer object. The response schema's root must be an object, so the
two cannot be confused: an array is read as calls, an object is the content.
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass, field
from typing import Any

from lragent.server.call_scanner import CallScanner, CallSpan
from lragent.server.errors import bad_request

PARSERS = ("hermes", "llama3_json", "mistral")


@dataclass
class ParsedCall:
    name: str
    arguments: str  # JSON text of an object


def new_call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


def _json_prefix(text: str, start: int) -> tuple[Any, int] | None:
    """The JSON value starting at `start` (after whitespace) and where it ends, or None."""
    decoder = json.JSONDecoder()
    i = start
    while i < len(text) and text[i].isspace():
        i += 1
    try:
        value, end = decoder.raw_decode(text, i)
    except ValueError:
        return None
    return value, end


def _call(obj: Any, key: str = "arguments") -> ParsedCall | None:
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
        return None
    args = obj.get(key, obj.get("arguments", obj.get("parameters", {})))
    if isinstance(args, str):  # some models write the arguments as JSON text
        try:
            args = json.loads(args)
        except ValueError:
            return None
    if not isinstance(args, dict):
        return None
    return ParsedCall(obj["name"], json.dumps(args, ensure_ascii=False))


class ToolParser:
    """One output format: its instructions for the fallback prompt, how it writes a past call, how it parses."""

    name = ""
    markers: tuple[str, ...] = ()  # text that starts the tool-call part of an output

    def format_hint(self) -> str:
        raise NotImplementedError

    def render_calls(self, calls: list[tuple[str, dict]]) -> str:
        raise NotImplementedError

    def parse(self, text: str) -> tuple[str | None, list[ParsedCall]]:
        """(content before the calls or None, calls); no calls when the text holds none or any one is malformed."""
        raise NotImplementedError

    def content_until(self, text: str) -> int:
        """While streaming: how much of `text` is surely content (no tool call can start in it)."""
        for marker in self.markers:
            at = text.find(marker)
            if at >= 0:
                return at
        keep = len(text)
        for marker in self.markers:  # a suffix that may grow into a marker is held back
            for k in range(min(len(marker) - 1, len(text)), 0, -1):
                if text.endswith(marker[:k]):
                    keep = min(keep, len(text) - k)
                    break
        return keep


class HermesParser(ToolParser):
    name = "hermes"
    markers = ("<tool_call>",)
    _block = re.compile(r"<tool_call>(.*?)(?:</tool_call>|$)", re.S)

    def format_hint(self) -> str:
        return (
            "To call a function, answer with one block per call and nothing else in it:\n"
            '<tool_call>\n{"name": "FUNCTION_NAME", "arguments": {ARGUMENTS AS A JSON OBJECT}}\n</tool_call>'
        )

    def render_calls(self, calls: list[tuple[str, dict]]) -> str:
        return "\n".join(
            f"<tool_call>\n{json.dumps({'name': n, 'arguments': a}, ensure_ascii=False)}\n</tool_call>"
            for n, a in calls
        )

    def parse(self, text: str) -> tuple[str | None, list[ParsedCall]]:
        at = text.find("<tool_call>")
        if at < 0:
            return text, []
        calls = []
        for block in self._block.findall(text[at:]):
            found = _json_prefix(block, 0)
            call = _call(found[0]) if found and not block[found[1] :].strip() else None
            if call is None:
                return text, []
            calls.append(call)
        content = text[:at].rstrip()
        return (content or None), calls


class Llama3JsonParser(ToolParser):
    name = "llama3_json"
    markers = ("<|python_tag|>", "{")

    def format_hint(self) -> str:
        return (
            "To call a function, answer with only a JSON object (several calls: separated by ';'):\n"
            '{"name": "FUNCTION_NAME", "parameters": {ARGUMENTS AS A JSON OBJECT}}'
        )

    def render_calls(self, calls: list[tuple[str, dict]]) -> str:
        return "; ".join(json.dumps({"name": n, "parameters": a}, ensure_ascii=False) for n, a in calls)

    def content_until(self, text: str) -> int:
        stripped = text.lstrip()
        if not stripped or any(stripped.startswith(m) or m.startswith(stripped) for m in self.markers):
            return 0  # a call can only be the whole output
        return len(text)

    def parse(self, text: str) -> tuple[str | None, list[ParsedCall]]:
        body = text.strip().removeprefix("<|python_tag|>")
        calls, at = [], 0
        while True:
            found = _json_prefix(body, at)
            call = _call(found[0], "parameters") if found else None
            if found is None or call is None:
                return text, []
            calls.append(call)
            at = found[1]
            rest = body[at:].lstrip()
            if not rest:
                return None, calls
            if not rest.startswith(";"):
                return text, []
            at = len(body) - len(rest) + 1


class MistralParser(ToolParser):
    name = "mistral"
    markers = ("[TOOL_CALLS]",)

    def format_hint(self) -> str:
        return (
            "To call functions, answer with [TOOL_CALLS] and a JSON list of calls:\n"
            '[TOOL_CALLS][{"name": "FUNCTION_NAME", "arguments": {ARGUMENTS AS A JSON OBJECT}}]'
        )

    def render_calls(self, calls: list[tuple[str, dict]]) -> str:
        return "[TOOL_CALLS]" + json.dumps([{"name": n, "arguments": a} for n, a in calls], ensure_ascii=False)

    def content_until(self, text: str) -> int:
        if text.lstrip().startswith("[") or not text.strip():  # the marker is a special token, often decoded away
            return 0
        return super().content_until(text)

    def parse(self, text: str) -> tuple[str | None, list[ParsedCall]]:
        at = text.find("[TOOL_CALLS]")
        start = at + len("[TOOL_CALLS]") if at >= 0 else len(text) - len(text.lstrip())
        if at < 0 and not text.lstrip().startswith("["):
            return text, []
        found = _json_prefix(text, start)
        items = found[0] if found else None
        if isinstance(items, dict):
            items = [items]
        calls = [_call(item) for item in items] if isinstance(items, list) and items else [None]
        if any(c is None for c in calls) or text[found[1] :].strip():  # type: ignore[index]
            return text, []
        content = text[: max(at, 0)].rstrip()
        return (content or None), calls  # type: ignore[return-value]


def get_parser(name: str) -> ToolParser:
    parsers = {p.name: p for p in (HermesParser(), Llama3JsonParser(), MistralParser())}
    if name not in parsers:
        raise ValueError(f"unknown tool-call parser {name!r} (choose from {', '.join(PARSERS)})")
    return parsers[name]


def parse_tool_calls(text: str, parser: str = "hermes") -> tuple[str | None, list[ParsedCall]]:
    """(content, calls) of a completion text in the given format; calls is empty when there is none."""
    return get_parser(parser).parse(text)


# ---- the request's plan --------------------------------------------------------------------------------------


def check_schema(schema: Any, where: str, param: str) -> None:
    """400 for a parameters schema that is not a JSON Schema (draft 2020-12 meta-schema, when jsonschema is here)."""
    if not isinstance(schema, dict):
        raise bad_request(f"{where} must be a JSON Schema object", param)
    try:
        import jsonschema  # type: ignore[import-untyped]
    except ImportError:  # pragma: no cover - jsonschema comes with the server's dependencies
        return
    try:
        jsonschema.validators.validator_for(schema, default=jsonschema.Draft202012Validator).check_schema(schema)
    except jsonschema.SchemaError as exc:
        path = "/".join(str(p) for p in exc.absolute_path) or "(root)"
        raise bad_request(f"{where} is not a valid JSON Schema at {path}: {exc.message[:200]}", param) from None


@dataclass
class ToolPlan:
    """How one chat request uses its tools: mode none / auto / required / named."""

    tools: list[dict]  # the OpenAI tool objects shown to the model (empty when mode is "none")
    mode: str
    name: str | None = None  # the named function
    parallel: bool = True
    parser: ToolParser = field(default_factory=HermesParser)
    output_schema: dict | None = None  # "auto" with a JSON response_format: the answer's schema (root: an object)

    @property
    def active(self) -> bool:
        return self.mode != "none"

    @property
    def json_auto(self) -> bool:
        """tool_choice "auto" with a JSON output: a JSON array of calls, or the answer object."""
        return self.mode == "auto" and self.output_schema is not None

    def parameters(self, name: str) -> dict:
        for tool in self.tools:
            if tool["function"]["name"] == name:
                return tool["function"].get("parameters") or {"type": "object", "properties": {}}
        raise KeyError(name)

    def constraint(self) -> dict | None:
        """SamplingParams keywords constraining the output (required / named), else None."""
        if self.mode == "named":
            return {"json_schema": self.parameters(self.name or "")}
        if self.json_auto:
            answer = dict(self.output_schema or {})
            # "#/$defs/..." references resolve against the root: the answer's definitions move up to the wrapper
            hoisted = {k: answer.pop(k) for k in ("$defs", "definitions") if k in answer}
            return {"json_schema": {**hoisted, "anyOf": [self.calls_schema(), answer]}}
        if self.mode == "required":
            return {"json_schema": self.calls_schema()}
        return None

    def calls_schema(self) -> dict:
        """A JSON array of one or more {"name", "arguments"} calls of the offered tools."""
        options = [
            {
                "type": "object",
                "properties": {"name": {"const": t["function"]["name"]}, "arguments": self.parameters(
                    t["function"]["name"]
                )},
                "required": ["name", "arguments"],
            }
            for t in self.tools
        ]  # fmt: skip
        items = options[0] if len(options) == 1 else {"anyOf": options}
        schema: dict = {"type": "array", "items": items, "minItems": 1}
        if not self.parallel:
            schema["maxItems"] = 1
        return schema

    @property
    def streams_calls(self) -> bool:
        """Whether calls stream their arguments as they are generated: only for grammar-constrained calls (named,
        required, the array branch of json_auto) whose every tool takes an object, so that a call whose first
        fragment went out is sure to end as that call (a sent delta cannot be taken back). Free-text formats
        (auto with a parser) are held to the end: the model may still write something that is no call at all."""
        if self.mode == "named":
            return self.parameters(self.name or "").get("type") == "object"
        constrained = self.mode == "required" or self.json_auto
        return constrained and all(self.parameters(t["function"]["name"]).get("type") == "object" for t in self.tools)

    def parse(self, text: str) -> tuple[str | None, list[ParsedCall]]:
        """Content and calls of a finished output; calls naming no offered tool make the output plain content.
        Constrained calls keep their arguments as written (the text streaming sends), others are re-serialised."""
        if self.mode == "named":
            found = _json_prefix(text, 0)
            if found is None or not isinstance(found[0], dict) or text[found[1] :].strip():
                return text, []
            start = len(text) - len(text.lstrip())
            return None, [ParsedCall(self.name or "", text[start : found[1]])]
        names = {t["function"]["name"] for t in self.tools}
        if self.mode == "required" or self.json_auto:
            found = _json_prefix(text, 0)
            items = found[0] if found is not None and not text[found[1] :].strip() else None
            parsed = [_call(i) for i in items] if isinstance(items, list) and items else [None]
            required = [c for c in parsed if c is not None and c.name in names]
            return (None, _as_written(text, required)) if len(required) == len(parsed) else (text, [])
        content, calls = self.parser.parse(text)
        if not calls or any(c.name not in names for c in calls):
            return text, []
        if not self.parallel:
            calls = calls[:1]
        return content, calls

    def system_section(self) -> str:
        """The fallback prompt section for chat templates that do not render tools."""
        lines = "\n".join(json.dumps(t, ensure_ascii=False) for t in self.tools)
        return (
            "# Tools\n\nYou can call these functions (JSON Schema signatures, one per line):\n"
            f"<tools>\n{lines}\n</tools>\n\n{self.format_hint()}"
        )

    def format_hint(self) -> str:
        if not self.json_auto:
            return self.parser.format_hint()
        return (
            "Answer with JSON only. To call functions, answer with a JSON list of calls:\n"
            '[{"name": "FUNCTION_NAME", "arguments": {ARGUMENTS AS A JSON OBJECT}}]\n'
            "Otherwise answer with the final JSON object."
        )


def plan_tools(tools: list[dict] | None, tool_choice: Any, parallel: bool | None, parser: str) -> ToolPlan:
    """Validate tools and tool_choice (400s naming the field) and decide the mode."""
    tools = tools or []
    seen: set[str] = set()
    for i, tool in enumerate(tools):
        fn = tool["function"]
        if fn["name"] in seen:
            raise bad_request(f"tools[{i}]: the function name {fn['name']!r} is given twice", "tools")
        seen.add(fn["name"])
        if fn.get("parameters") is not None:
            check_schema(fn["parameters"], f"tools[{i}].function.parameters", "tools")
    choice = tool_choice if tool_choice is not None else ("auto" if tools else "none")
    mode, name = (choice, None) if isinstance(choice, str) else ("named", choice["function"]["name"])
    if mode != "none" and not tools:
        raise bad_request(f"tool_choice {mode!r} needs tools", "tool_choice")
    if name is not None and name not in seen:
        raise bad_request(f"tool_choice names the function {name!r}, which is not in tools", "tool_choice")
    return ToolPlan(tools if mode != "none" else [], mode, name, parallel is not False, get_parser(parser))


def _as_written(text: str, calls: list[ParsedCall]) -> list[ParsedCall]:
    """`calls` (parsed from the JSON array `text`) with each arguments object's text as the model wrote it."""
    scanner = CallScanner()
    scanner.feed(text)
    if scanner.bad or len(scanner.calls) != len(calls):
        return calls
    for call, span in zip(calls, scanner.calls):
        if span.args_start is not None and span.args_end is not None:
            call.arguments = text[span.args_start : span.args_end]
    return calls


class ToolStream:
    """Turns one choice's streamed text deltas into OpenAI chat deltas (content and/or tool_calls).

    Calls that stream (`ToolPlan.streams_calls`) go out as OpenAI sends them: a first delta with the call's index,
    id, type, name and empty arguments, then fragments of the arguments text, whose concatenation is the
    non-streamed call's `arguments`. Other calls are sent whole when the output is finished."""

    def __init__(self, plan: ToolPlan):
        self.plan = plan
        self.text = ""
        self.sent = 0  # characters of text sent as content
        self.scanner = CallScanner() if plan.streams_calls and plan.mode != "named" else None  # required, json_auto
        self.calls: list[tuple[str, str]] = []  # (id, arguments sent so far) of each call streamed so far

    def delta(self, new: str) -> list[dict]:
        self.text += new
        if self.plan.mode == "named":
            return self._call_deltas(self._named_spans()) if self.plan.streams_calls else []
        if self.plan.mode == "required" or self.plan.json_auto:
            stripped = self.text.lstrip()
            if self.plan.json_auto and stripped.startswith("{"):  # the answer object streams as content
                piece, self.sent = self.text[self.sent :], len(self.text)
                return [{"content": piece}] if piece else []
            if self.scanner is None:
                return []
            self.scanner.feed(new)
            return [] if self.scanner.bad else self._call_deltas(self.scanner.calls)
        cut = len(self.text[: self.plan.parser.content_until(self.text)].rstrip())  # whitespace may precede a call
        if cut > self.sent:
            piece, self.sent = self.text[self.sent : cut], cut
            return [{"content": piece}]
        return []

    def _named_spans(self) -> list[CallSpan]:
        start = len(self.text) - len(self.text.lstrip())
        return [CallSpan(self.plan.name, start if start < len(self.text) else None)]

    def _call_deltas(self, spans: list[CallSpan]) -> list[dict]:
        """Deltas for what the spans show beyond what was sent: new calls (in order, each once its name is complete
        and its arguments have begun) and new arguments text. Trailing whitespace waits for what follows it."""
        names = {t["function"]["name"] for t in self.plan.tools}
        out: list[dict] = []
        for i, span in enumerate(spans):
            if span.name not in names or span.args_start is None:
                break
            end = span.args_end if span.args_end is not None else len(self.text.rstrip())
            if i == len(self.calls):
                self.calls.append((new_call_id(), ""))
                function = {"name": span.name, "arguments": ""}
                out.append({"tool_calls": [{"index": i, "id": self.calls[i][0], "type": "function",
                                            "function": function}]})  # fmt: skip
            call_id, sent = self.calls[i]
            piece = self.text[span.args_start + len(sent) : end]
            if piece:
                self.calls[i] = (call_id, sent + piece)
                out.append({"tool_calls": [{"index": i, "function": {"arguments": piece}}]})
        return out

    def finish(self, new: str) -> tuple[list[dict], bool]:
        """The last deltas and whether the output was tool calls."""
        deltas = self.delta(new)
        content, calls = self.plan.parse(self.text)
        if not calls:
            if self.calls:  # a streamed call that did not finish (max_tokens): it cannot be taken back as content
                return deltas, False
            rest = self.text[self.sent :]
            return deltas + ([{"content": rest}] if rest else []), False
        if content and len(content) > self.sent:
            deltas.append({"content": content[self.sent :]})
        for i, call in enumerate(calls):
            if i < len(self.calls):  # streamed: the rest of its arguments (nothing, unless the text was cut short)
                call_id, sent = self.calls[i]
                rest = call.arguments[len(sent) :] if call.arguments.startswith(sent) else ""
                if rest:
                    deltas.append({"tool_calls": [{"index": i, "function": {"arguments": rest}}]})
                continue
            function = {"name": call.name, "arguments": call.arguments}
            deltas.append({"tool_calls": [{"index": i, "id": new_call_id(), "type": "function", "function": function}]})
        return deltas, True


def message_of(plan: ToolPlan | None, text: str) -> tuple[dict, bool]:
    """The assistant message of a finished output and whether it holds tool calls."""
    if plan is None or not plan.active:
        return {"role": "assistant", "content": text}, False
    content, calls = plan.parse(text)
    if not calls:
        return {"role": "assistant", "content": text}, False
    tool_calls = [
        {"id": new_call_id(), "type": "function", "function": {"name": c.name, "arguments": c.arguments}} for c in calls
    ]
    return {"role": "assistant", "content": content, "tool_calls": tool_calls}, True
