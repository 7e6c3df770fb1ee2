"""Decode throughput of our engine against HF transformers + PEFT on the same machine, same adapter, and (`--floor`)
against the memory-bandwidth floor of a decode step.

Greedy by default; `--temperature --top-p --top-k` sample instead (every request with a fixed seed, on both
systems), so greedy and sampled decoding can be compared run against run. `--json-schema FILE` constrains every
request's output (our engine only); a constrained request stops when its schema is complete, so the tokens counted
are those generated (`new_tokens_mean` in the JSON).

Decode tok/s = tokens generated after each request's first / (time from the last first token to the last token),
i.e. batch * (new_tokens - 1) / that time unless a constraint ends requests early, so prefill is excluded on both.
The floor of one decode step is (weight bytes + the cache bytes every sequence reads: keys, base values and its LR
rows) over the copy bandwidth measured in the same run; `--floor` reports step time / floor.
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

from lragent.bench.adapters import model_config_for, write_random_adapters
from lragent.bench.decoding import (
    add_sampling_args,
    describe,
    engine_only,
    is_constrained,
    is_greedy,
    penalties,
    request_params,
    request_seed,
    sampling_options,
)
from lragent.config import QUANTIZATIONS


def ours(
    model: str,
    adapter_dir: str,
    batch: int,
    prompt_len: int,
    new_tokens: int,
    device: str,
    profile: dict | None = None,
    sampling: dict | None = None,
    seed: int = 0,
    stats: dict | None = None,
    shared_prefix: int = 0,
    **engine,
) -> float:
    """Decode tok/s of our engine, greedy or with `sampling` ({temperature, top_p, top_k[, json_schema]}; request i
    seeded from `seed` and i); with `profile` (a dict, CUDA) also fills in a torch.profiler breakdown of 16 decode
    steps of the same batch; with `stats` (a dict) the mean tokens generated per request. `shared_prefix` > 0: the
    first that many tokens of every prompt are the same and cached once before the batch starts (agents reading one
    context: the rows share those blocks, what cascade decode is for)."""
    from lragent import LLM

    engine.setdefault("sharing", "non_shared")
    if device != "cpu":
        engine.setdefault("max_model_len", prompt_len + new_tokens + 16)
    t0 = time.perf_counter()
    llm = LLM(model=model, adapters={"plan": adapter_dir}, device=device, **engine)
    _log(f"engine ready in {time.perf_counter() - t0:.1f} s")
    vocab = llm.engine.model_config.vocab_size
    prompts = _prompts(batch, prompt_len, shared_prefix, vocab, variant=0)
    params = [
        request_params(sampling, request_seed(seed, i), max_tokens=new_tokens, ignore_eos=True) for i in range(batch)
    ]
    # warm-up (same decoding): compiles kernels and captures the decode graph of this batch size
    warm = [request_params(sampling, request_seed(seed + 1, i), max_tokens=4, ignore_eos=True) for i in range(batch)]
    llm.generate(prompts, adapter="plan", sampling_params=warm)
    _log(f"warm-up done at {time.perf_counter() - t0:.1f} s")
    llm.engine.reset_prefix_cache()
    timed = _prompts(batch, prompt_len, shared_prefix, vocab, variant=1)  # nothing of the warm-up's cached
    if shared_prefix:  # cache the shared part once, so that every row's table points at the same blocks
        primer = request_params(None, 0, max_tokens=1, ignore_eos=True)
        llm.generate([timed[0][:shared_prefix]], adapter="plan", sampling_params=[primer])
    steps: list = []
    llm.engine.add_step_listener(steps.append)
    outs = llm.generate(timed, adapter="plan", sampling_params=params)
    llm.engine.remove_step_listener(steps.append)
    if stats is not None:
        stats.update(host_split(steps))
        stats["reused_tokens_mean"] = sum(o.metrics.base_reused_tokens for o in outs) / len(outs)
    first = max(o.metrics.first_token_time for o in outs)  # prefill-first: decode starts once all have one token
    last = max(o.metrics.finish_time for o in outs)
    decoded = sum(len(o.token_ids) - 1 for o in outs)  # batch * (new_tokens - 1) unless a constraint stopped early
    if stats is not None:
        stats["new_tokens_mean"] = sum(len(o.token_ids) for o in outs) / len(outs)
    if profile is not None and torch.cuda.is_available():
        profile.update(_profile_decode(llm, prompts, sampling=sampling, seed=seed))
    del llm, outs
    gc.collect()  # free this engine's pools before the next one is sized from the free memory
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return decoded / (last - first)


def host_split(steps: list) -> dict[str, float]:
    """Where a decode step's wall time goes (means over the decode steps, ms): the runner's host preparation, the
    runner end to end (the forward and sampling until the tokens are on the host: GPU time plus what the host adds),
    and the rest of `step()` (scheduling, bookkeeping, post-processing), which the GPU waits through."""
    dec = [s for s in steps if not s.is_prefill]
    if not dec:
        return {}
    n = len(dec)
    step = sum(s.step_s for s in dec) / n
    forward = sum(s.forward_s for s in dec) / n
    prepare = sum(s.prepare_s for s in dec) / n
    return {"step_s_ms": 1e3 * step, "runner_ms": 1e3 * forward, "prepare_ms": 1e3 * prepare,
            "outside_runner_ms": 1e3 * (step - forward)}  # fmt: skip


def _prompts(batch: int, length: int, shared: int, vocab: int, variant: int) -> list[list[int]]:
    """`batch` distinct prompts of `length` tokens whose first `shared` tokens are the same; another `variant` shares
    no leading block with these."""
    common = [(31 * j + 7 + 101 * variant) % (vocab - 100) + 50 for j in range(shared)]
    own = [[(97 * i + 13 * j + 53 * variant) % (vocab - 100) + 50 for j in range(shared, length)] for i in range(batch)]
    if variant:
        own = [p[::-1] for p in own]
    return [common + o for o in own]


def _profile_decode(
    llm, prompts: list[list[int]], steps: int = 16, sampling: dict | None = None, seed: int = 0
) -> dict:
    """16 decode steps of the whole batch (after every prompt is prefilled), under torch.profiler."""
    from lragent.bench.profiling import profile_steps

    engine = llm.engine
    engine.reset_prefix_cache()
    ids = [
        engine.add_request(
            p[1:] + p[:1],
            request_params(sampling, request_seed(seed + 2, i), max_tokens=2 * steps + 8, ignore_eos=True),
            "plan",
        )
        for i, p in enumerate(prompts)
    ]
    prefilling = set(ids)  # requests without their first token yet (a finished one counts as done)
    while prefilling and engine.has_unfinished():
        prefilling -= {out.request_id for out in engine.step() if out.token_ids or out.finished}
    engine.step()  # one plain decode step first
    result = profile_steps(engine.step, steps)
    for i in ids:
        engine.abort(i)
    return result


def _log(msg: str) -> None:
    print(f"  [bench decode] {msg}", file=sys.stderr, flush=True)


def decode_floor_s(
    model: str, batch: int, context: int, dtype: torch.dtype, rates, rank: int = 8, quantization: str | None = None
) -> float:
    """Bytes one decode step must move (every weight once, each sequence's K, V_base and LR rows) over bandwidth;
    with fp8 weights the projections count one byte each (their per-row scales are negligible)."""
    from lragent.bench.roofline import ModelCost

    cost = ModelCost.of(model_config_for(model), dtype, rank)
    per_token = cost.kv_bytes_per_token + cost.lr_bytes_per_token
    weight_bytes = cost.weight_bytes
    if quantization == "fp8":
        weight_bytes -= cost.linear_params * (cost.itemsize - 1)
    return (weight_bytes + batch * context * per_token) / rates.copy_bytes


def floor_report(args) -> list[dict]:
    """Our decode step time at each batch size against its bandwidth floor (GPU; no HF run)."""
    from lragent.bench.roofline import calibrate
    from lragent.config import DTYPES

    dtype = DTYPES["bfloat16" if args.dtype == "auto" else args.dtype]
    rates = calibrate(args.device, dtype)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        adapter = write_random_adapters(args.model, Path(tmp), ["plan"], rank=8)["plan"]
        for batch in args.batch:
            prof: dict | None = {} if args.profile else None
            split: dict = {}
            tok_s = ours(
                args.model,
                adapter,
                batch,
                args.prompt_len,
                args.new_tokens,
                args.device,
                profile=prof,
                sampling=args.sampling,
                seed=args.seed,
                sharing=args.sharing,
                dtype=args.dtype,
                enforce_eager=args.enforce_eager,
                async_scheduling=args.async_scheduling,
                quantization=args.quantization,
                tensor_parallel_size=args.tensor_parallel_size,
                stats=split,
            )
            step = batch / tok_s
            context = args.prompt_len + args.new_tokens // 2
            floor = decode_floor_s(args.model, batch, context, dtype, rates, quantization=args.quantization)
            rows.append(
                {
                    "batch": batch,
                    "context": args.prompt_len,
                    "tok_s": tok_s,
                    "step_ms": step * 1e3,
                    "floor_ms": floor * 1e3,
                    "x_floor": step / floor,
                    "profile": prof,
                    "host_split_ms": {k: v for k, v in split.items() if k.endswith("_ms")}
                    | ({"outside_step_ms": step * 1e3 - split["step_s_ms"]} if "step_s_ms" in split else {}),
                }
            )
            _log(f"batch {batch} host split (ms, decode steps): " + json.dumps(rows[-1]["host_split_ms"]))
            if prof:
                _log(f"batch {batch} profile: " + json.dumps(prof))
            _log(f"batch {batch}: {step * 1e3:.2f} ms/step, floor {floor * 1e3:.2f} ms")
    print(
        f"decode vs bandwidth floor, {args.model}, {args.sharing}, q/v LoRA r8, context {args.prompt_len}, "
        f"{args.new_tokens} new tokens, {rates.device}, copy {rates.copy_bytes / 1e9:.0f} GB/s"
        f"{', eager' if args.enforce_eager else ', CUDA graphs'}{', fp8 weights' if args.quantization else ''}; "
        f"decoding: {describe(args.sampling)}"
    )
    print(f"{'batch':>5} {'tok/s':>9} {'step ms':>8} {'floor ms':>9} {'x floor':>8}")
    for r in rows:
        print(f"{r['batch']:>5} {r['tok_s']:>9.0f} {r['step_ms']:>8.2f} {r['floor_ms']:>9.2f} {r['x_floor']:>7.2f}x")
    return [dict(r, rates=rates.as_dict()) for r in rows]


def hf_peft(
    model: str,
    adapter_dir: str,
    batch: int,
    prompt_len: int,
    new_tokens: int,
    device: str,
    sampling: dict | None = None,
    seed: int = 0,
) -> float:
    """Decode tok/s of HF `generate` on a PeftModel: greedy, or sampled with the same temperature / top-p / top-k
    (HF's own warpers; its default top-k of 50 is turned off unless asked for) from a seeded global generator."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from lragent.models.hub import resolve_model

    base = AutoModelForCausalLM.from_pretrained(resolve_model(model), dtype=torch.float32).to(device)
    peft_model = PeftModel.from_pretrained(base, adapter_dir).eval()
    vocab = base.config.vocab_size
    ids = torch.tensor(
        [[(97 * i + 13 * j) % (vocab - 100) + 50 for j in range(prompt_len)] for i in range(batch)], device=device
    )

    decoding: dict = {"do_sample": False}
    if not is_greedy(sampling):
        assert sampling is not None
        decoding = {
            "do_sample": True,
            "temperature": sampling["temperature"],
            "top_p": sampling["top_p"],
            "top_k": max(0, sampling["top_k"]),
        }

    def timed(n: int) -> float:
        torch.manual_seed(seed)
        start = time.perf_counter()
        with torch.no_grad():
            peft_model.generate(ids, max_new_tokens=n, min_new_tokens=n, **decoding)
        return time.perf_counter() - start

    timed(4)
    one, full = timed(1), timed(new_tokens)
    return batch * (new_tokens - 1) / (full - one)


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lragent bench decode")
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=48)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", default="results/bench_decode.json")
    parser.add_argument("--floor", action="store_true", help="GPU: step time against the bandwidth floor, no HF run")
    parser.add_argument("--sharing", default="base_lr_shared", help="scheme for --floor")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--tokenizer", default=None, help="an HF tokenizer folder (dummy models have none)")
    parser.add_argument("--enforce-eager", action="store_true")
    parser.add_argument(
        "--quantization", default=None, choices=QUANTIZATIONS, help="fp8: FP8 projection weights (our engine only)"
    )
    parser.add_argument(
        "--profile",
        action="store_true",
        help="--floor on CUDA: also break 16 decode steps down by kernel (torch.profiler)",
    )
    parser.add_argument("--no-hf", action="store_true", help="time our engine only (no HF + PEFT run)")
    parser.add_argument(
        "--shared-prefix",
        type=int,
        default=0,
        metavar="N",
        help="the first N prompt tokens are common to the batch and cached once first (implies --no-hf)",
    )
    parser.add_argument(
        "--cascade-decode",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="engine option: shared-prefix decode (default: the engine's, on for CUDA)",
    )
    parser.add_argument(
        "--async-scheduling",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="engine option: decode one step ahead of the host (default: the engine's, on for CUDA)",
    )
    parser.add_argument("--tensor-parallel-size", "-tp", type=int, default=1, help="GPUs (ranks) of our engine")
    parser.add_argument("--seed", type=int, default=0, help="base of the per-request seeds when sampling")
    add_sampling_args(parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = _build_parser()
    args = parser.parse_args(argv)
    args.sampling = sampling_options(args, parser)
    torch.manual_seed(0)
    if args.floor:
        _floor_main(args)
        return 0
    rows = _time_batches(args)
    decoding = describe(args.sampling)
    _print_table(args, rows, decoding)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    result = {"args": vars(args), "decoding": decoding, "sampling": args.sampling, "rows": rows}
    Path(args.out).write_text(json.dumps(result, indent=2))
    return 0


def _floor_main(args: argparse.Namespace) -> None:
    """--floor: step times against the bandwidth floor, written to --out."""
    logging.basicConfig(level=logging.INFO, format="  [%(name)s] %(message)s")
    rows = floor_report(args)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    result = {"args": vars(args), "decoding": describe(args.sampling), "sampling": args.sampling, "rows": rows}
    Path(args.out).write_text(json.dumps(result, indent=2))


def _time_batches(args: argparse.Namespace) -> list[dict]:
    """Decode throughput of our engine (and HF + PEFT unless skipped) at every --batch, one row each."""
    rows = []
    skip_hf = args.no_hf or args.shared_prefix or engine_only(args.sampling)  # HF + PEFT: none of these
    with tempfile.TemporaryDirectory() as tmp:
        adapter = write_random_adapters(args.model, Path(tmp), ["plan"], rank=8)["plan"]
        for batch in args.batch:
            common = (args.model, adapter, batch, args.prompt_len, args.new_tokens, args.device)
            stats: dict = {}
            extra = {"tokenizer": args.tokenizer} if args.tokenizer else {}
            if args.quantization:
                extra["quantization"] = args.quantization
            if args.cascade_decode is not None:
                extra["cascade_decode"] = args.cascade_decode
            if args.async_scheduling is not None:
                extra["async_scheduling"] = args.async_scheduling
            if args.tensor_parallel_size > 1:
                extra["tensor_parallel_size"] = args.tensor_parallel_size
            if args.shared_prefix >= args.prompt_len:
                raise ValueError("--shared-prefix must be shorter than --prompt-len")
            a = ours(*common, sampling=args.sampling, seed=args.seed, stats=stats, shared_prefix=args.shared_prefix,
                     **extra)  # fmt: skip
            b = None if skip_hf else hf_peft(*common, sampling=args.sampling, seed=args.seed)
            rows.append(
                {"batch": batch, "lragent_tok_s": a, "hf_peft_tok_s": b, "speedup": a / b if b else None, **stats}
            )
    return rows


def _print_table(args: argparse.Namespace, rows: list[dict], decoding: str) -> None:
    """The table and the parseable `DECODE ...` line."""
    print(
        f"decode, {args.model}, q/v LoRA r8, prompt {args.prompt_len}, {args.new_tokens} new tokens, {args.device} "
        f"({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads), decoding: {decoding}"
    )
    print(f"{'batch':>5} {'lragent tok/s':>14} {'HF+PEFT tok/s':>14} {'speedup':>8} {'new tok/req':>12}")
    for r in rows:
        hf = "-" if r["hf_peft_tok_s"] is None else f"{r['hf_peft_tok_s']:.1f}"
        speedup = "-" if r["speedup"] is None else f"{r['speedup']:.2f}x"
        print(f"{r['batch']:>5} {r['lragent_tok_s']:>14.1f} {hf:>14} {speedup:>8} {r['new_tokens_mean']:>12.1f}")
    print(
        f"DECODE decoding={decoding.split(' ')[0]} temperature={args.temperature:g} top_p={args.top_p:g} "
        f"top_k={args.top_k} json_schema={int(is_constrained(args.sampling))} "
        f"penalised={int(bool(penalties(args.sampling)))} "
        + " ".join(f"b{r['batch']}_tok_s={r['lragent_tok_s']:.4g}" for r in rows)
    )


if __name__ == "__main__":
    raise SystemExit(main())
