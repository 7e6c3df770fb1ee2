"""CUDA graphs for short prefill chunks.

In an agent trajectory most prefill steps are short: an observation or a thought header of a few dozen tokens
appended after a long cached context. Such a step costs the GPU about what a decode step does (one read of the
weights and the chunk's keys), but run eagerly it launches the whole layer stack from Python: on an H200 with
Llama-3.1-8B a 24-token chunk took 22-34 ms eagerly against 5-6 ms for a graphed decode step (BENCHMARKS.md). A
graph per token bucket (16, 32, ..., `max_tokens`) replays it in one launch.

A step is padded to its bucket: token rows past its own write nowhere and use no adapter, and the grid's sequence
rows past its own run no tokens (`PrefillGraphInputs`). The attention grid and split-KV count follow the bucket,
never the step (the split count is sized for one sequence over `max_model_len` keys; split partials of empty key
ranges merge to nothing). A step that owes only some pools' entries (BASE_SHARED's LR prefill of tokens whose keys
another agent cached) computes every token's keys and base values in the graph and stores only the owed ones (slot
-1 for the rest): the cached entries are the same base-model values, so the step reads what the eager one does.
What a graph cannot replay runs eagerly, as before: prompt log-probs (their rows' logits come out of the forward),
DROIDSPEAK's layer pools, key adapters under sharing (their keys are materialised by host-sized launches), more
sequences or tokens than the largest bucket. Graphs share the decode graphs' memory pool (`DecodeGraphs.pool`).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

import torch

from lragent.engine.cuda_graph import capture_forward
from lragent.lora.metadata import LoRAMetadata
from lragent.models.context import ForwardContext

if TYPE_CHECKING:
    from lragent.engine.model_runner import ModelRunner, StepInputs

logger = logging.getLogger(__name__)

MAX_SEQS = 32  # sequences one prefill graph holds (an agent's chunk, often beside other trajectories' decode rows)
GRAPH_POOLS = frozenset({"kv", "lr"})  # the pools a graph writes (DROIDSPEAK's layer pools are not among them)


def prefill_buckets(max_tokens: int) -> list[int]:
    """16, 32, 64, ... below `max_tokens`, then `max_tokens` itself; none for 0 (prefill graphs off)."""
    if max_tokens <= 0:
        return []
    sizes, size = [], 16
    while size < max_tokens:
        sizes.append(size)
        size *= 2
    return sizes + [max_tokens]


class PrefillGraphs:
    def __init__(
        self,
        runner: ModelRunner,
        pool: Callable[[], torch.cuda._POOL_HANDLE],
        max_tokens: int,
        max_model_len: int,
        max_seqs: int = MAX_SEQS,
    ):
        self.model, self.bank, self.expand_values = runner.model, runner.bank, runner.expand_values
        self.device = runner.device
        self.sizes = prefill_buckets(max_tokens)
        self.max_seqs = max_seqs
        self.pool = pool
        # a scheme the graphs cannot serve leaves every prefill eager (see the module doc)
        self.enabled = bool(self.sizes) and set(runner.pools) <= GRAPH_POOLS and not runner.bank.key_lr
        top = self.sizes[-1] if self.sizes else 1
        self.attn = runner.backend.prefill_graph_inputs(
            runner.cache, runner.pools, max_seqs, top, max_model_len, self.device
        )
        self.tokens = torch.zeros(2, top, dtype=torch.int64, device=self.device)  # ids, positions
        host = torch.zeros(2, top, dtype=torch.int64)
        self.host_tokens = host.pin_memory() if self.device.type == "cuda" else host
        self._np_tokens = self.host_tokens.numpy()
        self._graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self.replays = 0  # steps replayed from a graph (a counter for tests and stats)

    def supports(self, step: StepInputs) -> bool:
        """A prefill step without prompt scores within the largest bucket (a step writing only some pools' entries,
        LR prefill after another agent's keys, computes every token's keys and stores only the ones it owes)."""
        rows = step.rows
        return (
            self.enabled
            and not rows.is_decode
            and step.scores is None
            and not step.hidden_reads[0]
            and 0 < len(step.token_ids) <= self.sizes[-1]
            and rows.num_seqs <= self.max_seqs
        )

    def bucket(self, tokens: int) -> int:
        return next(s for s in self.sizes if s >= tokens)

    def clear(self) -> None:
        """Forget every graph (the adapter stacks they captured are stale); the pool's owner drops the pool."""
        self._graphs.clear()

    def capture_all(self) -> None:
        """Capture every bucket now (start-up), so no request waits for a capture."""
        if self.enabled:
            for size in self.sizes:
                self._ensure(size)

    def run(self, step: StepInputs) -> torch.Tensor:
        """Final hidden states [tokens, hidden] of one prefill step replayed from its bucket's graph."""
        n = len(step.token_ids)
        size = self.bucket(n)
        graph, hidden = self._ensure(size)
        self.fill(step, size)
        graph.replay()
        self.replays += 1
        return hidden[:n]

    def fill(self, step: StepInputs, size: int) -> None:
        """Refill the static inputs in place (asynchronous uploads, after the previous ones have read the host
        mirrors)."""
        self.attn.fill(step.rows, step.token_slots, size, step.write_idx)  # waits for the last uploads first
        n, host = len(step.token_ids), self._np_tokens
        host[0, :n], host[1, :n] = step.token_ids, step.positions
        host[:, n:size] = 0
        self.tokens[:, :size].copy_(self.host_tokens[:, :size], non_blocking=True)
        if self.attn.uploaded is not None:
            self.attn.uploaded.record()

    def _context(self, size: int) -> ForwardContext:
        segments = self.bank.per_row_segments(*self.attn.lora_rows(size))
        positions = self.tokens[1, :size]
        meta = self.attn.metadata(size)
        return ForwardContext(meta, LoRAMetadata(segments, segments), self.expand_values, positions, positions)

    def _ensure(self, size: int) -> tuple[torch.cuda.CUDAGraph, torch.Tensor]:
        if size not in self._graphs:
            start = time.perf_counter()
            self.attn.pad(size)  # safe contents for the warm-up run (it really executes)
            self.tokens[:, :size] = 0
            self._graphs[size] = capture_forward(self.model, self.tokens[0, :size], self._context(size), self.pool())
            logger.debug("captured the prefill graph of %d tokens in %.2f s", size, time.perf_counter() - start)
        return self._graphs[size]
