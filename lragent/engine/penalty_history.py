"""Each penalised sequence's token history as rows on the device, kept up to date by the draws themselves.

Repetition, presence and frequency penalties read what a sequence has seen (prompt and output) and how often it
produced each token. Built from the host's token lists every step, that costs host work in the history's length
(a 30k-token agent trajectory is a 30k-entry list per step) and needs the last token on the host before the next
step can be queued, which keeps async scheduling from running ahead. Here a sequence's `seen` [V] and `counts` [V]
rows are filled from its host history once, on its first sampled step, and each draw then adds its token on the
device, in stream order before the next step samples. The host-history build (`sampler._penalties`) stays the
reference the rows are tested against.
"""

from __future__ import annotations

import torch

from lragent.engine.sequence import Sequence
from lragent.kernels.backend import upload

ZERO_ROW = 0  # rows of unpenalised sequences in a mixed batch read this one (never written; their penalties are 0)


class PenaltyHistory:
    def __init__(self, device: torch.device):
        self.device = device
        self.vocab = 0
        self.seen = torch.zeros(0, 0, dtype=torch.bool, device=device)
        self.counts = torch.zeros(0, 0, dtype=torch.float32, device=device)
        self._rows: dict[Sequence, int] = {}
        self._free: list[int] = []

    def rows(self, seqs: list[Sequence], vocab: int) -> list[int]:
        """Each sequence's row (`ZERO_ROW` for the unpenalised): allocated and filled from the host history the
        first time, the rows of finished sequences reclaimed first."""
        if vocab != self.vocab:
            self._reset(vocab)
        for seq in [s for s in self._rows if s.is_finished]:
            self._free.append(self._rows.pop(seq))
        return [self._row(s) if s.params.penalized else ZERO_ROW for s in seqs]

    def gather(self, rows: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """(seen [B, V] bool, counts [B, V] float32) of the rows, for `SamplingBatch.build(history=...)`."""
        index = _upload(rows, self.device)
        return self.seen.index_select(0, index), self.counts.index_select(0, index)

    def record(self, rows: list[int], tokens: torch.Tensor) -> None:
        """Add each row's drawn token (tokens [B] on the device, any numeric dtype), on the device; unpenalised rows
        are skipped."""
        picked = [i for i, r in enumerate(rows) if r != ZERO_ROW]
        if not picked:
            return
        at = _upload(picked, self.device)
        index = _upload([rows[i] for i in picked], self.device)
        drawn = tokens.index_select(0, at).to(torch.int64).clamp_(0, self.vocab - 1)
        self.seen.index_put_((index, drawn), torch.ones_like(drawn, dtype=torch.bool))
        self.counts.index_put_((index, drawn), torch.ones_like(drawn, dtype=torch.float32), accumulate=True)

    def forget(self, seqs: list[Sequence]) -> None:
        """Drop these sequences' rows (a step of theirs failed after its draws were recorded): the next use rebuilds
        them from the host history, which holds only the tokens the engine accepted."""
        for seq in seqs:
            row = self._rows.pop(seq, None)
            if row is not None:
                self._free.append(row)

    def _row(self, seq: Sequence) -> int:
        row = self._rows.get(seq)
        if row is None:
            row = self._rows[seq] = self._take()
            self._fill(row, seq)
        return row

    def _take(self) -> int:
        if not self._free:
            old = self.seen.shape[0]
            grown = max(8, 2 * old)
            self.seen = torch.cat([self.seen, self.seen.new_zeros(grown - old, self.vocab)])
            self.counts = torch.cat([self.counts, self.counts.new_zeros(grown - old, self.vocab)])
            self._free = list(range(grown - 1, max(old, ZERO_ROW + 1) - 1, -1))
        return self._free.pop()

    def _fill(self, row: int, seq: Sequence) -> None:
        vocab = self.vocab
        seen = [t for t in seq.token_ids if t < vocab]
        output = [t for t in seq.token_ids[seq.prompt_len :] if t < vocab]
        self.seen[row] = False
        self.counts[row] = 0
        if seen:
            self.seen[row, _upload(seen, self.device)] = True
        if output:
            ids = _upload(output, self.device)
            self.counts[row].index_put_((ids,), torch.ones(len(output), device=self.device), accumulate=True)

    def _reset(self, vocab: int) -> None:
        self.vocab = vocab
        self.seen = torch.zeros(0, vocab, dtype=torch.bool, device=self.device)
        self.counts = torch.zeros(0, vocab, dtype=torch.float32, device=self.device)
        self._rows.clear()
        self._free = []


def _upload(values: list[int], device: torch.device) -> torch.Tensor:
    return upload(values, torch.int64, device)
