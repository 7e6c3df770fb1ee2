"""A request as the engine sees it: tokens, adapter, cache blocks, progress and metrics. Plain Python."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, NamedTuple

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


@dataclass
class BlockTable:
    """One sequence's blocks in one declared pool, and how far they are filled and published."""

    namespace: str = ""  # what this pool's blocks are keyed by for this request (SharingScheme.namespaces)
    blocks: list[int] = field(default_factory=list)
    hashes: list[int] = field(default_factory=list)  # hash chain of the published blocks (extended, never redone)
    registered: int = 0  # leading blocks already published to the prefix index
    cached: int = 0  # positions < this have entries in this pool
    # nothing more of it is published: its later entries were computed under another key than `namespace` (the
    # adapter set changed under STACKED_LR while it ran); what it published before stays valid
    sealed: bool = False


KV, LR = "kv", "lr"  # the pool names (lragent.cache.sharing.PoolKind values) the engine's kernels read


class PromptLogprob(NamedTuple):
    """A prompt token's log-probability given the tokens before it, and the most likely alternatives there."""

    token: int
    logprob: float
    top: list[tuple[int, float]]
    rank: int = 0  # 1 + how many tokens are more likely (vLLM's rank); 0 where unknown


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
        self.namespaces: dict[str, str] = {}  # pool name -> prefix-cache namespace of this request
        self.cache_salt = ""  # the tenant the namespaces separate (kept to rebuild them when the adapter set changes)
        self.tables: dict[str, BlockTable] = {}  # one per declared pool (created by the block manager)
        self.num_computed = 0  # positions < this have every cache entry this agent needs
        self.finish_reason: str | None = None
        self.error: str | None = None  # why the engine failed this request alone (finish_reason "error")
        self.text = ""
        self.stop_text_len: int | None = None
        self.logprobs: list[float] = []
        self.top_logprobs: list[list[tuple[int, float]]] = []  # per generated token, when asked for
        # per prompt position, when asked for (params.prompt_logprobs): None before prompt_logprobs_start
        self.prompt_logprobs: list[PromptLogprob | None] | None = None
        if params.prompt_logprobs is not None:
            self.prompt_logprobs = [None] * len(prompt_ids)
        self.metrics = RequestMetrics(prompt_tokens=len(prompt_ids))
        self.seed = 0  # keys this request's random draws (with the position drawn): batch-independent
        self.grammar: Any = None  # GrammarState of a structured-output request (lragent.engine.structured)
        self.leader: Sequence | None = None  # a sample of the same prompt this one waits for (n > 1: shared blocks)

    def __len__(self) -> int:
        return len(self.token_ids)

    def table(self, pool: str) -> BlockTable:
        if pool not in self.tables:
            self.tables[pool] = BlockTable(self.namespaces.get(pool, ""))
        return self.tables[pool]

    # the KV and LR pools by name: what the model runner and the graph inputs read
    @property
    def base_blocks(self) -> list[int]:
        return self.table(KV).blocks

    @base_blocks.setter
    def base_blocks(self, blocks: list[int]) -> None:
        self.table(KV).blocks = blocks

    @property
    def lr_blocks(self) -> list[int]:
        return self.tables[LR].blocks if LR in self.tables else []

    @lr_blocks.setter
    def lr_blocks(self, blocks: list[int]) -> None:
        self.table(LR).blocks = blocks

    @property
    def num_base_cached(self) -> int:
        """Positions < this have keys and base values in the pool (LR prefill computes only the rest)."""
        return self.tables[KV].cached if KV in self.tables else self.num_computed

    @num_base_cached.setter
    def num_base_cached(self, value: int) -> None:
        self.table(KV).cached = value

    def scored_positions(self, start: int, count: int) -> range:
        """Of the positions [start, start + count) a step computes, those whose logits give a prompt log-prob
        (position p scores prompt token p + 1; the last prompt position samples instead)."""
        first = self.params.logits_from
        if first is None:
            return range(0)
        return range(max(start, first), min(start + count, self.prompt_len - 1))

    def record_prompt_logprob(self, position: int, scored: PromptLogprob) -> None:
        """A step scored this prompt position (again, after a preemption: the same value)."""
        assert self.prompt_logprobs is not None, "scored a request that asked for no prompt log-probs"
        self.prompt_logprobs[position] = scored

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

    @property
    def ready(self) -> bool:
        """Admissible: no leader, or the leader has computed (and published) its prompt, so this sample finds the
        prompt's blocks in the prefix cache instead of computing them again."""
        lead = self.leader
        return lead is None or lead.is_finished or len(lead.token_ids) > lead.prompt_len
