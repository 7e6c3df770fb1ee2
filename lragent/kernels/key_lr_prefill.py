"""Prefill with key adapters under base sharing, the keys materialised once per reader instead of per query tile.

With a k_proj adapter under BASE_SHARED / BASE_LR_SHARED the key pool holds RoPE(X W_k) and every reader adds
s RoPE((X A_k) B_k) with its own B_k. The paged prefill kernel can rebuild that term on chip for every key tile it
reads ("on_chip"), but it reads every key tile once per (query tile, query head): a long prompt rebuilds each key
hundreds of times, with B_k, its rotated copy and float32 cos / sin tiles in registers throughout (on the H200 the
33.7k trace's prefill took 2.6x as long as without key adapters). Here ("materialize") one Triton launch per layer
writes each prefill sequence's keys, the reader's adapter term added in float32 and rounded to the pool's dtype
exactly as the attention kernels do, into a contiguous scratch; the prefill kernel then reads its keys from there
(`paged_prefill(key_rows=...)`) and its base values and value LR rows from the pools as usual. The scratch holds
the contexts' keys once (`scratch_bytes`: 69 MB for a 33.7k context of Llama-3.1-8B's 8 kv heads x 128 in bf16),
freed after the layer.

`KEY_LR_PREFILL` (environment `LRAGENT_KEY_LR_PREFILL`) chooses; "materialize" is the default (measured faster).
`materialize_keys_reference` is the slow exact torch route the tests compare the kernel with.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from lragent.kernels.backend import KeyLR, upload
from lragent.kernels.reference import add_key_lora, gather_positions, lr_row_layout
from lragent.kernels.triton_attention import _add_key_lora, _dot_precision, _load_key_up, _Pools

KEY_LR_PREFILL = os.environ.get("LRAGENT_KEY_LR_PREFILL", "materialize")
MODES = ("on_chip", "materialize")
if KEY_LR_PREFILL not in MODES:
    raise ValueError(f"LRAGENT_KEY_LR_PREFILL must be one of {MODES}, got {KEY_LR_PREFILL!r}")


def row_starts(context_lens: list[int]) -> list[int]:
    """First scratch row of each sequence's keys (sequences back to back)."""
    return [sum(context_lens[:i]) for i in range(len(context_lens))]


