"""Long prefill chunks read gathered keys and values with the LR term already added, V' = V_base + s R B_v.

Flash-LoRA-Attention keeps the LR term out of the value pool: every key tile adds `P R` to a rank-r accumulator and
the merge applies `s (P R) B_v` once. That is the right trade where attention streams the cache (decode, short
chunks): it reads r extra numbers per key instead of d. A long prefill chunk is compute-bound instead: each key
tile is read once per query tile and head, and the LR accumulator costs every tile a second small MMA, an LR row
gather and its rescale (on the H200, 6-11% of the prefill kernel's time, BENCHMARKS.md), while page-run tiles are
limited to a page's keys. Here one launch per layer writes each prefill sequence's values `V_base + s (R B_v)`
(float32 sum, rounded to the pool's dtype, as the model's own v_proj output would be) and one its keys into
contiguous scratches (sequences back to back), and the prefill kernel reads both there with no LR term and with
128-key tiles whatever the page size (`paged_prefill(key_rows=..., value_rows=...)`). The scratches cost the
context's keys and values once more in memory traffic per layer, which `gathered_route_worth_it` weighs
against the chunk's attention work. With key adapters the keys come from `key_lr_prefill.materialize_keys`.

`VALUE_LR_PREFILL` (environment `LRAGENT_VALUE_LR_PREFILL`): "auto" (the default: on a GPU, for steps with at least
`MIN_PAIRS` causal query-key pairs per context key), "materialize" (always: tests) or "on_chip" (never).
`materialize_values_reference` is the slow exact torch route the tests compare the kernel with.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from lragent.kernels.backend import KeyLR, upload
from lragent.kernels.key_lr_prefill import _context_tile, _store_scratch_tile, row_starts
from lragent.kernels.reference import gather_positions, lr_row_layout
from lragent.kernels.triton_attention import _dot_precision, _Pools, _value_up_cols

VALUE_LR_PREFILL = os.environ.get("LRAGENT_VALUE_LR_PREFILL", "auto")
MODES = ("auto", "on_chip", "materialize")
if VALUE_LR_PREFILL not in MODES:
    raise ValueError(f"LRAGENT_VALUE_LR_PREFILL must be one of {MODES}, got {VALUE_LR_PREFILL!r}")
# "auto" gathers when the chunk's causal query-key pairs per context key reach this: below it the prefill is closer
# to streaming the cache, where reading r numbers per key beats writing and re-reading the keys and values (H200,
# bench kernels, twelfth session: 2k new tokens alone (1,024 pairs a key) 4% slower gathered, 2k after 8k (1,843)
# 7% faster, 1k after 8k (967) 2% slower)
MIN_PAIRS = int(os.environ.get("LRAGENT_VALUE_LR_MIN_PAIRS", "1536"))
# the scratches are transient (one layer) but outside the KV budget's measured step peak: a step whose scratches
# would pass this keeps the on-chip route (512 MiB: 131k context tokens of Llama-3.1-8B's keys and values in bf16)
MAX_SCRATCH_BYTES = int(os.environ.get("LRAGENT_VALUE_LR_MAX_SCRATCH", str(512 << 20)))


@dataclass(frozen=True)
class ScratchRows:
    """Where each prefill sequence's context sits in a gathered scratch (sequences back to back): uploaded once per
    step (`of`), read by every layer's gathers and by the prefill kernel."""

    lens: list[int]  # host: each sequence's context length
    lens_t: torch.Tensor  # [B] int32
    starts: torch.Tensor  # [B] int64 first row of each sequence

    @staticmethod
    def of(context_lens: list[int], device: torch.device) -> ScratchRows:
        return ScratchRows(
            list(context_lens),
            upload(context_lens, torch.int32, device),
            upload(row_starts(context_lens), torch.int64, device),
        )

    @property
    def total(self) -> int:
        return sum(self.lens)


def gathered_route_worth_it(
    query_lens: list[int],
    context_lens: list[int],
    device: torch.device,
    mode: str | None = None,
    row_bytes: int = 0,
) -> bool:
    """Whether a prefill step with these lengths should take the gathered route (see the module docstring): its
    causal query-key pairs, sum(q_i (ctx_i - q_i / 2)), reach MIN_PAIRS per context key, sum(ctx_i): the
    attention work each gathered key and value row serves; and ("auto") its scratches, `row_bytes` a context
    token, stay within MAX_SCRATCH_BYTES."""
    mode = VALUE_LR_PREFILL if mode is None else mode
    if mode not in MODES:
        raise ValueError(f"value LR prefill mode must be one of {MODES}, got {mode!r}")
    if mode != "auto":
        return mode == "materialize"
    if device.type != "cuda":
        return False
    keys = sum(context_lens)
    pairs = sum(q * (c - q / 2) for q, c in zip(query_lens, context_lens))
    return keys > 0 and pairs >= MIN_PAIRS * keys and keys * row_bytes <= MAX_SCRATCH_BYTES


