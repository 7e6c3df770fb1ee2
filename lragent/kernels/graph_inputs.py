"""Static attention inputs of CUDA graphs: device buffers a captured graph reads, refilled in place per step.

`GraphInputs` serves decode steps (one token per row), `PrefillGraphInputs` short prefill chunks.

A backend that supports CUDA graphs hands these out (`AttentionBackend.graph_inputs`) and builds the metadata the
graph captures from views of them (`metadata`). Each replay writes the step's rows into pinned host mirrors and
uploads them asynchronously (no host sync). Block tables are refilled incrementally: a row whose block lists are the
same list objects as last step gets only its new entries (lists only grow in place or are replaced on
preemption). Padding rows (batches are padded to a captured size) write nowhere (slot -1), read one key of block 0
and use no adapter.

A backend may capture variants of a bucket beside the plain graph (`variants`, e.g. cascade decode with a plan of
fixed shape): the variant name then reaches `metadata` (capture), `pad` and `fill` (each replay), and `fill` may
decline a step the variant cannot compute (it then runs eagerly).
"""

from __future__ import annotations

import numpy as np
import torch

from lragent.kernels.metadata import AttentionMetadata, BatchRows

# rows of the int64 buffer: the KV and LR write slots, the adapter slot of each row
_KV_SLOT, _LR_SLOT, _LORA = range(3)


def _host(t: torch.Tensor, pin: bool) -> torch.Tensor:
    return t.pin_memory() if pin else t


