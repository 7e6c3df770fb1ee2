"""Per-step attention metadata, built once by the model runner and read by every layer's attention backend."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class AttentionMetadata:
    """Describes a flattened batch of B sequences with T new tokens in total.

    Sequence i owns tokens `query_start[i]:query_start[i+1]` of the batch and attends to its first
    `context_lens[i]` positions (cached prefix + its new tokens, causal over the new ones).
    """

    query_lens: list[int]  # host copy, [B]
    context_lens: list[int]  # host copy, [B]
    query_start: torch.Tensor  # [B+1] int32
    context_lens_t: torch.Tensor  # [B] int32
    base_block_tables: torch.Tensor  # [B, max_blocks] int32 into the key/value pools, -1 padded
    lr_block_tables: torch.Tensor | None  # [B, max_lr_blocks] int32 into the LR pool; None without an LR pool
    seq_lora_slots: torch.Tensor  # [B] int64, adapter slot of each sequence (its B_v in `s (P R) B`)
    base_write_idx: torch.Tensor | None  # token indices whose keys/base values are written; None = all T
    base_slots: torch.Tensor  # [n written] flat slot ids (block * block_size + offset) in the key/value pools
    lr_slots: torch.Tensor | None  # [T] flat slot ids in the LR pool
    is_decode: bool = False  # every sequence has exactly one new token
    decode_splits: int | None = None  # fixed split-KV count (CUDA graphs: the grid must not follow the lengths)

    @property
    def num_seqs(self) -> int:
        return len(self.query_lens)


@dataclass
class BatchRows:
    """A step's batch as plain host lists, built once by the model runner from the scheduled sequences. Each
    attention backend turns it into its metadata (`AttentionBackend.metadata`) or writes it into its CUDA-graph
    input buffers (`GraphInputs.fill`): one description, one owner per form."""

    query_lens: list[int]  # [B] tokens each sequence runs this step
    context_lens: list[int]  # [B] positions each sequence attends to (cached prefix + new tokens)
    seq_lora_slots: list[int]  # [B] adapter slot of each sequence
    tables: dict[str, list[list[int]]]  # pool -> each sequence's block list (the lists themselves, not copies)
    write_slots: dict[str, list[int]]  # pool -> flat slots of the entries written this step, in token order
    kv_write_idx: list[int] | None  # tokens whose keys/base values are written; None = every token
    is_decode: bool

    @property
    def num_seqs(self) -> int:
        return len(self.query_lens)
