"""Continuous batching: which sequences run in the next step, and how many of their tokens. Plain Python.

Prefill work (new requests, unfinished prompt chunks) goes first, up to a token budget; otherwise every running
sequence decodes one token. When the cache cannot grow a decoding sequence, the most recently admitted one is
preempted: its blocks are released (they stay findable in the prefix index) and it is recomputed later.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from lragent.engine.block_manager import BlockManager
from lragent.engine.sequence import Sequence, SequenceStatus


@dataclass
class ScheduledBatch:
    """One step's work. The one place that decides which sequences sample: those whose pending tokens all run."""

    seqs: list[Sequence]
    num_tokens: list[int]  # tokens each sequence computes in this step
    is_prefill: bool
    samples: list[bool] = field(default_factory=list)  # per sequence: gets its next token this step
    # tokens each sequence has in flight beyond what the host knows (async scheduling: the step launched before the
    # previous one's tokens arrived computes the position after them)
    ahead: int = 0

    def __post_init__(self) -> None:
        if not self.samples:
            self.samples = [s.num_computed + n == len(s) for s, n in zip(self.seqs, self.num_tokens)]

    @property
    def total_tokens(self) -> int:
        return sum(self.num_tokens)

    @property
    def sampling_seqs(self) -> list[Sequence]:
        return [s for s, sampled in zip(self.seqs, self.samples) if sampled]


class Scheduler:
    def __init__(self, block_manager: BlockManager, max_num_seqs: int, max_num_batched_tokens: int):
        self.blocks = block_manager
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> ScheduledBatch | None:
        batch = self._schedule_prefill()
        return batch if batch is not None else self._schedule_decode()

    def _schedule_prefill(self) -> ScheduledBatch | None:
        seqs: list[Sequence] = []
        counts: list[int] = []
        budget = self.max_num_batched_tokens
        for seq in self.running:  # prompts that did not fit one step's budget continue first
            if seq.num_pending > 1 and budget > 0:
                take = min(seq.num_pending, budget)
                seqs.append(seq)
                counts.append(take)
                budget -= take
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
            seq = self.waiting[0]
            if not seq.ready or not self.blocks.admit(seq):
                break  # FIFO: later requests wait too, so a long prompt cannot starve
            self.waiting.popleft()
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            if seq.metrics.computed_tokens == 0 and seq.metrics.preemptions == 0:
                seq.metrics.reused_tokens = seq.num_computed
                seq.metrics.base_reused_tokens = seq.num_base_cached
            take = min(seq.num_pending, budget)
            seqs.append(seq)
            counts.append(take)
            budget -= take
        return ScheduledBatch(seqs, counts, is_prefill=True) if seqs else None

    def _schedule_decode(self) -> ScheduledBatch | None:
        seqs: list[Sequence] = []
        queue = list(self.running)
        while queue:
            seq = queue.pop(0)
            while not self.blocks.can_append(seq):
                victim = queue.pop() if queue else seq
                self.preempt(victim)
                if victim is seq:
                    break
            else:
                self.blocks.append_slot(seq)
                seqs.append(seq)
        return ScheduledBatch(seqs, [1] * len(seqs), is_prefill=False) if seqs else None

    def schedule_ahead(self, seqs: list[Sequence]) -> ScheduledBatch | None:
        """The decode step after the one in flight over `seqs`, before its tokens are known (async scheduling): the
        step `schedule` would give next, or None when it could differ (requests waiting to be admitted, running
        sequences outside `seqs`) or the cache cannot grow every sequence by the in-flight token and the next one
        (the normal path preempts then)."""
        if not seqs or self.waiting or len(seqs) != len(self.running) or set(seqs) != set(self.running):
            return None
        if not all(self.blocks.can_append(s, ahead=1) for s in seqs):
            return None
        for s in seqs:
            self.blocks.append_slot(s, ahead=1)
        return ScheduledBatch(seqs, [1] * len(seqs), is_prefill=False, ahead=1)

    def preempt(self, seq: Sequence) -> None:
        self.blocks.release(seq)
        self.running.remove(seq)
        seq.status = SequenceStatus.WAITING
        seq.metrics.preemptions += 1
        self.waiting.appendleft(seq)

    def finish(self, seq: Sequence, reason: str) -> None:
        self.blocks.release(seq)
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        seq.status = SequenceStatus.FINISHED
        seq.finish_reason = reason
