"""Cascade decode vs plain split-KV decode on a GPU (issue 17 part 3): one decode step's attention over every layer.

Llama-3.1-8B attention shape by default (32 layers, 32 q heads, 8 kv heads, head_dim 128, LR rank 8, bf16, block
16): `--seqs` rows over one `--shared`-token cached prefix (the same block ids in the key/value and LR pools, as
BASE_LR_SHARED gives agents of one trajectory), each with its own `--suffix-min`..`--suffix-max` tokens, mixed
adapter slots. Each layer has its own pools (no layer hits another's L2). Per step it times:

- plain: `paged_decode` for every layer (what the engine runs today);
- cascade: `cascade_decode` for every layer, with the plan `find_groups` / `plan_cascade` build from the tables;

both as captured CUDA graphs (device time: what a graph replay costs) and eagerly (what an eager engine step pays,
host launches included), plus the host time of planning, and the max |difference| of the two outputs. Prints a
table and writes JSON to $OUT/cascade_gpu.json (or --json).

    OUT=results python benchmarks/cascade_gpu.py                       # 16 rows over a 32k prefix
    OUT=results python benchmarks/cascade_gpu.py --seqs 4 8 16 32 --shared 8192 32768
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import time
from pathlib import Path

import torch

from lragent.kernels.metadata import BatchRows
from lragent.kernels.triton_attention import paged_decode
from lragent.kernels.triton_backend import TritonBackend
from lragent.kernels.triton_cascade import CascadeOptions, cascade_decode, find_groups, plan_cascade


def build(seqs: int, shared: int, args: argparse.Namespace, device: torch.device) -> dict:
    """Per-layer pools, a decode batch over one shared prefix, its plain and cascade metadata."""
    rng = random.Random(0)
    bs, hkv, d, r, hq = args.block_size, args.kv_heads, args.head_dim, args.rank, args.q_heads
    dtype = getattr(torch, args.dtype)
    own = [rng.randint(args.suffix_min, args.suffix_max) for _ in range(seqs)]
    shared_blocks = shared // bs
    own_blocks = [-(-o // bs) for o in own]
    total = shared_blocks + sum(own_blocks) + 1
    ids = list(range(total))
    rng.shuffle(ids)  # scattered blocks, as a long-running pool has them
    prefix = ids[:shared_blocks]
    tables, used = [], shared_blocks
    for nb in own_blocks:
        tables.append(prefix + ids[used : used + nb])
        used += nb
    ctx = [shared_blocks * bs + o for o in own]
    slots = [1 + i % args.adapters for i in range(seqs)]
    pools = {"kv": tables, "lr": tables}  # LR blocks shared as the key/value blocks are (BASE_LR_SHARED)
    rows = BatchRows([1] * seqs, ctx, slots, pools, {"kv": [0] * seqs, "lr": [0] * seqs}, None, True)
    gen = torch.Generator(device=device).manual_seed(0)

    def randn(*shape):
        return torch.randn(*shape, generator=gen, device=device, dtype=dtype)

    layers = [(randn(total, bs, hkv, d), randn(total, bs, hkv, d), randn(total, bs, r)) for _ in range(args.layers)]
    value_up = randn(args.adapters + 1, r, hkv * d) / r**0.5
    value_up[0] = 0
    scaling = torch.full((args.adapters + 1,), 2.0, device=device)
    scaling[0] = 0
    backend = TritonBackend(cascade=CascadeOptions.for_tokens(bs, args.min_shared))
    meta = backend.metadata(rows, device)
    host_s = []
    for _ in range(20):
        start = time.perf_counter()
        plan_cascade(find_groups(rows, backend.cascade), rows, bs, device)  # type: ignore[arg-type]
        host_s.append(time.perf_counter() - start)
    query = randn(seqs, hq, d)
    return dict(layers=layers, meta=meta, query=query, value_up=value_up, scaling=scaling, ctx=ctx,
                plan_ms=1e3 * statistics.median(host_s))  # fmt: skip


def step_fn(case: dict, cascade: bool, out: torch.Tensor):
    m, q = case["meta"], case["query"]
    max_ctx = max(case["ctx"])

    def run() -> None:
        for key, value, lr in case["layers"]:
            args = dict(
                key_pool=key, value_pool=value, lr_pool=lr, base_block_tables=m.base_block_tables,
                lr_block_tables=m.lr_block_tables, context_lens=m.context_lens_t, seq_lora_slots=m.seq_lora_slots,
                value_up=case["value_up"], lora_scaling=case["scaling"], out=out,
            )  # fmt: skip
            if cascade:
                cascade_decode(q, plan=m.cascade, **args)
            else:
                paged_decode(q, max_context=max_ctx, **args)

    return run


def timed(fn, iters: int) -> float:
    """Median ms of `fn` between CUDA events."""
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def graphed(fn):
    fn()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph.replay


def measure(seqs: int, shared: int, args: argparse.Namespace, device: torch.device) -> dict:
    case = build(seqs, shared, args, device)
    outs = {name: torch.empty_like(case["query"]) for name in ("plain", "cascade")}
    row: dict = {"seqs": seqs, "shared": shared, "plan_host_ms": case["plan_ms"]}
    for name in ("plain", "cascade"):
        fn = step_fn(case, name == "cascade", outs[name])
        for _ in range(3):
            fn()  # compile and warm
        torch.cuda.synchronize()
        row[f"{name}_eager_ms"] = timed(fn, args.iters)
        row[f"{name}_graph_ms"] = timed(graphed(fn), args.iters)
    row["max_abs_diff"] = (outs["plain"].float() - outs["cascade"].float()).abs().max().item()
    row["speedup_graph"] = row["plain_graph_ms"] / row["cascade_graph_ms"]
    row["speedup_eager"] = row["plain_eager_ms"] / row["cascade_eager_ms"]
    del case
    torch.cuda.empty_cache()
    return row


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--seqs", type=int, nargs="+", default=[16])
    p.add_argument("--shared", type=int, nargs="+", default=[32768], help="shared prefix tokens")
    p.add_argument("--suffix-min", type=int, default=16)
    p.add_argument("--suffix-max", type=int, default=512)
    p.add_argument("--layers", type=int, default=32)
    p.add_argument("--q-heads", type=int, default=32)
    p.add_argument("--kv-heads", type=int, default=8)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--adapters", type=int, default=3, help="adapter slots the rows cycle through")
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--min-shared", type=int, default=1024, help="fewest shared tokens that form a group")
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--json", default=None, help="default: $OUT/cascade_gpu.json")
    args = p.parse_args()
    device = torch.device("cuda")
    print(f"{torch.cuda.get_device_name()}  {args.layers} layers, {args.q_heads}/{args.kv_heads} heads x "
          f"{args.head_dim}, rank {args.rank}, {args.dtype}, block {args.block_size}")  # fmt: skip
    head = f"{'seqs':>5} {'shared':>7} {'plain graph':>12} {'cascade graph':>14} {'x':>6} {'plain eager':>12} "
    print(head + f"{'cascade eager':>14} {'x':>6} {'plan host':>10} {'max|diff|':>10}")
    rows = []
    for shared in args.shared:
        for seqs in args.seqs:
            r = measure(seqs, shared, args, device)
            rows.append(r)
            print(
                f"{seqs:5d} {shared:7d} {r['plain_graph_ms']:10.3f}ms {r['cascade_graph_ms']:12.3f}ms "
                f"{r['speedup_graph']:5.2f}x {r['plain_eager_ms']:10.3f}ms {r['cascade_eager_ms']:12.3f}ms "
                f"{r['speedup_eager']:5.2f}x {r['plan_host_ms']:8.3f}ms {r['max_abs_diff']:10.2e}",
                flush=True,
            )
    path = Path(args.json or Path(os.environ.get("OUT", ".")) / "cascade_gpu.json")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"args": vars(args), "gpu": torch.cuda.get_device_name(), "rows": rows}, indent=1))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
