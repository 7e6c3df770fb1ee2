"""First paper trace of a fresh process vs the second, greedy and sampled, on a GPU (issue 13's "no compilation
inside requests"). Prints the engine's start-up (and warm-up) time, each trace's end-to-end seconds, and how many
Triton kernel variants compiled during each trace (0 when the warm-up covered what the trace needs).

    TRITON_CACHE_DIR=$(mktemp -d) python benchmarks/first_vs_second_gpu.py --ctx 8192   # a fresh machine
    python benchmarks/first_vs_second_gpu.py --ctx 8192 --no-warmup                      # the old behaviour
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch

from lragent.bench.adapters import write_random_adapters
from lragent.bench.trace import paper_trace, run_engine_trace
from lragent.config import EngineConfig
from lragent.engine.llm_engine import LLMEngine

SAMPLED = {"temperature": 0.9, "top_p": 0.75, "top_k": 40}


def compiled_variants() -> int:
    """Triton kernels compiled so far in this process, over every @triton.jit function of the loaded modules."""
    from triton.runtime.jit import JITFunction

    total = 0
    warnings.simplefilter("ignore", FutureWarning)  # reading every module's globals touches deprecated aliases
    for module in list(sys.modules.values()):
        for value in list(getattr(module, "__dict__", {}).values()):
            if isinstance(value, JITFunction):
                try:
                    total += sum(len(caches[0]) for caches in value.device_caches.values())
                except (AttributeError, TypeError, IndexError):  # another Triton's layout: count nothing
                    pass
    return total


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="dummy:llama-3.1-8b")
    p.add_argument("--ctx", type=int, default=8192, help="the paper trace's L_ctx (8192: 33.7k tokens)")
    p.add_argument("--sharing", default="base_lr_shared")
    p.add_argument("--no-warmup", action="store_true")
    p.add_argument("--out", default="results/first_vs_second.json")
    args = p.parse_args()
    rows: dict = {"args": vars(args), "device": torch.cuda.get_device_name(), "traces": []}
    with tempfile.TemporaryDirectory() as tmp:
        adapters = write_random_adapters(args.model, Path(tmp), ["plan", "action", "reflect"], rank=8)
        start = time.perf_counter()
        config = EngineConfig(model=args.model, adapters=adapters, sharing=args.sharing, device="cuda",
                              max_model_len=65_536, warmup=False if args.no_warmup else None)  # fmt: skip
        engine = LLMEngine(config)
        rows["startup_s"], rows["warmup_s"] = time.perf_counter() - start, engine.warmup_s
        print(f"engine start {rows['startup_s']:.1f} s (warm-up {engine.warmup_s:.1f} s)", flush=True)
        spec = paper_trace(args.ctx)
        for name, sampling in (("greedy", None), ("sampled", SAMPLED)):
            for run in ("first", "second"):
                before = compiled_variants()
                row = run_engine_trace(engine, spec, 1, 0, time.perf_counter() + 300, sampling)
                new = compiled_variants() - before
                tok_s = (row["computed_tokens"] + row["generated_tokens"]) / row["e2e_s"]
                rows["traces"].append({"decoding": name, "run": run, "e2e_s": row["e2e_s"], "compiled": new,
                                       "status": row["status"], "tok_s": tok_s})  # fmt: skip
                print(f"{name:8s} {run:6s} e2e {row['e2e_s']:6.2f} s  {tok_s:8.1f} tok/s  "
                      f"{new:3d} kernels compiled  {row['status']}", flush=True)  # fmt: skip
        engine.close()
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
