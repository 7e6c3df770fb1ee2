"""Long prefill chunks read values with the LR term already added: V' = V_base + s R B_v, once per reader.

Flash-LoRA-Attention keeps the LR term out of the value pool: every key tile adds `P R` to a rank-r accumulator and
the merge applies `s (P R) B_v` once. That is the right trade where attention streams the cache (decode, short
chunks): it reads r extra numbers per key instead of d. A long prefill chunk is compute-bound instead: each key
tile is read once per query tile and head, and the LR accumulator costs every tile a second small MMA, an LR row
gather and its rescale (on the H200, 6-11% of the prefill kernel's time, BENCHMARKS.md). Here one launch per layer
writes each prefill sequence's values `V_base + s (R B_v)` (float32 sum, rounded to the pool's dtype, as the
model's own v_proj output would be) into a contiguous scratch, and the prefill kernel reads them there with no LR
term (`paged_prefill(value_rows=...)`). The scratch costs the context's values once more in memory traffic per
layer, which `materialize_values_worth_it` weighs against the chunk's attention work.

`VALUE_LR_PREFILL` (environment `LRAGENT_VALUE_LR_PREFILL`): "auto" (the default: on a GPU, for chunks whose
token-weighted query length reaches `MIN_QUERY`), "materialize" (always: tests) or "on_chip" (never).
`materialize_values_reference` is the slow exact torch route the tests compare the kernel with.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from lragent.kernels.backend import KeyLR, upload
from lragent.kernels.key_lr_prefill import row_starts
from lragent.kernels.reference import gather_positions, lr_row_layout
from lragent.kernels.triton_attention import _dot_precision, _Pools, _value_up_cols

VALUE_LR_PREFILL = os.environ.get("LRAGENT_VALUE_LR_PREFILL", "auto")
MODES = ("auto", "on_chip", "materialize")
if VALUE_LR_PREFILL not in MODES:
    raise ValueError(f"LRAGENT_VALUE_LR_PREFILL must be one of {MODES}, got {VALUE_LR_PREFILL!r}")
# "auto" materialises when the chunk's queries per context key (token-weighted) reach this: below it the prefill
# is closer to streaming the cache, where reading r numbers per key beats writing and re-reading d of them
MIN_QUERY = int(os.environ.get("LRAGENT_VALUE_LR_MIN_QUERY", "512"))


def materialize_values_worth_it(
    query_lens: list[int], context_lens: list[int], device: torch.device, mode: str | None = None
) -> bool:
    """Whether a prefill step with these lengths should read materialised values (see the module docstring):
    sum(q_i * ctx_i) >= MIN_QUERY * sum(ctx_i), i.e. each context key serves that many queries on average."""
    mode = VALUE_LR_PREFILL if mode is None else mode
    if mode not in MODES:
        raise ValueError(f"value LR prefill mode must be one of {MODES}, got {mode!r}")
    if mode != "auto":
        return mode == "materialize"
    if device.type != "cuda":
        return False
    keys = sum(context_lens)
    return keys > 0 and sum(q * c for q, c in zip(query_lens, context_lens)) >= MIN_QUERY * keys


@triton.jit(do_not_specialize=["stride_bt", "stride_lbt"])
def _materialize_kernel(
    v_ptr,
    lr_ptr,
    bt_ptr,
    lbt_ptr,
    ctx_ptr,
    start_ptr,
    slot_ptr,
    scaling_ptr,
    vup_ptr,
    out_ptr,
    stride_bt,
    stride_lbt,
    stride_vs,
    stride_vr,
    HKV: tl.constexpr,
    D: tl.constexpr,
    R: tl.constexpr,
    R_PAD: tl.constexpr,
    LR_W: tl.constexpr,
    LR_SLICE: tl.constexpr,
    BS: tl.constexpr,
    BLOCK_N: tl.constexpr,
    DOT_PREC: tl.constexpr,
):
    """Program (key tile, kv head, sequence): V_base + s R B_v of the reader into its scratch rows (a slot-0 reader
    gets its base values: it reads no LR row)."""
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
    blk = tl.load(bt_ptr + b64 * stride_bt + kpos // BS, mask=kmask, other=0).to(tl.int64)
    v = tl.load(v_ptr + (blk * BS + kpos % BS)[:, None] * (HKV * D) + g * D + offs_d[None, :], mask=kmask[:, None])
    slot = tl.load(slot_ptr + b)
    out = v.to(tl.float32)
    if slot != 0:
        lblk = tl.load(lbt_ptr + b64 * stride_lbt + kpos // BS, mask=kmask, other=0).to(tl.int64)
        lr_col = (slot - 1) * LR_SLICE  # this reader's slice of a stacked LR row (else 0)
        lr = tl.load(
            lr_ptr + (lblk * BS + kpos % BS)[:, None] * LR_W + lr_col + offs_r[None, :],
            mask=kmask[:, None] & (offs_r[None, :] < R),
            other=0.0,
        )
        up = _value_up_cols(vup_ptr, slot, stride_vs, stride_vr, g, offs_r, offs_d, D, R)
        scale = tl.load(scaling_ptr + slot)
        out += scale * tl.dot(lr.to(tl.float32), up, input_precision=DOT_PREC)
    rows = tl.load(start_ptr + b) + kpos.to(tl.int64)
    tl.store(out_ptr + rows[:, None] * (HKV * D) + g * D + offs_d[None, :], out.to(v.dtype), mask=kmask[:, None])


def materialize_values(
    value_pool: torch.Tensor,
    lr_pool: torch.Tensor,
    base_block_tables: torch.Tensor,
    lr_block_tables: torch.Tensor | None,
    seq_lora_slots: torch.Tensor,
    value_up: torch.Tensor,
    lora_scaling: torch.Tensor,
    context_lens: list[int],
    key_lr: KeyLR | None = None,
    block_n: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(values [sum(context_lens), Hkv, d] in the pool's dtype, first row of each sequence [B] int64): every prefill
    sequence's whole context with its reader's value adapter term. One launch, no host synchronisation. `key_lr`:
    LR rows are [R_v | R_k] (the value part is read). No LR block tables: the LR rows sit where the base rows do."""
    bs, hkv, d = value_pool.shape[1:]
    lr_block_tables = base_block_tables if lr_block_tables is None else lr_block_tables
    starts = row_starts(context_lens)
    values = value_pool.new_empty(max(1, sum(context_lens)), hkv, d)
    start_t = upload(starts, torch.int64, value_pool.device)
    ctx_t = upload(context_lens, torch.int32, value_pool.device)
    p = _Pools(value_pool, value_pool, lr_pool, value_up, lora_scaling, bs, key_lr)
    if block_n is None:
        block_n = 64 if value_pool.device.type == "cuda" else 16
    grid = (triton.cdiv(max(context_lens, default=0), block_n), hkv, len(context_lens))
    if grid[0] > 0:
        _materialize_kernel[grid](
            value_pool, p.lr, base_block_tables, lr_block_tables, ctx_t, start_t, seq_lora_slots, lora_scaling,
            p.vup, values, base_block_tables.stride(0), lr_block_tables.stride(0), p.stride_vs, p.stride_vr,
            HKV=hkv, D=d, R=p.r, R_PAD=p.r_pad, LR_W=p.lr_width, LR_SLICE=p.lr_slice, BS=bs, BLOCK_N=block_n,
            DOT_PREC=_dot_precision(value_pool.dtype), num_warps=4,
        )  # fmt: skip
    return values, start_t


