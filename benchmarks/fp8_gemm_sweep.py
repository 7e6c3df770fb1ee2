"""FP8 weight-only matmul at decode sizes against bf16 cuBLAS, over tile shapes (GPU, one table).

Llama-3.1-8B's projection shapes (fused q/k/v, o, fused gate/up, down) at M = 1 and 8 rows: `F.linear` on the bf16
weight, then `w8a16_linear` on the FP8 weight, the tiled kernel (`tl.dot`) and, for one row, the GEMV kernel, over
a few BLOCK_N / BLOCK_K / warps / stages, and for the GEMV split-K (the default tiles too; issuing two K tiles'
loads per step was measured slower everywhere and is gone). For the down projection at one row it also
times the SiLU prologue (`act="silu_mul"` on the [gate | up] row) against the silu_mul kernel followed by the GEMV.
Prints microseconds per call (CUDA graph replays, median of 5 x 100) and the weight bytes streamed per second; the
line to read is the best FP8 configuration against bf16 per shape (the FP8 target of issue 17 needs about 0.5x).

    python3 benchmarks/fp8_gemm_sweep.py [--rows 1,8] [--shapes qkv,o,gate_up,down]
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

from lragent.bench.kernels import graph_replay_us
from lragent.kernels.triton_fp8 import w8a16_linear
from lragent.kernels.triton_fused import silu_mul
from lragent.quant.fp8 import quantize_fp8

SHAPES = {"qkv": (6144, 4096), "o": (4096, 4096), "gate_up": (28672, 4096), "down": (4096, 14336)}
TILED = [(bn, bk, w, st) for bn, bk in ((16, 512), (32, 256), (64, 128)) for w, st in ((4, 3), (4, 4), (8, 3))]
# single row: (BLOCK_N, BLOCK_K, warps, stages, split_k); 8 warps measured best in the first sweep (2026-12-01)
GEMV_TILES = ((8, 512), (16, 512), (32, 512), (16, 1024), (32, 1024))
GEMV = [(bn, bk, 8, 3, sp) for bn, bk in GEMV_TILES for sp in (1, 2, 4)]
GEMV_DEFAULT = (None, None, None, None, None)  # gemv_config's tiles


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", default="1,8")
    ap.add_argument("--shapes", default=",".join(SHAPES), help="a subset of " + ", ".join(SHAPES))
    args = ap.parse_args()
    dev = torch.device("cuda")
    print(f"{'shape':8} {'M':>3} {'variant':42} {'us':>8} {'GB/s':>7} {'x bf16':>7}")
    for name in args.shapes.split(","):
        n, k = SHAPES[name]
        w = torch.randn(n, k, device=dev, dtype=torch.bfloat16) * 0.02
        w8, scale = quantize_fp8(w)
        for m in (int(r) for r in args.rows.split(",")):
            x = torch.randn(m, k, device=dev, dtype=torch.bfloat16)
            bf16 = graph_replay_us(lambda w=w, x=x: F.linear(x, w), reps=100)
            print(f"{name:8} {m:3} {'bf16 F.linear':42} {bf16:8.1f} {n * k * 2 / bf16 / 1e3:7.0f} {1.0:7.2f}")
            calls = [(_label("tiled", (*cfg, None)), _call(x, w8, scale, (*cfg, None), False)) for cfg in TILED]
            if m == 1:
                calls += [(_label("gemv", cfg), _call(x, w8, scale, cfg, True)) for cfg in [*GEMV, GEMV_DEFAULT]]
            if m == 1 and name == "down":
                calls += _silu_calls(x, w8, scale)
            best = None
            for label, call in calls:
                try:
                    us = graph_replay_us(call, reps=100)
                except Exception as e:  # a shape that does not compile or fit: say so, keep going
                    print(f"{name:8} {m:3} {label:42} failed: {type(e).__name__}: {str(e)[:60]}")
                    continue
                if not label.startswith("silu"):  # those include the SiLU: not the same work as the rest
                    best = min(best or (us, label), (us, label))
                print(f"{name:8} {m:3} {label:42} {us:8.1f} {n * k / us / 1e3:7.0f} {us / bf16:7.2f}", flush=True)
            if best is not None:
                print(f"BEST {name} M={m}: {best[1]} {best[0]:.1f} us = {best[0] / bf16:.2f}x bf16", flush=True)


Variant = tuple[int | None, int | None, int | None, int | None, int | None]


def _label(kind: str, cfg: Variant) -> str:
    bn, bk, warps, stages, split = cfg
    if bn is None:
        return f"fp8 {kind} default"
    tail = f" split{split}" if kind == "gemv" else ""
    return f"fp8 {kind} N{bn} K{bk} w{warps} s{stages}{tail}"


def _call(x: torch.Tensor, w8: torch.Tensor, scale: torch.Tensor, cfg: Variant, gemv: bool, act: str | None = None):
    """w8a16_linear on (x, w8, scale) with the variant's tiles, as a closure to time."""
    bn, bk, warps, stages, split = cfg
    kw = dict(block_n=bn, block_k=bk, num_warps=warps, num_stages=stages or 3, gemv=gemv, split_k=split)
    return lambda: w8a16_linear(x, w8, scale, act=act, **kw)


def _silu_calls(x: torch.Tensor, w8: torch.Tensor, scale: torch.Tensor):
    """The down projection with its activation, on a [gate | up] row: silu_mul then the GEMV (today's two launches)
    against the GEMV's SiLU prologue (one launch), default tiles."""
    gate_up = torch.randn(1, 2 * x.shape[-1], device=x.device, dtype=x.dtype)
    return [
        ("silu_mul + gemv default", lambda: w8a16_linear(silu_mul(gate_up), w8, scale)),
        ("silu prologue gemv default", _call(gate_up, w8, scale, GEMV_DEFAULT, True, "silu_mul")),
    ]


if __name__ == "__main__":
    main()
