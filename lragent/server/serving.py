"""Chat and text completions: request -> prompts and sampling params -> engine requests -> response or SSE stream.

Each choice is one engine request; all choices of all clients run in the engine's one continuous batch. The engine
finds shared prefixes itself, across adapters as the sharing scheme allows, so clients need not do anything.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from typing import Any

from jinja2 import TemplateError
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from lragent.engine.structured import StructuredOutputError
from lragent.sampling import CONSTRAINTS, GREEDY_TEMPERATURE, SamplingParams
from lragent.server.engine_loop import AsyncEngine, EngineRequest, EngineUnavailable
from lragent.server.errors import APIError, bad_request, from_engine_error
from lragent.server.guard import shown
from lragent.server.protocol import (
    INT64,
    ChatCompletionRequest,
    ChatMessage,
    CompletionRequest,
    NamedToolChoice,
    ToolCall,
)
from lragent.server.responses import Job, Responder
from lragent.server.streaming import ClientDisconnected, EventStream, until_disconnect
from lragent.server.tools import ToolPlan, check_schema, get_parser, plan_tools

SAMPLING_FIELDS = (
    "max_tokens", "temperature", "top_p", "top_k", "stop", "stop_token_ids", "seed", "min_p", "repetition_penalty",
    "presence_penalty", "frequency_penalty", "logit_bias", "top_logprobs",
)  # fmt: skip


def prompt_too_long(limit: int, prompt_len: int, param: str) -> APIError:
    return bad_request(
        f"This model's maximum context length is {limit} tokens, but the prompt has {prompt_len} tokens "
        "(at least one token must be generated). Please shorten the prompt.",
        param,
        "context_length_exceeded",
    )


def longest_token(tokenizer: Any) -> int:
    """Characters in the tokenizer's longest vocabulary entry (byte-level BPE: one character per byte)."""
    try:
        return max(map(len, tokenizer.get_vocab()), default=1)
    except (AttributeError, TypeError):
        return 64