@triton.jit
def _context_tile(pool_ptr, bt_row, kpos, kmask, g, offs_d, HKV: tl.constexpr, D: tl.constexpr, BS: tl.constexpr):
    """Kv head g's rows at positions `kpos` of one sequence (block-table row `bt_row`) of a key or value pool."""
    blk = tl.load(bt_row + kpos // BS, mask=kmask, other=0).to(tl.int64)
    return tl.load(
        pool_ptr + (blk * BS + kpos % BS)[:, None] * (HKV * D) + g * D + offs_d[None, :], mask=kmask[:, None]
    )


@triton.jit
def _store_scratch_tile(out_ptr, start_ptr, b, tile, kpos, kmask, g, offs_d, HKV: tl.constexpr, D: tl.constexpr):
    """The tile into sequence b's scratch rows (its first row at start_ptr[b]), kv head g's columns."""
    rows = tl.load(start_ptr + b) + kpos.to(tl.int64)
    tl.store(out_ptr + rows[:, None] * (HKV * D) + g * D + offs_d[None, :], tile, mask=kmask[:, None])


@triton.jit(do_not_specialize=["stride_bt", "stride_lbt"])
def _materialize_kernel(
    k_ptr,
    lr_ptr,
    bt_ptr,
    lbt_ptr,
    ctx_ptr,
    start_ptr,
    slot_ptr,
    scaling_ptr,
    kup_ptr,
    cos_ptr,
    sin_ptr,
    out_ptr,
    stride_bt,
    stride_lbt,
    stride_ks,
    stride_kr,
    HKV: tl.constexpr,
    D: tl.constexpr,
    R: tl.constexpr,
    R_PAD: tl.constexpr,
    LR_W: tl.constexpr,
    KLR_COL: tl.constexpr,
    BS: tl.constexpr,
    BLOCK_N: tl.constexpr,
    DOT_PREC: tl.constexpr,
    TRIG_ON_CHIP: tl.constexpr,
):
    """Program (key tile, kv head, sequence): K_base + s RoPE(R_k B_k) of the reader into its scratch rows."""
    n0 = tl.program_id(0) * BLOCK_N
    g = tl.program_id(1)
    b = tl.program_id(2)
    ctx = tl.load(ctx_ptr + b)
    if n0 >= ctx:
        return
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, D)
    offs_r = tl.arange(0, R_PAD)
    kpos = n0 + offs_n
    kmask = kpos < ctx
    b64 = b.to(tl.int64)
    k = _context_tile(k_ptr, bt_ptr + b64 * stride_bt, kpos, kmask, g, offs_d, HKV, D, BS)
    slot = tl.load(slot_ptr + b)
    lmask = kpos < tl.where(slot != 0, ctx, 0)  # a slot-0 reader adds nothing and reads no LR row
    lblk = tl.load(lbt_ptr + b64 * stride_lbt + kpos // BS, mask=lmask, other=0).to(tl.int64)
    lrow = lblk * BS + kpos % BS
    kup, kup_rot = _load_key_up(kup_ptr, slot, stride_ks, stride_kr, g * D, offs_r, offs_d, R, D)
    kscale = tl.load(scaling_ptr + slot)
    k = _add_key_lora(
        k, lr_ptr, lrow, lmask, kpos, kup, kup_rot, kscale, cos_ptr, sin_ptr, offs_r, offs_d, R, D, LR_W, KLR_COL,
        DOT_PREC, TRIG_ON_CHIP,
    )  # fmt: skip
    _store_scratch_tile(out_ptr, start_ptr, b, k, kpos, kmask, g, offs_d, HKV, D)


def materialize_keys(
    key_pool: torch.Tensor,
    lr_pool: torch.Tensor,
    base_block_tables: torch.Tensor,
    lr_block_tables: torch.Tensor,
    seq_lora_slots: torch.Tensor,
    lora_scaling: torch.Tensor,
    key_lr: KeyLR,
    context_lens: list[int],
    block_n: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(keys [sum(context_lens), Hkv, d] in the pool's dtype, first row of each sequence [B] int64): every prefill
    sequence's whole context with its reader's key adapter term. One launch, no host synchronisation."""
    assert key_lr.up is not None, "nothing to materialise without a key adapter"
    bs, hkv, d = key_pool.shape[1:]
    starts = row_starts(context_lens)
    keys = key_pool.new_empty(max(1, sum(context_lens)), hkv, d)
    start_t = upload(starts, torch.int64, key_pool.device)
    ctx_t = upload(context_lens, torch.int32, key_pool.device)
    p = _Pools(key_pool, key_pool, lr_pool, None, lora_scaling, bs, key_lr)
    if block_n is None:
        block_n = 64 if key_pool.device.type == "cuda" else 16
    grid = (triton.cdiv(max(context_lens, default=0), block_n), hkv, len(context_lens))
    if grid[0] > 0:
        _materialize_kernel[grid](
            key_pool, p.lr, base_block_tables, lr_block_tables, ctx_t, start_t, seq_lora_slots, lora_scaling, p.kup,
            p.cos, p.sin, keys, base_block_tables.stride(0), lr_block_tables.stride(0), p.stride_ks, p.stride_kr,
            HKV=hkv, D=d, R=p.r, R_PAD=p.r_pad, LR_W=p.lr_width, KLR_COL=p.klr_col, BS=bs, BLOCK_N=block_n,
            DOT_PREC=_dot_precision(key_pool.dtype), TRIG_ON_CHIP=p.trig_on_chip, num_warps=4,
        )  # fmt: skip
    return keys, start_t


def materialize_keys_reference(
    key_pool: torch.Tensor,
    lr_pool: torch.Tensor,
    base_block_tables: torch.Tensor,
    lr_block_tables: torch.Tensor,
    seq_lora_slots: torch.Tensor,
    lora_scaling: torch.Tensor,
    key_lr: KeyLR,
    context_lens: list[int],
) -> tuple[torch.Tensor, torch.Tensor]:
    """`materialize_keys` in plain torch (gathers through the block tables, `add_key_lora`): the exact oracle."""
    assert key_lr.up is not None, "nothing to materialise without a key adapter"
    bs, hkv, d = key_pool.shape[1:]
    rank, width = key_lr.up.shape[1], lr_pool.shape[-1]
    _, klr_col = lr_row_layout(width, rank, key_lr.up.shape[0] - 1, key_lr=True)
    keys = key_pool.new_empty(max(1, sum(context_lens)), hkv, d)
    flat_k, flat_lr = key_pool.view(-1, hkv, d), lr_pool.view(-1, width)
    for i, (start, length) in enumerate(zip(row_starts(context_lens), context_lens)):
        if length == 0:
            continue
        slot = seq_lora_slots[i]
        own = gather_positions(lr_block_tables[i], length, bs)
        r_k = torch.where(slot != 0, flat_lr[own][:, klr_col : klr_col + rank], 0.0)  # slot 0: rows never written
        k = add_key_lora(flat_k[gather_positions(base_block_tables[i], length, bs)], r_k,
                         key_lr.up[slot].view(rank, hkv, d), lora_scaling[slot],
                         key_lr.cos[:length], key_lr.sin[:length])  # fmt: skip
        keys[start : start + length] = k.to(keys.dtype)
    return keys, torch.tensor(row_starts(context_lens), dtype=torch.int64, device=key_pool.device)


def scratch_bytes(context_lens: list[int], key_pool: torch.Tensor) -> int:
    """What `materialize_keys` allocates: the contexts' keys."""
    hkv, d = key_pool.shape[-2:]
    return sum(context_lens) * hkv * d * key_pool.element_size()
