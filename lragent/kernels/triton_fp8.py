"""Weight-only FP8 matmul (W8A16) for decode-sized inputs: y[M, N] = x[M, K] @ (W[N, K] * scale[N])^T.

W holds float8 e4m3 (e4m3fn) values with one float32 scale per output row (lragent.quant.fp8); x stays in its own
dtype (bfloat16, float16 or float32) and is never quantised. At decode, M is a handful of rows, so the step is bound
by reading W: this kernel reads every weight byte once, one byte each (half of bf16), in one launch.

Layout of the work (`w8a16_config`):

- one program per BLOCK_N output channels (and per BLOCK_M rows of x, a single tile for M <= 64). Decode row counts
  (up to 32) take `DECODE_TILES`, measured with every weight streamed from memory as in a decode step (32 x 256
  tiles up to 16 rows, 64 x 128 at 32); above, BLOCK_N is the widest of 16 / 32 / 64 that still gives two programs
  per SM, with 8 KiB of weights per K step;
- the K loop reads W in chunks of BLOCK_K bytes per row; each chunk is converted to x's dtype in registers and fed
  to `tl.dot` with x's rows padded (masked) to BLOCK_M >= 16; accumulation in float32; the per-channel scale (and
  the bias) are applied once, in the epilogue;
- split-K only when there are fewer output tiles than SMs (N < 16 * SMs, about 2100 on an H200: small models, or an
  unfused k/v projection): each split writes float32 partials to a workspace [splits, M, N] and a second small
  launch sums them in a fixed order, then scales, adds the bias and rounds (deterministic; no atomics, no memset).

Two ways to turn a weight byte into a number (`decode`):

- "native": the weight is loaded as `tl.float8e4nv` and converted by the hardware (compute capability >= 8.9);
- "bits": the weight is passed as uint8 and decoded with integer operations (any GPU, and the interpreter): the
  byte s.eeee.mmm placed as s.0eeee.mmm0000000 is the float16 whose value is the e4m3 value times 2^-8, normal and
  subnormal alike (both formats put the subnormal step at the bottom of their exponent range, 2^-9 = 2^-17 * 2^8);
  the 2^8 is folded into the scale. The two NaN codes (0x7F, 0xFF) decode to +-480; the quantiser never writes
  them (it saturates at +-448), and Triton's interpreter decodes them the same way on the native path.

A single row (decode at batch 1) goes through `_w8a16_gemv_kernel` instead (no `tl.dot`, tiles from `gemv_config`),
and `act="silu_mul"` lets it read the MLP's [gate | up] row and compute silu(gate) * up as its x, with
the rounding of `triton_fused.silu_mul`, so the down projection needs no separate SiLU launch.

No host synchronisation and no data-dependent allocation (the output and the workspace depend on shapes only): a
CUDA graph can capture it. Under TRITON_INTERPRET=1 it runs on CPU tensors (tests).
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from lragent.kernels.counters import arrival_counters
from lragent.kernels.pdl import gdc_launch_dependents, gdc_wait, launch_options, pdl_enabled

DECODES = ("native", "bits")
BITS_SCALE = 256.0  # "bits" decodes to the e4m3 value * 2^-8
WEIGHT_TILE_BYTES = 8192  # bytes of W per program and K step: BLOCK_N * BLOCK_K
X_TILE_BYTES = 16384  # bytes of x per program and K step: BLOCK_M * BLOCK_K * x's element size (16 bf16 rows x 512)
MAX_SPLIT_K = 16
DEFAULT_SMS = 132  # an H100 / H200, when there is no CUDA device to ask (the interpreter)


@dataclass(frozen=True)
class W8A16Config:
    block_m: int
    block_n: int
    block_k: int
    split_k: int  # number of K splits actually launched (1: no workspace, one launch)
    k_per_split: int  # a multiple of block_k
    num_warps: int = 4
    num_stages: int = 3


# decode tiles by BLOCK_M: (BLOCK_N, BLOCK_K, warps, stages), from benchmarks/fp8_stream_sweep.py on an H200 (eighth
# session: Llama-3.1-8B projections, every call on weights not in L2, as in a decode step). Up to 16 rows 32 x 256
# tiles, 4 stages: 0.74-1.0x bf16 cuBLAS at 2-16 rows (the 16 x 512 tiles before, 3 stages: 0.87-1.55x); at 32
# rows 64 x 128: 0.87-1.25x (qkv 1.25, o 1.17, gate_up 0.87, down 1.08).
DECODE_TILES = {16: (32, 256, 4, 4), 32: (64, 128, 4, 4)}


def _pow2_at_least(n: int, lo: int) -> int:
    return max(lo, triton.next_power_of_2(n))


def w8a16_config(
    m: int,
    n: int,
    k: int,
    sms: int,
    x_bytes: int = 2,
    block_n: int | None = None,
    block_k: int | None = None,
    split_k: int | None = None,
) -> W8A16Config:
    """Tile sizes for an [m, k] x [n, k]^T product on `sms` SMs, x with `x_bytes` bytes per element (see the module
    docstring); the optional arguments override the choice (tests). Decode row counts (BLOCK_M 16 or 32) take the
    measured `DECODE_TILES`; larger ones (the "triton" routing on a prefill) the widest BLOCK_N that still gives two
    programs per SM and 8 KiB of weights per K step."""
    block_m = min(64, _pow2_at_least(m, 16))
    warps, stages = 4, 3
    if block_m in DECODE_TILES:
        bn, bk, warps, stages = DECODE_TILES[block_m]
        block_n = block_n or bn
        block_k = block_k or max(16, min(bk, X_TILE_BYTES // (block_m * x_bytes), _pow2_at_least(k, 16)))
    if block_n is None:
        block_n = next((b for b in (64, 32) if triton.cdiv(n, b) >= 2 * sms), 16)
    if block_k is None:
        block_k = min(512, WEIGHT_TILE_BYTES // block_n, X_TILE_BYTES // (block_m * x_bytes))
        block_k = max(16, min(block_k, _pow2_at_least(k, 16)))
    chunks = triton.cdiv(k, block_k)
    tiles = triton.cdiv(n, block_n) * triton.cdiv(m, block_m)
    if split_k is None:
        split_k = triton.cdiv(2 * sms, tiles) if tiles < sms else 1
    split_k = max(1, min(split_k, MAX_SPLIT_K, chunks))
    k_per_split = triton.cdiv(chunks, split_k) * block_k
    return W8A16Config(block_m, block_n, block_k, triton.cdiv(k, k_per_split), k_per_split, warps, stages)


@functools.cache
def _device_info(device: torch.device) -> tuple[int, str]:
    """(SM count, default decode) of a device: "native" from compute capability 8.9 on, else "bits"."""
    if device.type != "cuda":
        return DEFAULT_SMS, "bits"
    props = torch.cuda.get_device_properties(device)
    native = (props.major, props.minor) >= (8, 9)
    return props.multi_processor_count, "native" if native else "bits"


@triton.jit
def _decode_e4m3(w, BITS: tl.constexpr):
    """A tile of weights -> a float tile to convert to the dot's dtype: "bits" turns uint8 bytes into float16
    holding the value * 2^-8 (see the module docstring); "native" returns the float8e4nv tile as it is."""
    if BITS:
        b = w.to(tl.int32)
        h = ((b & 0x80) << 8) | ((b & 0x7F) << 7)
        return h.to(tl.int16).to(tl.float16, bitcast=True)
    else:
        return w


@triton.jit
def _scaled(acc, scale_ptr, bias_ptr, offs_n, nmask, HAS_BIAS: tl.constexpr, BITS: tl.constexpr):
    """The epilogue every kernel here shares: the per-channel scale (times 2^8 for the "bits" decode), then the
    bias, in float32."""
    scale = tl.load(scale_ptr + offs_n, mask=nmask, other=0.0)
    if BITS:
        scale = scale * 256.0
    y = acc * scale
    if HAS_BIAS:
        y += tl.load(bias_ptr + offs_n, mask=nmask, other=0.0).to(tl.float32)
    return y


@triton.jit
def _w8a16_kernel(
    x_ptr,
    w_ptr,
    scale_ptr,
    bias_ptr,
    out_ptr,
    ws_ptr,
    M,
    N,
    K,
    k_per_split,
    stride_xm,
    stride_wn,
    stride_om,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    SPLIT: tl.constexpr,  # write float32 partials to ws [splits, M, N] (reduced by `_w8a16_reduce_kernel`)
    HAS_BIAS: tl.constexpr,
    EVEN_K: tl.constexpr,  # K % k_per_split == 0: no K masks
    EVEN_N: tl.constexpr,  # N % BLOCK_N == 0: no N masks on the weight loads
    BITS: tl.constexpr,
    DOT_PREC: tl.constexpr,
    DOT_F32: tl.constexpr,  # dot on float32 copies of both operands (only the interpreter: see `_INTERPRET_BF16_DOT`)
):
    """x [M, K] times W [N, K]^T for a [BLOCK_M, BLOCK_N] output tile, K in BLOCK_K steps through `tl.dot`.

    The transposed form (W x^T, the decoded weight as the MMA's left operand, read by Hopper's wgmma from registers)
    was measured slower on an H200 at 1-8 rows (1.06-1.56x bf16 against 0.73-1.0x for this one with the decode tiles;
    eighth session, BENCHMARKS.md) and removed."""
    pid_n = tl.program_id(0)
    ks = tl.program_id(1)
    pid_m = tl.program_id(2)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    mmask = offs_m < M
    nmask = offs_n < N
    k_lo = ks * k_per_split
    x_ptrs = x_ptr + offs_m[:, None].to(tl.int64) * stride_xm + (k_lo + offs_k)[None, :]
    # W^T tile [BLOCK_K, BLOCK_N]: K is contiguous in memory (W is row-major [N, K])
    w_ptrs = w_ptr + offs_n[None, :].to(tl.int64) * stride_wn + (k_lo + offs_k)[:, None]
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, k_per_split, BLOCK_K):
        kmask = (k_lo + k0 + offs_k) < K  # all true when EVEN_K (x's masks are cheap; W's are skipped then)
        x = tl.load(x_ptrs, mask=mmask[:, None] & kmask[None, :], other=0.0)
        if EVEN_K and EVEN_N:
            w = tl.load(w_ptrs, eviction_policy="evict_first")
        else:
            w = tl.load(w_ptrs, mask=kmask[:, None] & nmask[None, :], other=0.0, eviction_policy="evict_first")
        w = _decode_e4m3(w, BITS).to(x.dtype)
        if DOT_F32:
            acc = tl.dot(x.to(tl.float32), w.to(tl.float32), acc, input_precision="ieee")
        else:
            acc = tl.dot(x, w, acc, input_precision=DOT_PREC)
        x_ptrs += BLOCK_K
        w_ptrs += BLOCK_K
    omask = mmask[:, None] & nmask[None, :]
    if SPLIT:
        ws_ptrs = ws_ptr + (ks * M + offs_m[:, None]).to(tl.int64) * N + offs_n[None, :]
        tl.store(ws_ptrs, acc, mask=omask)
    else:
        y = _scaled(acc, scale_ptr, bias_ptr, offs_n[None, :], nmask[None, :], HAS_BIAS, BITS)
        out_ptrs = out_ptr + offs_m[:, None].to(tl.int64) * stride_om + offs_n[None, :]
        tl.store(out_ptrs, y.to(out_ptr.dtype.element_ty), mask=omask)


@triton.jit
def _w8a16_reduce_kernel(
    ws_ptr,
    scale_ptr,
    bias_ptr,
    out_ptr,
    M,
    N,
    SPLITS,
    stride_om,
    BLOCK: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    BITS: tl.constexpr,
):
    """out[m, n] = scale[n] * sum over splits of ws[s, m, n] (+ bias[n]), splits in order."""
    pid_n = tl.program_id(0)
    m = tl.program_id(1).to(tl.int64)
    offs_n = pid_n * BLOCK + tl.arange(0, BLOCK)
    nmask = offs_n < N
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for s in range(0, SPLITS):
        acc += tl.load(ws_ptr + (s * M + m) * N + offs_n, mask=nmask, other=0.0)
    y = _scaled(acc, scale_ptr, bias_ptr, offs_n, nmask, HAS_BIAS, BITS)
    tl.store(out_ptr + m * stride_om + offs_n, y.to(out_ptr.dtype.element_ty), mask=nmask)


@triton.jit
def _load_k(ptr, offs, K, MASKED: tl.constexpr):
    """ptr[offs], zero past K where the tile may cross it (MASKED), else an unmasked (vectorisable) load."""
    if MASKED:
        return tl.load(ptr + offs, mask=offs < K, other=0.0)
    else:
        return tl.load(ptr + offs)


@triton.jit
def _row_rstd(x_ptr, res_ptr, sum_ptr, K, eps, STORE, KP2: tl.constexpr):
    """1 / rms(x + res) over the whole row, as `triton_fused._add_rms_norm_kernel` computes it (the sum rounded to
    the activation dtype, squares summed in float32 in one reduction over a power-of-two block); the program that
    has STORE writes the sum (the new residual stream) to sum_ptr."""
    cols = tl.arange(0, KP2)
    mask = cols < K
    r = tl.load(x_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    r = (r + tl.load(res_ptr + cols, mask=mask, other=0.0).to(tl.float32)).to(sum_ptr.dtype.element_ty)
    if STORE:
        tl.store(sum_ptr + cols, r, mask=mask)
    rf = r.to(tl.float32)
    return 1.0 / tl.sqrt(tl.sum(rf * rf, axis=0) / K + eps)


@triton.jit
def _gemv_x(
    x_ptr,
    offs,
    K,
    MASKED: tl.constexpr,
    SILU_MUL: tl.constexpr,
    ADD_NORM: tl.constexpr = False,
    res_ptr=None,
    nw_ptr=None,
    rstd=None,
):
    """x[offs] in float32. With SILU_MUL, x_ptr is a [gate | up] row of 2K and x = silu(gate) * up, computed as
    `triton_fused._silu_mul_kernel` does (float32, the SiLU and the product each rounded to the activation dtype),
    so the down projection sees the very values that kernel would have written, without their round trip. With
    ADD_NORM, x = RMSNorm(x + res) * nw given the row's `rstd` (`_row_rstd`), rounded where `_add_rms_norm_kernel`
    rounds: the sum, the normalised row and the weighted row."""
    if ADD_NORM:
        ty = x_ptr.dtype.element_ty
        r = _load_k(x_ptr, offs, K, MASKED).to(tl.float32) + _load_k(res_ptr, offs, K, MASKED).to(tl.float32)
        normed = (r.to(ty).to(tl.float32) * rstd).to(ty).to(tl.float32)
        return (_load_k(nw_ptr, offs, K, MASKED).to(tl.float32) * normed).to(ty).to(tl.float32)
    elif SILU_MUL:
        ty = x_ptr.dtype.element_ty
        gate = _load_k(x_ptr, offs, K, MASKED).to(tl.float32)
        up = _load_k(x_ptr + K, offs, K, MASKED).to(tl.float32)
        act = (gate / (1.0 + tl.exp(-gate))).to(ty).to(tl.float32)
        return (act * up).to(ty).to(tl.float32)
    else:
        return _load_k(x_ptr, offs, K, MASKED).to(tl.float32)


@triton.jit
def _load_w(w_ptrs, nmask, offs_k, K, MASK_N: tl.constexpr, MASK_K: tl.constexpr):
    """A [BLOCK_N, BLOCK_K] weight tile, masked only along the dimensions that may be ragged (streamed once:
    evict first)."""
    if MASK_K:
        return tl.load(w_ptrs, mask=nmask[:, None] & (offs_k < K)[None, :], other=0.0, eviction_policy="evict_first")
    elif MASK_N:
        return tl.load(w_ptrs, mask=nmask[:, None], other=0.0, eviction_policy="evict_first")
    else:
        return tl.load(w_ptrs, eviction_policy="evict_first")


@triton.jit
def _w8a16_gemv_kernel(
    x_ptr,
    w_ptr,
    scale_ptr,
    bias_ptr,
    out_ptr,
    ws_ptr,
    cnt_ptr,  # LAST_SPLIT: one int32 arrival counter per BLOCK_N channels (`lragent.kernels.counters`)
    res_ptr,  # ADD_NORM: the residual row, the norm's weight, the new residual (x + res) written by program (0, 0)
    nw_ptr,
    sum_ptr,
    eps,
    N,
    K,
    K_PER_SPLIT,
    stride_wn,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    EVEN_K: tl.constexpr,
    EVEN_N: tl.constexpr,
    BITS: tl.constexpr,
    SPLIT: tl.constexpr,
    SILU_MUL: tl.constexpr = False,  # x_ptr holds [gate | up] (2K): x = silu(gate) * up on the fly (`_gemv_x`)
    LAST_SPLIT: tl.constexpr = False,  # with SPLIT: the last split to finish reduces (no `_w8a16_reduce_kernel`)
    PDL: tl.constexpr = False,  # launched with PDL (`lragent.kernels.pdl`): first weight tile before the wait
    ADD_NORM: tl.constexpr = False,  # x = RMSNorm(x + res) * nw on the fly (`_row_rstd`, `_gemv_x`)
    KP2: tl.constexpr = 1,  # ADD_NORM: the power of two >= K the row's norm is reduced over
):
    """One row of x: y[n] = scale[n] * sum_k W[n, k] x[k] for BLOCK_N output channels per program, without `tl.dot`
    (which pads the row to 16): each [BLOCK_N, BLOCK_K] weight tile is read along K (contiguous bytes, wide loads),
    multiplied by x in float32 and summed over K into a [BLOCK_N] accumulator. With SPLIT, program (n, s) sums only
    K_PER_SPLIT of K (a multiple of BLOCK_K) and stores its unscaled partial in ws[s, n]: more programs in flight for
    projections with few output channels and long rows; the split that finishes last for a channel block adds the
    splits and scales (LAST_SPLIT: one launch), else `_w8a16_reduce_kernel` does in a second launch.

    Without a `tl.dot` Triton does not pipeline the loop: a program has one weight tile in flight at a time, and the
    memory stays busy through many programs per SM. Issuing two tiles' loads before reducing either was measured
    slower at every Llama-3.1-8B projection on an H200 (seventh session: the doubled registers cost more programs
    per SM than the extra bytes in flight gain).

    With ADD_NORM every program first reduces the whole row's norm (K elements, from L2 after the first program)
    and program (0, 0) writes the new residual: the residual add + RMSNorm before the MLP needs no launch of its own."""
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    k_start = tl.program_id(1) * K_PER_SPLIT
    k_end = tl.minimum(K, k_start + K_PER_SPLIT)
    offs_k = tl.arange(0, BLOCK_K)
    nmask = offs_n < N
    w_ptrs = w_ptr + offs_n[:, None].to(tl.int64) * stride_wn + (k_start + offs_k)[None, :]
    acc = tl.zeros([BLOCK_N], dtype=tl.float32)
    k_tail = k_start
    rstd = 0.0
    first = (tl.program_id(0) == 0) & (tl.program_id(1) == 0)
    if PDL:
        # the weights are no earlier kernel's output: load the first tile while the kernel that writes x may still
        # run, then wait for it before reading x (every split has at least one tile)
        gdc_launch_dependents()
        w = _load_w(w_ptrs, nmask, k_start + offs_k, K, not EVEN_N, not EVEN_K)
        gdc_wait()
        if ADD_NORM:
            rstd = _row_rstd(x_ptr, res_ptr, sum_ptr, K, eps, first, KP2)
        x = _gemv_x(x_ptr, k_start + offs_k, K, not EVEN_K, SILU_MUL, ADD_NORM, res_ptr, nw_ptr, rstd)
        acc += tl.sum(_decode_e4m3(w, BITS).to(tl.float32) * x[None, :], 1)
        w_ptrs += BLOCK_K
        k_tail = k_start + BLOCK_K
    elif ADD_NORM:
        rstd = _row_rstd(x_ptr, res_ptr, sum_ptr, K, eps, first, KP2)
    for k0 in range(k_tail, k_end, BLOCK_K):
        x = _gemv_x(x_ptr, k0 + offs_k, K, not EVEN_K, SILU_MUL, ADD_NORM, res_ptr, nw_ptr, rstd)
        w = _load_w(w_ptrs, nmask, k0 + offs_k, K, not EVEN_N, not EVEN_K)
        acc += tl.sum(_decode_e4m3(w, BITS).to(tl.float32) * x[None, :], 1)
        w_ptrs += BLOCK_K
    if SPLIT:
        tl.store(ws_ptr + tl.program_id(1) * N + offs_n, acc, mask=nmask)
        if LAST_SPLIT:
            # one launch: the last split of these channels to arrive adds the partials in split order (the reduce
            # kernel's sum, bit for bit) and resets its counter; the barrier orders every thread's partial store
            # before thread 0's release, the acquire orders the sum's loads (through L2: other SMs wrote them)
            tl.debug_barrier()
            cnt = cnt_ptr + tl.program_id(0)
            splits = tl.num_programs(1)
            if tl.atomic_add(cnt, 1, sem="acq_rel", scope="gpu") == splits - 1:
                acc = tl.zeros([BLOCK_N], dtype=tl.float32)
                for s in range(0, splits):
                    acc += tl.load(ws_ptr + s * N + offs_n, mask=nmask, other=0.0, cache_modifier=".cg")
                tl.atomic_xchg(cnt, 0)
                _store_row(acc, scale_ptr, bias_ptr, out_ptr, offs_n, nmask, HAS_BIAS, BITS)
    else:
        _store_row(acc, scale_ptr, bias_ptr, out_ptr, offs_n, nmask, HAS_BIAS, BITS)


@triton.jit
def _store_row(acc, scale_ptr, bias_ptr, out_ptr, offs_n, nmask, HAS_BIAS: tl.constexpr, BITS: tl.constexpr):
    y = _scaled(acc, scale_ptr, bias_ptr, offs_n, nmask, HAS_BIAS, BITS)
    tl.store(out_ptr + offs_n, y.to(out_ptr.dtype.element_ty), mask=nmask)


REDUCE_BLOCK = 1024
# Triton's interpreter (3.x) multiplies a bfloat16 `tl.dot`'s raw uint16 storage; there the dot runs on float32 copies
# of the bf16 x and of the decoded weights: the same products (a bf16 x bf16 product is exact in float32), summed in
# float32 as on the GPU, in another order. Compiled kernels never take this branch.
_INTERPRET_BF16_DOT = os.environ.get("TRITON_INTERPRET") == "1"
GEMV = os.environ.get("LRAGENT_FP8_GEMV", "1") == "1"  # single rows through `_w8a16_gemv_kernel` (see w8a16_linear)
# a split single-row GEMV reduces in its last split (one launch) unless LRAGENT_FP8_GEMV_REDUCE=kernel (two launches)
GEMV_LAST_SPLIT = os.environ.get("LRAGENT_FP8_GEMV_REDUCE", "last_split") != "kernel"
GEMV_COUNTERS_OWNER = "fp8_gemv"  # one arrival counter per BLOCK_N channels of a split launch
GEMV_PDL: bool | None = None  # None: PDL where `pdl_enabled`; tests and sweeps set True / False


class GemvConfig(NamedTuple):
    block_n: int
    block_k: int
    num_warps: int
    split_k: int  # programs along K (1: one program per BLOCK_N channels, no reduce launch)


def gemv_config(
    n: int,
    k: int,
    block_n: int | None = None,
    block_k: int | None = None,
    num_warps: int | None = None,
    split_k: int | None = None,
) -> GemvConfig:
    """The single-row kernel's tiles (any argument given overrides), from benchmarks/fp8_gemm_sweep.py on an H200
    (Llama-3.1-8B projections, 2026-12-01, two sweeps): 8 warps always (4 left the loads short of bandwidth: up to 2x
    slower); up to N = 8192 16 channels per program in 1,024-wide K steps (qkv 8.3 us = 0.48x bf16, o 7.5 us =
    0.68x), above it 32 channels in 512-wide steps (gate_up 32.1 us = 0.52x); rows longer than 8192 split in two
    along K so twice the programs stream them (down, K 14336: 19.9 us = 0.61x; 23.8 unsplit, 62.7 with the first
    4-warp 32 x 512 tiles)."""
    wide = n > 8192
    bn = block_n or (32 if wide else 16)
    bk = block_k or (512 if wide else 1024)
    split = split_k or (2 if k > 8192 else 1)
    return GemvConfig(bn, bk, num_warps or 8, max(1, min(split, triton.cdiv(k, bk))))


def _gemv(
    x: torch.Tensor,
    weight: torch.Tensor,
    scale: torch.Tensor,
    bias: torch.Tensor | None,
    out: torch.Tensor,
    bits: bool,
    cfg: GemvConfig,
    num_stages: int,
    silu_mul: bool = False,
    add_norm: AddNorm | None = None,
) -> None:
    """One row through `_w8a16_gemv_kernel` (and the split reduce when cfg.split_k > 1) into out [1, N]; with
    `silu_mul`, x is the [gate | up] row of 2K and the kernel multiplies W by silu(gate) * up; with `add_norm`, by
    RMSNorm(x + residual) * weight, writing x + residual to `add_norm.total`."""
    n, k = weight.shape
    per_split = triton.cdiv(triton.cdiv(k, cfg.split_k), cfg.block_k) * cfg.block_k
    splits = triton.cdiv(k, per_split)
    ws = torch.empty(splits, 1, n, dtype=torch.float32, device=x.device) if splits > 1 else out
    bias_arg = bias if bias is not None else scale  # never read without HAS_BIAS
    tiles = triton.cdiv(n, cfg.block_n)
    last = splits > 1 and GEMV_LAST_SPLIT
    cnt = arrival_counters(tiles, x.device, GEMV_COUNTERS_OWNER) if last else out  # unread unless `last`
    pdl = pdl_enabled(x.device) if GEMV_PDL is None else GEMV_PDL
    norm = add_norm or AddNorm(x, x, x, 0.0)  # never read without ADD_NORM
    _w8a16_gemv_kernel[(tiles, splits)](
        x, weight, scale, bias_arg, out, ws, cnt, norm.residual, norm.weight, norm.total, norm.eps, n, k, per_split,
        weight.stride(0), BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, HAS_BIAS=bias is not None,
        EVEN_K=k % cfg.block_k == 0, EVEN_N=n % cfg.block_n == 0, BITS=bits, SPLIT=splits > 1, SILU_MUL=silu_mul,
        LAST_SPLIT=last, PDL=pdl, ADD_NORM=add_norm is not None, KP2=triton.next_power_of_2(k) if add_norm else 1,
        num_warps=cfg.num_warps, num_stages=num_stages, **launch_options(pdl),
    )  # fmt: skip
    if splits > 1 and not last:
        _w8a16_reduce_kernel[(triton.cdiv(n, REDUCE_BLOCK), 1)](
            ws, scale, bias_arg, out, 1, n, splits, out.stride(0), BLOCK=REDUCE_BLOCK, HAS_BIAS=bias is not None,
            BITS=bits, num_warps=4,
        )  # fmt: skip


class AddNorm(NamedTuple):
    """The residual add + RMSNorm a GEMV may compute as its prologue (`w8a16_add_rms_norm_linear`)."""

    residual: torch.Tensor  # [1, K], added to x
    weight: torch.Tensor  # [K], the norm's weight
    total: torch.Tensor  # [1, K], receives x + residual (the new residual stream)
    eps: float


def w8a16_add_rms_norm_linear(
    x: torch.Tensor,
    residual: torch.Tensor,
    norm_weight: torch.Tensor,
    eps: float,
    weight: torch.Tensor,
    scale: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    decode: str | None = None,
    block_n: int | None = None,
    block_k: int | None = None,
    split_k: int | None = None,
    num_warps: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(linear(RMSNorm(x + residual) * norm_weight, W), x + residual) for one row x [1, K] in one launch: what
    `triton_fused.add_rms_norm` and `w8a16_linear` compute in two, with the same roundings (the sum exactly; the
    product bit for bit in the interpreter, where both kernels reduce the norm alike, and within the GEMV's
    tolerance compiled, where the sums of squares may run in another order), without the normalised row's round
    trip through memory. Only a single row on the GEMV path (`can_fuse_add_norm`); anything else raises ValueError."""
    if not can_fuse_add_norm(x, residual):
        raise ValueError(f"the add + RMSNorm prologue needs one row with its residual, got {tuple(x.shape)}")
    k, n = x.shape[-1], weight.shape[0]
    assert weight.shape[1] == k and weight.stride(1) == 1 and norm_weight.shape == (k,), (weight.shape, k)
    x2, res2 = x.reshape(1, k).contiguous(), residual.reshape(1, k).contiguous()
    out = torch.empty(1, n, dtype=x.dtype, device=x.device)
    total = torch.empty_like(x2)
    bits = _decode_bits(weight, decode, x.device)
    weight = weight.view(torch.uint8) if bits else weight
    cfg = gemv_config(n, k, block_n, block_k, num_warps, split_k)
    _gemv(x2, weight, scale, bias, out, bits, cfg, 3, add_norm=AddNorm(res2, norm_weight, total, eps))
    return out.view(*x.shape[:-1], n), total.view(x.shape)


