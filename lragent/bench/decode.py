"""CPU/GPU decode throughput of our engine against HF transformers + PEFT on the same machine, same adapter.

Decode tok/s = batch * (new_tokens - 1) / (time from first token to last token), so prefill is excluded on both.
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path

import torch

from lragent.bench.adapters import write_random_adapters


def ours(model: str, adapter_dir: str, batch: int, prompt_len: int, new_tokens: int, device: str) -> float:
    from lragent import LLM, SamplingParams

    llm = LLM(model=model, adapters={"plan": adapter_dir}, sharing="non_shared", device=device)
    vocab = llm.engine.model_config.vocab_size
    prompts = [[(97 * i + 13 * j) % (vocab - 100) + 50 for j in range(prompt_len)] for i in range(batch)]
    params = SamplingParams(max_tokens=new_tokens, temperature=0.0, ignore_eos=True)
    llm.generate(prompts, adapter="plan", sampling_params=SamplingParams(max_tokens=4, ignore_eos=True))  # warm-up
    outs = llm.generate([p[::-1] for p in prompts], adapter="plan", sampling_params=params)
    first = min(o.metrics.first_token_time for o in outs)
    last = max(o.metrics.finish_time for o in outs)
    return batch * (new_tokens - 1) / (last - first)


def hf_peft(model: str, adapter_dir: str, batch: int, prompt_len: int, new_tokens: int, device: str) -> float:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from lragent.models.hub import resolve_model

    base = AutoModelForCausalLM.from_pretrained(resolve_model(model), dtype=torch.float32).to(device)
    peft_model = PeftModel.from_pretrained(base, adapter_dir).eval()
    vocab = base.config.vocab_size
    ids = torch.tensor([[(97 * i + 13 * j) % (vocab - 100) + 50 for j in range(prompt_len)] for i in range(batch)], device=device)

    def timed(n: int) -> float:
        start = time.perf_counter()
        with torch.no_grad():
            peft_model.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False)
        return time.perf_counter() - start

    timed(4)
    one, full = timed(1), timed(new_tokens)
    return batch * (new_tokens - 1) / (full - one)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="lragent bench decode")
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=48)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", default="results/bench_decode.json")
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        adapter = write_random_adapters(args.model, Path(tmp), ["plan"], rank=8)["plan"]
        for batch in args.batch:
            a = ours(args.model, adapter, batch, args.prompt_len, args.new_tokens, args.device)
            b = hf_peft(args.model, adapter, batch, args.prompt_len, args.new_tokens, args.device)
            rows.append({"batch": batch, "lragent_tok_s": a, "hf_peft_tok_s": b, "speedup": a / b})
    print(f"decode, {args.model}, q/v LoRA r8, prompt {args.prompt_len}, {args.new_tokens} new tokens, {args.device} "
          f"({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)")
    print(f"{'batch':>5} {'lragent tok/s':>14} {'HF+PEFT tok/s':>14} {'speedup':>8}")
    for r in rows:
        print(f"{r['batch']:>5} {r['lragent_tok_s']:>14.1f} {r['hf_peft_tok_s']:>14.1f} {r['speedup']:>7.2f}x")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"args": vars(args), "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
