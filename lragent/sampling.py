"""Sampling parameters of one request, validated when built.

Validation is strict because a bad value must fail its own request at submission, never a later engine step that
serves other requests too: every message starts with the field's name (the server reports it as the `param`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

# Temperatures below this are treated as greedy: dividing logits by a subnormal temperature overflows to inf and the
# softmax becomes NaN (vLLM uses the same floor).
GREEDY_TEMPERATURE = 1e-5
INT64 = 1 << 63


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


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int = 64
    temperature: float = 1.0  # 0 (or below GREEDY_TEMPERATURE) means greedy
    top_p: float = 1.0
    top_k: int = -1  # -1 or 0: no top-k cut
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    include_stop_str_in_output: bool = False
    logprobs: bool = False  # return the chosen token's log-probability

    def __post_init__(self) -> None:
        object.__setattr__(self, "stop", _string_list("stop", self.stop))
        object.__setattr__(self, "stop_token_ids", _id_list("stop_token_ids", self.stop_token_ids))
        if not _is_int(self.max_tokens) or self.max_tokens < 1:
            raise ValueError(f"max_tokens must be a positive integer, got {self.max_tokens!r:.80}")
        if not _is_real(self.temperature) or not 0.0 <= self.temperature <= 100.0:
            raise ValueError(f"temperature must be a number in [0, 100], got {self.temperature!r:.80}")
        if not _is_real(self.top_p) or not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be a number in (0, 1], got {self.top_p!r:.80}")
        if not _is_int(self.top_k) or self.top_k < -1:
            raise ValueError(f"top_k must be -1 (off) or a non-negative integer, got {self.top_k!r:.80}")
        if self.seed is not None and (not _is_int(self.seed) or not -INT64 <= self.seed < INT64):
            raise ValueError(f"seed must be a 64-bit integer or None, got {self.seed!r:.80}")
        for name in ("ignore_eos", "include_stop_str_in_output", "logprobs"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be a bool, got {getattr(self, name)!r:.80}")

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_TEMPERATURE
