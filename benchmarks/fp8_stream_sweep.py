"""FP8 weight-only matmul with the weights streamed from memory, as in a decode step (GPU, one table).

`fp8_gemm_sweep.py` replays one call on one weight, so a projection of up to ~50 MB (q/k/v, o) is read from L2 after
the first replay. A decode step never reuses a weight: each layer's projections are read once. Here each shape gets
enough distinct copies of its weight (>= 1 GB of FP8 weights, bf16 twice that) and one CUDA graph calls the variant
once per copy; the time per call is the graph's time over the copies. Variants: bf16 `F.linear`, the single-row GEMV
(default tiles), the tiled `tl.dot` kernel as x W^T (default tiles), per-token activation quantisation with
`torch._scaled_mm` (the engine's path above `TRITON_MAX_ROWS`); for more than one row the tiled kernel over a few
tile shapes too (the eighth session also timed a W x^T form and a multi-row GEMV here, both since removed: see
BENCHMARKS.md and `benchmarks/round8_h200/`).
Prints microseconds per call, weight bytes per second and the ratio to bf16 per shape and row count; `BEST` lines
name the fastest FP8 variant.

    python3 benchmarks/fp8_stream_sweep.py [--rows 1,2,4,8,16,32] [--shapes qkv,o,gate_up,down] [--gigabytes 1]
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

from lragent.bench.kernels import graph_replay_us
from lragent.kernels.triton_fp8 import w8a16_linear
from lragent.quant.fp8 import Fp8Weight, quantize_fp8

SHAPES = {"qkv": (6144, 4096), "o": (4096, 4096), "gate_up": (28672, 4096), "down": (4096, 14336)}
TILED = [(64, 128, 4, 4), (32, 256, 4, 4), (64, 256, 4, 3), (128, 128, 8, 3), (32, 128, 4, 6)]


def _copies(n: int, k: int, gigabytes: float) -> int:
    return max(2, int(gigabytes * 1e9 // (n * k)) + 1)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", default="1,8")
    ap.add_argument("--shapes", default=",".join(SHAPES))
    ap.add_argument("--gigabytes", type=float, default=1.0, help="FP8 weight bytes streamed per graph replay")
    args = ap.parse_args()
    dev = torch.device("cuda")
    print(f"{'shape':8} {'M':>3} {'variant':34} {'us':>8} {'GB/s':>7} {'x bf16':>7}")
    for name in args.shapes.split(","):
        n, k = SHAPES[name]
        copies = _copies(n, k, args.gigabytes)
        ws = [torch.randn(n, k, device=dev, dtype=torch.bfloat16) * 0.02 for _ in range(copies)]
        w8s = [quantize_fp8(w) for w in ws]
        for m in (int(r) for r in args.rows.split(",")):
            x = torch.randn(m, k, device=dev, dtype=torch.bfloat16)

            bf16 = graph_replay_us(lambda x=x, ws=ws: [F.linear(x, w) for w in ws], reps=5) / copies
            print(f"{name:8} {m:3} {'bf16 F.linear':34} {bf16:8.1f} {n * k * 2 / bf16 / 1e3:7.0f} {1.0:7.2f}")
            variants = [("fp8 tiled default", dict(gemv=False)), ("fp8 _scaled_mm", None)]
            if m == 1:
                variants.insert(0, ("fp8 gemv default", dict(gemv=True)))
            else:
                variants += [
                    (f"fp8 tiled N{bn} K{bk} w{w} s{st}", dict(gemv=False, block_n=bn, block_k=bk, num_warps=w,
                                                              num_stages=st))
                    for bn, bk, w, st in TILED
                ]  # fmt: skip
            best = None
            for label, kw in variants:
                if kw is None:  # the engine's path above the Triton rows: per-token quantisation + _scaled_mm
                    fws = [Fp8Weight(w8, s, torch.bfloat16, scaled_mm=True) for w8, s in w8s]
                    fn = lambda x=x, fws=fws: [f.linear(x) for f in fws]  # noqa: E731
                else:
                    fn = lambda kw=kw, x=x, w8s=w8s: [w8a16_linear(x, w8, s, **kw) for w8, s in w8s]  # noqa: E731
                try:
                    us = graph_replay_us(fn, reps=5) / copies
                except Exception as e:  # a tile that does not compile or fit: say so, keep going
                    print(f"{name:8} {m:3} {label:34} failed: {type(e).__name__}: {str(e)[:60]}")
                    continue
                best = min(best or (us, label), (us, label))
                print(f"{name:8} {m:3} {label:34} {us:8.1f} {n * k / us / 1e3:7.0f} {us / bf16:7.2f}", flush=True)
            if best is not None:
                print(f"BEST {name} M={m}: {best[1]} {best[0]:.1f} us = {best[0] / bf16:.2f}x bf16", flush=True)
        del ws, w8s
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
