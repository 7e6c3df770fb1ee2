"""Turns a scheduled batch into the step's inputs, runs the model once, samples.

The runner describes the batch once, in host lists (`StepInputs`, `BatchRows`); the attention backend turns that
description into its metadata (eager steps) or writes it into its CUDA-graph buffers (graph replays), and the LoRA
bank groups the tokens by adapter. Which entries a step writes follows the sequence's block tables: a pool gets
entries for the positions it does not hold yet (LR prefill writes only the LR pool for tokens whose keys and base
values are cached). Under DROIDSPEAK the critical layers get a context of their own (their pool's tables and writes)
and the tokens another agent computed take the stored hidden state at each run of critical layers.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, NamedTuple

import torch

from lragent.cache.kv_cache import HiddenRows, KVCache
from lragent.cache.sharing import PoolKind, SharingScheme
from lragent.engine.penalty_history import PenaltyHistory
from lragent.engine.sampler import PendingSample, SampleResult, SamplingBatch, sample_async
from lragent.engine.scheduler import ScheduledBatch
from lragent.engine.sequence import KV, PromptLogprob, Sequence
from lragent.engine.structured import allocate_bitmask, apply_bitmask
from lragent.kernels.backend import AttentionBackend, upload
from lragent.kernels.metadata import BatchRows
from lragent.lora.bank import LoRABank
from lragent.lora.metadata import LoRAMetadata, group_by_slot
from lragent.models.context import ForwardContext
from lragent.models.llama import CausalLM

if TYPE_CHECKING:
    from lragent.engine.cuda_graph import DecodeGraphs
    from lragent.engine.prefill_graph import PrefillGraphs

SCORE_ROWS = 256  # prompt log-probs: rows whose logits are computed at once (256 x 128k vocab x 4 B = 128 MiB)
CRITICAL_KV, HIDDEN = PoolKind.CRITICAL_KV.value, PoolKind.HIDDEN.value  # DROIDSPEAK's pools besides the KV pool


class StepResult(NamedTuple):
    """A step's draws (the sampler's result) and the prompt tokens it scored: (batch index, prompt position,
    PromptLogprob) of each."""

    sampled: SampleResult
    prompt: tuple[tuple[int, int, PromptLogprob], ...] = ()


@dataclass
class LaunchedStep:
    """A step queued on the device (`ModelRunner.launch`): its draws reach the host with `result()`, and the next
    step can read them on the device first (`feed`)."""

    batch: ScheduledBatch
    drawn: PendingSample | None
    prompt: tuple[tuple[int, int, PromptLogprob], ...] = ()
    prepare_s: float = 0.0  # host time turning the batch into inputs
    launch_s: float = 0.0  # host time queueing it (preparation included)
    graphed: bool = False  # the forward replays a captured graph
    wait_s: float = 0.0  # host time `result()` waited for the draws

    @property
    def forward_s(self) -> float:
        """Host time the step held the runner: its launch and the wait for its tokens (not the time it spent queued
        behind another step while the host did other work)."""
        return self.launch_s + self.wait_s

    def feed(self, seqs: list[Sequence]) -> torch.Tensor:
        """The tokens this step draws for `seqs` (some of its sampling sequences), int64 on the device."""
        assert self.drawn is not None, "a step that samples nothing feeds no step"
        rows = {s: i for i, s in enumerate(self.batch.sampling_seqs)}
        return self.drawn.tokens([rows[s] for s in seqs])

    def result(self) -> StepResult:
        start = time.perf_counter()
        sampled = SampleResult([], [], []) if self.drawn is None else self.drawn.result()
        self.wait_s = time.perf_counter() - start
        return StepResult(sampled, self.prompt)


@dataclass
class PromptScores:
    """The step's tokens whose logits score the next prompt token: row, target token, and (batch index, prompt
    position scored) of each."""

    rows: list[int] = field(default_factory=list)
    targets: list[int] = field(default_factory=list)
    at: list[tuple[int, int]] = field(default_factory=list)
    top: int = 0  # the most alternatives a request asks for

    def add(self, row: int, target: int, seq_index: int, position: int) -> None:
        self.rows.append(row)
        self.targets.append(target)
        self.at.append((seq_index, position))


@dataclass
class StepInputs:
    """One step in host lists: the flattened tokens and the per-sequence rows the backend needs."""

    token_ids: list[int]
    positions: list[int]
    token_slots: list[int]  # adapter slot of every token
    rows: BatchRows
    sample_rows: list[int]  # token index of each sampling sequence's last token
    scores: PromptScores | None = None  # rows whose logits give prompt log-probs (requests that ask for them)
    write_idx: dict[str, list[int]] = field(default_factory=dict)  # pool -> tokens it gets entries for (absent: all)
    hidden_reads: tuple[list[int], list[int]] = ([], [])  # tokens that read the HIDDEN pool, and its slots they read

    @property
    def kv_positions(self) -> list[int]:
        idx = self.rows.kv_write_idx
        return self.positions if idx is None else [self.positions[i] for i in idx]


class ModelRunner:
    def __init__(
        self,
        model: CausalLM,
        cache: KVCache,
        scheme: SharingScheme,
        backend: AttentionBackend,
        bank: LoRABank,
        device: torch.device,
    ):
        self.model, self.cache, self.backend, self.bank = model, cache, backend, bank
        self.pools = [p.name for p in scheme.pools]
        self.expand_values = scheme.expand_values
        self.device = device
        self.block_size = cache.block_size
        self.graphs: DecodeGraphs | None = None  # set by the engine on CUDA unless enforce_eager
        self.prefill_graphs: PrefillGraphs | None = None  # short prefill chunks; with the decode graphs
        self.history = PenaltyHistory(device)  # penalised sequences' token histories on the device
        self.prepare_s = 0.0  # host time of the last run's input preparation (read through StepStats)
        self.forward_s = 0.0  # the last run, end to end (a launch alone: its queueing)
        self.graphed = False  # the last run replayed a captured graph (read through StepStats)
        self._bitmask: torch.Tensor | None = None  # host buffer of structured-output token masks

    def enable_cuda_graphs(self, max_batch: int, max_model_len: int, prefill_tokens: int = 0) -> None:
        """Decode steps of up to `max_batch` rows, and prefill steps of up to `prefill_tokens` tokens (0: none),
        replay captured graphs."""
        from lragent.engine.cuda_graph import DecodeGraphs
        from lragent.engine.prefill_graph import PrefillGraphs

        self.graphs = DecodeGraphs(self, max_batch, max_model_len)
        if prefill_tokens > 0:
            self.prefill_graphs = PrefillGraphs(self, self.graphs.pool, prefill_tokens, max_model_len)

    def clear_graphs(self) -> None:
        """Forget every captured graph (adapter stacks changed, or the engine closes)."""
        if self.prefill_graphs is not None:
            self.prefill_graphs.clear()
        if self.graphs is not None:
            self.graphs.clear()  # last: it drops the pool both captured into

    def capture_graphs(self) -> None:
        """Capture every decode size and prefill bucket now (start-up), so no request waits for a capture."""
        if self.graphs is not None:
            self.graphs.capture_all()
        if self.prefill_graphs is not None:
            self.prefill_graphs.capture_all()

    def inputs(self, batch: ScheduledBatch) -> StepInputs:
        """Flatten the batch: tokens, positions, adapter slots, and per pool the slots of the entries written."""
        if not batch.is_prefill and all(t.cached <= s.num_computed for s in batch.seqs for t in s.tables.values()):
            return self._decode_inputs(batch)
        if batch.ahead:
            raise ValueError("only decode steps that write every pool run ahead of their inputs")
        bs = self.block_size
        ids: list[int] = []
        positions: list[int] = []
        token_slots: list[int] = []
        sample_rows: list[int] = []
        writes: dict[str, list[int]] = {p: [] for p in self.pools}
        written: dict[str, list[int]] = {p: [] for p in self.pools}
        reads: tuple[list[int], list[int]] = ([], [])  # a stored hidden state is read where it is not written
        scores = PromptScores()
        for i, (seq, n, samples) in enumerate(zip(batch.seqs, batch.num_tokens, batch.samples)):
            tables = [(p, seq.table(p)) for p in self.pools]
            base = len(ids) - seq.num_computed
            positions_scored = seq.scored_positions(seq.num_computed, n)
            for pos in positions_scored:
                scores.add(base + pos, seq.token_ids[pos + 1], i, pos + 1)
            if positions_scored:
                scores.top = max(scores.top, seq.params.prompt_logprobs or 0)
            for pos in range(seq.num_computed, seq.num_computed + n):
                for pool, table in tables:
                    if pos >= table.cached:
                        writes[pool].append(table.blocks[pos // bs] * bs + pos % bs)
                        written[pool].append(len(ids))
                    elif pool == HIDDEN:
                        reads[0].append(len(ids))
                        reads[1].append(table.blocks[pos // bs] * bs + pos % bs)
                ids.append(seq.token_ids[pos])
                positions.append(pos)
                token_slots.append(seq.lora_slot)
            if samples:
                sample_rows.append(len(ids) - 1)
        subsets = {p: idx for p, idx in written.items() if len(idx) < len(ids)}
        rows = self._rows(batch, writes, subsets.get(KV))
        scored = scores if scores.rows else None
        return StepInputs(ids, positions, token_slots, rows, sample_rows, scored, subsets, reads)

    def _decode_inputs(self, batch: ScheduledBatch) -> StepInputs:
        """One token per sequence, written to every pool (the per-step hot path of decoding: kept lean). A step
        run ahead computes the position after the in-flight token, whose id the device supplies (0 here)."""
        bs, seqs, ahead = self.block_size, batch.seqs, batch.ahead
        positions = [s.num_computed + ahead for s in seqs]
        writes = {}
        for p in self.pools:
            blocks = [s.tables[p].blocks for s in seqs]
            writes[p] = [b[pos // bs] * bs + pos % bs for b, pos in zip(blocks, positions)]
        ids = [0] * len(seqs) if ahead else [s.token_ids[pos] for s, pos in zip(seqs, positions)]
        step = StepInputs(ids, positions, [s.lora_slot for s in seqs], self._rows(batch, writes, None), [])
        step.sample_rows = list(range(len(seqs)))
        return step

    def _rows(self, batch: ScheduledBatch, writes: dict[str, list[int]], kv_write_idx: list[int] | None) -> BatchRows:
        seqs = batch.seqs
        return BatchRows(
            query_lens=list(batch.num_tokens),
            context_lens=[s.num_computed + batch.ahead + n for s, n in zip(seqs, batch.num_tokens)],
            seq_lora_slots=[s.lora_slot for s in seqs],
            tables={p: [s.tables[p].blocks for s in seqs] for p in self.pools},
            write_slots=writes,
            kv_write_idx=kv_write_idx,
            is_decode=not batch.is_prefill,
        )

    def prepare(
        self, batch: ScheduledBatch, step: StepInputs | None = None
    ) -> tuple[torch.Tensor, ForwardContext, list[int]]:
        """Input ids, the step's context, and the row of each sampling sequence (an eager step; `step`: the batch's
        inputs when already built)."""
        step = self.inputs(batch) if step is None else step
        dev, idx = self.device, step.rows.kv_write_idx
        pos_t = upload(step.positions, torch.int64, dev)
        kv_slots = step.token_slots if idx is None else [step.token_slots[i] for i in idx]
        ctx = ForwardContext(
            attn=self.backend.metadata(step.rows, dev),
            lora=LoRAMetadata(group_by_slot(step.token_slots, dev), group_by_slot(kv_slots, dev)),
            expand_values=self.expand_values,
            positions=pos_t,
            base_positions=pos_t if idx is None else upload(step.kv_positions, torch.int64, dev),
        )
        if CRITICAL_KV in self.pools:
            ctx.critical = self._critical_context(step, ctx)
        if HIDDEN in self.pools:
            ctx.hidden = self._hidden_rows(step)
        return upload(step.token_ids, torch.int64, dev), ctx, step.sample_rows

    def _critical_context(self, step: StepInputs, ctx: ForwardContext) -> ForwardContext:
        """The critical layers' context (DROIDSPEAK): the step as their own KV pool sees it (its tables, its writes;
        every token the step runs writes there, recomputation included)."""
        rows, idx, dev = step.rows, step.write_idx.get(CRITICAL_KV), self.device
        own = replace(
            rows,
            tables={KV: rows.tables[CRITICAL_KV]},
            write_slots={KV: rows.write_slots[CRITICAL_KV]},
            kv_write_idx=idx,
        )
        if idx is None:
            lora = LoRAMetadata(ctx.lora.segments, ctx.lora.segments)
            return replace(ctx, attn=self.backend.metadata(own, dev), lora=lora, base_positions=ctx.positions)
        lora = LoRAMetadata(ctx.lora.segments, group_by_slot([step.token_slots[i] for i in idx], dev))
        positions = upload([step.positions[i] for i in idx], torch.int64, dev)
        return replace(ctx, attn=self.backend.metadata(own, dev), lora=lora, base_positions=positions)

    def _hidden_rows(self, step: StepInputs) -> HiddenRows:
        """Which tokens store their hidden state at the critical runs' boundaries, and which read the stored one."""
        dev, idx = self.device, step.write_idx.get(HIDDEN)
        read_idx, read_slots = step.hidden_reads
        return HiddenRows(
            write_idx=None if idx is None else upload(idx, torch.int64, dev),
            write_slots=upload(step.rows.write_slots[HIDDEN], torch.int64, dev),
            read_idx=upload(read_idx, torch.int64, dev) if read_idx else None,
            read_slots=upload(read_slots, torch.int64, dev) if read_slots else None,
        )

    def run(self, batch: ScheduledBatch) -> StepResult:
        """One forward pass; returns a token (and its log-prob) for each sequence the batch marks as sampling."""
        launched = self.launch(batch)
        result = launched.result()
        self.forward_s = launched.forward_s
        return result

    def launch(self, batch: ScheduledBatch, after: LaunchedStep | None = None) -> LaunchedStep:
        """Queue one forward pass and its sampling on the device without waiting for the draws. `after`: the step in
        flight whose tokens are this (decode) batch's input ids, read on the device (`batch.ahead` is 1)."""
        start = time.perf_counter()
        self.prepare_s, self.graphed = 0.0, False
        try:
            launched = self._launch(batch, None if after is None else after.feed(batch.seqs))
        finally:
            self.forward_s = time.perf_counter() - start
        launched.prepare_s, launched.launch_s, launched.graphed = self.prepare_s, self.forward_s, self.graphed
        return launched

    @torch.inference_mode()
    def _launch(self, batch: ScheduledBatch, feed: torch.Tensor | None) -> LaunchedStep:
        hidden, scores = self._forward(batch, feed)
        prompt = () if scores is None else self._score_prompt(hidden[-len(scores.rows) :], scores)
        seqs = batch.sampling_seqs
        if not seqs:
            return LaunchedStep(batch, None, prompt)
        masks = self._grammar_masks(seqs)  # host work while the device runs the forward
        logits = self.model.logits(hidden[: len(seqs)])
        if masks is not None:
            apply_bitmask(logits, *masks)
        vocab = logits.shape[-1]
        rows = self.history.rows(seqs, vocab) if any(s.params.penalized for s in seqs) else None
        drawn = sample_async(logits, self.sampling_batch(seqs, vocab, batch.ahead, rows))
        if rows is not None:
            self.history.record(rows, drawn.flat)  # on the device, before any later step samples
        return LaunchedStep(batch, drawn, prompt)

    def _score_prompt(self, hidden: torch.Tensor, scores: PromptScores) -> tuple[tuple[int, int, PromptLogprob], ...]:
        """Each scored row's log-prob of the prompt's next token (and the top alternatives), in slices of rows so a
        long prompt never holds all its logits at once."""
        targets = upload(scores.targets, torch.int64, hidden.device)
        out = []
        for lo in range(0, len(scores.rows), SCORE_ROWS):
            logits = self.model.logits(hidden[lo : lo + SCORE_ROWS])
            lse = torch.logsumexp(logits, dim=-1, keepdim=True)
            picked = logits.gather(1, targets[lo : lo + SCORE_ROWS, None])
            own = (picked - lse).squeeze(1).tolist()
            ranks = ((logits > picked).sum(dim=-1) + 1).tolist()
            best = (logits - lse).topk(scores.top, dim=-1) if scores.top else None
            tops = [list(zip(i, v)) for i, v in zip(best.indices.tolist(), best.values.tolist())] if best else None
            for j, lp in enumerate(own):
                top = tops[j] if tops is not None else []
                out.append((*scores.at[lo + j], PromptLogprob(scores.targets[lo + j], lp, top, ranks[j])))
        return tuple(out)

    def _grammar_masks(self, seqs: list[Sequence]) -> tuple[torch.Tensor, list[int]] | None:
        """Allowed next tokens of the structured-output rows (others untouched), filled on the host."""
        rows = [i for i, s in enumerate(seqs) if s.grammar is not None]
        if not rows:
            return None
        vocab = self.model.config.vocab_size
        if self._bitmask is None or self._bitmask.shape[0] < len(seqs):
            self._bitmask = allocate_bitmask(max(len(seqs), 64), vocab, self.device)
        bitmask = self._bitmask[: len(seqs)]  # (the last step's copy of it is done: its sampling synchronised)
        for i in rows:
            seqs[i].grammar.fill(bitmask, i)
        return bitmask, rows

    def _forward(
        self, batch: ScheduledBatch, feed: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, PromptScores | None]:
        """Final hidden states of the sampling rows, then of the rows that score prompt tokens (if any). `feed`: the
        input ids on the device (a decode step run ahead)."""
        start = time.perf_counter()
        step = None
        if self.graphs is not None and self.graphs.supports(batch):
            step = self.inputs(batch)
            variant = self.backend.decode_graph(step.rows)  # e.g. "cascade": the graph with a cascade plan
            self.prepare_s = time.perf_counter() - start
            hidden = None if variant is None else self.graphs.run(step, variant, feed)  # None: declined the step
            if hidden is not None:
                self.graphed = True
                return hidden, None  # every decode row samples
        step = self.inputs(batch) if step is None else step
        prefill = self.prefill_graphs
        if prefill is not None and feed is None and prefill.supports(step):
            self.prepare_s, self.graphed = time.perf_counter() - start, True
            return prefill.run(step)[step.sample_rows], None
        input_ids, ctx, rows = self.prepare(batch, step)
        if feed is not None:
            input_ids = feed
        self.prepare_s = time.perf_counter() - start
        if step.scores is not None:
            rows = rows + step.scores.rows
        out = self.model(input_ids, ctx)
        return out[rows], step.scores

    def sampling_batch(
        self, seqs: list[Sequence], vocab_size: int, ahead: int = 0, history_rows: list[int] | None = None
    ) -> SamplingBatch:
        """Each row's draw is keyed by its request's seed and the position of the token it draws (`ahead`: tokens in
        flight before it). Penalties read each row's history on the device (`history_rows`, `PenaltyHistory`),
        which the draws keep current, so a step with them can run ahead too."""
        history = None if history_rows is None else self.history.gather(history_rows)
        return SamplingBatch.build(
            [s.params for s in seqs], [s.seed for s in seqs], [len(s) + ahead for s in seqs], None, None,
            vocab_size, self.device, history,
        )  # fmt: skip