def can_fuse_add_norm(x: torch.Tensor, residual: torch.Tensor | None, gemv: bool | None = None) -> bool:
    """Whether one row and its residual can take the GEMV's add + RMSNorm prologue (the GEMV path on)."""
    return (
        residual is not None
        and x.numel() == x.shape[-1] > 0
        and residual.shape == x.shape
        and residual.dtype == x.dtype
        and (GEMV if gemv is None else gemv)
    )


def _decode_bits(weight: torch.Tensor, decode: str | None, device: torch.device) -> bool:
    """Whether the weight decodes from its bytes ("bits": uint8 weights, older GPUs, or asked) or natively."""
    decode = "bits" if weight.dtype == torch.uint8 else decode or _device_info(device)[1]
    if decode not in DECODES:
        raise ValueError(f"decode must be one of {DECODES}, got {decode!r}")
    return decode == "bits"


ACTS = ("silu_mul",)


def can_fuse_act(x: torch.Tensor, act: str, gemv: bool | None = None) -> bool:
    """Whether `w8a16_linear(x, ..., act=act)` fuses the activation: a known one, a single row of even width, and
    the GEMV path (`gemv`, None: the module's `GEMV`); the tiled kernel has no prologue."""
    if act not in ACTS:
        raise ValueError(f"act must be one of {ACTS}, got {act!r}")
    return x.numel() == x.shape[-1] > 0 and x.shape[-1] % 2 == 0 and (GEMV if gemv is None else gemv)


