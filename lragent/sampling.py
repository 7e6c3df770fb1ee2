"""Sampling parameters of one request, validated when built.

Validation is strict because a bad value must fail its own request at submission, never a later engine step that
serves other requests too: every message starts with the field's name (the server reports it as the `param`).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Any

# Temperatures below this are treated as greedy: dividing logits by a subnormal temperature overflows to inf and the
# softmax becomes NaN (vLLM uses the same floor).
GREEDY_TEMPERATURE = 1e-5
INT64 = 1 << 63
MAX_TOP_LOGPROBS = 20  # the OpenAI API's limit on alternatives per token
MAX_LOGIT_BIAS = 1024  # entries per request
MAX_N = 256  # samples of one prompt
CONSTRAINTS = ("json_schema", "json_object", "regex", "grammar", "choice")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_real(value: Any) -> bool:
    return (isinstance(value, (int, float)) and not isinstance(value, bool)) and math.isfinite(value)


def _string_list(name: str, value: Any) -> list[str]:
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, (list, tuple)) or not all(isinstance(s, str) and s for s in items):
        raise ValueError(f"{name} must be a non-empty string or a list of non-empty strings, got {value!r:.80}")
    return list(items)


def _id_list(name: str, value: Any) -> list[int]:
    if not isinstance(value, (list, tuple)) or not all(_is_int(t) and 0 <= t < INT64 for t in value):
        raise ValueError(f"{name} must be a list of non-negative integer token ids, got {value!r:.80}")
    return list(value)


def _logit_bias(value: Any) -> dict[int, float]:
    """{token id: bias in [-100, 100]} (OpenAI's range; JSON object keys arrive as strings of digits)."""
    if not isinstance(value, dict) or len(value) > MAX_LOGIT_BIAS:
        raise ValueError(f"logit_bias must be a mapping of at most {MAX_LOGIT_BIAS} token ids to numbers")
    out = {}
    for key, bias in value.items():
        token = int(key) if isinstance(key, str) and key.isdigit() and len(key) < 19 else key
        if not _is_int(token) or token < 0 or not _is_real(bias) or not -100.0 <= bias <= 100.0:
            raise ValueError(f"logit_bias entries must map token ids to numbers in [-100, 100], got {key!r:.40}")
        out[token] = float(bias)
    return out


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int = 64
    n: int = 1  # samples of the prompt (LLM.generate returns them in order; they share the prompt's cache blocks)
    best_of: int | None = None  # draw this many samples (>= n) and keep the n with the highest cumulative logprob
    temperature: float = 1.0  # 0 (or below GREEDY_TEMPERATURE) means greedy
    top_p: float = 1.0
    top_k: int = -1  # -1 or 0: no top-k cut
    min_p: float = 0.0  # drop tokens below min_p x the most likely token's probability
    repetition_penalty: float = 1.0  # > 1 discourages tokens of the prompt and output (CTRL-style, as vLLM/HF)
    presence_penalty: float = 0.0  # subtracted once from the logit of every token already generated
    frequency_penalty: float = 0.0  # subtracted per occurrence in the generated text
    logit_bias: dict[int, float] = field(default_factory=dict)  # added to the logits before everything else
    seed: int | None = None  # the same seed gives the same tokens whatever else is in the batch
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    include_stop_str_in_output: bool = False
    logprobs: bool = False  # return the chosen token's log-probability
    top_logprobs: int = 0  # and this many most likely alternatives per token (needs logprobs)
    # log-probabilities of the prompt's own tokens (vLLM's prompt_logprobs: None = off, k = each prompt token's own
    # plus its k most likely alternatives), for prompt positions >= prompt_logprobs_start (SGLang's
    # logprob_start_len): the request may reuse cached entries before that position only, since a cached position
    # has no logits. Scoring continuations of a long shared context sets the start at the continuation.
    prompt_logprobs: int | None = None
    prompt_logprobs_start: int = 0
    # structured output (at most one): the output must match it (lragent.engine.structured)
    json_schema: dict | str | None = None  # a JSON schema (dict or its JSON text)
    json_object: bool = False  # any JSON object
    regex: str | None = None
    grammar: str | None = None  # EBNF (GBNF-style) grammar text
    choice: list[str] | None = None  # exactly one of these strings

    def __post_init__(self) -> None:
        object.__setattr__(self, "stop", _string_list("stop", self.stop))
        object.__setattr__(self, "stop_token_ids", _id_list("stop_token_ids", self.stop_token_ids))
        object.__setattr__(self, "logit_bias", _logit_bias(self.logit_bias))
        self._check_numbers()
        for name in ("ignore_eos", "include_stop_str_in_output", "logprobs", "json_object"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be a bool, got {getattr(self, name)!r:.80}")
        self._check_constraint()

    def _check_numbers(self) -> None:
        if not _is_int(self.n) or not 1 <= self.n <= MAX_N:
            raise ValueError(f"n must be an integer in [1, {MAX_N}], got {self.n!r:.80}")
        if self.best_of is not None:
            if not _is_int(self.best_of) or not self.n <= self.best_of <= MAX_N:
                raise ValueError(f"best_of must be an integer in [n, {MAX_N}] (n={self.n}), got {self.best_of!r:.80}")
            if self.best_of > self.n and self.temperature < GREEDY_TEMPERATURE:
                raise ValueError("best_of > n needs sampling (temperature > 0): greedy samples are all the same")
        if not _is_int(self.max_tokens) or self.max_tokens < 1:
            raise ValueError(f"max_tokens must be a positive integer, got {self.max_tokens!r:.80}")
        ranges = {
            "temperature": (0.0, 100.0), "top_p": (0.0, 1.0), "min_p": (0.0, 1.0),
            "repetition_penalty": (0.0, 100.0), "presence_penalty": (-2.0, 2.0), "frequency_penalty": (-2.0, 2.0),
        }  # fmt: skip
        for name, (low, high) in ranges.items():
            value = getattr(self, name)
            if not _is_real(value) or not low <= value <= high:
                raise ValueError(f"{name} must be a number in [{low:g}, {high:g}], got {value!r:.80}")
        if self.top_p == 0.0:
            raise ValueError("top_p must be a number in (0, 1], got 0")
        if self.repetition_penalty == 0.0:
            raise ValueError("repetition_penalty must be positive, got 0")
        if not _is_int(self.top_k) or self.top_k < -1:
            raise ValueError(f"top_k must be -1 (off) or a non-negative integer, got {self.top_k!r:.80}")
        if self.seed is not None and (not _is_int(self.seed) or not -INT64 <= self.seed < INT64):
            raise ValueError(f"seed must be a 64-bit integer or None, got {self.seed!r:.80}")
        if not _is_int(self.top_logprobs) or not 0 <= self.top_logprobs <= MAX_TOP_LOGPROBS:
            raise ValueError(
                f"top_logprobs must be an integer in [0, {MAX_TOP_LOGPROBS}], got {self.top_logprobs!r:.80}"
            )
        k = self.prompt_logprobs
        if k is not None and (not _is_int(k) or not 0 <= k <= MAX_TOP_LOGPROBS):
            raise ValueError(f"prompt_logprobs must be None or an integer in [0, {MAX_TOP_LOGPROBS}], got {k!r:.80}")
        if not _is_int(self.prompt_logprobs_start) or self.prompt_logprobs_start < 0:
            raise ValueError(
                f"prompt_logprobs_start must be a non-negative integer, got {self.prompt_logprobs_start!r:.80}"
            )

    def _check_constraint(self) -> None:
        """Shapes only; whether a schema / regex / grammar compiles is checked when the request is added."""
        given = [name for name in CONSTRAINTS if getattr(self, name) not in (None, False)]
        if len(given) > 1:
            raise ValueError(f"{given[0]} cannot be combined with {given[1]}: give one output constraint")
        schema = self.json_schema
        if isinstance(schema, str):
            try:
                schema = json.loads(schema)
            except ValueError:
                raise ValueError("json_schema must be a JSON object (or its text)") from None
        if schema is not None and not isinstance(schema, dict):
            raise ValueError("json_schema must be a JSON object (or its text)")
        for name in ("regex", "grammar"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, str) or not value):
                raise ValueError(f"{name} must be a non-empty string")
        if self.choice is not None and (
            not isinstance(self.choice, (list, tuple)) or not self.choice
            or not all(isinstance(c, str) and c for c in self.choice)
        ):  # fmt: skip
            raise ValueError("choice must be a non-empty list of non-empty strings")

    @property
    def samples(self) -> int:
        """How many sequences the prompt forks into: best_of when given, else n."""
        return self.best_of if self.best_of is not None else self.n

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_TEMPERATURE

    @property
    def constrained(self) -> bool:
        return any(getattr(self, name) not in (None, False) for name in CONSTRAINTS)

    @property
    def logits_from(self) -> int | None:
        """The first prompt position whose logits the request needs (the one before its first scored token), or
        None: the prefix cache may serve the request's positions before this one only."""
        if self.prompt_logprobs is None:
            return None
        return max(self.prompt_logprobs_start, 1) - 1

    @property
    def penalized(self) -> bool:
        return self.repetition_penalty != 1.0 or self.presence_penalty != 0.0 or self.frequency_penalty != 0.0