@triton.jit(do_not_specialize=["stride_bt", "stride_lbt"])
def _gather_kernel(
    pool_ptr,
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
    HAS_LR: tl.constexpr,
    DOT_PREC: tl.constexpr,
):
    """Program (key tile, kv head, sequence): the pool's rows of the sequence's context into its scratch rows, with
    `HAS_LR` the reader's s R B_v added (a slot-0 reader gets its base values: it reads no LR row)."""
    n0 = tl.program_id(0) * BLOCK_N
    g = tl.program_id(1)
    b = tl.program_id(2)
    ctx = tl.load(ctx_ptr + b)
    if n0 >= ctx:
        return
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, D)
    kpos = n0 + offs_n
    kmask = kpos < ctx
    b64 = b.to(tl.int64)
    v = _context_tile(pool_ptr, bt_ptr + b64 * stride_bt, kpos, kmask, g, offs_d, HKV, D, BS)
    out = v
    if HAS_LR:
        slot = tl.load(slot_ptr + b)
        if slot != 0:
            offs_r = tl.arange(0, R_PAD)
            lblk = tl.load(lbt_ptr + b64 * stride_lbt + kpos // BS, mask=kmask, other=0).to(tl.int64)
            lr_col = (slot - 1) * LR_SLICE  # this reader's slice of a stacked LR row (else 0)
            lr = tl.load(
                lr_ptr + (lblk * BS + kpos % BS)[:, None] * LR_W + lr_col + offs_r[None, :],
                mask=kmask[:, None] & (offs_r[None, :] < R),
                other=0.0,
            )
            up = _value_up_cols(vup_ptr, slot, stride_vs, stride_vr, g, offs_r, offs_d, D, R)
            scale = tl.load(scaling_ptr + slot)
            out = (v.to(tl.float32) + scale * tl.dot(lr.to(tl.float32), up, input_precision=DOT_PREC)).to(v.dtype)
    _store_scratch_tile(out_ptr, start_ptr, b, out, kpos, kmask, g, offs_d, HKV, D)


def _gather(pool: torch.Tensor, rows: ScratchRows, block_n: int | None, *args, **consts) -> torch.Tensor:
    """[rows.total, Hkv, d] in the pool's dtype from one `_gather_kernel` launch; `args` are its pointers and strides
    after the pool's (LR pool, block tables, lengths, ... as the kernel lists them) and `consts` its LR constexprs."""
    bs, hkv, d = pool.shape[1:]
    out = pool.new_empty(max(1, rows.total), hkv, d)
    bn = block_n or (64 if pool.device.type == "cuda" else 16)
    grid = (triton.cdiv(max(rows.lens, default=0), bn), hkv, len(rows.lens))
    if grid[0] > 0:
        lr, bt, lbt, slots, scaling, vup, stride_vs, stride_vr = args
        _gather_kernel[grid](
            pool, lr, bt, lbt, rows.lens_t, rows.starts, slots, scaling, vup, out, bt.stride(0), lbt.stride(0),
            stride_vs, stride_vr, HKV=hkv, D=d, BS=bs, BLOCK_N=bn, num_warps=4, **consts,
        )  # fmt: skip
    return out


def gather_rows(
    pool: torch.Tensor, block_tables: torch.Tensor, rows: ScratchRows, block_n: int | None = None
) -> torch.Tensor:
    """[rows.total, Hkv, d]: each sequence's context of a key or value pool, contiguous. One launch, no sync."""
    return _gather(
        pool, rows, block_n, pool, block_tables, block_tables, rows.starts, pool, pool, 0, 0,
        R=1, R_PAD=16, LR_W=1, LR_SLICE=0, HAS_LR=False, DOT_PREC="ieee",
    )  # fmt: skip


def materialize_values(
    value_pool: torch.Tensor,
    lr_pool: torch.Tensor,
    base_block_tables: torch.Tensor,
    lr_block_tables: torch.Tensor | None,
    seq_lora_slots: torch.Tensor,
    value_up: torch.Tensor,
    lora_scaling: torch.Tensor,
    rows: ScratchRows,
    key_lr: KeyLR | None = None,
    block_n: int | None = None,
) -> torch.Tensor:
    """[rows.total, Hkv, d] in the pool's dtype: every prefill sequence's whole context of values with its reader's
    adapter term. One launch, no host synchronisation. `key_lr`: LR rows are [R_v | R_k] (the value part is read).
    No LR block tables: the LR rows sit where the base rows do."""
    lr_block_tables = base_block_tables if lr_block_tables is None else lr_block_tables
    p = _Pools(value_pool, value_pool, lr_pool, value_up, lora_scaling, value_pool.shape[1], key_lr)
    return _gather(
        value_pool, rows, block_n, p.lr, base_block_tables, lr_block_tables, seq_lora_slots, lora_scaling, p.vup,
        p.stride_vs, p.stride_vr, R=p.r, R_PAD=p.r_pad, LR_W=p.lr_width, LR_SLICE=p.lr_slice, HAS_LR=True,
        DOT_PREC=_dot_precision(value_pool.dtype),
    )  # fmt: skip


def gathered_prefill_args(
    key_pool: torch.Tensor,
    value_pool: torch.Tensor,
    lr_pool: torch.Tensor,
    base_block_tables: torch.Tensor,
    lr_block_tables: torch.Tensor | None,
    seq_lora_slots: torch.Tensor,
    value_up: torch.Tensor,
    lora_scaling: torch.Tensor,
    rows: ScratchRows,
    key_lr: KeyLR | None = None,
    keys: torch.Tensor | None = None,
) -> dict:
    """`paged_prefill`'s keyword arguments for the gathered route: key_rows (`keys` when materialised already, with
    key adapters; else gathered here), value_rows with the LR term, and value_up None (no term in the kernel)."""
    if keys is None:
        keys = gather_rows(key_pool, base_block_tables, rows)
    values = materialize_values(
        value_pool, lr_pool, base_block_tables, lr_block_tables, seq_lora_slots, value_up, lora_scaling, rows, key_lr
    )
    return dict(key_rows=(keys, rows.starts), value_rows=(values, rows.starts), value_up=None)


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
    """`materialize_values` in plain torch (gathers through the block tables, float64 sum): the exact oracle, with
    each sequence's first row."""
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


def row_bytes(value_pool: torch.Tensor) -> int:
    """What the gathered route allocates per layer and context token: its key and its value."""
    hkv, d = value_pool.shape[-2:]
    return 2 * hkv * d * value_pool.element_size()