def materialize_values_reference(
    value_pool: torch.Tensor,
    lr_pool: torch.Tensor,
    base_block_tables: torch.Tensor,
    lr_block_tables: torch.Tensor | None,
    seq_lora_slots: torch.Tensor,
    value_up: torch.Tensor,
    lora_scaling: torch.Tensor,
    context_lens: list[int],
    key_lr: KeyLR | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """`materialize_values` in plain torch (gathers through the block tables, float64 sum): the exact oracle."""
    bs, hkv, d = value_pool.shape[1:]
    lr_block_tables = base_block_tables if lr_block_tables is None else lr_block_tables
    rank, width = value_up.shape[1], lr_pool.shape[-1]
    lr_slice, _ = lr_row_layout(width, rank, value_up.shape[0] - 1, key_lr is not None)
    values = value_pool.new_empty(max(1, sum(context_lens)), hkv, d)
    flat_v, flat_lr = value_pool.view(-1, hkv, d), lr_pool.view(-1, width)
    for i, (start, length) in enumerate(zip(row_starts(context_lens), context_lens)):
        if length == 0:
            continue
        slot = int(seq_lora_slots[i])
        v = flat_v[gather_positions(base_block_tables[i], length, bs)].double()
        if slot != 0:
            col = (slot - 1) * lr_slice
            r = flat_lr[gather_positions(lr_block_tables[i], length, bs)][:, col : col + rank].double()
            v = v + float(lora_scaling[slot]) * (r @ value_up[slot].double()).view(length, hkv, d)
        values[start : start + length] = v.to(values.dtype)
    return values, torch.tensor(row_starts(context_lens), dtype=torch.int64, device=value_pool.device)


def scratch_bytes(context_lens: list[int], value_pool: torch.Tensor) -> int:
    """What `materialize_values` allocates: the contexts' values."""
    hkv, d = value_pool.shape[-2:]
    return sum(context_lens) * hkv * d * value_pool.element_size()
