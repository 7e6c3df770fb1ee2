"""Run the paged decode kernel (with the LR term) a few times on one (batch, context) case, for a profiler (GPU).

Meant for Nsight Compute: `ncu --clock-control none -k regex:_decode --launch-skip 4 --launch-count 2 --section
SpeedOfLight --section Occupancy --section WarpStateStats python3 benchmarks/decode_probe.py --batch 1 --ctx 8192`
reads where the batch-1 decode kernel and its merge spend their time (achieved occupancy, stall reasons, DRAM
throughput). Without a profiler it prints the CUDA-graph replay time of the case; `--sweep` also times tile shapes,
split counts and the merge kernel's D slices (`MERGE_BLOCK_D`) on it.
"""

from __future__ import annotations

import argparse

import torch

from lragent.bench.kernels import PagedPools, Timer, _decode_calls, _decode_inputs, graph_replay_us


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--ctx", type=int, default=8192)
    ap.add_argument("--splits", type=int, default=None)
    ap.add_argument("--calls", type=int, default=8)
    ap.add_argument("--sweep", action="store_true")
    args = ap.parse_args()
    dev = torch.device("cuda")
    pools = PagedPools(args.batch * args.ctx + 64, 16, 8, torch.bfloat16, dev)
    bt, lbt, slots, ctx_t, q, out = _decode_inputs(pools, args.batch, args.ctx, torch.bfloat16, dev)
    kw = {"num_splits": args.splits} if args.splits else {}
    ours, _ = _decode_calls(pools, q, out, bt, lbt, ctx_t, slots, args.ctx, kw)
    for _ in range(args.calls):
        ours()
    torch.cuda.synchronize()
    print(f"batch {args.batch} ctx {args.ctx}: {graph_replay_us(ours, reps=200):.1f} us per call (graph replays)")
    if args.sweep:
        sweep(pools, args, (bt, lbt, slots, ctx_t, q, out))


def sweep(pools: PagedPools, args: argparse.Namespace, inputs: tuple) -> None:
    """Time (as `bench kernels` times it) of the case over merge slices, split counts, BLOCK_N, warps and stages."""
    from lragent.kernels import triton_attention as ta

    bt, lbt, slots, ctx_t, q, out = inputs
    timer = Timer(q.device, 25, 100)  # `lragent bench kernels`' timing: graph replays, L2 flushed before each
    base = ta.default_num_splits(args.batch, pools.key.shape[2], args.ctx, q.device)
    configs = [(d, base, 64, 4, 2) for d in (0, 16)]  # the merge's slices at the default tiles
    tiles = ((64, 4, 2), (32, 4, 2), (64, 8, 2), (32, 2, 2), (64, 4, 1), (16, 2, 2))
    configs += [(32, splits, *t) for splits in sorted({base // 2, base, 2 * base}) for t in tiles]
    for block_d, splits, bn, warps, stages in configs:
        ta.MERGE_BLOCK_D = block_d
        kw = dict(num_splits=splits, block_n=bn, num_warps=warps, num_stages=stages)
        ours, _ = _decode_calls(pools, q, out, bt, lbt, ctx_t, slots, args.ctx, kw)
        us = timer(ours) * 1e3
        print(f"merge_block_d {block_d:3} splits {splits:4} block_n {bn:3} warps {warps} stages {stages}: "
              f"{us:6.1f} us", flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
