"""Fused elementwise kernels of the decoder layer: residual add + RMSNorm, rotary embedding, SiLU-and-multiply.

In PyTorch each of these is 5-10 small kernels (RMSNorm: cast, square, mean, rsqrt, two multiplies, casts; RoPE:
two gathers, a negate, a concat, four multiplies and adds). At decode batch sizes they read a few kilobytes each,
so what they cost is their launches: about 50 of a layer's 66 in the eager model, the larger part of a CUDA-graph
decode step of an 8B model. One kernel each cuts a layer to ~15 launches.

Numerics follow the PyTorch reference in `lragent.models.llama` (fp32 arithmetic, rounding to the activation dtype
at the same points: the residual sum, the normalised row, the SiLU), so the CPU path stays the exact reference
and these are compared with it in `tests/test_fused_ops.py`.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from lragent.kernels.pdl import gdc_launch_dependents, pdl_enabled


@triton.jit
def _add_rms_norm_kernel(
    x_ptr,
    res_ptr,
    w_ptr,
    out_ptr,
    sum_ptr,
    n_cols,
    eps,
    stride_x,
    stride_res,
    stride_out,
    stride_sum,
    BLOCK: tl.constexpr,
    HAS_RES: tl.constexpr,
    PDL: tl.constexpr = False,
):
    if PDL:  # the next kernel (an FP8 GEMV reading this row) may launch now and stream its weights meanwhile
        gdc_launch_dependents()
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < n_cols
    x = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0)
    if HAS_RES:
        # the residual stream is kept in the activation dtype: round the sum exactly where `h + delta` would
        x = x.to(tl.float32) + tl.load(res_ptr + row * stride_res + cols, mask=mask, other=0.0).to(tl.float32)
        x = x.to(sum_ptr.dtype.element_ty)
        tl.store(sum_ptr + row * stride_sum + cols, x, mask=mask)
    xf = x.to(tl.float32)
    rstd = 1.0 / tl.sqrt(tl.sum(xf * xf, axis=0) / n_cols + eps)
    normed = (xf * rstd).to(out_ptr.dtype.element_ty).to(tl.float32)
    w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + row * stride_out + cols, (w * normed).to(out_ptr.dtype.element_ty), mask=mask)


def add_rms_norm(
    x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor, eps: float, out: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(RMSNorm(x + residual) * weight, x + residual) for x [T, N]; without a residual the second is x itself."""
    t, n = x.shape
    if x.stride(-1) != 1 or (residual is not None and residual.stride(-1) != 1):
        raise ValueError("add_rms_norm needs rows with unit stride")
    out = torch.empty_like(x) if out is None else out
    total = x if residual is None else torch.empty_like(x)
    if t:
        res = residual if residual is not None else x
        _add_rms_norm_kernel[(t,)](
            x,
            res,
            weight,
            out,
            total,
            n,
            eps,
            x.stride(0),
            res.stride(0),
            out.stride(0),
            total.stride(0),
            BLOCK=triton.next_power_of_2(n),
            HAS_RES=residual is not None,
            PDL=pdl_enabled(x.device),
            num_warps=4 if n <= 2048 else 8,
        )
    return out, total


@triton.jit
def _rotary_kernel(
    x_ptr,
    out_ptr,
    pos_ptr,
    cos_ptr,
    sin_ptr,
    n_heads,
    stride_xt,
    stride_xh,
    stride_ot,
    stride_oh,
    stride_table,
    HALF: tl.constexpr,
    H_PAD: tl.constexpr,
):
    t = tl.program_id(0).to(tl.int64)
    heads = tl.arange(0, H_PAD)
    cols = tl.arange(0, HALF)
    mask = heads[:, None] < n_heads
    pos = tl.load(pos_ptr + t).to(tl.int64)
    # the tables hold cat(freqs, freqs): the first half serves both halves
    cos = tl.load(cos_ptr + pos * stride_table + cols)[None, :]
    sin = tl.load(sin_ptr + pos * stride_table + cols)[None, :]
    src = x_ptr + t * stride_xt + heads[:, None] * stride_xh + cols[None, :]
    x1 = tl.load(src, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(src + HALF, mask=mask, other=0.0).to(tl.float32)
    dst = out_ptr + t * stride_ot + heads[:, None] * stride_oh + cols[None, :]
    ty = out_ptr.dtype.element_ty
    tl.store(dst, (x1 * cos - x2 * sin).to(ty), mask=mask)
    tl.store(dst + HALF, (x2 * cos + x1 * sin).to(ty), mask=mask)


def rotary(
    x: torch.Tensor, positions: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, out: torch.Tensor | None = None
) -> torch.Tensor:
    """Half-split RoPE of x [T, heads, d] (rows may be strided views of a fused projection) into `out`: a new
    tensor by default, or x itself (each program reads its token's rows before writing them)."""
    t, h, d = x.shape
    if x.stride(-1) != 1 or cos.stride(-1) != 1:
        raise ValueError("rotary needs a unit stride along head_dim")
    out = torch.empty((t, h, d), dtype=x.dtype, device=x.device) if out is None else out
    if t:
        _rotary_kernel[(t,)](
            x,
            out,
            positions,
            cos,
            sin,
            h,
            x.stride(0),
            x.stride(1),
            out.stride(0),
            out.stride(1),
            cos.stride(0),
            HALF=d // 2,
            H_PAD=triton.next_power_of_2(h),
            num_warps=4 if h * d <= 4096 else 8,
        )
    return out


@triton.jit
def _silu_mul_kernel(gu_ptr, out_ptr, n_cols, stride_gu, stride_out, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < n_cols
    gate = tl.load(gu_ptr + row * stride_gu + cols, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(gu_ptr + row * stride_gu + n_cols + cols, mask=mask, other=0.0).to(tl.float32)
    ty = out_ptr.dtype.element_ty
    act = (gate / (1.0 + tl.exp(-gate))).to(ty).to(tl.float32)  # F.silu rounds to the dtype before the product
    tl.store(out_ptr + row * stride_out + cols, (act * up).to(ty), mask=mask)


def silu_mul(gate_up: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """silu(gate) * up for gate_up [T, 2I] laid out as [gate | up] (the fused gate/up projection's output)."""
    t, two_i = gate_up.shape
    n = two_i // 2
    if gate_up.stride(-1) != 1:
        raise ValueError("silu_mul needs rows with unit stride")
    out = torch.empty((t, n), dtype=gate_up.dtype, device=gate_up.device) if out is None else out
    block = min(1024, triton.next_power_of_2(n))
    if t:
        _silu_mul_kernel[(t, triton.cdiv(n, block))](
            gate_up,
            out,
            n,
            gate_up.stride(0),
            out.stride(0),
            BLOCK=block,
            num_warps=4,
        )
    return out
