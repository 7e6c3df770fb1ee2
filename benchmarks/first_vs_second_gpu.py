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
from collections import Counter
from pathlib import Path

import torch

from lragent.bench.adapters import write_random_adapters
from lragent.bench.trace import paper_trace, run_engine_trace
from lragent.config import EngineConfig
from lragent.engine.llm_engine import LLMEngine
from lragent.sampling import SamplingParams

SAMPLED = {"temperature": 0.9, "top_p": 0.75, "top_k": 40}


def compiled_variants() -> Counter:
    """Triton kernel variants compiled so far in this process, by kernel name, over every @triton.jit function of
    the loaded modules (0 everywhere on another Triton's layout)."""
    from triton.runtime.jit import JITFunction

    counts: Counter = Counter()
    warnings.simplefilter("ignore", FutureWarning)  # reading every module's globals touches deprecated aliases
    for module in list(sys.modules.values()):
        for value in list(getattr(module, "__dict__", {}).values()):
            if isinstance(value, JITFunction):
                try:
                    counts[value.__name__] = sum(len(c[0]) for c in value.device_caches.values())
                except (AttributeError, TypeError, IndexError):
                    pass
    return counts


def timed_trace(
    engine: LLMEngine, ctx: int, k: int, name: str, sampling: dict | None, label: str, gen_cap: int | None = None
) -> dict:
    """One trace run (k trajectories at once), with the kernel variants compiled during it."""
    before = compiled_variants()
    row = run_engine_trace(engine, paper_trace(ctx, gen_cap), k, 0, time.perf_counter() + 300, sampling)
    grown = compiled_variants() - before
    n_compiled, gen = sum(grown.values()), row["generated_tokens"]
    out = {"ctx": ctx, "k": k, "decoding": name, "run": label, "e2e_s": row["e2e_s"], "compiled": dict(grown),
           "status": row["status"], "prompt_tokens": row["prompt_tokens"], "generated": gen}  # fmt: skip
    print(f"L_ctx {ctx:5d} K {k:2d} {name:8s} {label:6s} e2e {row['e2e_s']:6.2f} s  generated {gen:6d}"
          f"  {n_compiled:2d} kernels compiled {dict(grown)}  {row['status']}", flush=True)  # fmt: skip
    return out


def decode_rate(engine: LLMEngine, schema: dict | None, batch: int = 32, prompt: int = 512, new: int = 128) -> float:
    """Decode tokens/s of `batch` sampled requests (JSON-schema constrained when `schema`), after their prefill."""
    vocab = min(engine.model_config.vocab_size, len(engine.tokenizer) if engine.tokenizer else 1 << 30)
    ids = []
    for i in range(batch):
        p = [(97 * i + 13 * j) % (vocab - 100) + 50 for j in range(prompt)]
        params = SamplingParams(max_tokens=new, seed=i, json_schema=schema, ignore_eos=schema is None, **SAMPLED)
        ids.append(engine.add_request(p, params, "plan"))
    first: dict[str, float] = {}
    done: dict[str, tuple[float, int]] = {}
    while engine.has_unfinished():
        for out in engine.step():
            if out.token_ids and out.request_id not in first:
                first[out.request_id] = time.perf_counter()
            if out.finished:
                done[out.request_id] = (time.perf_counter(), len(out.token_ids))
    start, end = max(first.values()), max(t for t, _ in done.values())
    engine.reset_prefix_cache()
    return sum(n - 1 for _, n in done.values()) / (end - start)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="dummy:llama-3.1-8b")
    p.add_argument("--ctx", type=int, default=8192, help="the paper trace's L_ctx (8192: 33.7k tokens)")
    p.add_argument("--concurrent-ctx", type=int, default=2048, help="L_ctx of the 16-trajectory runs (9.1k)")
    p.add_argument("--sharing", default="base_lr_shared")
    p.add_argument("--tokenizer", default=None, help="for the JSON-schema decode runs (dummy weights have none)")
    p.add_argument("--json-schema", default=None, help="a JSON schema file for the constrained decode runs")
    p.add_argument("--no-warmup", action="store_true")
    p.add_argument("--device", default="cuda")
    p.add_argument(
        "--gen-cap", type=int, default=None, help="cap each step's generation (a quick check, not the paper)"
    )
    p.add_argument("--new-tokens", type=int, default=128, help="tokens per request of the decode runs")
    p.add_argument("--out", default="results/first_vs_second.json")
    args = p.parse_args()
    rows: dict = {
        "args": vars(args),
        "device": torch.cuda.get_device_name() if args.device != "cpu" else "cpu",
        "traces": [],
        "decode": [],
    }
    with tempfile.TemporaryDirectory() as tmp:
        adapters = write_random_adapters(args.model, Path(tmp), ["plan", "action", "reflect"], rank=8)
        start = time.perf_counter()
        config = EngineConfig(model=args.model, adapters=adapters, sharing=args.sharing, device=args.device,
                              max_model_len=65_536, tokenizer=args.tokenizer,
                              warmup=False if args.no_warmup else None)  # fmt: skip
        engine = LLMEngine(config)
        rows["startup_s"], rows["warmup_s"] = time.perf_counter() - start, engine.warmup_s
        print(f"engine start {rows['startup_s']:.1f} s (warm-up {engine.warmup_s:.1f} s)", flush=True)
        for name, sampling in (("greedy", None), ("sampled", SAMPLED)):
            for run in ("first", "second"):
                rows["traces"].append(timed_trace(engine, args.ctx, 1, name, sampling, run, args.gen_cap))
        for run in ("first", "second"):
            for name, sampling in (("greedy", None), ("sampled", SAMPLED)):
                rows["traces"].append(timed_trace(engine, args.concurrent_ctx, 16, name, sampling, run, args.gen_cap))
        if args.json_schema:
            schema = json.loads(Path(args.json_schema).read_text())
            for run in ("first", "second"):
                for name, sch in (("unconstrained", None), ("json_schema", schema)):
                    rate = decode_rate(engine, sch, new=args.new_tokens)
                    rows["decode"].append({"decoding": name, "run": run, "tok_s": rate})
                    print(f"decode b32 sampled {name:13s} {run:6s} {rate:8.1f} tok/s", flush=True)
        engine.close()
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
