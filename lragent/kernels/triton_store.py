"""One launch writes a step's new keys, base values and LR rows into the paged pools.

Program i copies key/value row i to flat slot `base_slots[i]` (if i < n) and LR row i to `lr_slots[i]` (if i < T).
Negative slots are skipped (padding rows of a captured CUDA graph). Values are cast to the pool dtype on store, so
a float32 shrink output can go straight into a bf16 LR pool. With flag arrays, a row holding a NaN or inf (after
the cast) marks its block there: the engine never publishes a marked block into the shared cache, and the check
costs nothing beyond the values already in registers.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _nonfinite(x):
    """Number of NaN / inf entries of a row (exponent bits all ones: immune to fast-math rewrites of x != x)."""
    bits = x.to(tl.float32).to(tl.int32, bitcast=True)
    return tl.sum(((bits & 0x7F800000) == 0x7F800000).to(tl.int32), axis=0)


@triton.jit(do_not_specialize=["n_base", "n_lr"])
def _store_kernel(
    key_ptr,
    val_ptr,
    kpool_ptr,
    vpool_ptr,
    slots_ptr,
    n_base,
    lr_ptr,
    lrpool_ptr,
    lr_slots_ptr,
    n_lr,
    stride_kt,
    stride_vt,
    stride_lt,
    kv_flags_ptr,
    lr_flags_ptr,
    ROW: tl.constexpr,
    ROW_PAD: tl.constexpr,
    R: tl.constexpr,
    R_PAD: tl.constexpr,
    HAS_KV: tl.constexpr,
    HAS_LR: tl.constexpr,
    HAS_FLAGS: tl.constexpr,
    BLOCK: tl.constexpr,
):
    i = tl.program_id(0)
    if HAS_KV:
        if i < n_base:
            slot = tl.load(slots_ptr + i).to(tl.int64)
            if slot >= 0:
                offs = tl.arange(0, ROW_PAD)
                mask = offs < ROW
                i64 = i.to(tl.int64)
                k = tl.load(key_ptr + i64 * stride_kt + offs, mask=mask, other=0.0).to(kpool_ptr.dtype.element_ty)
                v = tl.load(val_ptr + i64 * stride_vt + offs, mask=mask, other=0.0).to(vpool_ptr.dtype.element_ty)
                tl.store(kpool_ptr + slot * ROW + offs, k, mask=mask)
                tl.store(vpool_ptr + slot * ROW + offs, v, mask=mask)
                if HAS_FLAGS:
                    if _nonfinite(k) + _nonfinite(v) > 0:
                        tl.store(kv_flags_ptr + slot // BLOCK, 1)
    if HAS_LR:
        if i < n_lr:
            lslot = tl.load(lr_slots_ptr + i).to(tl.int64)
            if lslot >= 0:
                offs_r = tl.arange(0, R_PAD)
                rmask = offs_r < R
                x = tl.load(lr_ptr + i.to(tl.int64) * stride_lt + offs_r, mask=rmask, other=0.0)
                x = x.to(lrpool_ptr.dtype.element_ty)
                tl.store(lrpool_ptr + lslot * R + offs_r, x, mask=rmask)
                if HAS_FLAGS:
                    if _nonfinite(x) > 0:
                        tl.store(lr_flags_ptr + lslot // BLOCK, 1)


def _rows(x: torch.Tensor) -> torch.Tensor:
    x = x.reshape(x.shape[0], -1)
    return x if x.stride(-1) == 1 else x.contiguous()


def store_kv_lr(
    key_pool: torch.Tensor,
    value_pool: torch.Tensor,
    lr_pool: torch.Tensor | None,
    key: torch.Tensor | None,
    value: torch.Tensor | None,
    base_slots: torch.Tensor | None,
    lr: torch.Tensor | None,
    lr_slots: torch.Tensor | None,
    kv_flags: torch.Tensor | None = None,
    lr_flags: torch.Tensor | None = None,
    block_size: int = 1,
) -> None:
    """key/value [n, Hkv, d] at base_slots [n]; lr [T, r] at lr_slots [T] (pools of one layer). `kv_flags` /
    `lr_flags` (int8 per block of each pool, both or neither) get a 1 for every block a non-finite row lands in."""
    has_kv = key is not None and key.shape[0] > 0
    has_lr = lr is not None and lr_pool is not None and lr.shape[0] > 0
    if not (has_kv or has_lr):
        return
    row = key_pool.shape[-2] * key_pool.shape[-1]
    r = lr_pool.shape[-1] if lr_pool is not None else 1
    if has_kv:
        assert key is not None and value is not None
        k2, v2 = _rows(key), _rows(value)
        if k2.shape[1] != row or v2.shape[1] != row:
            raise ValueError(f"key/value rows of {k2.shape[1]} elements do not match the pool's {row}")
        n_base = k2.shape[0]
    else:
        k2 = v2 = key_pool
        n_base = 0
        base_slots = key_pool
    if has_lr:
        assert lr is not None
        l2 = _rows(lr)
        if l2.shape[1] != r:
            raise ValueError(f"LR rows of width {l2.shape[1]} do not match the pool's rank {r}")
        n_lr = l2.shape[0]
    else:
        l2 = lr_slots = key_pool
        n_lr = 0
    _store_kernel[(max(n_base, n_lr),)](
        k2,
        v2,
        key_pool,
        value_pool,
        base_slots,
        n_base,
        l2,
        lr_pool if has_lr else key_pool,
        lr_slots,
        n_lr,
        k2.stride(0),
        v2.stride(0),
        l2.stride(0),
        kv_flags if kv_flags is not None else key_pool,
        lr_flags if lr_flags is not None else key_pool,
        ROW=row,
        ROW_PAD=triton.next_power_of_2(row),
        R=r,
        R_PAD=triton.next_power_of_2(r),
        HAS_KV=has_kv,
        HAS_LR=has_lr,
        HAS_FLAGS=kv_flags is not None,
        BLOCK=block_size,
        num_warps=4 if row >= 512 else 1,
    )
