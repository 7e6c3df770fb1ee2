"""Request bodies of the OpenAI (and vLLM adapter-management) API, validated with pydantic.

Unknown fields are refused with a 400 naming them: a field the server does not know could change the output, and a
200 with unconstrained text is worse than an error. A few fields that common clients (the official `openai` client,
LangChain, the OpenAI Agents SDK) send and that cannot change the generated text are accepted and ignored:
`user`, `metadata`, `store`, `service_tier`, `prompt_cache_key`, `safety_identifier`, `prediction`,
`stream_options.include_obfuscation`, `guided_decoding_backend`, and on messages sent back from an earlier answer
`refusal` / `annotations` / `audio` / `function_call` / `reasoning_content` when empty (`HARMLESS_EXTRAS`).
Fields that would change the result but that lragent does not implement (min_tokens, ...) are refused by
`unsupported()`.
`session_id` (an lragent extension, like the `X-Session-ID` header, which wins when both are given) names the agent
trajectory a request belongs to; it only labels per-session cache metrics (`session_of()`): sharing never needs it.
Sizes are capped (`limits()`): every stop string is searched for after every token of every choice, so a request
with many long stop strings would slow the whole batch, i.e. every other client.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, ValidationError

from lragent.sampling import MAX_TOP_LOGPROBS
from lragent.server.errors import APIError, bad_request

INT64 = 1 << 63
MAX_STOPS = 16  # stop strings per request
MAX_STOP_CHARS = 256  # characters per stop string
MAX_STOP_TOKEN_IDS = 64
MAX_LOGIT_BIAS = 300  # entries (OpenAI's limit)
MAX_SALT_CHARS = 256
MAX_PATH_CHARS = 4096
MAX_SESSION_CHARS = 128
SESSION_HEADER = "X-Session-ID"
RESERVED_SESSIONS = ("_other",)  # metrics.OTHER_SESSIONS: the series older sessions are folded into

Number = Annotated[float, Field(allow_inf_nan=False)]
Int = Annotated[StrictInt, Field(ge=-INT64, lt=INT64)]  # larger integers are refused before any arithmetic


HARMLESS_EXTRAS = (
    "user", "metadata", "store", "service_tier", "prompt_cache_key", "safety_identifier", "prediction",
    "stream_options.include_obfuscation", "guided_decoding_backend",
)  # fmt: skip
NAME = r"^[A-Za-z0-9_.:-]{1,64}$"  # function and schema names (OpenAI's rule, plus '.' and ':')


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid")


class StreamOptions(_Body):
    include_usage: StrictBool = False
    include_obfuscation: StrictBool | None = None  # accepted, ignored (OpenAI pads events; lragent never does)


class _Generation(_Body):
    """Fields shared by chat and text completions (OpenAI names, plus a few of vLLM's extensions)."""

    model: str
    max_tokens: Int | None = None
    temperature: Number | None = None
    top_p: Number | None = None
    n: Int = 1
    stop: str | list[str] | None = None
    seed: Int | None = None
    stream: StrictBool = False
    stream_options: StreamOptions | None = None
    presence_penalty: Number | None = None
    frequency_penalty: Number | None = None
    logit_bias: dict[str, Number] | None = None
    user: str | None = None
    # accepted and ignored: cannot change the output (see the module docstring)
    metadata: dict[str, str] | None = None
    store: StrictBool | None = None
    service_tier: str | None = None
    prompt_cache_key: str | None = None
    safety_identifier: str | None = None
    # vLLM-style extensions
    top_k: Int | None = None
    min_p: Number | None = None
    repetition_penalty: Number | None = None
    ignore_eos: StrictBool = False
    stop_token_ids: list[Int] | None = None
    include_stop_str_in_output: StrictBool = False
    min_tokens: Int = 0
    cache_salt: str | None = Field(default=None, min_length=1, max_length=MAX_SALT_CHARS)
    prompt_logprobs: StrictInt | None = Field(default=None, ge=0, le=MAX_TOP_LOGPROBS)  # k alternatives per position
    session_id: str | None = None  # lragent extension: checked by session_of()

    def limits(self) -> list[tuple[str, str]]:
        """(param, reason) for every field over the server's caps."""
        out = []
        stops = [self.stop] if isinstance(self.stop, str) else self.stop or []
        if len(stops) > MAX_STOPS:
            out.append(("stop", f"at most {MAX_STOPS} stop strings per request, got {len(stops)}"))
        if any(len(s) > MAX_STOP_CHARS for s in stops):
            out.append(("stop", f"stop strings must be at most {MAX_STOP_CHARS} characters"))
        if self.stop_token_ids is not None and len(self.stop_token_ids) > MAX_STOP_TOKEN_IDS:
            out.append(("stop_token_ids", f"at most {MAX_STOP_TOKEN_IDS} stop_token_ids per request"))
        if self.logit_bias is not None and len(self.logit_bias) > MAX_LOGIT_BIAS:
            out.append(("logit_bias", f"logit_bias has more than {MAX_LOGIT_BIAS} entries"))
        return out

    def unsupported(self) -> list[tuple[str, str]]:
        """(param, reason) for every field set to something lragent cannot honour."""
        out = []
        if self.min_tokens:
            out.append(("min_tokens", "min_tokens is not supported"))
        if self.prompt_logprobs is not None and self.stream:  # vLLM refuses it too: the prompt is never streamed
            out.append(("prompt_logprobs", "prompt_logprobs cannot be used with stream"))
        return out

    @property
    def prompt_scores(self) -> int | None:
        """Alternatives per prompt position the engine must score (SamplingParams.prompt_logprobs); None = off."""
        return self.prompt_logprobs

    @property
    def include_usage_in_stream(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class ContentPart(_Body):
    model_config = ConfigDict(extra="allow")  # non-text parts are refused by ChatMessage.text(), naming their type
    type: str
    text: str | None = None


class FunctionCall(_Body):
    name: str = Field(min_length=1, max_length=256)
    arguments: str  # JSON text of an object


class ToolCall(_Body):
    id: str = Field(min_length=1, max_length=256)
    type: Literal["function"] = "function"
    function: FunctionCall
    index: Int | None = None  # some clients keep the index of a streamed call


class FunctionDefinition(_Body):
    name: str = Field(pattern=NAME)
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: StrictBool | None = None  # the arguments are constrained for required / named choices either way


class Tool(_Body):
    type: Literal["function"]
    function: FunctionDefinition


class FunctionName(_Body):
    name: str = Field(min_length=1, max_length=256)


class NamedToolChoice(_Body):
    type: Literal["function"]
    function: FunctionName


class JSONSchemaFormat(_Body):
    name: str = Field(pattern=NAME)
    description: str | None = None
    schema_: dict[str, Any] | None = Field(default=None, alias="schema")
    strict: StrictBool | None = None  # the output is constrained to the schema either way


class ResponseFormat(_Body):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JSONSchemaFormat | None = None


class StructuredOutputs(_Body):
    """vLLM's `structured_outputs` extra: one of these."""

    json_: dict[str, Any] | str | None = Field(default=None, alias="json")
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None
    json_object: StrictBool | None = None


class ChatMessage(_Body):
    role: Literal["system", "developer", "user", "assistant", "tool", "function"]
    content: str | list[ContentPart] | None = None
    name: str | None = None
    tool_calls: list[ToolCall] | None = None  # assistant messages
    tool_call_id: str | None = None  # tool messages
    # sent back by clients that append an earlier answer's message: accepted when empty
    refusal: None = None
    annotations: list[Any] | None = None
    audio: None = None
    function_call: None = None
    reasoning_content: None = None

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        parts = []
        for part in self.content:
            if part.type != "text" or part.text is None:
                raise bad_request(f"content parts of type {part.type!r} are not supported (text only)", "messages")
            parts.append(part.text)
        return "".join(parts)


class ChatCompletionRequest(_Generation):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: Int | None = None
    logprobs: StrictBool = False
    top_logprobs: Int | None = None
    tools: list[Tool] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: StrictBool | None = None
    response_format: ResponseFormat | None = None
    modalities: list[Literal["text"]] | None = None
    prediction: dict[str, Any] | None = None  # accepted, ignored: a speed hint, not a constraint
    # vLLM's structured-output extras (at most one constraint per request, response_format included)
    guided_json: dict[str, Any] | str | None = None
    guided_regex: str | None = None
    guided_choice: list[str] | None = None
    guided_grammar: str | None = None
    guided_decoding_backend: str | None = None  # accepted, ignored: xgrammar is the only backend
    structured_outputs: StructuredOutputs | None = None

    def unsupported(self) -> list[tuple[str, str]]:
        out = super().unsupported()
        if self.top_logprobs and not self.logprobs:
            out.append(("top_logprobs", "top_logprobs needs logprobs=true"))
        if self.response_format and self.response_format.type == "json_schema":
            spec = self.response_format.json_schema
            if spec is None or spec.schema_ is None:
                out.append(("response_format", "response_format json_schema needs json_schema.schema"))
        if self.structured_outputs is not None:
            given = [k for k, v in self.structured_outputs.model_dump().items() if v not in (None, False)]
            if len(given) != 1:
                out.append(("structured_outputs", "structured_outputs must set exactly one of json, regex, choice, "
                            f"grammar, json_object (got {', '.join(given) or 'none'})"))  # fmt: skip
        given = [name for name, _ in self.constraints()]
        if len(given) > 1:
            out.append((given[1], f"{given[1]} cannot be combined with {given[0]}: give one output constraint"))
        return out

    def constraints(self) -> list[tuple[str, dict]]:
        """(request field, SamplingParams keywords) of every output constraint the request sets."""
        out: list[tuple[str, dict]] = []
        fmt = self.response_format
        if fmt is not None and fmt.type == "json_object":
            out.append(("response_format", {"json_object": True}))
        elif fmt is not None and fmt.type == "json_schema" and fmt.json_schema and fmt.json_schema.schema_ is not None:
            out.append(("response_format", {"json_schema": fmt.json_schema.schema_}))
        simple = (("guided_json", "json_schema"), ("guided_regex", "regex"), ("guided_choice", "choice"),
                  ("guided_grammar", "grammar"))  # fmt: skip
        for name, key in simple:
            if getattr(self, name) is not None:
                out.append((name, {key: getattr(self, name)}))
        so = self.structured_outputs
        if so is not None:
            for name, key in (("json_", "json_schema"), ("regex", "regex"), ("choice", "choice"),
                              ("grammar", "grammar"), ("json_object", "json_object")):  # fmt: skip
                if getattr(so, name) not in (None, False):
                    out.append(("structured_outputs", {key: getattr(so, name)}))
                    break
        return out

    @property
    def token_limit(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    @property
    def alternatives(self) -> int:
        """Most likely alternatives per token (top_logprobs)."""
        return self.top_logprobs or 0


class CompletionRequest(_Generation):
    prompt: str | list[str] | list[Int] | list[list[Int]]
    logprobs: StrictInt | None = Field(default=None, ge=0, le=5)
    echo: StrictBool = False
    suffix: str | None = None
    best_of: Int | None = None

    def unsupported(self) -> list[tuple[str, str]]:
        out = super().unsupported()
        if self.suffix:
            out.append(("suffix", "suffix is not supported"))
        if self.echo_only and self.best_of is not None and self.best_of != self.n:
            out.append(("best_of", "best_of cannot be used with max_tokens 0 (nothing is generated to rank)"))
        return out

    @property
    def echo_logprobs(self) -> bool:
        """echo with logprobs: the logprobs object starts with the prompt's tokens (lm-evaluation-harness scoring)."""
        return self.echo and self.logprobs is not None

    @property
    def echo_only(self) -> bool:
        """max_tokens 0 with echo (the legacy API's way to score a prompt): the answer is the prompt alone."""
        return self.echo and self.max_tokens == 0

    @property
    def prompt_scores(self) -> int | None:
        """The most alternatives either echo's logprobs or vLLM's prompt_logprobs asks of each prompt position."""
        asked = [k for k in (self.prompt_logprobs, self.logprobs if self.echo else None) if k is not None]
        return max(asked, default=None)

    @property
    def token_limit(self) -> int | None:
        return self.max_tokens

    @property
    def alternatives(self) -> int:
        """Most likely alternatives per token (the legacy API's logprobs=N)."""
        return self.logprobs or 0


class LoadLoRARequest(_Body):
    lora_name: str = Field(min_length=1)  # checked by guard.check_adapter_name
    lora_path: str = Field(min_length=1, max_length=MAX_PATH_CHARS)


class UnloadLoRARequest(_Body):
    lora_name: str = Field(min_length=1)
    lora_int_id: Int | None = None


def parse_body(model: type[_Body], data: Any):
    """Validate a decoded JSON body; the first problem becomes a 400 naming the field."""
    if not isinstance(data, dict):
        raise bad_request("the request body must be a JSON object")
    try:
        body = model.model_validate(data)
    except ValidationError as exc:
        first = exc.errors(include_url=False, include_input=False)[0]
        loc = first["loc"]
        param = loc[0] if loc and isinstance(loc[0], str) else None  # the top-level field (union tags follow it)
        where = ".".join(str(p) for p in loc)[:200]  # dict keys are the client's: keep the echo short
        if first["type"] == "extra_forbidden":
            message = f"unknown field {where!r}: lragent does not support it (refused rather than ignored)"
            raise APIError(400, message, param, "unknown_field") from None
        raise APIError(400, f"{where}: {first['msg']}" if where else first["msg"], param) from None
    if isinstance(body, _Generation):
        for param, reason in body.limits() + body.unsupported():
            raise bad_request(reason, param)
    return body


def check_session_id(value: str, param: str) -> str:
    """A session id as a metrics label: 1 to 128 printable ASCII characters, not a reserved label."""
    if not 1 <= len(value) <= MAX_SESSION_CHARS or not all(" " <= c <= "~" for c in value):
        raise bad_request(f"{param} must be 1 to {MAX_SESSION_CHARS} printable ASCII characters", param)
    if value in RESERVED_SESSIONS:
        raise bad_request(f"{param} {value!r} is reserved", param)
    return value


def session_of(header: str | None, field: str | None) -> str | None:
    """The request's session id: the `X-Session-ID` header, else the body's `session_id`, else None.

    The `user` field is not used: it names an end user (OpenAI's abuse-monitoring id), and one user runs many
    trajectories."""
    if header is not None:
        return check_session_id(header, SESSION_HEADER)
    if field is not None:
        return check_session_id(field, "session_id")
    return None


def usage(prompt_tokens: int, completion_tokens: int, cached: int, base_cached: int) -> dict:
    """OpenAI usage; `cached_tokens` counts prompt tokens served entirely from the cache (no forward pass).

    `base_cached_tokens` (an lragent extension) counts prompt tokens whose keys and base values came from the
    shared cache: under base_shared they are reused although the agent still runs its own (LR) prefill.
    """
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
        "prompt_tokens_details": {"cached_tokens": cached, "base_cached_tokens": base_cached},
    }
