"""How fast can Triton run our paged prefill attention on Hopper when a key tile is one page? (GPU, one table.)

The engine's prefill kernel gathers every key row through the block table (pages of 16 tokens, pointer loads) and
reaches ~42% of the bf16 matmul rate at 8k new tokens. This probe times a variant whose key / value tiles are whole
pages (block size 64 or 128 = BLOCK_N), loaded with Hopper's tensor-memory accelerator through host-side tensor
descriptors (one scalar block-table read per tile, no per-row addresses), optionally with Triton's automatic warp
specialisation, with and without the LR term, against the engine's kernel and SDPA's flash backend on the same
shapes. Each variant is first checked against an fp32 reference on a small case.

Run: python benchmarks/prefill_tma_probe.py [--shapes 8192:0,1024:32768,2048:16384]
"""

from __future__ import annotations

import argparse
import json
from functools import partial

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

HQ, HKV, D, R = 32, 8, 128, 8
LOG2E = 1.4426950408889634


@triton.jit
def _tile(acc, acc_r, m_i, l_i, q, qpos, n0, desc_k, desc_v, bt_ptr, lr_ptr, kv_col, offs_n, offs_r, scale,
          BS: tl.constexpr, BN: tl.constexpr, D: tl.constexpr, R: tl.constexpr, MASKED: tl.constexpr,
          HAS_LR: tl.constexpr):  # fmt: skip
    row = tl.load(bt_ptr + n0 // BS).to(tl.int32) * BS + n0 % BS
    k = desc_k.load([row, kv_col])
    s = tl.dot(q, tl.trans(k)) * scale
    if MASKED:
        s = tl.where((n0 + offs_n)[None, :] <= qpos[:, None], s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    alpha = tl.exp2(m_i - m_new)
    p = tl.exp2(s - m_new[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    v = desc_v.load([row, kv_col])
    acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None])
    if HAS_LR:
        rows = row + offs_n
        lr = tl.load(lr_ptr + rows[:, None] * R + offs_r[None, :], mask=offs_r[None, :] < R, other=0.0)
        acc_r = tl.dot(p.to(lr.dtype), lr, acc_r * alpha[:, None])
    return acc, acc_r, m_new, l_i


@triton.jit
def _probe_kernel(desc_q, desc_k, desc_v, bt_ptr, lr_ptr, out_ptr, out_r_ptr, prefix, n_tiles, scale,
                  HQ: tl.constexpr, G: tl.constexpr, D: tl.constexpr, R: tl.constexpr, R_PAD: tl.constexpr,
                  BM: tl.constexpr, BN: tl.constexpr, BS: tl.constexpr, HAS_LR: tl.constexpr,
                  WS: tl.constexpr):  # fmt: skip
    mt = n_tiles - 1 - tl.program_id(1)  # longest (last) query tiles first: the causal tail fills the last wave
    h = tl.program_id(0)
    kv_col = (h // G) * D
    offs_m = mt * BM + tl.arange(0, BM)
    offs_n = tl.arange(0, BN)
    offs_r = tl.arange(0, R_PAD)
    qpos = prefix + offs_m
    q = desc_q.load([mt * BM, h * D])
    acc = tl.zeros([BM, D], dtype=tl.float32)
    acc_r = tl.zeros([BM, R_PAD], dtype=tl.float32)
    m_i = tl.full([BM], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BM], dtype=tl.float32)
    full_end = (prefix + mt * BM) // BN * BN
    for n0 in tl.range(0, full_end, BN, warp_specialize=WS):
        acc, acc_r, m_i, l_i = _tile(acc, acc_r, m_i, l_i, q, qpos, n0, desc_k, desc_v, bt_ptr, lr_ptr, kv_col,
                                     offs_n, offs_r, scale, BS, BN, D, R, False, HAS_LR)  # fmt: skip
    for n0 in tl.range(full_end, prefix + (mt + 1) * BM, BN):
        acc, acc_r, m_i, l_i = _tile(acc, acc_r, m_i, l_i, q, qpos, n0, desc_k, desc_v, bt_ptr, lr_ptr, kv_col,
                                     offs_n, offs_r, scale, BS, BN, D, R, True, HAS_LR)  # fmt: skip
    inv = 1.0 / l_i
    offs_d = tl.arange(0, D)
    rows = offs_m.to(tl.int64)[:, None] * HQ + h
    tl.store(out_ptr + rows * D + offs_d[None, :], (acc * inv[:, None]).to(out_ptr.dtype.element_ty))
    if HAS_LR:  # P R (normalised) per row; the (P R) B product is a small GEMM after
        tl.store(out_r_ptr + rows * R + offs_r[None, :], acc_r * inv[:, None], mask=offs_r[None, :] < R)


def probe(q, kpool, vpool, lrpool, bt, prefix, cfg, out, out_r):
    from triton.tools.tensor_descriptor import TensorDescriptor

    new = q.shape[0]
    bm, bn, bs, nw, ns, ws, has_lr = cfg
    dq = TensorDescriptor.from_tensor(q.view(new, HQ * D), [bm, D])
    dk = TensorDescriptor.from_tensor(kpool.view(-1, HKV * D), [bn, D])
    dv = TensorDescriptor.from_tensor(vpool.view(-1, HKV * D), [bn, D])
    n_tiles = new // bm
    _probe_kernel[(HQ, n_tiles)](
        dq, dk, dv, bt, lrpool, out, out_r, prefix, n_tiles, D**-0.5 * LOG2E,
        HQ=HQ, G=HQ // HKV, D=D, R=R, R_PAD=16, BM=bm, BN=bn, BS=bs, HAS_LR=has_lr, WS=ws,
        num_warps=nw, num_stages=ns,
    )  # fmt: skip
    return out


def pools(ctx: int, bs: int, device):
    nb = -(-ctx // bs)
    k = torch.randn(nb, bs, HKV, D, device=device, dtype=torch.bfloat16)
    v = torch.randn_like(k)
    lr = torch.randn(nb, bs, R, device=device, dtype=torch.bfloat16)
    bt = torch.randperm(nb, device=device).int()
    return k, v, lr, bt


def reference(q, k, v, lr, bt, prefix):
    """fp32: contiguous keys in table order, causal over the prefix; returns (out [new, HQ, D], P R [new, HQ, R])."""
    kk = k[bt.long()].reshape(-1, HKV, D).float()
    vv = v[bt.long()].reshape(-1, HKV, D).float()
    rr = lr[bt.long()].reshape(-1, R).float()
    new, ctx = q.shape[0], prefix + q.shape[0]
    kk, vv, rr = kk[:ctx], vv[:ctx], rr[:ctx]
    s = torch.einsum("thd,khd->htk", q.float(), kk.repeat_interleave(HQ // HKV, 1)) * D**-0.5
    mask = torch.arange(ctx, device=q.device)[None, :] <= (prefix + torch.arange(new, device=q.device))[:, None]
    p = torch.softmax(s.masked_fill(~mask, float("-inf")), -1)
    return torch.einsum("htk,khd->thd", p, vv.repeat_interleave(HQ // HKV, 1)), torch.einsum("htk,kr->thr", p, rr)


def timed(fn, reps: int = 20) -> float:
    fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / reps


def flops(new: int, prefix: int) -> float:
    return 4.0 * D * HQ * (new * prefix + new * (new + 1) / 2)


CONFIGS = [  # (BLOCK_M, BLOCK_N, block size, warps, stages, warp-specialised, LR term)
    (128, 128, 128, 8, 2, False, True),
    (128, 128, 128, 8, 3, False, True),
    (128, 64, 64, 8, 3, False, True),
    (128, 64, 64, 4, 3, False, True),
    (64, 64, 64, 4, 3, False, True),
    (128, 128, 128, 8, 2, False, False),
    (128, 128, 128, 8, 3, True, True),
    (128, 64, 64, 8, 3, True, True),
    (128, 128, 128, 4, 2, True, True),
]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", default="8192:0,4096:0,1024:32768,2048:16384,8192:8192")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    dev = torch.device("cuda")
    torch.manual_seed(0)
    a = torch.randn(4096, 4096, device=dev, dtype=torch.bfloat16)
    mm = 2 * 4096**3 / (timed(lambda: a @ a) * 1e-3) / 1e12
    print(f"{torch.cuda.get_device_name()}: bf16 4096^3 matmul {mm:.0f} TFLOP/s", flush=True)
    rows, ok = [], {}
    for cfg in CONFIGS:  # correctness first, on a small case (prefix 640, 384 new)
        bm, bn, bs = cfg[:3]
        k, v, lr, bt = pools(1024, bs, dev)
        q = torch.randn(384, HQ, D, device=dev, dtype=torch.bfloat16)
        out, out_r = torch.empty_like(q), torch.zeros(384, HQ, R, device=dev)
        try:
            probe(q, k, v, lr, bt, 640, cfg, out, out_r)
            ref, ref_r = reference(q, k, v, lr, bt, 640)
            err = (out.float() - ref).abs().max().item()
            err_r = (out_r - ref_r).abs().max().item() if cfg[6] else 0.0
            ok[cfg] = err < 2e-2 and err_r < 2e-2
            print(f"check {cfg}: max err {err:.2e} / LR {err_r:.2e} {'ok' if ok[cfg] else 'WRONG'}", flush=True)
        except Exception as e:  # noqa: BLE001 - a config that does not compile is reported and skipped
            ok[cfg] = False
            print(f"check {cfg}: failed {repr(e)[:300]}", flush=True)
    from lragent.bench.kernels import PagedPools, _prefill_calls

    for shape in args.shapes.split(","):
        new, prefix = map(int, shape.split(":"))
        ctx, f = new + prefix, flops(new, prefix)
        row = {"new": new, "prefix": prefix}
        pp = PagedPools(ctx, 16, R, torch.bfloat16, dev, num_slots=2)
        bt16, lbt16 = pp.tables(1, ctx)
        q = torch.randn(new, HQ, D, device=dev, dtype=torch.bfloat16)
        out = torch.empty_like(q)
        qstart = torch.tensor([0, new], dtype=torch.int32, device=dev)
        ctx_t = torch.tensor([ctx], dtype=torch.int32, device=dev)
        slots = torch.tensor([1], dtype=torch.long, device=dev)
        ours = _prefill_calls(pp, q, out, bt16, lbt16, qstart, ctx_t, slots, new, ctx, {})["on_chip"]
        row["engine_ms"] = timed(ours)
        kk = torch.randn(1, HKV, ctx, D, device=dev, dtype=torch.bfloat16)
        sdpa = partial(F.scaled_dot_product_attention, q.transpose(0, 1).unsqueeze(0), kk, torch.randn_like(kk))
        with torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.FLASH_ATTENTION):  # causal: no prefix
            row["sdpa_ms"] = timed(partial(sdpa, is_causal=True, enable_gqa=True)) if prefix == 0 else None
        del kk, sdpa, pp
        for cfg in CONFIGS:
            if not ok.get(cfg):
                continue
            k, v, lr, bt = pools(ctx, cfg[2], dev)
            out_r = torch.zeros(new, HQ, R, device=dev)
            try:
                row[str(cfg)] = timed(partial(probe, q, k, v, lr, bt, prefix, cfg, out, out_r))
            except Exception as e:  # noqa: BLE001
                row[str(cfg)] = None
                print(f"{shape} {cfg}: failed {repr(e)[:200]}", flush=True)
            del k, v, lr
        rows.append(row)
        print(f"\nnew {new} prefix {prefix} ({f / 1e12:.2f} TFLOP): % of the {mm:.0f} TFLOP/s matmul rate", flush=True)
        for key, ms in row.items():
            if key in ("new", "prefix") or ms is None:
                continue
            tf = f / (ms * 1e-3) / 1e12
            print(f"  {key:<45} {ms:8.3f} ms {tf:6.0f} TFLOP/s {100 * tf / mm:5.1f}%", flush=True)
    if args.out:
        json.dump({"matmul_TFLOPs": mm, "rows": rows, "checked": {str(k): v for k, v in ok.items()}},
                  open(args.out, "w"), indent=1)  # fmt: skip


if __name__ == "__main__":
    main()
