"""Per-step attention metadata, built once by the model runner and read by every layer's attention backend."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from lragent.kernels.value_lr_prefill import ScratchRows


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
    cascade: CascadePlan | None = None  # decode rows grouped by shared leading blocks (cascade attention), if any
    # CUDA-graph prefill: the grid holds padded sequences (no tokens) and padded token rows beyond the step's; the
    # split-KV count is sized for this many busy sequences, and split partials of padded rows stay readable
    graph_seqs: int | None = None
    # where each sequence's context sits in the gathered prefill scratches (`value_lr_prefill`): uploaded by the
    # first layer that gathers, read by the rest of the step's layers
    scratch_rows: ScratchRows | None = None
    # the step's FlashInfer plan on the gathered route (`flashinfer_prefill.RaggedPrefill`): made by the first layer
    library_prefill: Any = None

    @property
    def num_seqs(self) -> int:
        return len(self.query_lens)


@dataclass
class CascadePlan:
    """Decode rows grouped by a shared leading run of cache blocks (`lragent.kernels.triton_cascade`).

    A group's shared keys are read once for all its members, through the block tables of its first member (the
    blocks are the same ids, hence the same tensors, in every pool the step reads); each row then reads its own
    keys from `suffix_start`. Rows in no group have `suffix_start` 0 and `member_row` -1.

    Fixed shape: the kernels' grids and split counts follow only the host integers below (`capacity` group slots,
    `max_members`, ...), never the device arrays, so one plan's arrays can be rewritten in place between launches
    (CUDA-graph replays, `triton_cascade.StaticCascadePlan`). Group slots past the step's groups are empty
    (`group_start` repeats the member count): their programs exit at once. An eager step's plan has exactly its
    groups as capacity.
    """

    groups: list[tuple[list[int], int]]  # host: (member rows, shared tokens) per group ([] in a static plan)
    members: torch.Tensor  # [>= M] int32 batch rows of every group's members, group after group
    group_start: torch.Tensor  # [capacity + 1] int32 offsets into `members` (empty groups repeat the total)
    group_row: torch.Tensor  # [capacity] int32 the batch row whose tables the group's shared keys are read through
    shared_lens: torch.Tensor  # [capacity] int32 shared tokens (whole blocks)
    group_slot: torch.Tensor  # [capacity] int32 the members' adapter slot if they agree, else the largest (0: no LR)
    suffix_start: torch.Tensor  # [B] int32 each row's first own key
    member_row: torch.Tensor  # [B] int32 each row's index into `members`, -1 outside any group
    identity: torch.Tensor  # [B + 1] int32 0..B (each row as a group of one, for the suffix launch)
    uniform_slots: bool  # every group's members share one adapter slot (what keys rebuilt per reader need)
    max_members: int  # bound on a group's members (sizes the row tiles of the shared launch)
    max_shared: int  # bound on a group's shared tokens (sizes its split count)
    max_own: int  # bound on a row's own part, context - suffix_start (sizes the suffix launch's split count)
    capacity: int = 0  # group slots of the shared launch's grid (0: len(groups))
    split_groups: int = 0  # groups the shared launch's split count is sized for (0: len(groups))
    # set by a launch whose layer cascades only because `uniform_slots` holds (keys rebuilt per reader): a static
    # plan captured so must not replay a step whose groups mix adapter slots (`StaticCascadePlan.fill`)
    slot_bound: bool = False


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
