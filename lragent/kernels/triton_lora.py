"""Multi-LoRA projections in Triton over a flattened batch of tokens of mixed adapters.

Tokens are grouped into segments, each with one adapter slot: `tokens` (optional permutation [N] into the
batch's rows), `seg_start` [G+1] int32 offsets into it, `seg_slot` [G] int32. Segment g covers batch rows
`tokens[seg_start[g]:seg_start[g+1]]` (rows seg_start[g]..seg_start[g+1]-1 when `tokens` is None). Rows in no
segment are left alone (expand) or zero (shrink).

- `lora_shrink`: `Y[t] = X[t] A[slot(t)]`, A stacked [S, d_in, r]; split-K over d_in for few tokens, the splits
  summed by the last one to finish (one launch, deterministic).
- `lora_expand`: `out[t] (+)= scale[slot(t)] * Y[t] B[slot(t)]`, B stacked [S, r, d_out]; accumulates into
  the base projection's output in place when asked.
- `shared_shrink`: `Y = X A` for one A shared by every adapter (BaseLRShared's v_proj A): one segment.
- `grouped_shrink`: two shrinks of the same X (own A stacks, segments, output dtypes) as one launch: a layer's
  q_proj delta shrink and v_proj LR shrink, latency-bound at decode sizes.

Ranks 1..64 (any; padded to a power of two >= 16 inside with masks). Float32 inputs use IEEE-precision dots.
`TritonLoRABank` is an opt-in drop-in for `LoRABank` whose `delta` / `value_shrink` run these kernels.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch
import triton
import triton.language as tl

from lragent.kernels.counters import arrival_counters
from lragent.lora.bank import LoRABank
from lragent.lora.metadata import Segments

SHRINK_COUNTERS_OWNER = "lora_shrink"  # split-K arrival counters, one per (m tile, segment) of a launch


def _dot_precision(dtype: torch.dtype) -> str:
    return "ieee" if dtype == torch.float32 else "tf32"


@triton.jit
def _shrink_tile(
    x_ptr,
    a_ptr,
    out_ptr,
    part_ptr,
    cnt_ptr,
    tok_ptr,
    seg_start_ptr,
    seg_slot_ptr,
    mt,
    seg,
    ks,
    splits,
    K,
    k_per_split,
    stride_xt,
    stride_as,
    stride_ak,
    stride_ot,
    stride_ps,
    R: tl.constexpr,
    R_PAD: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_K: tl.constexpr,
    HAS_TOK: tl.constexpr,
    LAST_SPLIT: tl.constexpr,
    DOT_PREC: tl.constexpr,
):
    """Split `ks` of `splits` of m tile `mt` of segment `seg`: the body of `_shrink_kernel` and of each shrink of
    `_grouped_shrink_kernel`. No early return (a helper's body is inlined): a tile past the segment's end does
    nothing, in every split, so none of them counts on its counter."""
    s0 = tl.load(seg_start_ptr + seg)
    s1 = tl.load(seg_start_ptr + seg + 1)
    if s0 + mt * BLOCK_M < s1:
        slot = tl.load(seg_slot_ptr + seg).to(tl.int64)
        idx = s0 + mt * BLOCK_M + tl.arange(0, BLOCK_M)
        imask = idx < s1
        if HAS_TOK:
            rows = tl.load(tok_ptr + idx, mask=imask, other=0).to(tl.int64)
        else:
            rows = idx.to(tl.int64)
        offs_k = tl.arange(0, BLOCK_K)
        offs_r = tl.arange(0, R_PAD)
        rmask = offs_r < R
        k_lo = ks * k_per_split
        k_hi = tl.minimum(K, k_lo + k_per_split)
        acc = tl.zeros([BLOCK_M, R_PAD], dtype=tl.float32)
        a_base = a_ptr + slot * stride_as
        for k0 in range(k_lo, k_hi, BLOCK_K):
            kk = k0 + offs_k
            kmask = kk < k_hi
            x = tl.load(
                x_ptr + rows[:, None] * stride_xt + kk[None, :], mask=imask[:, None] & kmask[None, :], other=0.0
            )
            a = tl.load(
                a_base + kk[:, None] * stride_ak + offs_r[None, :], mask=kmask[:, None] & rmask[None, :], other=0.0
            )
            acc += tl.dot(x, a.to(x.dtype), input_precision=DOT_PREC)
        optr = out_ptr + rows[:, None] * stride_ot + offs_r[None, :]
        omask = imask[:, None] & rmask[None, :]
        if LAST_SPLIT:
            # one launch: each split stores its float32 partial (partials [split, T, R], this tile's rows only) and
            # counts itself done on the tile's counter; the last to arrive sums the partials in split order (the same
            # sum whichever split is last: deterministic), stores the result and resets the counter. Every thread's
            # partial stores precede thread 0's release (the barrier, then acq_rel at gpu scope); its acquire precedes
            # the sum's loads, which read through L2 (".cg"): other SMs wrote the partials during this launch.
            pptr = part_ptr + rows[:, None] * R + offs_r[None, :]
            tl.store(pptr + ks.to(tl.int64) * stride_ps, acc, mask=omask)
            tl.debug_barrier()
            cnt = cnt_ptr + seg * tl.num_programs(0) + mt
            done = tl.atomic_add(cnt, 1, sem="acq_rel", scope="gpu")
            if done == splits - 1:
                acc = tl.zeros([BLOCK_M, R_PAD], dtype=tl.float32)
                for _ in range(0, splits):
                    acc += tl.load(pptr, mask=omask, other=0.0, cache_modifier=".cg")
                    pptr += stride_ps
                tl.store(optr, acc.to(out_ptr.dtype.element_ty), mask=omask)
                tl.atomic_xchg(cnt, 0)  # ready for the next launch / graph replay: no zeroing on the host
        else:
            tl.store(optr, acc.to(out_ptr.dtype.element_ty), mask=omask)


@triton.jit
def _shrink_kernel(
    x_ptr,
    a_ptr,
    out_ptr,
    part_ptr,
    cnt_ptr,
    tok_ptr,
    seg_start_ptr,
    seg_slot_ptr,
    K,
    k_per_split,
    stride_xt,
    stride_as,
    stride_ak,
    stride_ot,
    stride_ps,
    R: tl.constexpr,
    R_PAD: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_K: tl.constexpr,
    HAS_TOK: tl.constexpr,
    LAST_SPLIT: tl.constexpr,
    DOT_PREC: tl.constexpr,
):
    # grid (m tiles, segments, splits)
    _shrink_tile(
        x_ptr, a_ptr, out_ptr, part_ptr, cnt_ptr, tok_ptr, seg_start_ptr, seg_slot_ptr,
        tl.program_id(0), tl.program_id(1), tl.program_id(2), tl.num_programs(2),
        K, k_per_split, stride_xt, stride_as, stride_ak, stride_ot, stride_ps,
        R, R_PAD, BLOCK_M, BLOCK_K, HAS_TOK, LAST_SPLIT, DOT_PREC,
    )  # fmt: skip


@triton.jit
def _grouped_shrink_kernel(
    x_ptr,
    a0_ptr,
    out0_ptr,
    part0_ptr,
    cnt0_ptr,
    tok0_ptr,
    seg_start0_ptr,
    seg_slot0_ptr,
    G0,
    stride_as0,
    stride_ak0,
    stride_ot0,
    a1_ptr,
    out1_ptr,
    part1_ptr,
    cnt1_ptr,
    tok1_ptr,
    seg_start1_ptr,
    seg_slot1_ptr,
    G1,
    stride_as1,
    stride_ak1,
    stride_ot1,
    K,
    k_per_split,
    stride_xt,
    stride_ps,
    R: tl.constexpr,
    R_PAD: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_K: tl.constexpr,
    HAS_TOK0: tl.constexpr,
    HAS_TOK1: tl.constexpr,
    LAST_SPLIT: tl.constexpr,
    DOT_PREC: tl.constexpr,
):
    # grid (m tiles, max(G0, G1), 2 * splits): the splits of shrink 0, then those of shrink 1, each over its own
    # segments (programs past a shrink's segment count do nothing) and its own counters
    mt = tl.program_id(0)
    seg = tl.program_id(1)
    splits = tl.num_programs(2) // 2
    ks = tl.program_id(2)
    if ks < splits:
        if seg < G0:
            _shrink_tile(
                x_ptr, a0_ptr, out0_ptr, part0_ptr, cnt0_ptr, tok0_ptr, seg_start0_ptr, seg_slot0_ptr,
                mt, seg, ks, splits,
                K, k_per_split, stride_xt, stride_as0, stride_ak0, stride_ot0, stride_ps,
                R, R_PAD, BLOCK_M, BLOCK_K, HAS_TOK0, LAST_SPLIT, DOT_PREC,
            )  # fmt: skip
    else:
        if seg < G1:
            _shrink_tile(
                x_ptr, a1_ptr, out1_ptr, part1_ptr, cnt1_ptr, tok1_ptr, seg_start1_ptr, seg_slot1_ptr,
                mt, seg, ks - splits, splits,
                K, k_per_split, stride_xt, stride_as1, stride_ak1, stride_ot1, stride_ps,
                R, R_PAD, BLOCK_M, BLOCK_K, HAS_TOK1, LAST_SPLIT, DOT_PREC,
            )  # fmt: skip


@triton.jit
def _expand_kernel(
    y_ptr,
    b_ptr,
    out_ptr,
    tok_ptr,
    seg_start_ptr,
    seg_slot_ptr,
    scaling_ptr,
    N,
    stride_yt,
    stride_bs,
    stride_br,
    stride_ot,
    R: tl.constexpr,
    R_PAD: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    HAS_TOK: tl.constexpr,
    ADD: tl.constexpr,
    DOT_PREC: tl.constexpr,
):
    mt = tl.program_id(0)
    seg = tl.program_id(1)
    nt = tl.program_id(2)
    s0 = tl.load(seg_start_ptr + seg)
    s1 = tl.load(seg_start_ptr + seg + 1)
    if s0 + mt * BLOCK_M >= s1:
        return
    slot = tl.load(seg_slot_ptr + seg).to(tl.int64)
    idx = s0 + mt * BLOCK_M + tl.arange(0, BLOCK_M)
    imask = idx < s1
    if HAS_TOK:
        rows = tl.load(tok_ptr + idx, mask=imask, other=0).to(tl.int64)
    else:
        rows = idx.to(tl.int64)
    offs_r = tl.arange(0, R_PAD)
    rmask = offs_r < R
    cols = nt * BLOCK_N + tl.arange(0, BLOCK_N)
    cmask = cols < N
    y = tl.load(y_ptr + rows[:, None] * stride_yt + offs_r[None, :], mask=imask[:, None] & rmask[None, :], other=0.0)
    bw = tl.load(
        b_ptr + slot * stride_bs + offs_r[:, None] * stride_br + cols[None, :],
        mask=rmask[:, None] & cmask[None, :],
        other=0.0,
    )
    scale = tl.load(scaling_ptr + slot)
    acc = tl.dot(y.to(bw.dtype), bw, input_precision=DOT_PREC) * scale
    optr = out_ptr + rows[:, None] * stride_ot + cols[None, :]
    omask = imask[:, None] & cmask[None, :]
    if ADD:
        acc += tl.load(optr, mask=omask, other=0.0).to(tl.float32)
    tl.store(optr, acc.to(out_ptr.dtype.element_ty), mask=omask)


def _rpad(r: int) -> int:
    return max(16, triton.next_power_of_2(r))


def _num_sms(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 4


def _shrink_shape(
    x: torch.Tensor, max_seg_len: int, programs_per_split: int, split_k: int | None
) -> tuple[int, int, int, int, int]:
    """(BLOCK_M, BLOCK_K, m tiles, split count, K per split) of a shrink launch over x [T, d_in].

    `programs_per_split`: segments of the launch (both shrinks' for a grouped one): the split count aims at two
    programs per SM in all. One owner for both launch forms, so a grouped shrink tiles each row like `lora_shrink`."""
    k = x.shape[1]
    on_gpu = x.device.type == "cuda"
    block_m = 16 if max_seg_len <= 16 or not on_gpu else (32 if max_seg_len <= 32 else 64)
    block_k = 128 if on_gpu else 32
    m_tiles = triton.cdiv(max(max_seg_len, 1), block_m)
    if split_k is None:
        split_k = 1
        if on_gpu:
            want = 2 * _num_sms(x.device)
            split_k = max(1, min(want // max(1, m_tiles * programs_per_split), triton.cdiv(k, 4 * block_k)))
    k_per_split = triton.cdiv(triton.cdiv(k, split_k), block_k) * block_k
    return block_m, block_k, m_tiles, triton.cdiv(k, k_per_split), k_per_split


def lora_shrink(
    x: torch.Tensor,
    a_stack: torch.Tensor,
    seg_start: torch.Tensor,
    seg_slot: torch.Tensor,
    max_seg_len: int,
    tokens: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
    out_dtype: torch.dtype | None = None,
    split_k: int | None = None,
    rows_covered: bool = False,
) -> torch.Tensor:
    """x [T, d_in]; a_stack [S, d_in, r] -> [T, r] (zeros for rows in no segment). `out` must be zero there.

    One launch, split-K or not: the last split of each tile sums the partials and stores the result in the output's
    dtype (see `_shrink_kernel`), so there is no zeroed accumulator and no conversion afterwards.
    `rows_covered`: every row lies in some segment, so every row is written and the result needs no zero fill
    (one launch fewer). Split-K stays on for decode-sized batches: one program walking all of d_in alone made an 8B
    decode step 1.5 ms slower (H200)."""
    t, k = x.shape
    r = a_stack.shape[-1]
    if x.stride(-1) != 1:
        x = x.contiguous()
    if a_stack.stride(-1) != 1:
        a_stack = a_stack.contiguous()
    if out is None:
        out = (torch.empty if rows_covered else torch.zeros)(t, r, dtype=out_dtype or x.dtype, device=x.device)
    elif out.stride(-1) != 1:
        raise ValueError("lora_shrink needs an output with contiguous rows")
    g = seg_slot.shape[0]
    on_gpu = x.device.type == "cuda"
    block_m, block_k, m_tiles, split_k, k_per_split = _shrink_shape(x, max_seg_len, g, split_k)
    if not (t and g and max_seg_len):
        return out
    last_split = split_k > 1
    # partials: every split of a tile stores all of the tile's rows and the last one reads only those, so no fill
    part = torch.empty(split_k, t, r, dtype=torch.float32, device=x.device) if last_split else out
    counters = arrival_counters(m_tiles * g, x.device, SHRINK_COUNTERS_OWNER) if last_split else out
    _shrink_kernel[(m_tiles, g, split_k)](
        x,
        a_stack,
        out,
        part,
        counters,
        tokens if tokens is not None else seg_start,
        seg_start,
        seg_slot,
        k,
        k_per_split,
        x.stride(0),
        a_stack.stride(0),
        a_stack.stride(1),
        out.stride(0),
        t * r,
        R=r,
        R_PAD=_rpad(r),
        BLOCK_M=block_m,
        BLOCK_K=block_k,
        HAS_TOK=tokens is not None,
        LAST_SPLIT=last_split,
        DOT_PREC=_dot_precision(x.dtype),
        num_warps=4,
        num_stages=3 if on_gpu else 1,
    )
    return out


class ShrinkJob(NamedTuple):
    """One shrink of a `grouped_shrink`: `lora_shrink`'s arguments other than x (see there)."""

    a_stack: torch.Tensor
    seg_start: torch.Tensor
    seg_slot: torch.Tensor
    max_seg_len: int
    tokens: torch.Tensor | None = None
    out_dtype: torch.dtype | None = None
    rows_covered: bool = False

    def run(self, x: torch.Tensor, split_k: int | None = None) -> torch.Tensor:
        """This shrink alone, as its own `lora_shrink` launch."""
        return lora_shrink(
            x,
            self.a_stack,
            self.seg_start,
            self.seg_slot,
            self.max_seg_len,
            tokens=self.tokens,
            out_dtype=self.out_dtype,
            split_k=split_k,
            rows_covered=self.rows_covered,
        )


def _shrink_out(x: torch.Tensor, job: ShrinkJob) -> torch.Tensor:
    alloc = torch.empty if job.rows_covered else torch.zeros
    return alloc(x.shape[0], job.a_stack.shape[-1], dtype=job.out_dtype or x.dtype, device=x.device)


def grouped_shrink(
    x: torch.Tensor, first: ShrinkJob, second: ShrinkJob, split_k: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Two shrinks of the same x as one launch: (`lora_shrink(x, *first)`, `lora_shrink(x, *second)`).

    Decode-sized shrinks are latency-bound (a launch costs more than its work), so q_proj's LoRA shrink and v_proj's
    LR-cache shrink of a layer share one. Each job keeps its own A stack, segments and output dtype; both split d_in
    alike (the same splits and tiles as `lora_shrink` would pick for their segments together), and their split-K
    arrival counters lie side by side. The A stacks must have the same rank."""
    t, k = x.shape
    r = first.a_stack.shape[-1]
    if second.a_stack.shape[-1] != r:
        raise ValueError("grouped_shrink needs A stacks of one rank")
    if x.stride(-1) != 1:
        x = x.contiguous()
    a0, a1 = (j.a_stack if j.a_stack.stride(-1) == 1 else j.a_stack.contiguous() for j in (first, second))
    out0, out1 = _shrink_out(x, first), _shrink_out(x, second)
    g0, g1 = first.seg_slot.shape[0], second.seg_slot.shape[0]
    max_len = max(first.max_seg_len, second.max_seg_len)
    if not (t and max_len and (g0 or g1)):
        return out0, out1
    on_gpu = x.device.type == "cuda"
    block_m, block_k, m_tiles, split_k, k_per_split = _shrink_shape(x, max_len, g0 + g1, split_k)
    last_split = split_k > 1
    part = torch.empty(2, split_k, t, r, dtype=torch.float32, device=x.device) if last_split else None
    counters = arrival_counters(m_tiles * (g0 + g1), x.device, SHRINK_COUNTERS_OWNER) if last_split else None
    part0, part1 = (out0, out1) if part is None else (part[0], part[1])
    # counters of shrink 1 start after shrink 0's m_tiles * G0 (the kernel indexes seg * m_tiles + mt in each)
    cnt0, cnt1 = (out0, out1) if counters is None else (counters, counters[m_tiles * g0 :])
    _grouped_shrink_kernel[(m_tiles, max(g0, g1), 2 * split_k)](
        x,
        a0,
        out0,
        part0,
        cnt0,
        first.tokens if first.tokens is not None else first.seg_start,
        first.seg_start,
        first.seg_slot,
        g0,
        a0.stride(0),
        a0.stride(1),
        out0.stride(0),
        a1,
        out1,
        part1,
        cnt1,
        second.tokens if second.tokens is not None else second.seg_start,
        second.seg_start,
        second.seg_slot,
        g1,
        a1.stride(0),
        a1.stride(1),
        out1.stride(0),
        k,
        k_per_split,
        x.stride(0),
        t * r,
        R=r,
        R_PAD=_rpad(r),
        BLOCK_M=block_m,
        BLOCK_K=block_k,
        HAS_TOK0=first.tokens is not None,
        HAS_TOK1=second.tokens is not None,
        LAST_SPLIT=last_split,
        DOT_PREC=_dot_precision(x.dtype),
        num_warps=4,
        num_stages=3 if on_gpu else 1,
    )
    return out0, out1


def shared_shrink(x: torch.Tensor, a: torch.Tensor, out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """Y = X A for one A [d_in, r] shared by every adapter: all T tokens in one segment."""
    t = x.shape[0]
    seg_start = torch.tensor([0, t], dtype=torch.int32, device=x.device)
    seg_slot = torch.zeros(1, dtype=torch.int32, device=x.device)
    return lora_shrink(x, a.unsqueeze(0), seg_start, seg_slot, t, out_dtype=out_dtype)


def lora_expand(
    y: torch.Tensor,
    b_stack: torch.Tensor,
    seg_start: torch.Tensor,
    seg_slot: torch.Tensor,
    max_seg_len: int,
    scaling: torch.Tensor,
    out: torch.Tensor | None = None,
    add: bool = True,
    tokens: torch.Tensor | None = None,
) -> torch.Tensor:
    """out[t] (+)= scaling[slot] * y[t] @ b_stack[slot]; y [T, r], b_stack [S, r, d_out], scaling [S] float32.

    `out=None` returns a fresh delta (zeros on rows in no segment)."""
    t, r = y.shape
    n = b_stack.shape[-1]
    if b_stack.stride(-1) != 1:
        b_stack = b_stack.contiguous()
    if out is None:
        out = torch.zeros(t, n, dtype=b_stack.dtype, device=y.device)
        add = False
    if out.stride(-1) != 1:
        raise ValueError("lora_expand needs an output with contiguous rows")
    g = seg_slot.shape[0]
    on_gpu = y.device.type == "cuda"
    block_m = 16 if max_seg_len <= 16 or not on_gpu else (32 if max_seg_len <= 32 else 64)
    block_n = (128 if max_seg_len <= 64 else 64) if on_gpu else 32
    if t and g and max_seg_len:
        _expand_kernel[(triton.cdiv(max_seg_len, block_m), g, triton.cdiv(n, block_n))](
            y,
            b_stack,
            out,
            tokens if tokens is not None else seg_start,
            seg_start,
            seg_slot,
            scaling,
            n,
            y.stride(0),
            b_stack.stride(0),
            b_stack.stride(1),
            out.stride(0),
            R=r,
            R_PAD=_rpad(r),
            BLOCK_M=block_m,
            BLOCK_N=block_n,
            HAS_TOK=tokens is not None,
            ADD=add,
            DOT_PREC=_dot_precision(b_stack.dtype),
            num_warps=4,
            num_stages=2 if on_gpu else 1,
        )
    return out


# ------------------------------------------------------------------------------------------------------------
# opt-in engine hook
# ------------------------------------------------------------------------------------------------------------
def _upload(values: list[int], device: torch.device) -> torch.Tensor:
    host = torch.tensor(values, dtype=torch.int32)
    if device.type == "cuda":
        host = host.pin_memory()  # asynchronous copy: no host synchronisation inside a step
    return host.to(device, non_blocking=True)


class SegmentPlan:
    """Device-side grouping of a step's tokens by adapter slot, as the shrink/expand kernels read it."""

    __slots__ = ("tokens", "seg_start", "seg_slot", "max_len", "slots", "covers_all", "writes_all", "shared")
    tokens: torch.Tensor | None  # the rows of each segment, concatenated; None when the segments cover rows in order
    shared: tuple[torch.Tensor, torch.Tensor] | None

    def __init__(self, segments: Segments, num_tokens: int, device: torch.device):
        starts, lens, idx = [0], [], []
        self.slots = [slot for slot, _ in segments]
        for _, rows in segments:
            n = num_tokens if rows is None else rows.numel()
            lens.append(n)
            starts.append(starts[-1] + n)
            if rows is not None:
                idx.append(rows)
        self.covers_all = starts[-1] == num_tokens
        self.writes_all = self.covers_all  # every row is in a segment (so every shrink output row is written)
        self.max_len = max(lens, default=0)
        if idx and len(idx) == len(segments):
            self.tokens = torch.cat(idx).to(torch.int32)
        elif idx:  # a None ("all tokens") segment mixed with indexed ones cannot happen; be safe anyway
            self.tokens = torch.cat(
                [torch.arange(num_tokens, device=device) if rows is None else rows for _, rows in segments]
            ).to(torch.int32)
        else:
            self.tokens = None
        self.seg_start = _upload(starts, device)
        self.seg_slot = _upload(self.slots, device)
        self.shared = None  # (seg_start, seg_slot) of one segment over all tokens, built on first use

    @classmethod
    def per_token(cls, seg_start: torch.Tensor, seg_slot: torch.Tensor) -> SegmentPlan:
        """One segment per token over static buffers (CUDA-graph decode): `seg_start` = 0..T, `seg_slot` [T].

        Tokens without an adapter read slot 0, whose stacks are zero, so the result stays exact; the grid depends
        only on T, never on which adapters the step mixes.
        """
        plan = cls.__new__(cls)
        plan.tokens, plan.seg_start, plan.seg_slot, plan.max_len = None, seg_start, seg_slot, 1
        plan.slots, plan.covers_all, plan.shared = [], False, None
        plan.writes_all = True
        return plan


class TritonLoRABank(LoRABank):
    """`LoRABank` whose multi-LoRA projections run the Triton kernels (one shrink + one expand launch per module).

    Segment plans are built once per step (the Segments list object is the same for every layer) and reused.
    `add_delta(y, x, ...)` adds in place into the base projection's output, saving the delta's allocation and add.
    `value_shrink` uses the single shared shrink when every token's adapter shares one v_proj A (BaseLRShared).
    `query_delta_and_values` runs q's delta shrink and the LR shrink as one launch (`grouped_shrink`).
    """

    _PLANS_KEPT = 8  # a step builds at most a handful: all tokens / base-written tokens x module subsets

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # (id(segments), T, active slots) -> (segments, plan); holding `segments` keeps its id from being reused
        self._plans: dict[tuple, tuple[Segments, SegmentPlan | None]] = {}
        self._shared_v: dict[tuple[int, str], bool] = {}  # (layer, v_proj / k_proj) -> one A for every adapter

    # A prebuilt SegmentPlan stands in for `Segments` here: only this bank's own methods (`_plan_for`) read it.
    def per_row_segments(self, row_start: torch.Tensor, row_slots: torch.Tensor) -> SegmentPlan:  # type: ignore[override]
        return SegmentPlan.per_token(row_start, row_slots)

    def load(self, slot, adapter) -> None:
        super().load(slot, adapter)
        self._shared_v.clear()
        self._plans.clear()

    def unload(self, slot) -> None:
        super().unload(slot)
        self._shared_v.clear()
        self._plans.clear()

    def _plan_for(
        self, segments: Segments | SegmentPlan, module: str | None, num_tokens: int, device
    ) -> SegmentPlan | None:
        """The step's plan for `segments`, restricted to the adapters that target `module`; built once per step.

        FULL_SHARED alternates two segment lists per layer (all tokens for q, base-written tokens for k/v) and mixed
        adapter sets give per-module subsets, so several plans are cached at once rather than only the last one.
        """
        if isinstance(segments, SegmentPlan):  # prebuilt (CUDA-graph decode)
            return segments
        active = segments if module is None else [(s, i) for s, i in segments if (s, module) in self.active]
        key = (id(segments), num_tokens, tuple(s for s, _ in active))
        hit = self._plans.get(key)
        if hit is not None and hit[0] is segments:
            return hit[1]
        plan = SegmentPlan(active, num_tokens, device) if active else None
        if len(self._plans) >= self._PLANS_KEPT:
            self._plans.pop(next(iter(self._plans)))
        self._plans[key] = (segments, plan)
        return plan

    def _delta_plan(self, x: torch.Tensor, layer: int, module: str, segments) -> SegmentPlan | None:
        """The plan of `module`'s delta over x (None: no token's adapter targets it)."""
        if (layer, module) not in self.down or not segments:
            return None
        return self._plan_for(segments, module, x.shape[0], x.device)

    def _delta_job(self, plan: SegmentPlan, layer: int, module: str) -> ShrinkJob:
        """The shrink of `module`'s delta: float32, so the expand reads x A unrounded."""
        down = self.down[(layer, module)]
        return ShrinkJob(down, plan.seg_start, plan.seg_slot, plan.max_len, plan.tokens, torch.float32, plan.writes_all)

    def _expand(self, y, out, plan: SegmentPlan, layer: int, module: str, add: bool) -> torch.Tensor:
        up = self.up[(layer, module)]
        return lora_expand(
            y, up, plan.seg_start, plan.seg_slot, plan.max_len, self.scaling, out=out, add=add, tokens=plan.tokens
        )

    def _delta_into(self, out, x, layer, module, segments, add) -> torch.Tensor | None:
        plan = self._delta_plan(x, layer, module, segments)
        if plan is None:
            return None
        y = self._delta_job(plan, layer, module).run(x)
        return self._expand(y, out, plan, layer, module, add)

    def delta(self, x, layer, module, segments):
        return self._delta_into(None, x, layer, module, segments, add=False)

    def add_delta(self, y: torch.Tensor, x: torch.Tensor, layer: int, module: str, segments: Segments) -> torch.Tensor:
        """y += s * (x A) B per token, in place; returns y."""
        self._delta_into(y, x, layer, module, segments, add=True)
        return y

    def _v_shared(self, layer: int) -> bool:
        return self._a_shared(layer, "v_proj")

    def _a_shared(self, layer: int, module: str) -> bool:
        if (layer, module) not in self._shared_v:
            down = self.down.get((layer, module))
            slots = sorted(s for s, m in self.active if m == module)
            self._shared_v[(layer, module)] = (
                down is not None and len(slots) > 0 and all(torch.equal(down[slots[0]], down[s]) for s in slots[1:])
            )
        return self._shared_v[(layer, module)]

    def _value_job(self, x: torch.Tensor, layer: int, segments, module: str = "v_proj") -> ShrinkJob | None:
        """The shrink of the tokens' own LR rows for `module` (None: no token's adapter targets it, the rows are
        zero). BaseLRShared (one A for every adapter, every token in some segment): one segment over all tokens."""
        down = self.down.get((layer, module))
        t = x.shape[0]
        if down is None or not segments:
            return None
        plan = self._plan_for(segments, module, t, x.device)
        if plan is None:
            return None
        if plan.covers_all and self._a_shared(layer, module):
            if plan.shared is None:
                plan.shared = (_upload([0, t], x.device), _upload([plan.slots[0]], x.device))
            return ShrinkJob(down, plan.shared[0], plan.shared[1], t, None, x.dtype, True)
        return ShrinkJob(down, plan.seg_start, plan.seg_slot, plan.max_len, plan.tokens, x.dtype, plan.writes_all)

    def _own_value_shrink(self, x, layer, segments, module="v_proj"):
        job = self._value_job(x, layer, segments, module)
        if job is None:
            return torch.zeros(x.shape[0], self.max_rank, dtype=x.dtype, device=x.device)
        return job.run(x)

    def query_delta_and_values(
        self, q: torch.Tensor, x: torch.Tensor, layer: int, segments: Segments | SegmentPlan
    ) -> torch.Tensor:
        """`LoRABank.query_delta_and_values` with q_proj's delta shrink and v_proj's LR shrink as one launch (then
        q's expand): both read x and decode shrinks are latency-bound. Only where the LR rows are the tokens' own
        v_proj rows (no `stack_values`, no `key_lr`) and both modules have work; else the two calls."""
        q_plan = None if self.stack_values or self.key_lr else self._delta_plan(x, layer, "q_proj", segments)
        v_job = None if q_plan is None else self._value_job(x, layer, segments)
        if q_plan is None or v_job is None:
            return super().query_delta_and_values(q, x, layer, segments)  # type: ignore[arg-type]
        y, lr = grouped_shrink(x, self._delta_job(q_plan, layer, "q_proj"), v_job)
        self._expand(y, q, q_plan, layer, "q_proj", add=True)
        return lr
