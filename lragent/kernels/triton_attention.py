"""Flash-LoRA-Attention in Triton over the engine's paged pools.

O = softmax(Q K^T / sqrt(d)) (V_base + s R B) = P V_base + s (P R) B_g, with one extra rank-r accumulator
`acc_r = P R` next to FlashAttention's `acc_v = P V_base`; `R B` is never materialised.

Two entry points, both reading keys / base values / LR rows through the block tables:

- `paged_prefill`: several sequences in one launch, each with a cached prefix and `query_len` new tokens
  (causal over the new ones), each with its own adapter slot. One program per (query tile, q head, sequence);
  when that is too few programs to fill the GPU (a short chunk, e.g. a tool's output, after a long context) the
  keys are split as in decode and the decode merge kernel combines the partials, one row per query token.
  On Hopper with pages of >= 64 tokens a key tile is one page run: its keys and values come through tensor
  descriptors (the bulk-copy engine, one block-table read per tile), its LR rows as one strided tile (`_use_tma`).
- `paged_decode`: one query token per sequence, split-KV (flash-decoding): program (sequence, kv head, split)
  handles all G = q_heads / kv_heads query heads of its kv head together (G padded to 16 rows of one `tl.dot`),
  writes partial (acc_v, acc_r, max, sum); a second small kernel merges the splits and applies `s acc_r B_g`
  (merge "kernel"), or (merge "last_split", one launch) each split counts itself done on an atomic counter per
  (sequence, kv head) and the last one to finish merges them (`LRAGENT_DECODE_MERGE`, `paged_decode(merge=)`).
  With one split the first kernel finishes the job itself.

An LR row is one adapter's R, or (STACKED_LR) every adapter slot's R side by side: a sequence of slot s then reads
columns (s - 1) r .. s r of each row in place (the row width and the slice stride are launch constants), or (key LR:
schemes that share keys with k_proj adapters) [R_v | R_k]: every key tile is rebuilt on chip as
K_base + s RoPE_p(R_k B_k) = K_base + s ((R_k B_k) cos_p + (R_k B_k^rot) sin_p), B_k^rot being B_k with rotate-half
applied to each head's columns (read as a signed permutation of B_k's columns, once per program).
Any rank 1..64 (padded to a power of two >= 16 inside, masked loads), head_dim 64/128/256 (any power of two),
any power-of-two block size, fp16 / bf16 / fp32 (fp32 dots run in IEEE precision so tests can ask for ~1e-5).
Slot 0 (no adapter) and `value_up=None` skip the LR term entirely (the LR pool is not even read).
Integer arguments that change from step to step (block-table widths, split counts) are not specialised: Triton
would otherwise compile a new variant the first time a width happens to be a multiple of 16, inside a timed run.
"""

from __future__ import annotations

import math
import os

import numpy as np
import torch
import triton
import triton.language as tl

from lragent.config import hopper_or_newer
from lragent.kernels.backend import KeyLR
from lragent.kernels.counters import arrival_counters
from lragent.kernels.pdl import gdc_launch_dependents, pdl_enabled
from lragent.kernels.reference import lr_row_layout

LOG2E = 1.4426950408889634
# 2 pi = HI + MID + LO: HI has 8 significant bits, so turns * HI is exact in float32 for < 2^16 turns
_TWO_PI_HI: tl.constexpr = tl.constexpr(6.28125)
_TWO_PI_MID: tl.constexpr = tl.constexpr(float(np.float32(2 * math.pi - 6.28125)))
_TWO_PI_LO: tl.constexpr = tl.constexpr(2 * math.pi - 6.28125 - float(np.float32(2 * math.pi - 6.28125)))
_INV_TWO_PI: tl.constexpr = tl.constexpr(1 / (2 * math.pi))


def _pow2_at_least(n: int, floor: int) -> int:
    return max(floor, triton.next_power_of_2(max(1, n)))


def _dot_precision(dtype: torch.dtype) -> str:
    return "ieee" if dtype == torch.float32 else "tf32"


# ------------------------------------------------------------------------------------------------------------
# shared epilogues: finish a program's rows, or leave split-KV partials for the merge kernel
# ------------------------------------------------------------------------------------------------------------
@triton.jit
def _finish_rows(
    acc,
    acc_r,
    l_i,
    use_lr,
    slot,
    vup_ptr,
    scaling_ptr,
    stride_vs,
    stride_vr,
    kv_col,
    offs_r,
    offs_d,
    R: tl.constexpr,
    HAS_LR: tl.constexpr,
    DOT_PREC: tl.constexpr,
):
    """(acc_v + s acc_r B_g) / l: the LR term applied once, after the key loop (rows with no keys give 0)."""
    out = acc
    if HAS_LR:
        if use_lr:
            scale = tl.load(scaling_ptr + slot)
            up = tl.load(
                vup_ptr + slot * stride_vs + offs_r[:, None] * stride_vr + kv_col + offs_d[None, :],
                mask=offs_r[:, None] < R,
                other=0.0,
            )
            # bf16/fp16: one low-precision MMA (an IEEE fp32 dot here spills registers); fp32: exact
            out = out + scale * tl.dot(acc_r.to(up.dtype), up, input_precision=DOT_PREC)
    l_safe = tl.where(l_i == 0.0, 1.0, l_i)
    return out / l_safe[:, None]


@triton.jit
def _store_partials(
    pacc_ptr,
    pr_ptr,
    pml_ptr,
    base,
    mask,
    acc,
    acc_r,
    m_i,
    l_i,
    offs_d,
    offs_r,
    D: tl.constexpr,
    R_PAD: tl.constexpr,
    HAS_LR: tl.constexpr,
):
    """One split's (acc_v, acc_r, max, sum) at partial rows `base` of the [rows, splits, Hq, ...] layout."""
    tl.store(pacc_ptr + base[:, None] * D + offs_d[None, :], acc, mask=mask[:, None])
    if HAS_LR:
        tl.store(pr_ptr + base[:, None] * R_PAD + offs_r[None, :], acc_r, mask=mask[:, None])
    tl.store(pml_ptr + base * 2, m_i, mask=mask)
    tl.store(pml_ptr + base * 2 + 1, l_i, mask=mask)


