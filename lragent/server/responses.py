"""OpenAI response bodies and SSE chunks for a finished or running `Job` (chat or text completion)."""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from lragent.engine.llm_engine import RequestOutput
from lragent.engine.sequence import PromptLogprob
from lragent.server.engine_loop import EngineRequest
from lragent.server.errors import APIError
from lragent.server.protocol import usage as usage_object
from lragent.server.streaming import TextStream, sse
from lragent.server.tools import ToolPlan, ToolStream, message_of

LOWEST_LOGPROB = -9999.0  # what -inf (or NaN) becomes: JSON has no infinities (vLLM clamps the same way)


@dataclass
class Job:
    """One HTTP request's generation: prompts x n choices (choice index = prompt index * n + j)."""

    kind: str  # "chat" or "completion"
    id: str
    model: str
    prompts: list[list[int]]
    requests: list[EngineRequest]
    stream: bool
    include_usage: bool
    logprobs: bool
    echo: list[str] | None = None  # prompt texts to prepend (completions with echo)
    tools: ToolPlan | None = None  # chat with tools in use: outputs are parsed for tool calls
    constraint_param: str | None = None  # the request field that constrains the output (for errors)
    created: int = field(default_factory=lambda: int(time.time()))
    finished: dict[int, RequestOutput] = field(default_factory=dict)
    keep: int = 0  # best_of: choices per prompt to return (the best `keep` of the samples); 0 = every sample
    samples: dict[int, RequestOutput] = field(default_factory=dict)  # every finished sample (usage counts them all)
    echo_logprobs: bool = False  # echo with logprobs: the logprobs object starts with the prompt's tokens
    echo_only: bool = False  # echo with max_tokens 0: the one token the engine had to generate is not shown
    top: int = 0  # alternatives per token the client asked for (a batch may score more prompt alternatives)
    prompt_logprobs: int | None = None  # vLLM's prompt_logprobs=k: return `prompt_logprobs` (per choice / chat)

    def unfinished_ids(self) -> list[str]:
        return [r.request_id for r in self.requests if r.index not in self.finished]

    @property
    def per_prompt(self) -> int:
        """Engine requests per prompt (best_of, else n)."""
        return len(self.requests) // len(self.prompts)

    @property
    def choices_per_prompt(self) -> int:
        return self.keep or self.per_prompt

    def keep_best(self) -> None:
        """best_of: of each prompt's finished samples keep the `keep` of highest cumulative log-probability (best
        first, as choices 0.. of that prompt); every sample stays in `samples` for the usage."""
        self.samples = dict(self.finished)
        per, keep = self.per_prompt, self.keep
        if not keep or keep == per:
            return

        def score(out: RequestOutput) -> float:
            total = sum(out.logprobs)
            return total if out.error is None and math.isfinite(total) else -math.inf

        best: dict[int, RequestOutput] = {}
        for i in range(len(self.prompts)):
            outs = sorted((self.finished[i * per + j] for j in range(per)), key=score, reverse=True)
            best.update({i * keep + k: out for k, out in enumerate(outs[:keep])})
        self.finished = best


