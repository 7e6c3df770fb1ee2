"""Which TMA prefill cases disagree with the float64 reference on the GPU? (one fresh process per case)

A kernel fault poisons its CUDA context, so each case runs in its own process; the table lists the relative error
of the TMA tiles (forced, tma 1) and of the pointer tiles (tma 0) on the same random ragged batch (NaN-poisoned
block tails). Found with it (H200, Triton 3.6): rank-1 16-bit LR rows beside TMA loads are wrong (`_use_tma` now
keeps those on the pointer tiles; forced here they still show it), and a descriptor box wider than the LR row (the
LR rows through TMA, since removed) read wrong values.
Run: python benchmarks/tma_check.py [--jobs 8]
"""

from __future__ import annotations

import argparse
import itertools
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def one(spec: str) -> None:
    import random

    import torch

    sys.path.insert(0, str(ROOT / "tests"))
    from test_kernels import _ragged, make_case, rel_err, run_kernel

    dtype, rank, bs, d, hq, hkv, tma, stages = spec.split(",")
    dt = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[dtype]
    rng = random.Random(7)
    case = make_case(_ragged(rng, 4, 900, 300, 4, False), int(hq), int(hkv), int(d),
                     None if rank == "none" else int(rank), int(bs), dt, seed=11)  # fmt: skip
    out = run_kernel(case, decode=False, tma=tma == "1", num_stages=int(stages))
    torch.cuda.synchronize()
    print(f"RESULT {rel_err(out.cpu(), case.ref):.3e}")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--one", default=None)
    ap.add_argument("--jobs", type=int, default=8)
    args = ap.parse_args()
    if args.one:
        return one(args.one)
    specs = [
        f"{dt},{r},64,64,8,8,{t},{s}"
        for dt, r, (t, s) in itertools.product(("bf16", "fp16"), (1, 2, 8, "none"), ((0, 2), (1, 3), (1, 2)))
    ]
    specs += [f"bf16,{r},{bs},128,32,4,1,3" for r in (1, 8) for bs in (64, 128)]
    specs += ["bf16,8,64,128,32,4,0,2", "fp32,1,64,64,8,8,1,3"]

    def run(spec: str) -> str:
        p = subprocess.run([sys.executable, __file__, "--one", spec], capture_output=True, text=True, timeout=300)
        lines = [x for x in p.stdout.splitlines() if x.startswith("RESULT")]
        err = lines[0].split()[1] if lines else "FAILED " + (p.stderr.strip().splitlines() or ["?"])[-1][:120]
        return f"{spec:<28} {err}"

    print("dtype,rank,bs,d,hq,hkv,tma,stages  rel err vs float64 reference")
    with ThreadPoolExecutor(args.jobs) as pool:
        for line in pool.map(run, specs):
            print(line, flush=True)


if __name__ == "__main__":
    main()