class GraphInputs:
    def __init__(self, pools: list[str], max_batch: int, max_model_len: int, block_size: int, device: torch.device):
        self.pools = pools  # declared pools in order; "kv" first
        self.has_lr = "lr" in pools
        self.max_model_len = max_model_len
        self.block_size = block_size
        self.device = device
        b, w = max_batch, -(-max_model_len // block_size)
        self.i64 = torch.zeros(3, b, dtype=torch.int64, device=device)
        self.i32 = torch.zeros(2, b, dtype=torch.int32, device=device)  # context lengths, adapter slot (int32)
        self.tables = torch.zeros(len(pools), b, w, dtype=torch.int32, device=device)
        self.seg_start = torch.arange(b + 1, dtype=torch.int32, device=device)
        pin = device.type == "cuda"  # (the buffers also work unpinned on the CPU, where the filling is tested)
        self.host_i64 = _host(torch.zeros(3, b, dtype=torch.int64), pin)
        self.host_i32 = _host(torch.zeros(2, b, dtype=torch.int32), pin)
        self.host_tables = _host(torch.zeros(self.tables.shape, dtype=torch.int32), pin)
        self.host_staging = _host(torch.zeros(self.tables.numel(), dtype=torch.int32), pin)
        self.staging = torch.zeros(self.tables.numel(), dtype=torch.int32, device=device)
        # numpy views of the host mirrors, taken once (a `.numpy()` call per step costs more than the writes)
        self._np_i64, self._np_i32 = self.host_i64.numpy(), self.host_i32.numpy()
        self._np_tables = self.host_tables.numpy()
        # per row: the block lists it held last step (one per pool) and the entries already in host_tables
        self._rows: list[tuple[tuple[list[int], ...], int] | None] = [None] * b

    def variants(self, size: int) -> list[str]:
        """Names of the graphs captured for `size` rows besides the plain one ("")."""
        return []

    def metadata(self, size: int, decode_splits: int | None = None, variant: str = "") -> AttentionMetadata:
        """Metadata over views of the static buffers, for a graph of `size` rows (what the capture records)."""
        return AttentionMetadata(
            query_lens=[1] * size,
            context_lens=[self.max_model_len] * size,
            query_start=self.seg_start[: size + 1],
            context_lens_t=self.i32[0, :size],
            base_block_tables=self.tables[0, :size],
            lr_block_tables=self.tables[1, :size] if self.has_lr else None,
            seq_lora_slots=self.i64[_LORA, :size],
            base_write_idx=None,
            base_slots=self.i64[_KV_SLOT, :size],
            lr_slots=self.i64[_LR_SLOT, :size] if self.has_lr else None,
            is_decode=True,
            decode_splits=decode_splits,
        )

    def lora_rows(self, size: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(row starts 0..size, int32 adapter slot per row): one LoRA segment per decode row."""
        return self.seg_start[: size + 1], self.i32[1, :size]

    def pad(self, size: int, variant: str = "") -> None:
        """Safe contents for a capture's warm-up run (it really executes: no pool writes, finite reads)."""
        self._pad_rows(0, size)
        self.i64[:, :size].copy_(self.host_i64[:, :size])
        self.i32[:, :size].copy_(self.host_i32[:, :size])
        self.tables[:, :size, 0] = 0

    def fill(self, rows: BatchRows, size: int, variant: str = "") -> bool:
        """Write the step's decode rows (one token each) into the host mirrors, then upload them asynchronously.
        False: the variant's graph cannot compute this step (nothing written; run it eagerly)."""
        n = rows.num_seqs
        i64, i32 = self._np_i64, self._np_i32
        i64[_KV_SLOT, :n] = rows.write_slots["kv"]
        i64[_LR_SLOT, :n] = rows.write_slots["lr"] if self.has_lr else -1
        i64[_LORA, :n] = rows.seq_lora_slots
        i32[0, :n] = rows.context_lens
        i32[1, :n] = rows.seq_lora_slots
        used = self._fill_tables(rows)
        self._pad_rows(n, size)
        self.i64[:, :size].copy_(self.host_i64[:, :size], non_blocking=True)
        self.i32[:, :size].copy_(self.host_i32[:, :size], non_blocking=True)
        # only the used corner of the tables travels: staged contiguously, then scattered on the device
        # (the previous step's copies are done: `DecodeGraphs.fill` waits for them before any mirror is written)
        corner = self.host_tables[:, :size, :used]
        count = corner.numel()
        self.host_staging[:count].view(corner.shape).copy_(corner)
        self.staging[:count].copy_(self.host_staging[:count], non_blocking=True)
        self.tables[:, :size, :used].copy_(self.staging[:count].view(corner.shape))
        return True

    def _fill_tables(self, rows: BatchRows) -> int:
        """New block-table entries of every row; returns the widest row's block count."""
        tables, bs, used = self._np_tables, self.block_size, 1
        lists = [rows.tables[p] for p in self.pools]
        for i, ctx in enumerate(rows.context_lens):
            mine = tuple(per_pool[i] for per_pool in lists)
            nb = -(-ctx // bs)
            last = self._rows[i]
            done = last[1] if last is not None and all(a is b for a, b in zip(last[0], mine)) else 0
            if nb > done:
                for p, blocks in enumerate(mine):
                    tables[p, i, done:nb] = blocks[done:nb]
            self._rows[i] = (mine, nb)
            used = max(used, nb)
        return used

    def _pad_rows(self, n: int, size: int) -> None:
        """Padding rows: slot -1 (no store), context 1 (one key of block 0), no adapter."""
        if n == size:
            return
        i64, i32, tables = self._np_i64, self._np_i32, self._np_tables
        self._rows[n:size] = [None] * (size - n)
        i64[:, n:size] = 0
        i64[_KV_SLOT, n:size] = -1
        i64[_LR_SLOT, n:size] = -1
        i32[0, n:size] = 1
        i32[1, n:size] = 0
        tables[:, n:size, 0] = 0


class PrefillGraphInputs:
    """Static attention inputs of CUDA-graph prefill: up to `max_seqs` sequences and `max_tokens` new tokens.

    A short prefill chunk (an agent's appended observation, a few dozen tokens after a long cached context) is
    bound by launching its ~2,000 kernels from Python, not by the GPU; a graph per token bucket replays them in one
    launch. Padding: token rows past the step's write nowhere (slot -1) and use no adapter; sequence rows past the
    step's own no tokens (their query tiles exit at once) and no keys. Every replay rewrites the whole used part
    (prefill steps are few; no incremental tables). The host mirrors are reused only once the previous upload has
    finished (`uploaded`, an event: a prefill step without sampling never synchronises with the host)."""

    def __init__(
        self,
        pools: list[str],
        max_seqs: int,
        max_tokens: int,
        max_model_len: int,
        block_size: int,
        device: torch.device,
    ):
        self.pools = pools
        self.has_lr = "lr" in pools
        self.max_seqs, self.max_tokens = max_seqs, max_tokens
        self.max_model_len, self.block_size, self.device = max_model_len, block_size, device
        s, t, w = max_seqs, max_tokens, -(-max_model_len // block_size)
        self.tok = torch.zeros(3, t, dtype=torch.int64, device=device)  # KV slot, LR slot, adapter slot per token
        self.seq = torch.zeros(2, s + 1, dtype=torch.int32, device=device)  # query starts [s + 1], contexts [s]
        self.seq_slot = torch.zeros(s, dtype=torch.int64, device=device)
        self.tables = torch.zeros(len(pools), s, w, dtype=torch.int32, device=device)
        self.seg_start = torch.arange(t + 1, dtype=torch.int32, device=device)
        self.tok_slot32 = torch.zeros(t, dtype=torch.int32, device=device)  # the LoRA kernels' per-token slots
        pin = device.type == "cuda"
        self.host_tok = _host(torch.zeros(3, t, dtype=torch.int64), pin)
        self.host_seq = _host(torch.zeros(2, s + 1, dtype=torch.int32), pin)
        self.host_seq_slot = _host(torch.zeros(s, dtype=torch.int64), pin)
        self.host_staging = _host(torch.zeros(self.tables.numel(), dtype=torch.int32), pin)
        self.staging = torch.zeros(self.tables.numel(), dtype=torch.int32, device=device)
        self._np_tok, self._np_seq = self.host_tok.numpy(), self.host_seq.numpy()
        self._np_seq_slot, self._np_staging = self.host_seq_slot.numpy(), self.host_staging.numpy()
        self.uploaded = torch.cuda.Event() if device.type == "cuda" else None

    def metadata(self, tokens: int) -> AttentionMetadata:
        """Metadata over views of the static buffers for a graph of `tokens` token rows (what the capture records):
        the host bounds are the bucket's, so the grids never follow the step's lengths."""
        s = self.max_seqs
        return AttentionMetadata(
            query_lens=[tokens] * s,
            context_lens=[self.max_model_len] * s,
            query_start=self.seq[0],
            context_lens_t=self.seq[1, :s],
            base_block_tables=self.tables[0],
            lr_block_tables=self.tables[1] if self.has_lr else None,
            seq_lora_slots=self.seq_slot,
            base_write_idx=None,
            base_slots=self.tok[_KV_SLOT, :tokens],
            lr_slots=self.tok[_LR_SLOT, :tokens] if self.has_lr else None,
            is_decode=False,
            graph_seqs=1,
        )

    def lora_rows(self, tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(row starts 0..tokens, int32 adapter slot per token): one LoRA segment per token row."""
        return self.seg_start[: tokens + 1], self.tok_slot32[:tokens]

    def pad(self, tokens: int) -> None:
        """Safe contents for a capture's warm-up run: one sequence of `tokens` tokens over block 0, no writes."""
        self.tok.zero_()
        self.tok[_KV_SLOT : _LR_SLOT + 1] = -1
        self.tok_slot32.zero_()
        self.seq.zero_()
        self.seq[0, 1:] = tokens
        self.seq[1, 0] = tokens
        self.seq_slot.zero_()
        self.tables.zero_()

    def fill(
        self, rows: BatchRows, token_slots: list[int], tokens: int, write_idx: dict[str, list[int]] | None = None
    ) -> None:
        """Write the step (n <= tokens new tokens of <= max_seqs sequences) into the host mirrors and upload them
        asynchronously; rows past the step's are padding (see the class doc). `write_idx`: pool -> the tokens it
        gets entries for, where not all (LR prefill of keys another agent cached): the graph still computes every
        token's keys and values, and the others get slot -1, so what is stored (and read back) is the eager step's."""
        if self.uploaded is not None:
            self.uploaded.synchronize()  # the last replay's uploads have read the mirrors
        n, b = len(token_slots), rows.num_seqs
        tok, seq, seq_slot = self._np_tok, self._np_seq, self._np_seq_slot
        subsets = write_idx or {}
        tok[_KV_SLOT : _LR_SLOT + 1, :tokens] = -1  # then the owed entries' slots
        tok[_LORA, n:tokens] = 0
        for row, pool in ((_KV_SLOT, "kv"), (_LR_SLOT, "lr")):
            if pool == "lr" and not self.has_lr:
                continue
            idx = subsets.get(pool)
            if idx is None:
                tok[row, :n] = rows.write_slots[pool]
            else:
                tok[row, idx] = rows.write_slots[pool]
        tok[_LORA, :n] = token_slots
        seq[0, 0] = 0
        seq[0, 1 : b + 1] = np.cumsum(rows.query_lens)
        seq[0, b + 1 :] = n
        seq[1, :b] = rows.context_lens
        seq[1, b:] = 0
        seq_slot[:b] = rows.seq_lora_slots
        seq_slot[b:] = 0
        bs = self.block_size
        used = max(-(-ctx // bs) for ctx in rows.context_lens)
        corner = self._np_staging[: len(self.pools) * b * used].reshape(len(self.pools), b, used)
        corner[:] = 0
        for p, pool in enumerate(self.pools):
            for i, (blocks, ctx) in enumerate(zip(rows.tables[pool], rows.context_lens)):
                nb = -(-ctx // bs)
                corner[p, i, :nb] = blocks[:nb]
        self.tok[:, :tokens].copy_(self.host_tok[:, :tokens], non_blocking=True)
        self.tok_slot32[:tokens].copy_(self.tok[_LORA, :tokens])
        self.seq.copy_(self.host_seq, non_blocking=True)
        self.seq_slot.copy_(self.host_seq_slot, non_blocking=True)
        count = corner.size
        self.staging[:count].copy_(self.host_staging[:count], non_blocking=True)
        self.tables[:, :b, :used].copy_(self.staging[:count].view(len(self.pools), b, used))
        if self.uploaded is not None:
            self.uploaded.record()
