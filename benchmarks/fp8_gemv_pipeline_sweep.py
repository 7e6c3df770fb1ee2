"""Single-row FP8 GEMV: does a software-pipelined K loop stream the weights faster than the engine's kernel? (GPU)

The engine's `_w8a16_gemv_kernel` keeps one weight tile in flight per program (a plain `range` loop, no `tl.dot`, so
Triton does not pipeline it) and relies on many programs per SM for bytes in flight. The small projections of a
Llama-3.1-8B layer (o: 16.8 MB, qkv: 25 MB) stream at 2.2-3.0 TB/s that way, gate_up at 3.9. Two pipelined forms
are timed here against it, with every weight streamed from memory as in a decode step (one CUDA graph calls the
variant once per distinct copy of the weight, >= 1 GB in all, as `fp8_stream_sweep.py` does):

- "ptr": the same loads in `tl.range(..., num_stages=S)` (Triton may turn them into asynchronous copies to shared
  memory, S - 1 tiles ahead);
- "tma": the weight tile loaded through a tensor descriptor (the Hopper bulk tensor copy), `num_stages=S`.

The variant grid is the second call's (the first, in `benchmarks/round9_h200/call1_gemv_pipeline.log`, timed
BLOCK_N 16-64 x BLOCK_K 128-256 x 2-4 stages for both forms). Split-K variants add partials with float32 atomics
into a zeroed row (the zeroing is in the timed graph). Each
variant is checked against the engine's kernel before it is timed (max |diff| printed). Prints us per call,
weight GB/s and the ratio to the engine's kernel; `BEST` lines name the fastest per shape.

    python3 benchmarks/fp8_gemv_pipeline_sweep.py [--shapes qkv,o,gate_up,down] [--gigabytes 1]
"""

from __future__ import annotations

import argparse
import itertools

import torch
import triton
import triton.language as tl

from lragent.bench.kernels import graph_replay_us
from lragent.kernels.triton_fp8 import w8a16_linear
from lragent.quant.fp8 import quantize_fp8

SHAPES = {"qkv": (6144, 4096), "o": (4096, 4096), "gate_up": (28672, 4096), "down": (4096, 14336)}


@triton.jit
def _gemv(x_ptr, w, scale_ptr, out_ptr, N, K, K_PER_SPLIT, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
          STAGES: tl.constexpr, SPLIT: tl.constexpr, TMA: tl.constexpr):  # fmt: skip
    """`w`: the FP8 weight's pointer, or with TMA its tensor descriptor (tiles [BLOCK_N, BLOCK_K])."""
    n0 = tl.program_id(0) * BLOCK_N
    offs_n = n0 + tl.arange(0, BLOCK_N)
    k_start = tl.program_id(1) * K_PER_SPLIT
    offs_k = tl.arange(0, BLOCK_K)
    acc = tl.zeros([BLOCK_N], dtype=tl.float32)
    for k0 in tl.range(k_start, k_start + K_PER_SPLIT, BLOCK_K, num_stages=STAGES):
        if TMA:
            tile = w.load([n0, k0])
        else:
            tile = tl.load(w + offs_n[:, None].to(tl.int64) * K + (k0 + offs_k)[None, :], eviction_policy="evict_first")
        x = tl.load(x_ptr + k0 + offs_k).to(tl.float32)
        acc += tl.sum(tile.to(tl.float32) * x[None, :], 1)
    if SPLIT:
        tl.atomic_add(out_ptr + offs_n, acc, sem="relaxed")
    else:
        tl.store(out_ptr + offs_n, (acc * tl.load(scale_ptr + offs_n)).to(out_ptr.dtype.element_ty))


def make_variant(kind: str, bn: int, bk: int, stages: int, warps: int, split: int, w8: torch.Tensor):
    """A callable x, w8, scale -> y [N] (bf16) for one variant; split > 1 sums fp32 partials atomically."""
    from triton.tools.tensor_descriptor import TensorDescriptor

    n, k = w8.shape
    per = k // split
    grid = (n // bn, split)
    tma = kind == "tma"

    def run(x: torch.Tensor, w: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        wa = TensorDescriptor.from_tensor(w, [bn, bk]) if tma else w
        out = (
            torch.zeros(n, device=x.device, dtype=torch.float32)
            if split > 1
            else torch.empty_like(scale, dtype=x.dtype)
        )
        _gemv[grid](x, wa, scale, out, n, k, per, BLOCK_N=bn, BLOCK_K=bk, STAGES=stages, SPLIT=split > 1, TMA=tma,
                    num_warps=warps)  # fmt: skip
        return (out * scale).to(x.dtype) if split > 1 else out

    return run


def variants(name: str) -> list[tuple[str, int, int, int, int, int]]:
    split = [1, 2] if name == "down" else [1]
    ptr = itertools.product(("ptr",), (8, 16), (512, 1024), (3, 4, 6), (4, 8), split)
    tma = itertools.product(("tma",), (8, 16, 32), (256,), (6, 8, 12), (4,), split)
    return [v for v in (*ptr, *tma) if v[1] * v[2] * v[3] <= 200 * 1024]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shapes", default=",".join(SHAPES))
    ap.add_argument("--gigabytes", type=float, default=1.0)
    args = ap.parse_args()
    dev = torch.device("cuda")
    triton.set_allocator(lambda size, align, stream: torch.empty(size, dtype=torch.int8, device=dev))
    print(f"{'shape':8} {'variant':30} {'us':>7} {'GB/s':>6} {'x engine':>8} {'max diff':>9}")
    for name in args.shapes.split(","):
        n, k = SHAPES[name]
        copies = max(2, int(args.gigabytes * 1e9 // (n * k)) + 1)
        w8s = [quantize_fp8(torch.randn(n, k, device=dev, dtype=torch.bfloat16) * 0.02) for _ in range(copies)]
        x = torch.randn(1, k, device=dev, dtype=torch.bfloat16)
        ref = w8a16_linear(x, *w8s[0]).view(-1).float()
        base = graph_replay_us(lambda x=x, w8s=w8s: [w8a16_linear(x, w8, s) for w8, s in w8s], reps=5) / copies
        print(f"{name:8} {'engine gemv':30} {base:7.1f} {n * k / base / 1e3:6.0f} {1.0:8.2f}", flush=True)
        best = (base, "engine gemv")
        for kind, bn, bk, st, w, sp in variants(name):
            label = f"{kind} N{bn} K{bk} s{st} w{w} split{sp}"
            try:
                fn = make_variant(kind, bn, bk, st, w, sp, w8s[0][0])
                diff = (fn(x.view(-1), *w8s[0]).float() - ref).abs().max().item()
                us = (
                    graph_replay_us(lambda fn=fn, x=x, w8s=w8s: [fn(x.view(-1), w8, s) for w8, s in w8s], reps=5)
                    / copies
                )
            except Exception as e:  # a tile that does not compile or fit: say so, keep going
                print(f"{name:8} {label:30} failed: {type(e).__name__}: {str(e)[:80]}", flush=True)
                continue
            best = min(best, (us, label))
            print(f"{name:8} {label:30} {us:7.1f} {n * k / us / 1e3:6.0f} {us / base:8.2f} {diff:9.2e}", flush=True)
        print(f"BEST {name}: {best[1]} {best[0]:.1f} us = {best[0] / base:.2f}x engine", flush=True)
        del w8s
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
