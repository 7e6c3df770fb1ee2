"""A request as the engine sees it: tokens, adapter, cache blocks, progress and metrics. Plain Python."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from enum import Enum

from lragent.sampling import SamplingParams


class SequenceStatus(Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass
class RequestMetrics:
    prompt_tokens: int = 0
    reused_tokens: int = 0  # prompt tokens served entirely from the cache (no forward pass)
    base_reused_tokens: int = 0  # prompt tokens whose keys and base values came from the cache
    computed_tokens: int = 0  # prompt tokens run through the model, LR prefill and recomputation included
    generated_tokens: int = 0
    preemptions: int = 0
    arrival_time: float = field(default_factory=time.perf_counter)
    first_token_time: float | None = None
    finish_time: float | None = None

    @property
    def ttft_s(self) -> float | None:
        return None if self.first_token_time is None else self.first_token_time - self.arrival_time

    @property
    def latency_s(self) -> float | None:
        return None if self.finish_time is None else self.finish_time - self.arrival_time

    def as_dict(self) -> dict:
        return {
            "prompt_tokens": self.prompt_tokens,
            "reused_tokens": self.reused_tokens,
            "base_reused_tokens": self.base_reused_tokens,
            "computed_tokens": self.computed_tokens,
            "generated_tokens": self.generated_tokens,
            "preemptions": self.preemptions,
            "ttft_s": self.ttft_s,
            "latency_s": self.latency_s,
        }


class Sequence:
    def __init__(self, request_id: str, prompt_ids: list[int], params: SamplingParams, adapter: str, slot: int):
        self.request_id = request_id
        self.token_ids = list(prompt_ids)
        self.prompt_len = len(prompt_ids)
        self.prompt_ids = list(prompt_ids)  # handed to every output of this request as is (no per-step copy)
        self.params = params
        self.adapter = adapter  # name ("" for the base model)
        self.lora_slot = slot
        self.status = SequenceStatus.WAITING
        self.base_blocks: list[int] = []  # key/value pool block table
        self.lr_blocks: list[int] = []  # LR pool block table
        self.num_computed = 0  # positions < this have every cache entry this agent needs
        self.num_base_cached = 0  # positions < this have keys and base values in the pool
        self.base_registered = 0  # leading base blocks already published to the prefix index
        self.lr_registered = 0
        self.base_hashes: list[int] = []  # hash chain of the published base blocks (extended, never recomputed)
        self.lr_hashes: list[int] = []
        self.base_ns = ""  # prefix-cache namespaces of the key/value and LR pools (SharingScheme.namespaces)
        self.lr_ns = ""
        self.error: str | None = None  # why the engine failed this request alone (finish_reason "error")
        self.finish_reason: str | None = None
        self.text = ""
        self.stop_text_len: int | None = None
        self.logprobs: list[float] = []
        self.metrics = RequestMetrics(prompt_tokens=len(prompt_ids))
        self.generator = None  # torch.Generator when a seed is given

    def __len__(self) -> int:
        return len(self.token_ids)

    @property
    def output_ids(self) -> list[int]:
        return self.token_ids[self.prompt_len :]

    @property
    def num_pending(self) -> int:
        """Tokens to run through the model before the next sample."""
        return len(self.token_ids) - self.num_computed

    @property
    def is_finished(self) -> bool:
        return self.status is SequenceStatus.FINISHED
