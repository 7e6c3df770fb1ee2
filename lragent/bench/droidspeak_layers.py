"""Which layers DroidSpeak should recompute: per-layer sensitivity, measured on the engine itself.

For each layer l, the `droidspeak` scheme runs with every layer critical but l (so only layer l's keys and values of
the producer's tokens are reused, and the layers after it are recomputed from the producer's hidden states), and
the next-token distribution of each reading agent is compared with its own under `non_shared` (every layer its
own). Sensitivity of l = mean KL(p_non_shared || p_l) over prompts and reading agents. The most sensitive layers
are the critical set (the paper recomputes its top third).

The KL is taken over the `non_shared` run's top-20 tokens (the engine hands out at most 20 alternatives per token),
both sides renormalised there; a token outside the other run's top 20 gets that run's 20th log-probability (an upper
bound of its own). It ranks layers; it is not the full-vocabulary KL.

    lragent bench droidspeak-layers --model M --adapter plan=P --adapter action=A [--num-critical K] [--json F]
"""

from __future__ import annotations

import argparse
import json
import math
import random
import sys
from collections.abc import Sequence

from lragent.engine_args import HelpFormatter, add_engine_args, engine_config

TOP = 20  # alternatives per token the engine returns (lragent.sampling.MAX_TOP_LOGPROBS)


def random_prompts(count: int, length: int, vocab: int, seed: int = 0) -> list[list[int]]:
    """Seeded token-id prompts (no tokenizer needed; ids 1..vocab-1)."""
    rng = random.Random(seed)
    return [[rng.randrange(1, vocab) for _ in range(length)] for _ in range(count)]


def _next_token_dists(llm, prompts: list[list[int]], producer: str, readers: list[str], tail: int) -> list[dict]:
    """Per (prompt, reader): {token: logprob} of the reader's first token after the producer computed the prompt
    and the reader appended `tail` tokens of its own (the prompt's last tokens again)."""
    from lragent import SamplingParams

    first = SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True)
    probe = SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True, logprobs=True, top_logprobs=TOP)
    dists = []
    for prompt in prompts:
        for reader in readers:
            llm.engine.reset_prefix_cache()  # each measurement starts from the producer's cache alone
            llm.generate([prompt], adapter=producer, sampling_params=first)
            out = llm.generate([prompt + prompt[-tail:]], adapter=reader, sampling_params=probe)[0]
            dists.append(dict(out.top_logprobs[0]))
    return dists


def top_kl(p: dict[int, float], q: dict[int, float]) -> float:
    """KL(p || q) over p's tokens, both renormalised there; a token q lacks gets q's smallest logprob."""
    floor = min(q.values())
    lp = {t: p[t] for t in p}
    lq = {t: q.get(t, floor) for t in p}
    zp = math.log(sum(math.exp(v) for v in lp.values()))
    zq = math.log(sum(math.exp(v) for v in lq.values()))
    return sum(math.exp(lp[t] - zp) * ((lp[t] - zp) - (lq[t] - zq)) for t in p)


def layer_sensitivity(
    model: str,
    adapters: dict[str, str],
    prompts: list[list[int]] | None = None,
    num_prompts: int = 3,
    prompt_len: int = 256,
    seed: int = 0,
    producer: str | None = None,
    tail: int = 8,
    **engine,
) -> list[float]:
    """Mean KL per layer (see the module doc) over `prompts` (token ids; default: `num_prompts` seeded random ones
    of `prompt_len` tokens); `engine`: further `LLM` options (device, dtype, kv_cache_bytes...). Builds one engine
    for the reference and one per layer."""
    from lragent import LLM

    names = list(adapters)
    if len(names) < 2:
        raise ValueError("measuring layer sensitivity needs at least two adapters (a producer and a reader)")
    first = producer or names[0]
    readers = [n for n in names if n != first]
    shape = {}

    def run(sharing: str, critical: tuple[int, ...] | None) -> list[dict]:
        nonlocal prompts
        llm = LLM(model=model, adapters=adapters, sharing=sharing, critical_layers=critical, **engine)
        try:
            shape["layers"] = llm.engine.model_config.num_layers
            if prompts is None:
                prompts = random_prompts(num_prompts, prompt_len, llm.engine.model_config.vocab_size, seed)
            return _next_token_dists(llm, prompts, first, readers, tail)
        finally:
            llm.close()

    reference = run("non_shared", None)
    num_layers = shape["layers"]
    scores = []
    for layer in range(num_layers):
        dists = run("droidspeak", tuple(i for i in range(num_layers) if i != layer))
        scores.append(sum(top_kl(p, q) for p, q in zip(reference, dists)) / len(dists))
    return scores


def pick_layers(scores: Sequence[float], count: int) -> tuple[int, ...]:
    """The `count` most sensitive layers (ties: the lower layer), sorted."""
    if not 0 <= count <= len(scores):
        raise ValueError(f"cannot pick {count} critical layers of {len(scores)}")
    ranked = sorted(range(len(scores)), key=lambda i: (-scores[i], i))
    return tuple(sorted(ranked[:count]))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="lragent bench droidspeak-layers", description=__doc__, formatter_class=HelpFormatter
    )
    add_engine_args(parser)
    parser.add_argument("--num-critical", type=int, default=None, help="layers to pick (default: a third, rounded)")
    parser.add_argument("--prompts", type=int, default=3, help="random token prompts measured")
    parser.add_argument("--prompt-len", type=int, default=256, help="tokens per prompt")
    parser.add_argument("--producer", default=None, help="the adapter that computes the prompt (default: the first)")
    parser.add_argument("--json", default=None, help="also write the scores and the set to this file")
    args = parser.parse_args(argv)
    config = engine_config(args)
    engine = {
        "device": config.device,
        "dtype": config.dtype,
        "block_size": config.block_size,
        "kv_cache_bytes": config.kv_cache_bytes,
        "gpu_memory_utilization": config.gpu_memory_utilization,
        "attention_backend": config.attention_backend,
        "warmup": False,
    }
    scores = layer_sensitivity(
        config.model,
        config.adapters,
        num_prompts=args.prompts,
        prompt_len=args.prompt_len,
        seed=args.seed,
        producer=args.producer,
        **engine,
    )
    count = args.num_critical if args.num_critical is not None else round(len(scores) / 3)
    chosen = pick_layers(scores, count)
    print(f"{'layer':>5}  {'KL to non_shared (only this layer shared)':>42}")
    for layer, score in enumerate(scores):
        print(f"{layer:>5}  {score:>42.6f}{'  *' if layer in chosen else ''}")
    print(f"critical layers: {','.join(map(str, chosen))}")
    print(json.dumps({"critical_layers": list(chosen)}))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"model": config.model, "scores": scores, "critical_layers": list(chosen)}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
