"""Decode attention with key adapters (key LR) against plain LoRA decode, over tile shapes (GPU, one table).

Llama-3.1-8B's attention shape (32 q / 8 kv heads x 128, bf16), rank 8, one sequence or a batch at a long context:
`paged_decode` without key LR, then with it (keys rebuilt as K_base + s RoPE(R_k B_k) per tile as two RoPE halves or
the whole tile, cos / sin read from the tables or computed on chip) for several BLOCK_N / num_warps, with the
one-launch merge and the two-launch merge.
Prints microseconds per launch (CUDA graph replays, median of 5 x 50) and the ratio to plain decode.

    python3 benchmarks/key_lr_decode_sweep.py [--ctx 33792] [--batch 1]
"""

from __future__ import annotations

import argparse

import torch

from lragent.bench.kernels import graph_replay_us
from lragent.kernels import triton_attention as ta
from lragent.kernels.backend import KeyLR
from lragent.models.rope import RotaryEmbedding


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--ctx", type=int, default=33792)
    ap.add_argument("--batch", type=int, default=1)
    args = ap.parse_args()
    dev, dt = torch.device("cuda"), torch.bfloat16
    hq, hkv, d, r, bs, slots = 32, 8, 128, 8, 16, 3
    b, ctx = args.batch, args.ctx
    nblk = b * (ctx // bs + 1)
    key = torch.randn(nblk, bs, hkv, d, device=dev, dtype=dt)
    value = torch.randn_like(key)
    lr = torch.randn(nblk, bs, 2 * r, device=dev, dtype=dt)
    tables = torch.arange(nblk, device=dev, dtype=torch.int32).view(b, -1)
    ctx_t = torch.full((b,), ctx, device=dev, dtype=torch.int32)
    slot_t = torch.ones(b, device=dev, dtype=torch.int32)
    up = torch.randn(slots, r, hkv * d, device=dev, dtype=dt) * 0.1
    scaling = torch.full((slots,), 2.0, device=dev, dtype=torch.float32)
    q = torch.randn(b, hq, d, device=dev, dtype=dt)
    out = torch.empty_like(q)
    cfg = type("C", (), {"head_dim": d, "rope_theta": 500000.0, "rope_scaling": None})()
    rope = RotaryEmbedding(cfg, ctx + 8)
    rope.build(dev)
    table = KeyLR(up, rope.cos, rope.sin)
    chip = KeyLR(up, rope.cos, rope.sin, rope.inv_freq)
    base = dict(key_pool=key, value_pool=value, lr_pool=lr, base_block_tables=tables, lr_block_tables=tables,
                context_lens=ctx_t, seq_lora_slots=slot_t, value_up=up, lora_scaling=scaling, max_context=ctx,
                out=out)  # fmt: skip
    kv_bytes = b * ctx * hkv * d * 2 * 2
    print(f"decode attention, batch {b}, context {ctx}, Llama-3.1-8B heads, rank {r}, bf16; KV {kv_bytes / 1e6:.0f} MB")
    print(f"{'variant':44} {'us':>8} {'x plain':>8} {'GB/s (KV)':>10}")
    plain = None
    rows = [("plain q/v LR", None, None, None, "kernel", True),
            ("plain q/v LR, last_split", None, None, None, "last_split", True)]  # fmt: skip
    variants = [(True, "table", bn, w) for bn in (16, 32, 64) for w in (4, 8)]
    variants += [(False, "table", bn, 4) for bn in (32, 64)] + [(True, "chip", bn, 4) for bn in (32, 64)]
    for halves, trig_name, block_n, warps in variants:
        name = f"key LR {'halves' if halves else 'whole'} {trig_name} BLOCK_N {block_n} w{warps}"
        rows.append((name, table if trig_name == "table" else chip, block_n, warps, "kernel", halves))
    rows.append(("key LR halves table default tiles, last_split", table, None, None, "last_split", True))
    for name, klr, block_n, warps, merge, halves in rows:
        ta.KEY_LR_HALVES = halves
        try:
            kw = dict(key_lr=klr, block_n=block_n, num_warps=warps, merge=merge, **base)
            us = graph_replay_us(lambda kw=kw: ta.paged_decode(q, **kw))
        except Exception as e:  # a tile shape that does not compile here: say so, keep going
            print(f"{name:44} failed: {type(e).__name__}: {str(e)[:80]}")
            continue
        plain = plain or us
        print(f"{name:44} {us:8.1f} {us / plain:8.2f} {kv_bytes / us / 1e3:10.0f}", flush=True)


if __name__ == "__main__":
    main()
