"""Prefill with key adapters under base sharing, the keys materialised once per reader instead of per query tile.

With a k_proj adapter under BASE_SHARED / BASE_LR_SHARED the key pool holds RoPE(X W_k) and every reader adds
s RoPE((X A_k) B_k) with its own B_k. The paged prefill kernel rebuilds that term on chip for every key tile it reads,
and it reads every key tile once per query tile: a long prompt rebuilds each key many times (and keeps B_k, its
rotated copy and float32 cos / sin tiles in registers throughout). Here each prefill sequence's keys, base values and
value LR rows are gathered once into contiguous scratch blocks, the keys with the reader's adapter term added in
float32 and rounded to the pool's dtype exactly as the kernel does, and the plain kernel (no key LR) runs over them.
The scratch holds the contexts' keys and values once per layer (`scratch_bytes`: 138 MB for a 33.7k context of
Llama-3.1-8B's 8 kv heads x 128 in bf16), freed after the layer.

`KEY_LR_PREFILL` (environment `LRAGENT_KEY_LR_PREFILL`) chooses: "on_chip" (the kernel rebuilds; the default until
measured otherwise on a GPU) or "materialize".
"""

from __future__ import annotations

import os

import torch

from lragent.kernels.backend import KeyLR
from lragent.kernels.reference import add_key_lora, gather_positions, lr_row_layout

KEY_LR_PREFILL = os.environ.get("LRAGENT_KEY_LR_PREFILL", "on_chip")
MODES = ("on_chip", "materialize")
if KEY_LR_PREFILL not in MODES:
    raise ValueError(f"LRAGENT_KEY_LR_PREFILL must be one of {MODES}, got {KEY_LR_PREFILL!r}")


class Scratch:
    """Contiguous scratch blocks for the prefill sequences' contexts, sequence i in blocks off_i .. off_i + n_i."""

    def __init__(self, context_lens: list[int], block_size: int, device: torch.device):
        self.block_size = block_size
        self.blocks = [-(-c // block_size) for c in context_lens]
        self.offsets = [sum(self.blocks[:i]) for i in range(len(self.blocks))]
        width = max(self.blocks, default=1)
        table = [[o + j for j in range(n)] + [-1] * (width - n) for o, n in zip(self.offsets, self.blocks)]
        self.tables = torch.tensor(table, dtype=torch.int32).to(device, non_blocking=True)
        self.total = sum(self.blocks)

    def rows(self, i: int, length: int) -> slice:
        start = self.offsets[i] * self.block_size
        return slice(start, start + length)


def materialize(
    key_pool: torch.Tensor,
    value_pool: torch.Tensor,
    lr_pool: torch.Tensor,
    base_block_tables: torch.Tensor,
    lr_block_tables: torch.Tensor,
    seq_lora_slots: torch.Tensor,
    value_up: torch.Tensor | None,
    lora_scaling: torch.Tensor,
    key_lr: KeyLR,
    context_lens: list[int],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """(keys, base values, value LR rows or None, block tables) of scratch pools in which every prefill sequence's
    context sits with its reader's key adapter term already added. No host synchronisation: adapter slots stay on
    the device (a slot-0 reader, no adapter, adds nothing and never reads its LR rows)."""
    assert key_lr.up is not None, "nothing to materialise without a key adapter"
    nblk, bs, hkv, d = key_pool.shape
    rank = key_lr.up.shape[1]
    width = lr_pool.shape[-1]
    _, klr_col = lr_row_layout(width, rank, key_lr.up.shape[0] - 1, key_lr=True)
    scratch = Scratch(context_lens, bs, key_pool.device)
    keys = key_pool.new_empty(scratch.total, bs, hkv, d)
    values = value_pool.new_empty(scratch.total, bs, hkv, d)
    lr_rows = lr_pool.new_empty(scratch.total, bs, rank) if value_up is not None else None
    flat_k, flat_v, flat_lr = key_pool.view(-1, hkv, d), value_pool.view(-1, hkv, d), lr_pool.view(-1, width)
    for i, length in enumerate(context_lens):
        if length == 0:
            continue
        base = gather_positions(base_block_tables[i], length, bs)
        own = gather_positions(lr_block_tables[i], length, bs)
        slot = seq_lora_slots[i]
        adapted = slot != 0
        rows = torch.where(adapted, flat_lr[own], 0.0)  # a slot-0 reader's rows are never written: not even read
        up = key_lr.up[slot].view(rank, hkv, d)
        k = add_key_lora(flat_k[base], rows[:, klr_col : klr_col + rank], up, lora_scaling[slot],
                         key_lr.cos[:length], key_lr.sin[:length])  # fmt: skip
        dest = scratch.rows(i, length)
        keys.view(-1, hkv, d)[dest] = k.to(keys.dtype)
        values.view(-1, hkv, d)[dest] = flat_v[base]
        if lr_rows is not None:
            lr_rows.view(-1, rank)[dest] = rows[:, :rank]
    return keys, values, lr_rows, scratch.tables


def scratch_bytes(context_lens: list[int], block_size: int, key_pool: torch.Tensor, rank: int) -> int:
    """What `materialize` allocates: the contexts' keys and values (and value LR rows), block-rounded."""
    hkv, d = key_pool.shape[-2:]
    tokens = sum(-(-c // block_size) * block_size for c in context_lens)
    return tokens * (2 * hkv * d + rank) * key_pool.element_size()
