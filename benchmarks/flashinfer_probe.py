"""FlashInfer's single-sequence prefill side by side with SDPA's flash backend at issue 17's prefill shape (8k new
tokens, causal, 32 query / 8 kv heads x 128, bf16), each checked against SDPA first; % of the bf16 matmul rate
measured here. FlashInfer is not a dependency: this needs its package importable (benchmarks/round13d_gpu.sh
installs the 0.2.5 sdist, which compiles its kernels on first use with the machine's nvcc). On the gathered route
our attention is plain attention over contiguous keys and values with the LR term added (`value_lr_prefill`), the
call this times; `lragent bench kernels --only prefill` times ours in the same device call.

    python3 benchmarks/flashinfer_probe.py [--new 8192]
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F
import triton.testing

from lragent.bench.kernels import prefill_flops


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--new", type=int, default=8192)
    ap.add_argument("--backends", default="fa3,fa2")
    args = ap.parse_args()
    import flashinfer

    n, dev, dt = args.new, "cuda", torch.bfloat16
    a = torch.randn(8192, 8192, dtype=dt, device=dev)
    t_mm = triton.testing.do_bench(lambda: a @ a, return_mode="median")
    rate = 2 * 8192**3 / (t_mm * 1e-3) / 1e12
    flops = prefill_flops(n, 0)
    q = torch.randn(n, 32, 128, dtype=dt, device=dev)
    k = torch.randn(n, 8, 128, dtype=dt, device=dev)
    v = torch.randn(n, 8, 128, dtype=dt, device=dev)
    qs, ks, vs = (t.transpose(0, 1)[None] for t in (q, k, v))

    def sdpa():
        from torch.nn.attention import SDPBackend, sdpa_kernel

        with sdpa_kernel([SDPBackend.FLASH_ATTENTION]):
            return F.scaled_dot_product_attention(qs, ks, vs, is_causal=True, enable_gqa=True)

    ref = sdpa()[0].transpose(0, 1).float()
    report("sdpa flash", triton.testing.do_bench(sdpa, return_mode="median"), flops, rate)
    print(f"flashinfer {flashinfer.__version__}; bf16 matmul {rate:.0f} TFLOP/s", flush=True)
    for backend in args.backends.split(","):
        call = lambda b=backend: flashinfer.single_prefill_with_kv_cache(q, k, v, causal=True, backend=b)  # noqa: E731
        start = time.perf_counter()
        try:
            out = call()
            torch.cuda.synchronize()
        except Exception as exc:  # noqa: BLE001 - a backend that does not build here is reported, not fatal
            print(f"flashinfer {backend}: failed: {repr(exc)[:400]}", flush=True)
            continue
        err = (out.float() - ref).abs().max().item()
        took = time.perf_counter() - start
        print(f"flashinfer {backend}: first call (JIT build) {took:.1f} s, max |diff| vs SDPA {err:.2e}")
        report(f"flashinfer {backend}", triton.testing.do_bench(call, return_mode="median"), flops, rate)


def report(name: str, ms: float, flops: float, rate: float) -> None:
    tflops = flops / (ms * 1e-3) / 1e12
    print(f"{name}: {ms:.3f} ms, {tflops:.0f} TFLOP/s, {100 * tflops / rate:.1f}% of matmul", flush=True)


if __name__ == "__main__":
    main()