class OpenAIServing:
    def __init__(
        self,
        engine: AsyncEngine,
        tokenizer: Any,
        model_name: str,
        aliases: set[str],
        max_choices: int,
        vocab_size: int | None = None,
        tool_call_parser: str = "hermes",
    ):
        self.engine = engine
        self.tokenizer = tokenizer
        self.model_name = model_name
        self.aliases = aliases | {model_name}
        self.max_choices = max_choices
        self.vocab_size = vocab_size
        self.responder = Responder(tokenizer)
        get_parser(tool_call_parser)  # a ValueError for an unknown name, before serving
        self.tool_call_parser = tool_call_parser
        # text this long cannot fit the context whatever it is (normalisation slack x2): refused before tokenising,
        # which runs on the event loop (about 1 s per MB) and would stall every other client's stream
        self.max_prompt_chars = 2 * engine.max_model_len * (longest_token(tokenizer) if tokenizer else 1) + 1024

    # ---- request -> engine requests ------------------------------------------------------------------------
    def resolve_model(self, name: str) -> str | None:
        """The adapter a `model` field names (None = the base model)."""
        if name in self.aliases:
            return None
        if name in self.engine.adapter_paths:
            return name
        known = ", ".join([self.model_name, *sorted(self.engine.adapter_paths)])
        raise APIError(404, f"The model {shown(name)} does not exist (served: {known}).", "model", "model_not_found")

    def _check_length(self, chars: int, param: str) -> None:
        if chars > self.max_prompt_chars:
            raise bad_request(
                f"the prompt has {chars} characters: more than can fit this model's context of "
                f"{self.engine.max_model_len} tokens",
                param,
                "context_length_exceeded",
            )

    def encode(self, text: str, param: str = "prompt") -> list[int]:
        if self.tokenizer is None:
            raise bad_request("this model has no tokenizer: send prompts as lists of token ids", "prompt")
        self._check_length(len(text), param)
        return self.tokenizer.encode(text, add_special_tokens=False)

    def decode(self, ids: list[int]) -> str:
        """Text of prompt token ids (for echo); ids were checked against the vocabulary first."""
        if self.tokenizer is None:
            return ""
        try:
            return self.tokenizer.decode(ids, skip_special_tokens=True)
        except Exception:  # an id the model has but the tokenizer lacks (padded vocabularies)
            raise bad_request("the prompt has token ids this model's tokenizer cannot decode", "prompt") from None

    def template_renders_tools(self) -> bool:
        template = getattr(self.tokenizer, "chat_template", None)
        return isinstance(template, str) and "tools" in template

    def chat_messages(self, body: ChatCompletionRequest, plan: ToolPlan) -> tuple[list[dict], list[dict] | None]:
        """The messages (and tools) for the chat template; tool calls and results in the history are checked and,
        for templates that know nothing of tools, written out in the parser's format (results as user turns)."""
        native = self.template_renders_tools()
        calls: dict[str, str] = {}  # call id -> function name, of the assistant messages so far
        messages: list[dict] = []
        for i, m in enumerate(body.messages):
            role = "system" if m.role == "developer" else m.role
            if role == "tool":
                _append_tool_result(messages, i, m, calls, native)
                continue
            if role != "assistant" and (m.tool_calls or m.tool_call_id):
                field = "tool_calls" if m.tool_calls else "tool_call_id"
                raise bad_request(f"messages[{i}]: only {'assistant' if m.tool_calls else 'tool'} messages "
                                  f"have {field}", "messages")  # fmt: skip
            message: dict = {"role": role, "content": m.text()}
            if m.tool_calls:
                _add_tool_calls(message, i, m.tool_calls, calls, native, plan)
            messages.append(message)
        for rendered_message in messages:
            rendered_message.pop("tool_results", None)
        if not plan.tools:
            return messages, None
        if native:
            return messages, plan.tools
        _prepend_tool_section(messages, plan.system_section())
        return messages, None

    def chat_prompt(self, body: ChatCompletionRequest, plan: ToolPlan | None = None) -> list[int]:
        if self.tokenizer is None or not getattr(self.tokenizer, "chat_template", None):
            raise bad_request("this model has no chat template: use /v1/completions", "messages")
        if len(body.messages) > self.engine.max_model_len:  # every message costs at least one token
            raise bad_request(
                f"{len(body.messages)} messages cannot fit this model's context of {self.engine.max_model_len} tokens",
                "messages",
                "context_length_exceeded",
            )
        plan = plan if plan is not None else self.tool_plan(body)
        messages, tools = self.chat_messages(body, plan)
        self._check_length(sum(len(m["content"]) for m in messages), "messages")
        extra = {"tools": tools} if tools else {}
        try:
            text = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False, **extra)
        except TemplateError as exc:  # the template itself refuses (e.g. role order): its message is for the user
            raise bad_request(f"the chat template rejected the messages: {shown(str(exc))}", "messages") from None
        except Exception:
            raise bad_request("the chat template could not render these messages", "messages") from None
        return self.encode(text, "messages")

    def tool_plan(self, body: ChatCompletionRequest) -> ToolPlan:
        tools = [t.model_dump(exclude_none=True) for t in body.tools or []]
        given = body.tool_choice
        choice = given.model_dump() if isinstance(given, NamedToolChoice) else given
        return plan_tools(tools, choice, body.parallel_tool_calls, self.tool_call_parser)

    def chat_constraint(self, body: ChatCompletionRequest, plan: ToolPlan) -> tuple[dict | None, str | None]:
        """(SamplingParams keywords, the request field they come from) of the output constraint, if any."""
        given = body.constraints()
        tool_constraint = plan.constraint()
        if tool_constraint is not None:
            if given:
                raise bad_request(
                    f"{given[0][0]} cannot be combined with tool_choice {plan.mode!r}: give one output constraint",
                    given[0][0],
                )
            return tool_constraint, "tools"
        if not given:
            return None, None
        param, kwargs = given[0]
        schema = kwargs.get("json_schema")
        if isinstance(schema, str):
            try:
                schema = json.loads(schema)
            except ValueError:
                raise bad_request(f"{param}: the schema is not valid JSON", param) from None
        if schema is not None:
            check_schema(schema, f"{param} schema", param)
        if plan.mode == "auto":  # either tool calls or the answer: one JSON schema allows both (tools.ToolPlan)
            if kwargs.get("json_object"):
                schema = {"type": "object"}
            if schema is None:
                raise bad_request(f"{param}: only a JSON output (json_schema or json_object) can be combined with "
                                  "tools under tool_choice 'auto'", param)  # fmt: skip
            if schema.get("type") != "object":
                raise bad_request(f"{param}: with tools under tool_choice 'auto', the schema's root must be "
                                  '"type": "object" (a JSON array is read as tool calls)', param)  # fmt: skip
            plan.output_schema = schema
            return plan.constraint(), param
        return kwargs, param

    def _check_ids(self, prompts: list[list[int]]) -> None:
        """Token ids must index the vocabulary, and fit the context, before anything decodes them (echo)."""
        vocab, limit = self.vocab_size, self.engine.max_model_len
        for ids in prompts:
            if len(ids) >= limit:
                raise prompt_too_long(limit, len(ids), "prompt")
            bad = [t for t in ids if t < 0 or (vocab is not None and t >= vocab)]
            if bad:
                upper = f"[0, {vocab})" if vocab is not None else "non-negative"
                raise bad_request(f"prompt token ids must be in {upper}; got {str(bad[:3])[:120]}", "prompt")

    def completion_prompts(self, body: CompletionRequest) -> tuple[list[list[int]], list[str]]:
        prompt = body.prompt
        if isinstance(prompt, str):
            prompt = [prompt]
        if not prompt:
            raise bad_request("prompt is empty", "prompt")
        if all(isinstance(p, int) for p in prompt):
            prompt = [prompt]
        if body.n * len(prompt) > self.max_choices:  # before tokenising a long list of prompts
            raise bad_request(f"at most {self.max_choices} choices per request (prompts x n)", "n")
        if all(isinstance(p, str) for p in prompt):
            return [self.encode(t) for t in prompt], list(prompt)
        ids = [list(p) for p in prompt]
        self._check_ids(ids)
        return ids, [self.decode(p) for p in ids] if body.echo else []

    def _params(
        self, body, prompt_len: int, choice: int, param: str, constraint: dict | None = None, where: str | None = None
    ) -> SamplingParams:
        limit = self.engine.max_model_len
        if prompt_len == 0:
            raise bad_request("the prompt is empty", param)
        if prompt_len >= limit:
            raise prompt_too_long(limit, prompt_len, param)
        max_tokens = body.token_limit
        if max_tokens is None:
            max_tokens = limit - prompt_len
        elif max_tokens == 0 and getattr(body, "echo_only", False):
            max_tokens = 1  # the engine always samples one token: the response drops it (Job.echo_only)
        elif max_tokens < 1:
            hint = " (0 only with echo)" if isinstance(body, CompletionRequest) else ""
            raise bad_request(f"max_tokens must be at least 1{hint}, got {max_tokens}", "max_tokens")
        elif prompt_len + max_tokens > limit:
            raise bad_request(
                f"This model's maximum context length is {limit} tokens. However, you requested "
                f"{prompt_len + max_tokens} tokens ({prompt_len} in the prompt, {max_tokens} in the completion). "
                "Please reduce the length of the prompt or max_tokens.",
                "max_tokens",
                "context_length_exceeded",
            )
        seed = body.seed
        if seed is not None and choice:
            seed = (seed + choice + INT64) % (2 * INT64) - INT64  # distinct choices, still a valid int64
        try:
            return SamplingParams(
                max_tokens=max_tokens,
                temperature=1.0 if body.temperature is None else body.temperature,
                top_p=1.0 if body.top_p is None else body.top_p,
                top_k=-1 if body.top_k is None else body.top_k,
                seed=seed,
                stop=[body.stop] if isinstance(body.stop, str) else list(body.stop or []),
                stop_token_ids=list(body.stop_token_ids or []),
                ignore_eos=body.ignore_eos,
                include_stop_str_in_output=body.include_stop_str_in_output,
                logprobs=bool(body.logprobs is not None and body.logprobs is not False),
                top_logprobs=body.alternatives,
                min_p=0.0 if body.min_p is None else body.min_p,
                repetition_penalty=1.0 if body.repetition_penalty is None else body.repetition_penalty,
                presence_penalty=body.presence_penalty or 0.0,
                frequency_penalty=body.frequency_penalty or 0.0,
                logit_bias=dict(body.logit_bias or {}),
                prompt_logprobs=body.prompt_scores,
                **(constraint or {}),
            )
        except (ValueError, TypeError) as exc:
            word = str(exc).split(" ", 1)[0]
            if where is not None and word.rstrip(":") in CONSTRAINTS:
                raise bad_request(f"{where}: {exc}", where) from None
            raise bad_request(str(exc), word if word in SAMPLING_FIELDS else None) from None

    def make_job(
        self,
        kind: str,
        body,
        adapter: str | None,
        prompts: list[list[int]],
        param: str,
        salt: str | None,
        constraint: dict | None = None,
        constraint_param: str | None = None,
        session: str | None = None,
    ) -> Job:
        if body.n < 1:
            raise bad_request(f"n must be at least 1, got {body.n}", "n")
        per = self._samples_per_prompt(body)
        if per * len(prompts) > self.max_choices:
            raise bad_request(f"at most {self.max_choices} choices per request (prompts x n, or x best_of)", "n")
        prefix = "chatcmpl" if kind == "chat" else "cmpl"
        job_id = f"{prefix}-{uuid.uuid4().hex}"
        requests = []
        for i, ids in enumerate(prompts):
            for j in range(per):
                index = i * per + j
                params = self._params(body, len(ids), j, param, constraint, constraint_param)
                first = f"{job_id}-{i * per}" if j else None  # later samples reuse the first's prompt
                requests.append(EngineRequest(ids, params, adapter, f"{job_id}-{index}", index, salt, first, session))
        return Job(
            kind,
            job_id,
            body.model,
            prompts,
            requests,
            body.stream,
            body.include_usage_in_stream,
            logprobs=bool(body.logprobs is not None and body.logprobs is not False),
            constraint_param=constraint_param,
            keep=body.n if per != body.n else 0,
            top=body.alternatives,
            prompt_logprobs=body.prompt_logprobs,
        )

    @staticmethod
    def _samples_per_prompt(body) -> int:
        """best_of (text completions) when given, else n; best_of below n, with streaming, or greedy is a 400."""
        best_of = getattr(body, "best_of", None)
        if best_of is None or best_of == body.n:
            return body.n
        if best_of < body.n:
            raise bad_request(f"best_of must be at least n ({body.n}), got {best_of}", "best_of")
        if body.stream:
            raise bad_request("best_of cannot be used with stream (the best samples are known only at the end)",
                              "best_of")  # fmt: skip
        if body.temperature is not None and body.temperature < GREEDY_TEMPERATURE:
            raise bad_request("best_of > n needs sampling (temperature > 0): greedy samples are all the same",
                              "best_of")  # fmt: skip
        return best_of

    # ---- endpoints -----------------------------------------------------------------------------------------
    def chat_job(self, body: ChatCompletionRequest, salt: str | None = None, session: str | None = None) -> Job:
        """A chat request as a Job (tools planned, prompt rendered, output constrained), ready for `run_job`."""
        adapter = self.resolve_model(body.model)
        plan = self.tool_plan(body)
        constraint, where = self.chat_constraint(body, plan)
        prompt = self.chat_prompt(body, plan)
        job = self.make_job("chat", body, adapter, [prompt], "messages", salt, constraint, where, session)
        job.tools = plan if plan.active else None
        return job

    async def chat(
        self, body: ChatCompletionRequest, request: Request, salt: str | None = None, session: str | None = None
    ) -> Response:
        """`salt`: the cache salt the server derived (tenant and/or the client's `cache_salt`); `session`: the
        checked session id (per-session metrics only)."""
        return await self.run_job(self.chat_job(body, salt, session), request)

    async def completion(
        self, body: CompletionRequest, request: Request, salt: str | None = None, session: str | None = None
    ) -> Response:
        adapter = self.resolve_model(body.model)
        prompts, texts = self.completion_prompts(body)
        job = self.make_job("completion", body, adapter, prompts, "prompt", salt, session=session)
        job.echo = texts if body.echo else None
        job.echo_logprobs, job.echo_only = body.echo_logprobs, body.echo_only
        return await self.run_job(job, request)

    async def submit(self, job: Job) -> asyncio.Queue:
        """Add the job's requests to the engine; its outputs arrive on the returned queue."""
        try:
            return await self.engine.submit(job.requests)
        except EngineUnavailable as exc:
            raise APIError(503, str(exc), None, "service_unavailable") from None
        except StructuredOutputError as exc:  # the constraint does not compile: name the request field behind it
            raise bad_request(f"{job.constraint_param}: {exc}" if job.constraint_param else str(exc),
                              job.constraint_param) from None  # fmt: skip
        except (ValueError, TypeError) as exc:  # AdapterError is a ValueError
            raise from_engine_error(exc, "messages" if job.kind == "chat" else "prompt") from None

    async def run_job(self, job: Job, request: Request) -> Response:
        """Run a Job: an SSE stream when it streams, else the JSON response once every choice finished."""
        queue = await self.submit(job)

        def on_close() -> None:
            self.engine.abort_nowait(job.unfinished_ids())

        if job.stream:
            return EventStream(self.responder.events(job, queue), on_close)
        try:
            await until_disconnect(request.receive, self._collect(job, queue))
        except ClientDisconnected:
            return Response(status_code=499)
        finally:
            on_close()
        job.keep_best()
        return JSONResponse(self.responder.response(job))

    _run = run_job  # the older name

    async def _collect(self, job: Job, queue: asyncio.Queue) -> None:
        while len(job.finished) < len(job.requests):
            item = await queue.get()
            if item.error is not None:  # this request failed (or the server is shutting down): others go on
                code = "engine_error" if item.status == 500 else "service_unavailable"
                raise APIError(item.status, item.error, None, code)
            if item.output.finished:
                job.finished[item.index] = item.output


