"""Chat and text completions: request -> prompts and sampling params -> engine requests -> response or SSE stream.

Each choice is one engine request; all choices of all clients run in the engine's one continuous batch. The engine
finds shared prefixes itself, across adapters as the sharing scheme allows, so clients need not do anything.
"""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from lragent.sampling import SamplingParams
from lragent.server.engine_loop import AsyncEngine, EngineRequest
from lragent.server.errors import APIError, bad_request, from_engine_error
from lragent.server.protocol import INT64, ChatCompletionRequest, CompletionRequest
from lragent.server.responses import Job, Responder
from lragent.server.streaming import ClientDisconnected, EventStream, until_disconnect

SAMPLING_FIELDS = ("max_tokens", "temperature", "top_p", "top_k", "stop")


class OpenAIServing:
    def __init__(self, engine: AsyncEngine, tokenizer: Any, model_name: str, aliases: set[str], max_choices: int):
        self.engine = engine
        self.tokenizer = tokenizer
        self.model_name = model_name
        self.aliases = aliases | {model_name}
        self.max_choices = max_choices
        self.responder = Responder(tokenizer)

    # ---- request -> engine requests ------------------------------------------------------------------------
    def resolve_model(self, name: str) -> str | None:
        """The adapter a `model` field names (None = the base model)."""
        if name in self.aliases:
            return None
        if name in self.engine.adapter_paths:
            return name
        known = ", ".join([self.model_name, *sorted(self.engine.adapter_paths)])
        raise APIError(404, f"The model `{name}` does not exist (served: {known}).", "model", "model_not_found")

    def encode(self, text: str) -> list[int]:
        if self.tokenizer is None:
            raise bad_request("this model has no tokenizer: send prompts as lists of token ids", "prompt")
        return self.tokenizer.encode(text, add_special_tokens=False)

    def decode(self, ids: list[int]) -> str:
        return "" if self.tokenizer is None else self.tokenizer.decode(ids, skip_special_tokens=True)

    def chat_prompt(self, body: ChatCompletionRequest) -> list[int]:
        if self.tokenizer is None or not getattr(self.tokenizer, "chat_template", None):
            raise bad_request("this model has no chat template: use /v1/completions", "messages")
        messages = [{"role": "system" if m.role == "developer" else m.role, "content": m.text()} for m in body.messages]
        try:
            text = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        except Exception as exc:  # the template itself refuses (e.g. role order)
            raise bad_request(f"the chat template rejected the messages: {exc}", "messages") from None
        return self.encode(text)

    def completion_prompts(self, body: CompletionRequest) -> tuple[list[list[int]], list[str]]:
        prompt = body.prompt
        if isinstance(prompt, str):
            texts = [prompt]
        elif prompt and all(isinstance(p, int) for p in prompt):
            return [list(prompt)], [self.decode(list(prompt))] if body.echo else []
        elif prompt and all(isinstance(p, str) for p in prompt):
            texts = list(prompt)
        elif prompt:
            return [list(p) for p in prompt], [self.decode(list(p)) for p in prompt] if body.echo else []
        else:
            raise bad_request("prompt is empty", "prompt")
        return [self.encode(t) for t in texts], texts

    def _params(self, body, prompt_len: int, choice: int, param: str) -> SamplingParams:
        limit = self.engine.max_model_len
        if prompt_len == 0:
            raise bad_request("the prompt is empty", param)
        if prompt_len >= limit:
            raise bad_request(
                f"This model's maximum context length is {limit} tokens, but the prompt has {prompt_len} tokens "
                "(at least one token must be generated). Please shorten the prompt.",
                param,
                "context_length_exceeded",
            )
        max_tokens = body.token_limit
        if max_tokens is None:
            max_tokens = limit - prompt_len
        elif max_tokens < 1:
            raise bad_request(f"max_tokens must be at least 1, got {max_tokens}", "max_tokens")
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
            )
        except (ValueError, TypeError) as exc:
            word = str(exc).split(" ", 1)[0]
            raise bad_request(str(exc), word if word in SAMPLING_FIELDS else None) from None

    def make_job(self, kind: str, body, adapter: str | None, prompts: list[list[int]], param: str) -> Job:
        if body.n < 1:
            raise bad_request(f"n must be at least 1, got {body.n}", "n")
        if body.n * len(prompts) > self.max_choices:
            raise bad_request(f"at most {self.max_choices} choices per request (prompts x n)", "n")
        prefix = "chatcmpl" if kind == "chat" else "cmpl"
        job_id = f"{prefix}-{uuid.uuid4().hex}"
        requests = []
        for i, ids in enumerate(prompts):
            for j in range(body.n):
                index = i * body.n + j
                params = self._params(body, len(ids), j, param)
                requests.append(EngineRequest(ids, params, adapter, f"{job_id}-{index}", index))
        return Job(
            kind,
            job_id,
            body.model,
            prompts,
            requests,
            body.stream,
            body.include_usage_in_stream,
            logprobs=bool(body.logprobs is not None and body.logprobs is not False),
        )

    # ---- endpoints -----------------------------------------------------------------------------------------
    async def chat(self, body: ChatCompletionRequest, request: Request) -> Response:
        adapter = self.resolve_model(body.model)
        job = self.make_job("chat", body, adapter, [self.chat_prompt(body)], "messages")
        return await self._run(job, request)

    async def completion(self, body: CompletionRequest, request: Request) -> Response:
        adapter = self.resolve_model(body.model)
        prompts, texts = self.completion_prompts(body)
        job = self.make_job("completion", body, adapter, prompts, "prompt")
        job.echo = texts if body.echo else None
        return await self._run(job, request)

    async def _run(self, job: Job, request: Request) -> Response:
        try:
            queue = await self.engine.submit(job.requests)
        except (ValueError, TypeError) as exc:  # AdapterError is a ValueError
            raise from_engine_error(exc, "messages" if job.kind == "chat" else "prompt") from None

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
        return JSONResponse(self.responder.response(job))

    async def _collect(self, job: Job, queue: asyncio.Queue) -> None:
        while len(job.finished) < len(job.requests):
            item = await queue.get()
            if item.error is not None:
                raise APIError(500, item.error)
            if item.output.finished:
                job.finished[item.index] = item.output