def w8a16_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    scale: torch.Tensor,
    bias: torch.Tensor | None = None,
    out_dtype: torch.dtype | None = None,
    *,
    decode: str | None = None,
    block_n: int | None = None,
    block_k: int | None = None,
    split_k: int | None = None,
    num_warps: int | None = None,
    num_stages: int | None = None,
    gemv: bool | None = None,
    act: str | None = None,
) -> torch.Tensor:
    """x [..., K] (bf16 / fp16 / fp32) times the FP8 weight [N, K] (float8_e4m3fn or its bytes as uint8, rows with
    unit stride along K) scaled per row by `scale` [N] (float32) -> [..., N] in `out_dtype` (default x's), plus
    `bias` [N] if given. `decode` ("native" / "bits") defaults to "native" on GPUs of compute capability >= 8.9 and
    "bits" elsewhere; a uint8 weight always decodes with "bits". `gemv` (None: `GEMV`, the environment's
    LRAGENT_FP8_GEMV, on unless 0) sends a single row through `_w8a16_gemv_kernel` (faster at every measured shape);
    `block_n`, `block_k`, `num_warps`, `num_stages`, `split_k` tune either kernel, overriding
    `w8a16_config` / `gemv_config` (tests, sweeps).

    `act="silu_mul"`: x [..., 2K] is a [gate | up] row (the fused gate/up projection's output) and the product is
    W times silu(gate) * up, computed in the GEMV's loads with `silu_mul`'s rounding (see `_gemv_x`): the down
    projection without the SiLU kernel's launch and its round trip through memory. Only one row, on the GEMV
    path (`can_fuse_act` says when); anything else raises ValueError, the caller runs `silu_mul` first instead."""
    if act is not None and not can_fuse_act(x, act, gemv):
        raise ValueError(f"act={act!r} needs a single row on the GEMV path, got {tuple(x.shape)}")
    k = x.shape[-1] // 2 if act else x.shape[-1]  # with act, the weight's K is half of x's [gate | up] row
    n = weight.shape[0]
    assert weight.shape[1] == k and weight.stride(1) == 1, (tuple(weight.shape), weight.stride(), k)
    assert scale.shape == (n,) and scale.dtype == torch.float32
    assert x.dtype in (torch.bfloat16, torch.float16, torch.float32), x.dtype
    x2 = x.reshape(-1, x.shape[-1])
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    m = x2.shape[0]
    out_dtype = out_dtype or x.dtype
    out = torch.empty(m, n, dtype=out_dtype, device=x.device)
    if m == 0 or k == 0:  # nothing to read (no shape of a real projection)
        out.zero_()
        if bias is not None:
            out += bias
        return out.view(*x.shape[:-1], n)
    sms = _device_info(x.device)[0]
    bits = _decode_bits(weight, decode, x.device)
    if bits and weight.dtype != torch.uint8:
        weight = weight.view(torch.uint8)
    has_bias = bias is not None
    bias_arg = bias if bias is not None else scale  # never read without HAS_BIAS
    if m == 1 and (GEMV if gemv is None else gemv):
        cfg_1 = gemv_config(n, k, block_n, block_k, num_warps, split_k)
        _gemv(x2, weight, scale, bias, out, bits, cfg_1, num_stages or 3, silu_mul=act == "silu_mul")
        return out.view(*x.shape[:-1], n)
    cfg = w8a16_config(m, n, k, sms, x2.element_size(), block_n, block_k, split_k)
    split = cfg.split_k > 1
    ws = torch.empty(cfg.split_k, m, n, dtype=torch.float32, device=x.device) if split else out
    grid = (triton.cdiv(n, cfg.block_n), cfg.split_k, triton.cdiv(m, cfg.block_m))
    _w8a16_kernel[grid](
        x2,
        weight,
        scale,
        bias_arg,
        out,
        ws,
        m,
        n,
        k,
        cfg.k_per_split,
        x2.stride(0),
        weight.stride(0),
        out.stride(0),
        BLOCK_M=cfg.block_m,
        BLOCK_N=cfg.block_n,
        BLOCK_K=cfg.block_k,
        SPLIT=split,
        HAS_BIAS=has_bias,
        EVEN_K=k % cfg.k_per_split == 0,
        EVEN_N=n % cfg.block_n == 0,
        BITS=bits,
        DOT_PREC="ieee" if x.dtype == torch.float32 else "tf32",
        DOT_F32=_INTERPRET_BF16_DOT and x.dtype == torch.bfloat16,
        num_warps=num_warps or cfg.num_warps,
        num_stages=num_stages or cfg.num_stages,
    )
    if split:
        _w8a16_reduce_kernel[(triton.cdiv(n, REDUCE_BLOCK), m)](
            ws,
            scale,
            bias_arg,
            out,
            m,
            n,
            cfg.split_k,
            out.stride(0),
            BLOCK=REDUCE_BLOCK,
            HAS_BIAS=has_bias,
            BITS=bits,
            num_warps=4,
        )
    return out.view(*x.shape[:-1], n)