class Responder:
    """Formats outputs; `tokenizer` (None for dummy models) turns token ids into text."""

    def __init__(self, tokenizer: Any):
        self.tokenizer = tokenizer

    def decode(self, ids: list[int]) -> str:
        return "" if self.tokenizer is None else self.tokenizer.decode(ids, skip_special_tokens=True)

    def usage(self, job: Job) -> dict:
        """Every sample's tokens (best_of ones not returned included), the prompt's reuse from its first sample."""
        n, samples = job.per_prompt, job.samples or job.finished
        firsts = [samples[i * n].metrics for i in range(len(job.prompts)) if i * n in samples]
        return usage_object(
            sum(len(p) for p in job.prompts),
            0 if job.echo_only else sum(len(o.token_ids) for o in samples.values()),
            sum(m.reused_tokens for m in firsts),
            sum(m.base_reused_tokens for m in firsts),
        )

    def _token_strings(self, ids: list[int]) -> list[str]:
        return [self.decode([t]) if self.tokenizer is not None else str(t) for t in ids]

    def _logprobs(
        self, job: Job, ids: list[int], logprobs: list[float], tops: list[list[tuple[int, float]]], offset: int = 0
    ) -> dict | None:
        """OpenAI's logprobs object: chat `content` entries with their `top_logprobs`, or the legacy completions
        lists (`top_logprobs` one {token: logprob} dict per token when alternatives were asked for)."""
        if not job.logprobs:
            return None
        tokens = self._token_strings(ids)
        tops = tops if len(tops) == len(ids) else [[] for _ in ids]
        alts = [list(self._named(top).items()) for top in tops]
        if job.kind == "chat":
            content = [
                {"token": s, "logprob": lp, "bytes": list(s.encode()),
                 "top_logprobs": [{"token": a, "logprob": alp, "bytes": list(a.encode())} for a, alp in alt]}
                for s, lp, alt in zip(tokens, logprobs, alts)
            ]  # fmt: skip
            return {"content": content}
        offsets, at = [], offset
        for s in tokens:
            offsets.append(at)
            at += len(s)
        top = [dict(alt) for alt in alts] if any(alts) else None
        return {"tokens": tokens, "token_logprobs": list(logprobs), "top_logprobs": top, "text_offset": offsets}

    def _named(self, top: list[tuple[int, float]]) -> dict[str, float]:
        """Alternatives keyed by their text, as the legacy API's `top_logprobs` dicts are."""
        return dict(zip(self._token_strings([t for t, _ in top]), (lp for _, lp in top)))

    def _prompt_part(self, job: Job, out: RequestOutput, echo: str) -> dict:
        """The legacy logprobs lists of the echoed prompt. Position 0 has nothing before it to be scored from: its
        logprob and its alternatives are null, as OpenAI and vLLM send them. Offsets run over the token texts and
        never past the echoed text (a character split over tokens decodes longer piece by piece)."""
        ids = out.prompt_token_ids
        scored = out.prompt_logprobs or [None] * len(ids)
        tokens = self._token_strings(ids)
        offsets, at = [], 0
        for piece in tokens:
            offsets.append(min(at, len(echo)))
            at += len(piece)
        logprobs = [None if e is None else _finite(e.logprob) for e in scored]
        top = None
        if job.top:
            top = [None if e is None else {s: _finite(v) for s, v in self._named(e.top[: job.top]).items()}
                   for e in scored]  # fmt: skip
        return {"tokens": tokens, "token_logprobs": logprobs, "top_logprobs": top, "text_offset": offsets}

    @staticmethod
    def _join(prompt: dict, generated: dict | None) -> dict:
        """The echoed prompt's logprobs lists followed by the generated tokens' (one object, as the text is one)."""
        if generated is None:
            return prompt
        joined = {key: prompt[key] + generated[key] for key in ("tokens", "token_logprobs", "text_offset")}
        first, then = prompt["top_logprobs"], generated["top_logprobs"]
        if first is None and then is None:
            joined["top_logprobs"] = None
        else:
            joined["top_logprobs"] = (first or [None] * len(prompt["tokens"])) + (
                then or [None] * len(generated["tokens"])
            )
        return joined

    def _vllm_prompt_logprobs(self, scored: list[PromptLogprob | None] | None, k: int) -> list[dict | None] | None:
        """vLLM's `prompt_logprobs`: per prompt position null (position 0) or {token id: {logprob, rank,
        decoded_token}}, the prompt's own token first (its rank from the engine: 1 + the tokens more likely), then
        its k most likely alternatives (ranks 1..k)."""
        if scored is None:
            return None
        ids = sorted({t for e in scored if e is not None for t in (e.token, *(a for a, _ in e.top[:k]))})
        names = dict(zip(ids, self._token_strings(ids)))
        out: list[dict | None] = []
        for e in scored:
            if e is None:
                out.append(None)
                continue
            ranks = {t: r for r, (t, _) in enumerate(e.top[:k], 1)}
            entry = {str(e.token): {"logprob": _finite(e.logprob), "rank": e.rank or ranks.get(e.token),
                                    "decoded_token": names[e.token]}}  # fmt: skip
            for t, lp in e.top[:k]:
                entry.setdefault(str(t), {"logprob": _finite(lp), "rank": ranks[t], "decoded_token": names[t]})
            out.append(entry)
        return out

    def _completion_choice(self, job: Job, index: int, out: RequestOutput) -> dict:
        """A text completion choice: the echoed prompt (scored with echo_logprobs), then the generated text."""
        echo = job.echo[index // job.choices_per_prompt] if job.echo else ""
        if job.echo_only:
            lp = self._logprobs(job, [], [], [], len(echo))
            text, reason = "", "length"  # vLLM's finish_reason for max_tokens 0
        else:
            n_out = len(out.token_ids)
            lp = self._logprobs(job, out.token_ids, out.logprobs[:n_out], out.top_logprobs[:n_out], len(echo))
            text, reason = out.text, out.finish_reason
        if job.echo_logprobs:
            lp = self._join(self._prompt_part(job, out, echo), lp)
        choice = {"index": index, "text": echo + text, "logprobs": lp, "finish_reason": reason}
        if job.prompt_logprobs is not None:
            choice["prompt_logprobs"] = self._vllm_prompt_logprobs(out.prompt_logprobs, job.prompt_logprobs)
        return choice

    def response(self, job: Job) -> dict:
        choices = []
        for index in sorted(job.finished):
            out = job.finished[index]
            if job.kind != "chat":
                choices.append(self._completion_choice(job, index, out))
                continue
            n_out = len(out.token_ids)
            lp = self._logprobs(job, out.token_ids, out.logprobs[:n_out], out.top_logprobs[:n_out])
            message, called = message_of(job.tools, out.text)
            reason = "tool_calls" if called and out.finish_reason == "stop" else out.finish_reason
            choices.append({"index": index, "message": message, "logprobs": lp, "finish_reason": reason})
        obj = "chat.completion" if job.kind == "chat" else "text_completion"
        body = {
            "id": job.id,
            "object": obj,
            "created": job.created,
            "model": job.model,
            "choices": choices,
            "usage": self.usage(job),
            "system_fingerprint": None,
        }
        if job.kind == "chat" and job.prompt_logprobs is not None and job.finished:  # vLLM: one prompt, top level
            first = job.finished[min(job.finished)]
            body["prompt_logprobs"] = self._vllm_prompt_logprobs(first.prompt_logprobs, job.prompt_logprobs)
        return body

    def _chunk(self, job: Job, choices: list[dict], usage_obj: dict | None = None) -> str:
        obj = "chat.completion.chunk" if job.kind == "chat" else "text_completion"
        chunk = {"id": job.id, "object": obj, "created": job.created, "model": job.model, "choices": choices}
        if job.include_usage:
            chunk["usage"] = usage_obj
        return sse(chunk)

    def _choice_delta(self, job: Job, index: int, text: str, reason: str | None, lp: dict | None) -> dict:
        if job.kind == "chat":
            delta = {"content": text} if text else {}
            return {"index": index, "delta": delta, "logprobs": lp, "finish_reason": reason}
        return {"index": index, "text": text, "logprobs": lp, "finish_reason": reason}

    def _completion_delta(
        self, job: Job, index: int, out: RequestOutput, text: str, offsets: dict[int, int], pending: dict[int, str]
    ) -> dict | None:
        """A streamed text completion's choice for one output (None: nothing to send). `offsets` keeps text_offset
        counting from the start of the choice's text, as in the full response; with echo_logprobs the choice's
        first chunk carries the echoed prompt and its scores (`pending`), which exist once the first token is out."""
        new = [] if job.echo_only else out.new_token_ids
        text = "" if job.echo_only else text
        span = slice(len(out.token_ids) - len(new), len(out.token_ids))
        at = offsets.get(index, 0)
        lp = self._logprobs(job, new, out.logprobs[span], out.top_logprobs[span], at)
        if lp is not None:
            offsets[index] = at + sum(map(len, lp["tokens"]))
        if index in pending:
            echo = pending.pop(index)
            text, lp = echo + text, self._join(self._prompt_part(job, out, echo), lp)
        if not (text or lp or out.finished):
            return None
        reason = ("length" if job.echo_only else out.finish_reason) if out.finished else None
        return self._choice_delta(job, index, text, reason, lp)

    async def events(self, job: Job, queue: asyncio.Queue) -> AsyncIterator[str]:
        n = job.per_prompt  # (no best_of when streaming)
        streams = {
            r.index: TextStream(self.tokenizer, r.params.stop, r.params.include_stop_str_in_output)
            for r in job.requests
        }
        calls = {r.index: ToolStream(job.tools) for r in job.requests} if job.tools is not None else {}
        pending: dict[int, str] = {}  # echo_logprobs: the prompt goes out with its scores, i.e. with the first tokens
        offsets: dict[int, int] = {}  # completions: where the choice's next token starts in its text (text_offset)
        for r in job.requests:  # the role (chat) or the echoed prompt first: headers and a first byte go out now
            if job.kind == "chat":
                first = {
                    "index": r.index,
                    "delta": {"role": "assistant", "content": ""},
                    "logprobs": None,
                    "finish_reason": None,
                }
                yield self._chunk(job, [first])
            elif job.echo:
                offsets[r.index] = len(job.echo[r.index // n])
                if job.echo_logprobs:
                    pending[r.index] = job.echo[r.index // n]
                else:
                    yield self._chunk(job, [self._choice_delta(job, r.index, job.echo[r.index // n], None, None)])
        while len(job.finished) < len(job.requests):
            item = await queue.get()
            if item.error is not None:  # an error event, then [DONE]: the client sees why the stream ended
                code = "engine_error" if item.status == 500 else "service_unavailable"
                yield sse(APIError(item.status, item.error, None, code).body())
                break
            out = item.output
            stream = streams[item.index]
            text = stream.final(out.text) if out.finished else stream.delta(out.token_ids)
            if job.kind != "chat":
                choice = self._completion_delta(job, item.index, out, text, offsets, pending)
                if choice is not None:
                    yield self._chunk(job, [choice])
                if out.finished:
                    job.finished[item.index] = out
                continue
            new = out.new_token_ids
            span = slice(len(out.token_ids) - len(new), len(out.token_ids))
            lp = self._logprobs(job, new, out.logprobs[span], out.top_logprobs[span])
            if item.index in calls:  # tool calls: content and call deltas from the parser, logprobs alongside
                tool_stream = calls[item.index]
                if out.finished:
                    deltas, called = tool_stream.finish(text)
                else:
                    deltas, called = tool_stream.delta(text), False
                for k, delta in enumerate(deltas):
                    chunk = {"index": item.index, "delta": delta, "logprobs": lp if k == 0 else None,
                             "finish_reason": None}  # fmt: skip
                    yield self._chunk(job, [chunk])
                if out.finished:
                    reason = "tool_calls" if called and out.finish_reason == "stop" else out.finish_reason
                    last = {"index": item.index, "delta": {}, "logprobs": None if deltas else lp}
                    last["finish_reason"] = reason
                    yield self._chunk(job, [last])
                elif lp and not deltas:
                    yield self._chunk(job, [self._choice_delta(job, item.index, "", None, lp)])
            elif text or lp or out.finished:
                reason = out.finish_reason if out.finished else None
                yield self._chunk(job, [self._choice_delta(job, item.index, text, reason, lp)])
            if out.finished:
                job.finished[item.index] = out
        else:
            if job.include_usage:
                yield self._chunk(job, [], self.usage(job))
        yield sse("[DONE]")


def _finite(logprob: float) -> float:
    """A log-probability JSON can carry: -inf and NaN become LOWEST_LOGPROB."""
    return logprob if logprob > LOWEST_LOGPROB else LOWEST_LOGPROB