@triton.jit
def _load_key_up(kup_ptr, slot, stride_ks, stride_kr, kv_col, offs_r, offs_d, R: tl.constexpr, D: tl.constexpr):
    """B_k of the slot for kv head columns kv_col.. [R_PAD, D], and B_k^rot: column j is -B_k[:, j + D/2] for
    j < D/2, B_k[:, j - D/2] after (so that R_k B_k^rot = rotate_half(R_k B_k))."""
    rows = kup_ptr + slot.to(tl.int64) * stride_ks + offs_r[:, None] * stride_kr + kv_col
    rmask = offs_r[:, None] < R
    up = tl.load(rows + offs_d[None, :], mask=rmask, other=0.0)
    sign = tl.where(offs_d < D // 2, -1.0, 1.0)
    up_rot = tl.load(rows + ((offs_d + D // 2) % D)[None, :], mask=rmask, other=0.0) * sign[None, :]
    return up, up_rot.to(up.dtype)


@triton.jit
def _rope_trig(cos_ptr, sin_ptr, kpos, lmask, offs_d, D: tl.constexpr, TRIG_ON_CHIP: tl.constexpr):
    """cos_p, sin_p [BLOCK_N, D] of the key positions (half-split RoPE: columns j and j + D/2 share a frequency).
    From the float32 tables, or (TRIG_ON_CHIP, `cos_ptr` = inv_freq [D/2]) computed here: the angle p * f_j rounded
    to float32 as the tables are built, reduced by 2 pi in three parts (the first exact for any position < 2^16
    turns) so that cos / sin run on an argument within pi of 0, where even approximate units are accurate."""
    half = offs_d % (D // 2)
    if TRIG_ON_CHIP:
        angle = kpos.to(tl.float32)[:, None] * tl.load(cos_ptr + half)[None, :]
        turns = tl.floor(angle * _INV_TWO_PI + 0.5)
        reduced = angle - turns * _TWO_PI_HI - turns * _TWO_PI_MID - turns * _TWO_PI_LO
        return tl.cos(reduced), tl.sin(reduced)
    trig = kpos[:, None] * D + half[None, :]
    cos = tl.load(cos_ptr + trig, mask=lmask[:, None], other=0.0)
    sin = tl.load(sin_ptr + trig, mask=lmask[:, None], other=0.0)
    return cos, sin


@triton.jit
def _add_key_lora(
    k,
    lr_ptr,
    lrow,
    lmask,
    kpos,
    kup,
    kup_rot,
    kscale,
    cos_ptr,
    sin_ptr,
    offs_r,
    offs_d,
    R: tl.constexpr,
    D: tl.constexpr,
    LR_W: tl.constexpr,
    KLR_COL: tl.constexpr,
    DOT_PREC: tl.constexpr,
    TRIG_ON_CHIP: tl.constexpr,
):
    """k + s RoPE(R_k B_k) for a key tile [BLOCK_N, D] (rows outside `lmask` get nothing: R_k reads as 0)."""
    r_k = tl.load(
        lr_ptr + lrow[:, None] * LR_W + KLR_COL + offs_r[None, :],
        mask=lmask[:, None] & (offs_r[None, :] < R),
        other=0.0,
    ).to(kup.dtype)
    u = tl.dot(r_k, kup, input_precision=DOT_PREC)
    u_rot = tl.dot(r_k, kup_rot, input_precision=DOT_PREC)
    cos, sin = _rope_trig(cos_ptr, sin_ptr, kpos, lmask, offs_d, D, TRIG_ON_CHIP)
    return (k.to(tl.float32) + kscale * (u * cos + u_rot * sin)).to(k.dtype)


@triton.jit
def _key_up_halves(kup_ptr, slot, stride_ks, stride_kr, kv_col, offs_r, offs_h, R: tl.constexpr, D: tl.constexpr):
    """B_k of the slot for kv head columns kv_col.. as its two RoPE halves [R_PAD, D/2] each."""
    rows = kup_ptr + slot.to(tl.int64) * stride_ks + offs_r[:, None] * stride_kr + kv_col
    rmask = offs_r[:, None] < R
    return tl.load(rows + offs_h[None, :], mask=rmask, other=0.0), tl.load(
        rows + (offs_h + D // 2)[None, :], mask=rmask, other=0.0
    )


@triton.jit
def _add_key_lora_halves(
    k_lo,
    k_hi,
    lr_ptr,
    lrow,
    lmask,
    kpos,
    kup_lo,
    kup_hi,
    kscale,
    cos_ptr,
    sin_ptr,
    offs_r,
    offs_h,
    R: tl.constexpr,
    D: tl.constexpr,
    LR_W: tl.constexpr,
    KLR_COL: tl.constexpr,
    DOT_PREC: tl.constexpr,
    TRIG_ON_CHIP: tl.constexpr,
):
    """`_add_key_lora` on a key tile held as its two RoPE halves [BLOCK_N, D/2]: u = R_k B_k split the same way,
    lo += s (u_lo cos - u_hi sin), hi += s (u_hi cos + u_lo sin). Half the registers and half the rank-r products
    of the whole-tile form (which keeps u, rotate_half(u), cos and sin [BLOCK_N, D] in float32 at once)."""
    r_k = tl.load(
        lr_ptr + lrow[:, None] * LR_W + KLR_COL + offs_r[None, :],
        mask=lmask[:, None] & (offs_r[None, :] < R),
        other=0.0,
    ).to(kup_lo.dtype)
    u_lo = tl.dot(r_k, kup_lo, input_precision=DOT_PREC)
    u_hi = tl.dot(r_k, kup_hi, input_precision=DOT_PREC)
    cos, sin = _rope_trig(cos_ptr, sin_ptr, kpos, lmask, offs_h, D, TRIG_ON_CHIP)  # offs_h < D/2: no repeat
    lo = (k_lo.to(tl.float32) + kscale * (u_lo * cos - u_hi * sin)).to(k_lo.dtype)
    hi = (k_hi.to(tl.float32) + kscale * (u_hi * cos + u_lo * sin)).to(k_hi.dtype)
    return lo, hi


# ------------------------------------------------------------------------------------------------------------
# prefill: varlen, paged, cached prefix, causal over the new tokens, one adapter per sequence
# ------------------------------------------------------------------------------------------------------------
@triton.jit
def _prefill_tile(
    acc,
    acc_r,
    m_i,
    l_i,
    q,
    qpos,
    n0,
    ctx,
    k_ptr,
    v_ptr,
    k_desc,
    v_desc,
    lr_ptr,
    bt_row,
    lbt_row,
    kv_col,
    lr_end,
    lr_col,
    kup,
    kup_rot,
    kscale,
    cos_ptr,
    sin_ptr,
    offs_d,
    offs_r,
    offs_n,
    sm_scale_log2,
    ks_ptr,
    kstart,
    vstart,
    HKV_D: tl.constexpr,
    D: tl.constexpr,
    R: tl.constexpr,
    LR_W: tl.constexpr,
    KLR_COL: tl.constexpr,
    BS: tl.constexpr,
    MASKED: tl.constexpr,
    HAS_LR: tl.constexpr,
    HAS_KLR: tl.constexpr,
    ANY_LR: tl.constexpr,
    DOT_PREC: tl.constexpr,
    TRIG_ON_CHIP: tl.constexpr,
    KEY_ROWS: tl.constexpr,
    VAL_ROWS: tl.constexpr,
    TMA: tl.constexpr,
):
    kpos = n0 + offs_n
    kmask = kpos < ctx
    if TMA:  # the tile is a run of one page's rows (one block-table read) or of a scratch's; Hopper's copy engine
        if not (KEY_ROWS and VAL_ROWS):  # loads K and V
            row0 = tl.load(bt_row + n0 // BS).to(tl.int32) * BS + n0 % BS
        if KEY_ROWS:  # gathered keys (`value_lr_prefill`): k_desc is over the contiguous scratch
            k = k_desc.load([(kstart + n0).to(tl.int32), kv_col])
        else:
            k = k_desc.load([row0, kv_col])
    else:
        if MASKED:
            blk = tl.load(bt_row + kpos // BS, mask=kmask, other=0).to(tl.int64)
        else:
            blk = tl.load(bt_row + kpos // BS).to(tl.int64)
        row = blk * BS + (kpos % BS)
        kv_off = row[:, None] * HKV_D + kv_col + offs_d[None, :]
        k_at = k_ptr + kv_off
        if KEY_ROWS:  # the keys were materialised for this reader (`key_lr_prefill`): its contiguous scratch rows
            k_at = ks_ptr + (kstart + kpos.to(tl.int64))[:, None] * HKV_D + kv_col + offs_d[None, :]
        if MASKED:
            k = tl.load(k_at, mask=kmask[:, None], other=0.0)
        else:
            k = tl.load(k_at)
    if ANY_LR:
        lmask = kpos < lr_end  # lr_end = 0 for slot 0: nothing read
        if TMA:  # a page run here too: one block-table read, rows in a contiguous strided tile
            lblk0 = tl.load(lbt_row + n0 // BS, mask=n0 < lr_end, other=0).to(tl.int64)
            lrow = lblk0 * BS + n0 % BS + offs_n
        else:
            lblk = tl.load(lbt_row + kpos // BS, mask=lmask, other=0).to(tl.int64)
            lrow = lblk * BS + (kpos % BS)
    if HAS_KLR:
        k = _add_key_lora(
            k, lr_ptr, lrow, lmask, kpos, kup, kup_rot, kscale, cos_ptr, sin_ptr, offs_r, offs_d, R, D, LR_W, KLR_COL,
            DOT_PREC, TRIG_ON_CHIP,
        )  # fmt: skip
    s = tl.dot(q, tl.trans(k), input_precision=DOT_PREC) * sm_scale_log2
    if MASKED:
        visible = (kpos[None, :] <= qpos[:, None]) & kmask[None, :]
        s = tl.where(visible, s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.exp2(m_i - m_safe)
    p = tl.exp2(s - m_safe[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    if TMA:
        if VAL_ROWS:  # materialised values (`value_lr_prefill`): v_desc is over the reader's contiguous scratch
            v = v_desc.load([(vstart + n0).to(tl.int32), kv_col])
        else:
            v = v_desc.load([row0, kv_col])
        if MASKED:  # rows past the context hold whatever the page held (NaN poisons a product with p = 0)
            v = tl.where(kmask[:, None], v, tl.zeros_like(v))
    else:
        v_at = v_ptr + kv_off
        if VAL_ROWS:  # v_ptr is the scratch: this reader's rows from vstart
            v_at = v_ptr + (vstart + kpos.to(tl.int64))[:, None] * HKV_D + kv_col + offs_d[None, :]
        if MASKED:
            v = tl.load(v_at, mask=kmask[:, None], other=0.0)
        else:
            v = tl.load(v_at)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PREC)
    if HAS_LR:
        lr = tl.load(
            lr_ptr + lrow[:, None] * LR_W + lr_col + offs_r[None, :],
            mask=lmask[:, None] & (offs_r[None, :] < R),
            other=0.0,
        )
        acc_r = acc_r * alpha[:, None] + tl.dot(p.to(lr.dtype), lr, input_precision=DOT_PREC)
    return acc, acc_r, m_new, l_i


@triton.jit(do_not_specialize=["stride_bt", "stride_lbt", "NUM_SPLITS"])
def _prefill_kernel(
    q_ptr,
    k_ptr,
    v_ptr,
    k_desc,
    v_desc,
    lr_ptr,
    bt_ptr,
    lbt_ptr,
    qstart_ptr,
    ctx_ptr,
    slot_ptr,
    vup_ptr,
    scaling_ptr,
    out_ptr,
    pacc_ptr,
    pr_ptr,
    pml_ptr,
    row_slot_ptr,
    kup_ptr,
    cos_ptr,
    sin_ptr,
    ks_ptr,
    kstart_ptr,
    vstart_ptr,
    sm_scale_log2,
    stride_qt,
    stride_qh,
    stride_ot,
    stride_oh,
    stride_bt,
    stride_lbt,
    stride_vs,
    stride_vr,
    stride_ks,
    stride_kr,
    NUM_SPLITS,
    HKV: tl.constexpr,
    G: tl.constexpr,
    D: tl.constexpr,
    R: tl.constexpr,
    R_PAD: tl.constexpr,
    LR_W: tl.constexpr,
    LR_SLICE: tl.constexpr,
    KLR_COL: tl.constexpr,
    BS: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    HAS_LR: tl.constexpr,
    HAS_KLR: tl.constexpr,
    ANY_LR: tl.constexpr,
    SINGLE: tl.constexpr,
    DOT_PREC: tl.constexpr,
    TRIG_ON_CHIP: tl.constexpr,
    KEY_ROWS: tl.constexpr,
    VAL_ROWS: tl.constexpr,
    TMA: tl.constexpr,
    HEAVY_FIRST: tl.constexpr,
    GP: tl.constexpr,
):
    # GP > 1 (GQA packing): a program's BLOCK_M rows are TOK tokens x the GP = G query heads of one kv head, so every
    # key and value tile is read once per kv head instead of once per query head; GP = 1: one query head's tokens
    TOK: tl.constexpr = BLOCK_M // GP
    mt = tl.program_id(0) // NUM_SPLITS
    if HEAVY_FIRST:  # under the causal mask the last query tiles read the most keys: launched first, they leave
        mt = tl.num_programs(0) // NUM_SPLITS - 1 - mt  # the light ones for the grid's tail (FlashAttention-3's order)
    sp = tl.program_id(0) % NUM_SPLITS
    hh = tl.program_id(1)  # the kv head (GP > 1) or the query head
    b = tl.program_id(2)
    q0 = tl.load(qstart_ptr + b)
    qlen = tl.load(qstart_ptr + b + 1) - q0
    if mt * TOK >= qlen:
        return
    ctx = tl.load(ctx_ptr + b)
    prefix = ctx - qlen
    g = (hh * GP) // G

    rows_m = tl.arange(0, BLOCK_M)
    offs_m = mt * TOK + rows_m // GP  # each row's token
    heads = hh * GP + rows_m % GP  # and query head
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, D)
    offs_r = tl.arange(0, R_PAD)
    rmask = (offs_m < qlen) & (rows_m < TOK * GP)
    qpos = prefix + offs_m
    q_rows = (q0 + offs_m).to(tl.int64)
    q_at = q_ptr + q_rows[:, None] * stride_qt + heads[:, None] * stride_qh + offs_d[None, :]
    q = tl.load(q_at, mask=rmask[:, None], other=0.0)

    use_lr = False
    lr_end = 0
    lr_col = 0
    slot = 0
    if ANY_LR:
        slot = tl.load(slot_ptr + b)
        use_lr = slot != 0
        lr_end = tl.where(use_lr, ctx, 0)
        lr_col = tl.maximum(slot - 1, 0) * LR_SLICE  # this sequence's slice of a stacked LR row (else 0)
    kup = 0.0
    kup_rot = 0.0
    kscale = 0.0
    if HAS_KLR:  # the reader's B_k for its kv head, once per program (slot 0: zeros, and no R_k is read)
        kup, kup_rot = _load_key_up(kup_ptr, slot, stride_ks, stride_kr, g * D, offs_r, offs_d, R, D)
        kscale = tl.load(scaling_ptr + slot)

    acc = tl.zeros([BLOCK_M, D], dtype=tl.float32)
    acc_r = tl.zeros([BLOCK_M, R_PAD], dtype=tl.float32)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    bt_row = bt_ptr + b.to(tl.int64) * stride_bt
    lbt_row = lbt_ptr + b.to(tl.int64) * stride_lbt
    kv_col = g * D
    kstart = 0
    if KEY_ROWS:
        kstart = tl.load(kstart_ptr + b)
    vstart = 0
    if VAL_ROWS:
        vstart = tl.load(vstart_ptr + b)

    # this split's keys (all of them when SINGLE); split bounds fall on key tiles
    split_len = tl.cdiv(tl.cdiv(ctx, NUM_SPLITS), BLOCK_N) * BLOCK_N
    k_lo = sp * split_len
    k_hi = tl.minimum(k_lo + split_len, ctx)
    # keys strictly before the tile's first query: no mask at all
    first_q = prefix + mt * TOK
    full_end = (first_q // BLOCK_N) * BLOCK_N
    for n0 in range(k_lo, tl.minimum(full_end, k_hi), BLOCK_N):
        acc, acc_r, m_i, l_i = _prefill_tile(
            acc,
            acc_r,
            m_i,
            l_i,
            q,
            qpos,
            n0,
            ctx,
            k_ptr,
            v_ptr,
            k_desc,
            v_desc,
            lr_ptr,
            bt_row,
            lbt_row,
            kv_col,
            lr_end,
            lr_col,
            kup,
            kup_rot,
            kscale,
            cos_ptr,
            sin_ptr,
            offs_d,
            offs_r,
            offs_n,
            sm_scale_log2,
            ks_ptr,
            kstart,
            vstart,
            HKV * D,
            D,
            R,
            LR_W,
            KLR_COL,
            BS,
            False,
            HAS_LR,
            HAS_KLR,
            ANY_LR,
            DOT_PREC,
            TRIG_ON_CHIP,
            KEY_ROWS,
            VAL_ROWS,
            TMA,
        )
    # the diagonal: causal mask and the end of the context
    end = tl.minimum(k_hi, prefix + (mt + 1) * TOK)
    for n0 in range(tl.maximum(full_end, k_lo), end, BLOCK_N):
        acc, acc_r, m_i, l_i = _prefill_tile(
            acc,
            acc_r,
            m_i,
            l_i,
            q,
            qpos,
            n0,
            ctx,
            k_ptr,
            v_ptr,
            k_desc,
            v_desc,
            lr_ptr,
            bt_row,
            lbt_row,
            kv_col,
            lr_end,
            lr_col,
            kup,
            kup_rot,
            kscale,
            cos_ptr,
            sin_ptr,
            offs_d,
            offs_r,
            offs_n,
            sm_scale_log2,
            ks_ptr,
            kstart,
            vstart,
            HKV * D,
            D,
            R,
            LR_W,
            KLR_COL,
            BS,
            True,
            HAS_LR,
            HAS_KLR,
            ANY_LR,
            DOT_PREC,
            TRIG_ON_CHIP,
            KEY_ROWS,
            VAL_ROWS,
            TMA,
        )

    if SINGLE:
        out = _finish_rows(
            acc,
            acc_r,
            l_i,
            use_lr,
            slot,
            vup_ptr,
            scaling_ptr,
            stride_vs,
            stride_vr,
            kv_col,
            offs_r,
            offs_d,
            R,
            HAS_LR,
            DOT_PREC,
        )
        tl.store(
            out_ptr + q_rows[:, None] * stride_ot + heads[:, None] * stride_oh + offs_d[None, :],
            out.to(out_ptr.dtype.element_ty),
            mask=rmask[:, None],
        )
    else:
        # partials laid out as decode's [T, NUM_SPLITS, HQ, ...], one row per (query token, head); the merge reads
        # each token's adapter slot from row_slot (written here once per token: no host-side expansion)
        if HAS_LR:
            if (sp == 0) & (hh == 0):
                tl.store(row_slot_ptr + q_rows, tl.zeros([BLOCK_M], dtype=tl.int64) + slot, mask=rmask)
        base = (q_rows * NUM_SPLITS + sp) * (HKV * G) + heads
        _store_partials(pacc_ptr, pr_ptr, pml_ptr, base, rmask, acc, acc_r, m_i, l_i, offs_d, offs_r, D, R_PAD, HAS_LR)


# ------------------------------------------------------------------------------------------------------------
# decode: split-KV, all q heads of one kv head per program
# ------------------------------------------------------------------------------------------------------------
@triton.jit(do_not_specialize=["stride_bt", "stride_lbt", "NUM_SPLITS"])
def _decode_kernel(
    q_ptr,
    k_ptr,
    v_ptr,
    lr_ptr,
    bt_ptr,
    lbt_ptr,
    ctx_ptr,
    slot_ptr,
    vup_ptr,
    scaling_ptr,
    out_ptr,
    pacc_ptr,
    pr_ptr,
    pml_ptr,
    kup_ptr,
    cos_ptr,
    sin_ptr,
    cnt_ptr,
    sm_scale_log2,
    stride_qt,
    stride_qh,
    stride_ot,
    stride_oh,
    stride_bt,
    stride_lbt,
    stride_vs,
    stride_vr,
    stride_ks,
    stride_kr,
    NUM_SPLITS,
    HKV: tl.constexpr,
    G: tl.constexpr,
    G_PAD: tl.constexpr,
    D: tl.constexpr,
    R: tl.constexpr,
    R_PAD: tl.constexpr,
    LR_W: tl.constexpr,
    LR_SLICE: tl.constexpr,
    KLR_COL: tl.constexpr,
    BS: tl.constexpr,
    BLOCK_N: tl.constexpr,
    HAS_LR: tl.constexpr,
    HAS_KLR: tl.constexpr,
    ANY_LR: tl.constexpr,
    SINGLE: tl.constexpr,
    DOT_PREC: tl.constexpr,
    TRIG_ON_CHIP: tl.constexpr,
    KLR_HALVES: tl.constexpr,
    LAST_SPLIT: tl.constexpr,
    NS_PAD: tl.constexpr,
    CHUNK: tl.constexpr,
):
    g = tl.program_id(0)  # kv heads of one token range run side by side: neighbouring rows of the pools
    sp = tl.program_id(1)
    b = tl.program_id(2)
    ctx = tl.load(ctx_ptr + b)
    split_len = tl.cdiv(tl.cdiv(ctx, NUM_SPLITS), BLOCK_N) * BLOCK_N
    start = sp * split_len
    end = tl.minimum(start + split_len, ctx)

    offs_g = tl.arange(0, G_PAD)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, D)
    offs_r = tl.arange(0, R_PAD)
    gmask = offs_g < G
    heads = g * G + offs_g
    b64 = b.to(tl.int64)
    q_at = q_ptr + b64 * stride_qt + heads[:, None] * stride_qh
    offs_h = tl.arange(0, D // 2)
    if KLR_HALVES:  # keys rebuilt per tile as two RoPE halves: q read the same way
        q_lo = tl.load(q_at + offs_h[None, :], mask=gmask[:, None], other=0.0)
        q_hi = tl.load(q_at + D // 2 + offs_h[None, :], mask=gmask[:, None], other=0.0)
    else:
        q = tl.load(q_at + offs_d[None, :], mask=gmask[:, None], other=0.0)

    use_lr = False
    lr_end = 0
    lr_col = 0
    slot = 0
    if ANY_LR:
        slot = tl.load(slot_ptr + b)
        use_lr = slot != 0
        lr_end = tl.where(use_lr, end, 0)
        lr_col = tl.maximum(slot - 1, 0) * LR_SLICE  # this sequence's slice of a stacked LR row (else 0)
    kup = 0.0
    kup_rot = 0.0
    kscale = 0.0
    if HAS_KLR:  # the reader's B_k for this kv head, once per program
        if KLR_HALVES:
            kup, kup_rot = _key_up_halves(kup_ptr, slot, stride_ks, stride_kr, g * D, offs_r, offs_h, R, D)
        else:
            kup, kup_rot = _load_key_up(kup_ptr, slot, stride_ks, stride_kr, g * D, offs_r, offs_d, R, D)
        kscale = tl.load(scaling_ptr + slot)

    acc = tl.zeros([G_PAD, D], dtype=tl.float32)
    acc_r = tl.zeros([G_PAD, R_PAD], dtype=tl.float32)
    m_i = tl.full([G_PAD], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([G_PAD], dtype=tl.float32)
    bt_row = bt_ptr + b64 * stride_bt
    lbt_row = lbt_ptr + b64 * stride_lbt
    kv_col = g * D
    for n0 in range(start, end, BLOCK_N):
        kpos = n0 + offs_n
        kmask = kpos < end
        blk = tl.load(bt_row + kpos // BS, mask=kmask, other=0).to(tl.int64)
        row = blk * BS + (kpos % BS)
        kv_off = row[:, None] * (HKV * D) + kv_col + offs_d[None, :]
        v = tl.load(v_ptr + kv_off, mask=kmask[:, None], other=0.0)
        if ANY_LR:
            lmask = kpos < lr_end
            lblk = tl.load(lbt_row + kpos // BS, mask=lmask, other=0).to(tl.int64)
            lrow = lblk * BS + (kpos % BS)
        if KLR_HALVES:
            k_at = k_ptr + row[:, None] * (HKV * D) + kv_col + offs_h[None, :]
            k_lo, k_hi = _add_key_lora_halves(
                tl.load(k_at, mask=kmask[:, None], other=0.0), tl.load(k_at + D // 2, mask=kmask[:, None], other=0.0),
                lr_ptr, lrow, lmask, kpos, kup, kup_rot, kscale, cos_ptr, sin_ptr, offs_r, offs_h, R, D, LR_W,
                KLR_COL, DOT_PREC, TRIG_ON_CHIP,
            )  # fmt: skip
            s = tl.dot(q_lo, tl.trans(k_lo), input_precision=DOT_PREC)
            s = (s + tl.dot(q_hi, tl.trans(k_hi), input_precision=DOT_PREC)) * sm_scale_log2
        else:
            k = tl.load(k_ptr + kv_off, mask=kmask[:, None], other=0.0)
            if HAS_KLR:
                k = _add_key_lora(
                    k, lr_ptr, lrow, lmask, kpos, kup, kup_rot, kscale, cos_ptr, sin_ptr, offs_r, offs_d, R, D, LR_W,
                    KLR_COL, DOT_PREC, TRIG_ON_CHIP,
                )  # fmt: skip
            s = tl.dot(q, tl.trans(k), input_precision=DOT_PREC) * sm_scale_log2
        s = tl.where(kmask[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PREC)
        if HAS_LR:
            lr = tl.load(
                lr_ptr + lrow[:, None] * LR_W + lr_col + offs_r[None, :],
                mask=lmask[:, None] & (offs_r[None, :] < R),
                other=0.0,
            )
            acc_r = acc_r * alpha[:, None] + tl.dot(p.to(lr.dtype), lr, input_precision=DOT_PREC)
        m_i = m_new

    if SINGLE:
        out = _finish_rows(
            acc,
            acc_r,
            l_i,
            use_lr,
            slot,
            vup_ptr,
            scaling_ptr,
            stride_vs,
            stride_vr,
            kv_col,
            offs_r,
            offs_d,
            R,
            HAS_LR,
            DOT_PREC,
        )
        tl.store(
            out_ptr + b64 * stride_ot + heads[:, None] * stride_oh + offs_d[None, :],
            out.to(out_ptr.dtype.element_ty),
            mask=gmask[:, None],
        )
    else:
        # partials laid out [B, NUM_SPLITS, HQ, ...]
        base = (b64 * NUM_SPLITS + sp) * (HKV * G) + heads
        _store_partials(pacc_ptr, pr_ptr, pml_ptr, base, gmask, acc, acc_r, m_i, l_i, offs_d, offs_r, D, R_PAD, HAS_LR)
        if LAST_SPLIT:
            # one launch: the split that finishes last merges all of them (empty splits store m = -inf, l = 0 and
            # count too). Every thread's partial stores precede thread 0's release (the barrier, then acq_rel at
            # gpu scope); its acquire precedes the merge's loads (the result is broadcast through a barrier).
            tl.debug_barrier()
            cnt = cnt_ptr + b64 * HKV + g
            done = tl.atomic_add(cnt, 1, sem="acq_rel", scope="gpu")
            if done == NUM_SPLITS - 1:
                for i in range(G):
                    h = g * G + i
                    out = _merge_head(
                        pacc_ptr, pr_ptr, pml_ptr, slot_ptr, vup_ptr, scaling_ptr, b, h, offs_d, stride_vs, stride_vr,
                        NUM_SPLITS, HKV * G, G, D, R, R_PAD, NS_PAD, CHUNK, HAS_LR,
                    )  # fmt: skip
                    tl.store(out_ptr + b64 * stride_ot + h * stride_oh + offs_d, out.to(out_ptr.dtype.element_ty))
                tl.atomic_xchg(cnt, 0)  # ready for the next launch / graph replay: no zeroing on the host


@triton.jit
def _value_up_cols(vup_ptr, slot, stride_vs, stride_vr, g, offs_r, offs_d, D: tl.constexpr, R: tl.constexpr):
    """Columns `offs_d` of kv head g's block of B_v for adapter `slot` ([R_PAD, len(offs_d)] float32, rows past R
    zero): what a merged acc_r multiplies to add s (P R) B (split-KV and cascade merges)."""
    return tl.load(
        vup_ptr + slot * stride_vs + offs_r[:, None] * stride_vr + g * D + offs_d[None, :],
        mask=offs_r[:, None] < R,
        other=0.0,
    ).to(tl.float32)


@triton.jit
def _merge_head(
    pacc_ptr,
    pr_ptr,
    pml_ptr,
    slot_ptr,
    vup_ptr,
    scaling_ptr,
    b,
    h,
    offs_d,
    stride_vs,
    stride_vr,
    NUM_SPLITS,
    HQ: tl.constexpr,
    G: tl.constexpr,
    D: tl.constexpr,
    R: tl.constexpr,
    R_PAD: tl.constexpr,
    NS_PAD: tl.constexpr,
    CHUNK: tl.constexpr,
    HAS_LR: tl.constexpr,
):
    """Columns `offs_d` of query head `h` of row `b` (float32): the splits' partials [rows, NUM_SPLITS, HQ, ...]
    merged by log-sum-exp with their max / sum, plus s acc_r B_g of the row's adapter slot (slot 0: none), over
    the sum. The one copy of the merge arithmetic: the merge kernel (a slice of D per program) and the decode
    kernel's last split (all of D) both call it. Partials are read through L2 (".cg"): in the last-split path other
    SMs wrote them during this launch. The row's slot, scale and B columns are loaded first: they depend on
    nothing computed here, so their latency overlaps the partials'."""
    offs_r = tl.arange(0, R_PAD)
    b64 = b.to(tl.int64)
    if HAS_LR:
        slot = tl.load(slot_ptr + b)
        scale = tl.load(scaling_ptr + slot)
        up = _value_up_cols(vup_ptr, slot, stride_vs, stride_vr, h // G, offs_r, offs_d, D, R)
    offs_s = tl.arange(0, NS_PAD)
    rows = (b64 * NUM_SPLITS + offs_s) * HQ + h
    smask = offs_s < NUM_SPLITS
    m_all = tl.load(pml_ptr + rows * 2, mask=smask, other=float("-inf"), cache_modifier=".cg")
    l_all = tl.load(pml_ptr + rows * 2 + 1, mask=smask, other=0.0, cache_modifier=".cg")
    m_max = tl.max(m_all, 0)
    m_max = tl.where(m_max == float("-inf"), 0.0, m_max)
    big_l = tl.sum(tl.exp2(m_all - m_max) * l_all, 0)  # empty splits: exp2(-inf) * 0 = 0
    offs_c = tl.arange(0, CHUNK)
    acc = tl.zeros(offs_d.shape, dtype=tl.float32)
    acc_r = tl.zeros([R_PAD], dtype=tl.float32)
    for c0 in range(0, NUM_SPLITS, CHUNK):
        cs = c0 + offs_c
        cmask = cs < NUM_SPLITS
        crow = (b64 * NUM_SPLITS + cs) * HQ + h
        w = tl.exp2(tl.load(pml_ptr + crow * 2, mask=cmask, other=float("-inf"), cache_modifier=".cg") - m_max)
        part = tl.load(
            pacc_ptr + crow[:, None] * D + offs_d[None, :], mask=cmask[:, None], other=0.0, cache_modifier=".cg"
        )
        acc += tl.sum(w[:, None] * part, 0)
        if HAS_LR:
            part_r = tl.load(
                pr_ptr + crow[:, None] * R_PAD + offs_r[None, :], mask=cmask[:, None], other=0.0, cache_modifier=".cg"
            )
            acc_r += tl.sum(w[:, None] * part_r, 0)
    out = acc
    if HAS_LR:
        if slot != 0:
            out = out + scale * tl.sum(acc_r[:, None] * up, 0)
    big_l = tl.where(big_l == 0.0, 1.0, big_l)
    return out / big_l


@triton.jit(do_not_specialize=["NUM_SPLITS"])
def _decode_merge_kernel(
    pacc_ptr,
    pr_ptr,
    pml_ptr,
    slot_ptr,
    vup_ptr,
    scaling_ptr,
    out_ptr,
    stride_ot,
    stride_oh,
    stride_vs,
    stride_vr,
    NUM_SPLITS,
    HQ: tl.constexpr,
    G: tl.constexpr,
    D: tl.constexpr,
    R: tl.constexpr,
    R_PAD: tl.constexpr,
    NS_PAD: tl.constexpr,
    CHUNK: tl.constexpr,
    HAS_LR: tl.constexpr,
    BLOCK_D: tl.constexpr = 0,  # columns of D per program (0: all of D)
    PDL: tl.constexpr = False,
):
    """Program (sequence, q head, slice of D): merge the splits' partials with their max / sum, then add s acc_r B_g.
    A slice of D per program: at batch 1 one program per head (32 of them) left each to walk every split's partial
    alone, ~7-10 us on an H200 (Nsight Compute, eighth session); slices put four times the programs on the SMs.
    With PDL the next kernel (the o projection's FP8 GEMV) may launch at once and stream its weights meanwhile."""
    if PDL:
        gdc_launch_dependents()
    b = tl.program_id(0)
    h = tl.program_id(1)
    BD: tl.constexpr = D if BLOCK_D == 0 else BLOCK_D
    offs_d = tl.program_id(2) * BD + tl.arange(0, BD)
    out = _merge_head(
        pacc_ptr, pr_ptr, pml_ptr, slot_ptr, vup_ptr, scaling_ptr, b, h, offs_d, stride_vs, stride_vr, NUM_SPLITS,
        HQ, G, D, R, R_PAD, NS_PAD, CHUNK, HAS_LR,
    )  # fmt: skip
    tl.store(out_ptr + b.to(tl.int64) * stride_ot + h * stride_oh + offs_d, out.to(out_ptr.dtype.element_ty))


# ------------------------------------------------------------------------------------------------------------
# launchers
# ------------------------------------------------------------------------------------------------------------
def _num_sms(device: torch.device) -> int:
    if device.type != "cuda":
        return 4
    return torch.cuda.get_device_properties(device).multi_processor_count


KEY_LR_TRIG = os.environ.get("LRAGENT_KEY_LR_TRIG", "table")  # "chip": 1.6x slower decode on the H200
if KEY_LR_TRIG not in ("chip", "table"):
    raise ValueError(f"LRAGENT_KEY_LR_TRIG must be chip or table, got {KEY_LR_TRIG!r}")


# decode rebuilds keys as two RoPE halves (`_add_key_lora_halves`; needs d >= 32 for its dots) unless
# LRAGENT_KEY_LR_HALVES=0 (the whole-tile form, kept for comparison on the GPU)
KEY_LR_HALVES = os.environ.get("LRAGENT_KEY_LR_HALVES", "1") != "0"


class _Pools:
    """Flattened views of one layer's pools plus the constexprs every launch needs."""

    def __init__(
        self, key, value, lr, value_up, lora_scaling, block_size, key_lr: KeyLR | None = None, keys_built=False
    ):
        self.key, self.value = key, value
        self.hkv, self.d = key.shape[-2], key.shape[-1]
        self.bs = block_size
        self.has_lr = lr is not None and value_up is not None
        key_up = key_lr.up if key_lr is not None and lr is not None else None
        # keys read get s RoPE(R_k B_k) (the row is [R_v | R_k]), unless `keys_built` (materialised already)
        self.has_klr = key_up is not None and not keys_built
        self.any_lr = self.has_lr or self.has_klr
        ups = value_up if self.has_lr else key_up if self.has_klr else None  # the B of what is read
        self.lr = lr if self.any_lr else key
        self.r = ups.shape[1] if ups is not None else 1  # the rank each sequence reads
        self.lr_width = lr.shape[-1] if self.any_lr else 1  # an LR row: r, r per adapter slot (stacked), or 2 r
        self.lr_slice, self.klr_col = 0, 0
        if ups is not None:
            self.lr_slice, self.klr_col = lr_row_layout(self.lr_width, self.r, ups.shape[0] - 1, key_lr is not None)
        self.r_pad = _pow2_at_least(self.r, 16)
        if self.any_lr:
            if lr.stride(-1) != 1 or lr.stride(-2) != self.lr_width:
                raise ValueError("the LR pool must hold contiguous rows")
        if self.has_lr and value_up.stride(-1) != 1:
            value_up = value_up.contiguous()
        self.vup = value_up if self.has_lr else key
        self.stride_vs = value_up.stride(0) if self.has_lr else 0
        self.stride_vr = value_up.stride(1) if self.has_lr else 0
        if key_up is not None and key_up.stride(-1) != 1:
            key_up = key_up.contiguous()
        self.kup = key_up if key_up is not None else key
        self.stride_ks = key_up.stride(0) if key_up is not None else 0
        self.stride_kr = key_up.stride(1) if key_up is not None else 0
        self.cos = key_lr.cos if self.has_klr and key_lr is not None else key
        self.sin = key_lr.sin if self.has_klr and key_lr is not None else key
        tables_ok = self.cos.stride(-1) == 1 and self.cos.stride(0) == self.d and self.sin.shape == self.cos.shape
        if self.has_klr and not tables_ok:
            raise ValueError("the RoPE tables must be contiguous [positions, head_dim]")
        inv_freq = key_lr.inv_freq if self.has_klr and key_lr is not None else None
        self.trig_on_chip = inv_freq is not None and KEY_LR_TRIG == "chip"
        if inv_freq is not None and self.trig_on_chip:
            self.cos = inv_freq.contiguous()  # the kernels compute cos / sin from the frequencies
        self.scaling = lora_scaling


def paged_prefill(
    query: torch.Tensor,
    key_pool: torch.Tensor,
    value_pool: torch.Tensor,
    lr_pool: torch.Tensor | None,
    base_block_tables: torch.Tensor,
    lr_block_tables: torch.Tensor | None,
    query_start: torch.Tensor,
    context_lens: torch.Tensor,
    seq_lora_slots: torch.Tensor,
    value_up: torch.Tensor | None,
    lora_scaling: torch.Tensor,
    max_query_len: int,
    out: torch.Tensor | None = None,
    sm_scale: float | None = None,
    block_m: int | None = None,
    block_n: int | None = None,
    num_warps: int | None = None,
    num_stages: int | None = None,
    max_context: int | None = None,
    num_splits: int | None = None,
    key_lr: KeyLR | None = None,
    key_rows: tuple[torch.Tensor, torch.Tensor] | None = None,
    value_rows: tuple[torch.Tensor, torch.Tensor] | None = None,
    graph_seqs: int | None = None,
    tma: bool | None = None,
) -> torch.Tensor:
    """query [T, Hq, d]; pools [num_blocks, block_size, Hkv, d] / [num_lr_blocks, block_size, r]. Returns [T, Hq, d].

    `num_splits` > 1 splits every sequence's keys (split-KV, merged by the decode merge kernel); None picks it from
    `max_context` (host value) when the grid would leave most of the GPU idle, else 1. `key_lr`: LR rows are
    [R_v | R_k] (width 2 r) and keys get the reader's s RoPE(R_k B_k). `key_rows` (keys [rows, Hkv, d], first row
    of each sequence [B] int64, from `key_lr_prefill.materialize_keys`): every sequence reads its keys there instead
    of through the block tables (base values and LR rows still come from the pools); `key_lr` still gives the LR
    rows' layout [R_v | R_k] and its term is not added again. `value_rows` (values [rows, Hkv, d] with the LR term
    added, first row of each sequence [B] int64, from `value_lr_prefill.materialize_values`; value_up None): every
    sequence reads its values there and the kernel has no LR term. `graph_seqs` (CUDA-graph prefill, whose grid is
    padded with empty sequences and whose rows past the step's tokens are padding): the split count is sized for that
    many sequences, and the split rows' adapter slots start at 0 so the merge of a padding row reads a valid slot.
    `tma`: key / value tiles loaded as whole page runs through tensor descriptors (None: on Hopper whenever pages
    hold whole key tiles, see `_use_tma`; True also runs in the interpreter, for the tests). The LR rows stay pointer
    loads: a descriptor box wider than an LR row (rank 8: 16 of 8 columns) read wrong values on the H200."""
    if key_rows is not None and key_lr is None and value_rows is None:
        raise ValueError("key_rows come with the key_lr they were materialised for (the LR rows' layout)")
    if value_rows is not None and value_up is not None:
        raise ValueError("value_rows hold the LR term already: pass value_up=None with them")
    t, hq, d = query.shape
    p = _Pools(key_pool, value_pool, lr_pool, value_up, lora_scaling, key_pool.shape[1], key_lr, key_rows is not None)
    if hq % p.hkv:
        raise ValueError(f"{hq} query heads are not a multiple of {p.hkv} kv heads")
    if query.stride(-1) != 1:
        query = query.contiguous()
    out = torch.empty_like(query) if out is None else out
    b = seq_lora_slots.shape[0]
    if t == 0 or b == 0:
        return out
    sm_scale = d**-0.5 if sm_scale is None else sm_scale
    on_gpu = query.device.type == "cuda"
    wide = query.element_size() * d  # bytes per row: fp32 (tests only) and d 256 get smaller tiles
    # tiles from the H200 sweep (BENCHMARKS.md): 64 x 64 with 4 warps beat 128-row tiles with 8 warps at d 128
    g = hq // p.hkv
    if block_m is None:
        block_m = (64 if wide <= 512 else 32) if on_gpu else 16
    gp = g if 1 < g <= block_m and _gqa_pack(max_query_len * g) else 1  # GQA packing: see `_prefill_kernel`
    block_m = min(block_m, _pow2_at_least(max_query_len * gp, 16))
    gathered = key_rows is not None and value_rows is not None  # K and V from contiguous scratches: no pages read
    if tma is None:
        tma = _use_tma(p, query.device, block_n, key_rows is not None, gathered)
    if block_n is None:
        block_n = (64 if wide <= 256 else 32) if on_gpu else 16
        if tma and on_gpu:  # page-run tiles (H200 probe, BENCHMARKS.md): 128 x 128 with 8 warps on 128-token pages
            block_n = 128 if wide <= 256 else 64 if wide <= 512 else 32  # fp32 at d 256: shared memory
            block_n = block_n if gathered else min(p.bs, block_n)
            if block_n == 128 and max_query_len * gp >= 128 and block_m == 64:
                block_m = 128
    if tma and not gathered and (p.bs % block_n or p.has_klr or key_rows is not None):
        raise ValueError(f"TMA tiles need pages of whole key tiles ({block_n} keys per tile, pages of {p.bs})")
    if num_warps is None:
        num_warps = 8 if block_m >= 128 else 4
    if num_stages is None:  # the LR-free 128 x 128 tile ran best with 2 (H200 probe, tenth session)
        num_stages = (2 if gathered and block_m >= 128 else 3) if tma else 2
    lbt = lr_block_tables if (p.any_lr and lr_block_tables is not None) else base_block_tables
    m_tiles = triton.cdiv(max_query_len, block_m // gp)
    if num_splits is None:
        num_splits = 1
        if on_gpu and max_context is not None:
            programs = m_tiles * (hq // gp) * (graph_seqs or b)
            num_splits = prefill_num_splits(programs, max_context, query.device, block_n)
    single = num_splits == 1
    if single:
        pacc = pr = pml = row_slots = out  # unused
    else:
        pacc, pr, pml, row_slots = _split_partials(t, num_splits, hq, d, p.r_pad if p.has_lr else 0, query.device)
        if graph_seqs is not None and p.has_lr:
            row_slots.zero_()  # padding rows get no slot from the kernel (their tiles exit): slot 0, zero B
    keys = key_pool if key_rows is None else key_rows[0]
    values = value_pool if value_rows is None else value_rows[0]
    k_desc, v_desc = (_kv_descriptor(keys, block_n), _kv_descriptor(values, block_n)) if tma else (0, 0)
    _prefill_kernel[(m_tiles * num_splits, hq // gp, b)](
        query,
        key_pool,
        values,
        k_desc,
        v_desc,
        p.lr,
        base_block_tables,
        lbt,
        query_start,
        context_lens,
        seq_lora_slots,
        p.vup,
        lora_scaling,
        out,
        pacc,
        pr,
        pml,
        row_slots,
        p.kup,
        p.cos,
        p.sin,
        key_pool if key_rows is None else key_rows[0],
        context_lens if key_rows is None else key_rows[1],
        context_lens if value_rows is None else value_rows[1],
        sm_scale * LOG2E,
        query.stride(0),
        query.stride(1),
        out.stride(0),
        out.stride(1),
        base_block_tables.stride(0),
        lbt.stride(0),
        p.stride_vs,
        p.stride_vr,
        p.stride_ks,
        p.stride_kr,
        num_splits,
        HKV=p.hkv,
        G=hq // p.hkv,
        D=d,
        R=p.r,
        R_PAD=p.r_pad,
        LR_W=p.lr_width,
        LR_SLICE=p.lr_slice,
        KLR_COL=p.klr_col,
        BS=p.bs,
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        HAS_LR=p.has_lr,
        HAS_KLR=p.has_klr,
        ANY_LR=p.any_lr,
        SINGLE=single,
        DOT_PREC=_dot_precision(query.dtype),
        TRIG_ON_CHIP=p.trig_on_chip,
        KEY_ROWS=key_rows is not None,
        VAL_ROWS=value_rows is not None,
        TMA=tma,
        HEAVY_FIRST=PREFILL_HEAVY_FIRST,
        GP=gp,
        num_warps=num_warps,
        num_stages=num_stages,
    )
    if not single:
        _merge_splits(pacc, pr, pml, row_slots, p, lora_scaling, out, num_splits, hq, p.r_pad)
    return out


PREFILL_TMA = os.environ.get("LRAGENT_PREFILL_TMA", "auto")  # "0": always the pointer-gather tiles
# prefill's query tiles launched last tile first (LRAGENT_PREFILL_HEAVY_FIRST=0: in order, for A/B timing)
PREFILL_HEAVY_FIRST = os.environ.get("LRAGENT_PREFILL_HEAVY_FIRST", "1") != "0"
# prefill packs the G query heads of a kv head into one program's rows: "auto" for short chunks (at most
# GQA_PACK_ROWS query rows, tokens x G), "1" always, "0" never (a program per query head, each reading its kv
# head's keys and values again). Long chunks are compute-bound and ran up to 6% slower packed (H200, twelfth
# session: four times the diagonal tiles)
PREFILL_GQA_PACK = os.environ.get("LRAGENT_PREFILL_GQA_PACK", "auto")
if PREFILL_GQA_PACK not in ("auto", "0", "1"):
    raise ValueError(f"LRAGENT_PREFILL_GQA_PACK must be auto, 0 or 1, got {PREFILL_GQA_PACK!r}")
GQA_PACK_ROWS = 256


def _gqa_pack(rows: int) -> bool:
    return PREFILL_GQA_PACK == "1" or (PREFILL_GQA_PACK == "auto" and rows <= GQA_PACK_ROWS)


def _use_tma(p: _Pools, device: torch.device, block_n: int | None, keys_built: bool, gathered: bool = False) -> bool:
    """Tiles through tensor descriptors: Hopper or newer, and either K and V both gathered into contiguous scratches
    (`gathered`: any tile) or page runs: pages of >= 64 tokens that hold whole key tiles, contiguous pools, keys read
    as they are (a key-LR rebuild or materialised keys alone keep the pointer path)."""
    if PREFILL_TMA == "0" or not hopper_or_newer(device):
        return False
    if gathered:
        return True
    if p.has_klr or keys_built or p.bs < 64 or (block_n is not None and p.bs % block_n):
        return False
    if p.has_lr and p.r * p.lr.element_size() < 4:  # 2-byte LR rows (rank 1, 16-bit): wrong on the H200 (Triton
        return False  # 3.6) while the LR rows were gathered per key; right since they are a page run
        # (benchmarks/tma_check.py, forced), kept on the pointer tiles until the GPU matrix has run that case
    return p.key.is_contiguous() and p.value.is_contiguous()


def _kv_descriptor(pool: torch.Tensor, block_n: int):
    """A [blocks * block_size, Hkv * d] view of a key or value pool (or a [rows, Hkv, d] scratch of materialised
    values) with [block_n, d] boxes: a tile of page-run rows at (first row, kv head * d)."""
    from triton.tools.tensor_descriptor import TensorDescriptor

    d = pool.shape[-1]
    return TensorDescriptor.from_tensor(pool.reshape(-1, pool.shape[-2] * d), [block_n, d])


def _split_partials(rows: int, splits: int, hq: int, d: int, r_pad: int, device: torch.device):
    """Split-KV partials of `rows` query rows in one allocation (host time per launch is what short chunks pay):
    acc [rows, splits, hq, d], acc_r [.., r_pad], (max, sum) [.., 2] as float32, and a slot per row (int64)."""
    per_row = splits * hq * (d + r_pad + 2) + 2  # + 2 float32 words: one int64 slot
    buf = torch.empty(rows * per_row, dtype=torch.float32, device=device)
    n_acc, n_r, n_ml = rows * splits * hq * d, rows * splits * hq * r_pad, rows * splits * hq * 2
    pacc = buf[:n_acc].view(rows, splits, hq, d)
    pr = buf[n_acc : n_acc + n_r].view(rows, splits, hq, r_pad) if r_pad else pacc
    pml = buf[n_acc + n_r : n_acc + n_r + n_ml].view(rows, splits, hq, 2)
    row_slots = buf[n_acc + n_r + n_ml :].view(torch.int64)
    return pacc, pr, pml, row_slots


# short chunks after contexts shorter than this run unsplit. 8192 while eager short chunks paid the split's host
# work per layer (a first version made 24-token chunks ~6 ms slower below ~17k keys); with GQA-packed tiles and
# CUDA-graph prefill a 32-token chunk after 1k keys is 8 programs of 17 key tiles each unsplit (H200, twelfth
# session: 0.034 ms against SDPA's 0.020)
PREFILL_SPLIT_MIN_CONTEXT = 2048


def prefill_num_splits(programs: int, max_context: int, device: torch.device, block_n: int = 64) -> int:
    """Split-KV count for a prefill grid of `programs` (query tile, head, sequence) programs: enough splits for
    about one wave when the grid alone is under an eighth of one and the context is long, >= 4 key tiles a split;
    1 otherwise. (Under half a wave, as before, split 512-token chunks in two: 0.36 ms against 0.21 unsplit after
    8k keys on the H200, twelfth session, the partials' write and merge costing more than the idle SMs.)"""
    wave = 4 * _num_sms(device)
    if 8 * programs > wave or max_context < PREFILL_SPLIT_MIN_CONTEXT:
        return 1
    return max(1, min(wave // max(1, programs), -(-max_context // (4 * block_n)), 64))


# columns of D per merge program (`_decode_merge_kernel`); 0 = all of D (LRAGENT_DECODE_MERGE_BLOCK_D, for sweeps)
MERGE_BLOCK_D = int(os.environ.get("LRAGENT_DECODE_MERGE_BLOCK_D", "32"))


def _merge_tiles(num_splits: int, d: int) -> tuple[int, int]:
    """`_merge_head`'s NS_PAD (all splits' max / sum at once) and CHUNK (splits' partials per step)."""
    ns_pad = _pow2_at_least(num_splits, 16)
    return ns_pad, min(ns_pad, 64 if d <= 128 else 32)


def _merge_splits(pacc, pr, pml, row_slots, p: _Pools, lora_scaling, out, num_splits: int, hq: int, r_pad: int):
    """Combine split-KV partials [rows, splits, Hq, ...] into out [rows, Hq, d] and add s acc_r B per row."""
    d = out.shape[-1]
    ns_pad, chunk = _merge_tiles(num_splits, d)
    block_d = min(d, MERGE_BLOCK_D) if MERGE_BLOCK_D else d
    _decode_merge_kernel[(out.shape[0], hq, d // block_d)](
        pacc,
        pr,
        pml,
        row_slots,
        p.vup,
        lora_scaling,
        out,
        out.stride(0),
        out.stride(1),
        p.stride_vs,
        p.stride_vr,
        num_splits,
        HQ=hq,
        G=hq // p.hkv,
        D=d,
        R=p.r,
        R_PAD=r_pad,
        NS_PAD=ns_pad,
        CHUNK=chunk,
        HAS_LR=p.has_lr,
        BLOCK_D=block_d,
        PDL=pdl_enabled(out.device),
        num_warps=4,
    )


def default_num_splits(
    batch: int, num_kv_heads: int, max_context: int, device: torch.device, block_n: int = 64, programs_per_sm: int = 4
) -> int:
    """Split-KV count: about one full wave of (kv head, split, sequence) programs (the decode kernel keeps ~4 resident
    per SM at 128 registers x 4 warps), rounded down so the last wave is not a small tail; >= 2 key tiles a split."""
    slots = programs_per_sm * _num_sms(device)
    splits = max(1, slots // max(1, batch * num_kv_heads))
    return max(1, min(splits, -(-max_context // (2 * block_n)), 256))


# how split-KV decode merges its splits: "kernel" (a second, small launch: `_decode_merge_kernel`) or "last_split"
# (one launch: the split program that finishes last for a (sequence, kv head) merges them, see `_decode_kernel`).
# Read here only; `paged_decode(merge=...)` overrides it per call.
DECODE_MERGE_MODES = ("kernel", "last_split")
DECODE_MERGE = os.environ.get("LRAGENT_DECODE_MERGE", "kernel")
if DECODE_MERGE not in DECODE_MERGE_MODES:
    raise ValueError(f"LRAGENT_DECODE_MERGE must be kernel or last_split, got {DECODE_MERGE!r}")

DECODE_COUNTERS_OWNER = "paged_decode(merge='last_split')"


def decode_counters(n: int, device: torch.device) -> torch.Tensor:
    """At least `n` zeroed arrival counters for `_decode_kernel`'s last-split merge (one per (sequence row, kv head));
    the last split of each resets its own. Grow-only and graph-safe: see `arrival_counters`."""
    return arrival_counters(n, device, DECODE_COUNTERS_OWNER)


def paged_decode(
    query: torch.Tensor,
    key_pool: torch.Tensor,
    value_pool: torch.Tensor,
    lr_pool: torch.Tensor | None,
    base_block_tables: torch.Tensor,
    lr_block_tables: torch.Tensor | None,
    context_lens: torch.Tensor,
    seq_lora_slots: torch.Tensor,
    value_up: torch.Tensor | None,
    lora_scaling: torch.Tensor,
    max_context: int | None = None,
    num_splits: int | None = None,
    out: torch.Tensor | None = None,
    sm_scale: float | None = None,
    block_n: int | None = None,
    num_warps: int | None = None,
    num_stages: int | None = None,
    key_lr: KeyLR | None = None,
    merge: str | None = None,
) -> torch.Tensor:
    """query [B, Hq, d] (one token per sequence). `num_splits` fixed (CUDA graphs) or chosen from `max_context`.
    `merge`: how more than one split is merged, "kernel" or "last_split" (see `DECODE_MERGE`; None: that)."""
    b, hq, d = query.shape
    p = _Pools(key_pool, value_pool, lr_pool, value_up, lora_scaling, key_pool.shape[1], key_lr)
    if hq % p.hkv:
        raise ValueError(f"{hq} query heads are not a multiple of {p.hkv} kv heads")
    if query.stride(-1) != 1:
        query = query.contiguous()
    out = torch.empty_like(query) if out is None else out
    if b == 0:
        return out
    on_gpu = query.device.type == "cuda"
    wide = query.element_size() * d
    if block_n is None:
        block_n = (64 if wide <= 256 else 32) if on_gpu else 16
    if num_stages is None:
        num_stages = 2  # 95 registers at d 128: five programs per SM
    if num_splits is None:
        if max_context is None:
            raise ValueError("give max_context (host value) or num_splits")
        num_splits = default_num_splits(b, p.hkv, max_context, query.device, block_n)
    if num_warps is None:
        num_warps = 4
    # the P R dot's N must cover 8 columns per warp, or Triton lays the warps along the 16 padded query rows and
    # every warp computes the whole tile (twice the registers, a quarter of the occupancy)
    r_pad = max(p.r_pad, 8 * num_warps)
    sm_scale = d**-0.5 if sm_scale is None else sm_scale
    g = hq // p.hkv
    single = num_splits == 1
    merge = DECODE_MERGE if merge is None else merge
    if merge not in DECODE_MERGE_MODES:
        raise ValueError(f"merge must be kernel or last_split, got {merge!r}")
    last_split = merge == "last_split" and not single
    counters = decode_counters(b * p.hkv, query.device) if last_split else out  # unused unless last_split
    ns_pad, chunk = _merge_tiles(num_splits, d) if last_split else (1, 1)  # kernel mode: no extra variants
    if single:
        pacc = pr = pml = out  # unused
    else:
        pacc = torch.empty(b, num_splits, hq, d, dtype=torch.float32, device=query.device)
        pr = torch.empty(b, num_splits, hq, r_pad, dtype=torch.float32, device=query.device) if p.has_lr else pacc
        pml = torch.empty(b, num_splits, hq, 2, dtype=torch.float32, device=query.device)
    lbt = lr_block_tables if (p.any_lr and lr_block_tables is not None) else base_block_tables
    _decode_kernel[(p.hkv, num_splits, b)](
        query,
        key_pool,
        value_pool,
        p.lr,
        base_block_tables,
        lbt,
        context_lens,
        seq_lora_slots,
        p.vup,
        lora_scaling,
        out,
        pacc,
        pr,
        pml,
        p.kup,
        p.cos,
        p.sin,
        counters,
        sm_scale * LOG2E,
        query.stride(0),
        query.stride(1),
        out.stride(0),
        out.stride(1),
        base_block_tables.stride(0),
        lbt.stride(0),
        p.stride_vs,
        p.stride_vr,
        p.stride_ks,
        p.stride_kr,
        num_splits,
        HKV=p.hkv,
        G=g,
        G_PAD=_pow2_at_least(g, 16),
        D=d,
        R=p.r,
        R_PAD=r_pad,
        LR_W=p.lr_width,
        LR_SLICE=p.lr_slice,
        KLR_COL=p.klr_col,
        BS=p.bs,
        BLOCK_N=block_n,
        HAS_LR=p.has_lr,
        HAS_KLR=p.has_klr,
        ANY_LR=p.any_lr,
        SINGLE=single,
        DOT_PREC=_dot_precision(query.dtype),
        TRIG_ON_CHIP=p.trig_on_chip,
        KLR_HALVES=p.has_klr and d >= 32 and KEY_LR_HALVES,
        LAST_SPLIT=last_split,
        NS_PAD=ns_pad,
        CHUNK=chunk,
        num_warps=num_warps,
        num_stages=num_stages,
    )
    if not single and not last_split:
        _merge_splits(pacc, pr, pml, seq_lora_slots, p, lora_scaling, out, num_splits, hq, r_pad)
    return out
