"""Tokenisation, truncation and padded batches for supervised role training (loss on output tokens only).

An example becomes ``prompt ids + output ids + [eos]``. The prompt is tokenised as one string with the tokenizer's
default special tokens (what inference does with a whole prompt); the output is tokenised on its own, without special
tokens, so the boundary is the one a generation continuing the prompt sees.

Truncation when the sequence exceeds ``max_len``: the output keeps at most half of ``max_len`` (its start); the prompt
keeps its head (system prompt and question, up to the first ``Thought: \\n### Response:\\n``) and the most recent
tokens that fit, dropping the oldest steps of the trajectory in between. When the head does not tokenise as a prefix of
the prompt, or too little room is left after it (< ``MIN_TAIL`` tokens), the prompt is simply cut from the left.

Batches are left-padded. A padding position has no real token at or before it, so under the plain causal + padding
mask its query row would be fully masked; some fused attention kernels (CUDA SDPA, bf16) return NaN for such rows, and
the NaN then reaches real tokens through ``0 * NaN`` in the next layer's ``P @ V`` (and through the backward pass).
:func:`attention_mask_4d` therefore lets every padding position attend to itself only: no row is ever empty, and
real tokens still see only the real tokens before them.
"""

from __future__ import annotations

import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from lragent.train import data as fmt
from lragent.train.examples import Example

IGNORE_INDEX = -100
MIN_TAIL = 64


@dataclass(frozen=True)
class Encoded:
    """Token ids of one example; ``ids[:n_prompt]`` is the (possibly truncated) prompt, the rest is supervised."""

    ids: tuple[int, ...]
    n_prompt: int
    truncated: bool

    @property
    def n_output(self) -> int:
        return len(self.ids) - self.n_prompt


def _ids(tokenizer: Any, text: str, special: bool) -> list[int]:
    return list(tokenizer(text, add_special_tokens=special)["input_ids"])


def _head_len(tokenizer: Any, prompt: str, prompt_ids: list[int]) -> int:
    """Tokens of the prompt's head (system prompt + question), or 0 if it does not tokenise as a prefix."""
    cut = prompt.find(fmt.THOUGHT_PROMPT)
    if cut <= 0:
        return 0
    head_ids = _ids(tokenizer, prompt[:cut], special=True)
    return len(head_ids) if prompt_ids[: len(head_ids)] == head_ids else 0


def truncate_prompt(prompt_ids: list[int], head_len: int, budget: int) -> list[int]:
    """Keep ``prompt_ids[:head_len]`` and the last tokens so that at most ``budget`` remain (see module doc)."""
    if len(prompt_ids) <= budget:
        return prompt_ids
    if head_len and budget - head_len >= MIN_TAIL:
        return prompt_ids[:head_len] + prompt_ids[len(prompt_ids) - (budget - head_len) :]
    return prompt_ids[len(prompt_ids) - budget :]


def encode_example(tokenizer: Any, example: Example, max_len: int) -> Encoded:
    """Tokenise one example and fit it into ``max_len`` tokens."""
    prompt_ids = _ids(tokenizer, example.input, special=True)
    out_ids = (_ids(tokenizer, example.output, special=False) + [tokenizer.eos_token_id])[: max_len // 2]
    budget = max_len - len(out_ids)
    truncated = len(prompt_ids) > budget
    if truncated:
        prompt_ids = truncate_prompt(prompt_ids, _head_len(tokenizer, example.input, prompt_ids), budget)
    return Encoded(tuple(prompt_ids + out_ids), len(prompt_ids), truncated)


@dataclass(frozen=True)
class Batch:
    """Left-padded tensors [B, T]: every output ends at column T-1, so only the last ``n_keep`` columns carry labels
    and the LM head runs on ``n_keep + 1`` positions only (``logits_to_keep``)."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    position_ids: torch.Tensor  # 0.. per sequence, counted from its first real token
    labels: torch.Tensor  # IGNORE_INDEX on padding and prompt
    n_keep: int  # longest output in the batch

    def to(self, device: torch.device) -> Batch:
        move = {
            k: getattr(self, k).to(device, non_blocking=True)
            for k in ("input_ids", "attention_mask", "position_ids", "labels")
        }
        return Batch(**move, n_keep=self.n_keep)


def collate(batch: Sequence[Encoded], pad_id: int) -> Batch:
    """Left-pad a list of encoded examples into one :class:`Batch`."""
    width = max(len(e.ids) for e in batch)
    input_ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    labels = torch.full((len(batch), width), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    for i, e in enumerate(batch):
        ids = torch.tensor(e.ids, dtype=torch.long)
        input_ids[i, width - len(ids) :] = ids
        labels[i, width - e.n_output :] = ids[e.n_prompt :]
        mask[i, width - len(ids) :] = 1
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    return Batch(input_ids, mask, positions, labels, max(e.n_output for e in batch))


def attention_mask_4d(attention_mask: torch.Tensor) -> torch.Tensor:
    """Boolean [B, 1, T, T] mask (True = attend) from a [B, T] padding mask: causal, real keys only, and each position
    may always attend to itself, so a padding query attends to itself alone instead of to nothing (see module doc)."""
    real = attention_mask.bool()
    width = real.shape[-1]
    idx = torch.arange(width, device=real.device)
    causal = idx[None, :] <= idx[:, None]  # [T(query), T(key)]
    diagonal = idx[None, :] == idx[:, None]
    return (causal & (real[:, None, :] | diagonal))[:, None]


def batches(n: int, batch_size: int, seed: int) -> Iterator[list[int]]:
    """Endless example indices: a fresh seeded shuffle per epoch, cut into batches (the last one may be short)."""
    rng = random.Random(seed)
    while True:
        order = list(range(n))
        rng.shuffle(order)
        for start in range(0, n, batch_size):
            yield order[start : start + batch_size]
