"""A scripted stand-in for `lragent.LLM` with the same `generate()` contract, for tests and dry runs.

    llm = ScriptedLLM(lambda role, prompt_text: "Finish[" if ... else "...")
    outs = llm.generate(prompts, adapter=["plan", "action"], sampling_params=SamplingParams(...))

The tokenizer is byte-level (one id per UTF-8 byte) so no model files are needed. Metrics mimic a prefix cache
shared by all roles: `reused_tokens` is the longest prefix shared with one of the last 8 prompts.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple


@dataclass
class SamplingParams:
    max_tokens: int = 128
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    stop: list[str] = field(default_factory=list)
    seed: int | None = None
    choice: list[str] | None = None  # the engine's constraint: the output is exactly one of these strings
    prompt_logprobs: int | None = None  # score the prompt from prompt_logprobs_start on (see ScriptedLLM.scorer)
    prompt_logprobs_start: int = 0


class ByteTokenizer:
    """encode: UTF-8 bytes -> ids 0..255; decode: back (invalid bytes replaced)."""

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return bytes(ids).decode("utf-8", errors="replace")


class FakeLogprob(NamedTuple):
    token: int
    logprob: float
    top: list[tuple[int, float]]


@dataclass
class FakeOutput:
    text: str
    token_ids: list[int]
    metrics: dict[str, float]
    prompt_logprobs: list[FakeLogprob | None] | None = None


@dataclass
class CallLog:
    role: str
    prompt: str
    params: Any


class ScriptedLLM:
    """`script(role, prompt_text) -> output text`; output is cut at the first stop string like the engine.
    `scorer(role, context_text, continuation_text) -> log-prob` answers requests with prompt_logprobs (the total is
    put on the first scored token, 0 on the rest); the default prefers the shorter continuation."""

    def __init__(self, script: Callable[[str, str], str], scorer: Callable[[str, str, str], float] | None = None):
        self.script = script
        self.scorer = scorer or (lambda role, context, continuation: -float(len(continuation)))
        self.tokenizer = ByteTokenizer()
        self.log: list[CallLog] = []
        self.batches: list[int] = []
        self._seen: list[list[int]] = []

    def generate(self, prompts: Sequence[Any], adapter: str | Sequence[str] = "plan", sampling_params: Any = None):
        roles = [adapter] * len(prompts) if isinstance(adapter, str) else list(adapter)
        params = sampling_params if isinstance(sampling_params, list) else [sampling_params] * len(prompts)
        self.batches.append(len(prompts))
        outs = []
        for prompt, role, sp in zip(prompts, roles, params):
            ids = self.tokenizer.encode(prompt) if isinstance(prompt, str) else list(prompt)
            text_in = self.tokenizer.decode(ids)
            self.log.append(CallLog(role, text_in, sp))
            text = self.script(role, text_in)
            for s in getattr(sp, "stop", None) or []:
                if s in text:
                    text = text[: text.index(s)]
            if getattr(sp, "choice", None):
                text = closest_choice(text, sp.choice)
            reused = max((_common_prefix(ids, seen) for seen in self._seen[-8:]), default=0)
            self._seen.append(ids)
            out_ids = self.tokenizer.encode(text)
            metrics = {
                "prompt_tokens": len(ids),
                "reused_tokens": reused,
                "computed_tokens": len(ids) - reused,
                "ttft_s": 0.001,
            }
            outs.append(FakeOutput(text, out_ids, metrics, self._prompt_logprobs(role, ids, sp)))
        return outs

    def _prompt_logprobs(self, role: str, ids: list[int], sp: Any) -> list[FakeLogprob | None] | None:
        if getattr(sp, "prompt_logprobs", None) is None:
            return None
        start = max(1, sp.prompt_logprobs_start)
        out: list[FakeLogprob | None] = [None] * len(ids)
        if start < len(ids):
            total = self.scorer(role, self.tokenizer.decode(ids[:start]), self.tokenizer.decode(ids[start:]))
            for p in range(start, len(ids)):
                out[p] = FakeLogprob(ids[p], total if p == start else 0.0, [])
        return out


def closest_choice(text: str, choices: Sequence[str]) -> str:
    """What a choice-constrained engine could have produced for a script's `text`: the choice equal to it (stripped),
    else the longest choice it starts with, else the longest choice sharing its longest prefix (ties: list order)."""
    text = text.strip()
    if text in choices:
        return text
    starts = [c for c in choices if text.startswith(c)]
    if starts:
        return max(starts, key=len)
    return max(choices, key=lambda c: len(os.path.commonprefix([c, text])))


def _common_prefix(a: list[int], b: list[int]) -> int:
    """Length of the common prefix (binary search over C-speed slice comparisons)."""
    lo, hi = 0, min(len(a), len(b))
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if a[:mid] == b[:mid]:
            lo = mid
        else:
            hi = mid - 1
    return lo
