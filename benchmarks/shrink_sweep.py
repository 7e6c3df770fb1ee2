"""LoRA shrink (`lora_shrink`, x A for one adapter) at decode sizes over the split-K count (GPU, one table).

Llama-3.1-8B's hidden size (4096) at 1 and 8 rows, rank 8 and 16, bf16 x, float32 out (q's delta) and bf16 out (v's
LR row): the split count `lora_shrink` picks ("auto") against fixed ones. Each split walks K / splits of d_in; the
last to finish sums the partials (one launch). CUDA graph replays, median of 5 x 200, microseconds per call.

    python3 benchmarks/shrink_sweep.py
"""

from __future__ import annotations

import torch

from lragent.bench.kernels import graph_replay_us
from lragent.kernels.triton_lora import lora_shrink

SPLITS = (None, 1, 2, 4, 8, 16, 32)


def _shrink(x, a, start, slot, out_dtype, split):
    return lambda: lora_shrink(x, a, start, slot, x.shape[0], out_dtype=out_dtype, split_k=split, rows_covered=True)


def main() -> None:
    dev = torch.device("cuda")
    print(f"{'rows':>4} {'rank':>4} {'out':>8} " + " ".join(f"{'auto' if s is None else s:>7}" for s in SPLITS))
    for t in (1, 8):
        for r in (8, 16):
            x = torch.randn(t, 4096, device=dev, dtype=torch.bfloat16)
            a = torch.randn(2, 4096, r, device=dev, dtype=torch.bfloat16) / 64
            start = torch.tensor([0, t], dtype=torch.int32, device=dev)
            slot = torch.tensor([1], dtype=torch.int32, device=dev)
            for out_dtype in (torch.float32, torch.bfloat16):
                cells = []
                for split in SPLITS:
                    call = _shrink(x, a, start, slot, out_dtype, split)
                    call()  # compiles, and grows the arrival counters outside the capture
                    cells.append(f"{graph_replay_us(call, reps=200):7.2f}")
                print(f"{t:>4} {r:>4} {str(out_dtype)[6:]:>8} " + " ".join(cells))


if __name__ == "__main__":
    main()