def _append_tool_result(messages: list[dict], i: int, m: ChatMessage, calls: dict[str, str], native: bool) -> None:
    """Append the tool message ``m`` (``messages[i]`` of the request), checked against the ``calls`` made so far:
    as a tool turn for templates that render tools, else as a ``<tool_response>`` user turn (merged with the
    results just before it)."""
    if not m.tool_call_id or m.tool_call_id not in calls:
        raise bad_request(
            f"messages[{i}]: a tool message needs the tool_call_id of a call made by an earlier "
            f"assistant message (got {shown(m.tool_call_id or '')})",
            "messages",
        )
    if native:
        messages.append({"role": "tool", "content": m.text(), "tool_call_id": m.tool_call_id,
                         "name": calls[m.tool_call_id]})  # fmt: skip
        return
    result = f"<tool_response>\n{m.text()}\n</tool_response>"
    if messages and messages[-1].get("tool_results"):
        messages[-1]["content"] += "\n" + result
    else:
        messages.append({"role": "user", "content": result, "tool_results": True})


def _add_tool_calls(
    message: dict, i: int, tool_calls: list[ToolCall], calls: dict[str, str], native: bool, plan: ToolPlan
) -> None:
    """Check the tool calls of an assistant message (``messages[i]`` of the request), record them in ``calls`` and
    add them to ``message``: as ``tool_calls`` for templates that render tools, else in the parser's format."""
    parsed = []
    for call in tool_calls:
        try:
            args = json.loads(call.function.arguments)
        except ValueError:
            args = None
        if not isinstance(args, dict):
            raise bad_request(f"messages[{i}].tool_calls: arguments of {shown(call.id)} must be the "
                              "JSON text of an object", "messages")  # fmt: skip
        calls[call.id] = call.function.name
        parsed.append((call.id, call.function.name, args))
    if native:
        message["tool_calls"] = [
            {"id": cid, "type": "function", "function": {"name": name, "arguments": args}} for cid, name, args in parsed
        ]
    else:
        rendered = plan.parser.render_calls([(name, args) for _, name, args in parsed])
        message["content"] = f"{message['content']}\n{rendered}" if message["content"] else rendered


def _prepend_tool_section(messages: list[dict], section: str) -> None:
    """Put the tools' system-prompt ``section`` at the end of the system message, or in a new one first."""
    if messages and messages[0]["role"] == "system":
        messages[0]["content"] = f"{messages[0]['content']}\n\n{section}"
    else:
        messages.insert(0, {"role": "system", "content": section})
