"""`python -m lragent.bench.grammar`: xgrammar vs llguidance on this CPU, with the embedded SmolLM2 tokenizer.

Why: structured output (lragent/engine/structured.py) needs one grammar library; this is the measurement that picked
it. Three costs matter to the engine: the one-time tokenizer setup (start-up), compiling a request's JSON schema
(paid once per new schema, on the request's admission), and the per-token host work (fill the next-token bitmask,
then accept the sampled token), paid on every decode step of every constrained sequence.

The per-token loop replays a fixed ~100-token tool call (the tokenizer's own encoding of a schema instance), so both
libraries walk the same path; each step checks that the token is allowed before accepting it, and the run must end
with the EOS token allowed and the matcher terminated. The choice (xgrammar) rests on the mean per-token cost, which
is what a decode step pays summed over its tokens: llguidance's median is lower, but it spikes at structural positions.
"""

from __future__ import annotations

import json
import statistics
import time
from collections.abc import Callable

import torch

TOOL_SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string"},
        "mode": {"enum": ["search", "lookup", "finish"]},
        "arguments": {
            "type": "object",
            "properties": {"query": {"type": "string"}, "limit": {"type": "integer"}, "exact": {"type": "boolean"}},
            "required": ["query", "limit"],
        },
        "tags": {"type": "array", "items": {"type": "string"}},
    },
    "required": ["name", "mode", "arguments", "tags"],
}
TOOL_CALL = {
    "name": "wikipedia_search_with_multi_hop_bridge_entities",
    "mode": "search",
    "arguments": {"query": "Which river flows through the capital city of the country that hosted Expo 2015, and how long is it in kilometres from its source in the Alps?", "limit": 5, "exact": False},
    "tags": ["geography", "multi-hop", "retrieval", "europe", "rivers", "capitals", "hotpotqa", "bridge-question"],
}  # fmt: skip


def _median_us(fn: Callable[[], object], reps: int) -> float:
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e6


def _allowed(bitmask: torch.Tensor, token: int) -> bool:
    return bool((int(bitmask[0, token // 32]) >> (token % 32)) & 1)


def _replay(fill: Callable[[], None], accept: Callable[[int], bool], bitmask, tokens, eos) -> tuple[list[float], float]:
    """Per-token (fill + accept) seconds over `tokens` then EOS; also the first fill alone."""
    steps, first = [], None
    for token in [*tokens, eos]:
        start = time.perf_counter()
        fill()
        filled = time.perf_counter() - start
        assert _allowed(bitmask, token), f"token {token} rejected"  # outside the timed parts
        start = time.perf_counter()
        ok = accept(token)
        steps.append(filled + time.perf_counter() - start)
        first = filled if first is None else first
        assert ok, f"token {token} not accepted"
    return steps, first


def bench_xgrammar(tokenizer, vocab_size: int, tokens: list[int], reps: int) -> dict:
    import xgrammar as xgr

    def setup():
        return xgr.GrammarCompiler(xgr.TokenizerInfo.from_huggingface(tokenizer, vocab_size=vocab_size))

    row = {"library": f"xgrammar {_version('xgrammar')}"}
    row["setup_ms"] = _median_us(setup, 3) / 1e3
    info = xgr.TokenizerInfo.from_huggingface(tokenizer, vocab_size=vocab_size)
    compiler = xgr.GrammarCompiler(info, cache_enabled=False)
    text = json.dumps(TOOL_SCHEMA)
    row["compile_ms"] = _median_us(lambda: xgr.GrammarMatcher(compiler.compile_json_schema(text)), reps) / 1e3
    compiled = compiler.compile_json_schema(text)
    bitmask = xgr.allocate_token_bitmask(1, vocab_size)
    steps, firsts = [], []
    for _ in range(reps):
        matcher = xgr.GrammarMatcher(compiled)
        s, f = _replay(lambda m=matcher: m.fill_next_token_bitmask(bitmask, 0), matcher.accept_token, bitmask, tokens, tokenizer.eos_token_id)  # fmt: skip
        assert matcher.is_terminated()
        steps += s
        firsts.append(f)
    return row | _step_stats(steps, firsts)


def bench_llguidance(tokenizer, vocab_size: int, tokens: list[int], reps: int) -> dict:
    import llguidance
    import llguidance.hf
    import llguidance.torch

    row = {"library": f"llguidance {_version('llguidance')}"}
    row["setup_ms"] = _median_us(lambda: llguidance.hf.from_tokenizer(tokenizer, n_vocab=vocab_size), 3) / 1e3
    lltok = llguidance.hf.from_tokenizer(tokenizer, n_vocab=vocab_size)
    text = json.dumps(TOOL_SCHEMA)

    def compile_():
        matcher = llguidance.LLMatcher(lltok, llguidance.LLMatcher.grammar_from_json_schema(text))
        assert not matcher.is_error(), matcher.get_error()
        return matcher

    row["compile_ms"] = _median_us(compile_, reps) / 1e3
    bitmask = llguidance.torch.allocate_token_bitmask(1, vocab_size)
    steps, firsts = [], []
    for _ in range(reps):
        matcher = compile_()
        fill = lambda m=matcher: llguidance.torch.fill_next_token_bitmask(m, bitmask, 0)  # noqa: E731
        s, f = _replay(fill, matcher.consume_token, bitmask, tokens, tokenizer.eos_token_id)
        assert matcher.is_stopped() and not matcher.is_error(), matcher.get_error()
        steps += s
        firsts.append(f)
    return row | _step_stats(steps, firsts)


def _version(name: str) -> str:
    from importlib.metadata import version

    return version(name)


def _step_stats(steps: list[float], firsts: list[float]) -> dict:
    steps_us = sorted(s * 1e6 for s in steps)
    return {
        "first_fill_us": statistics.median(firsts) * 1e6,
        "token_mean_us": statistics.fmean(steps_us),
        "token_median_us": statistics.median(steps_us),
        "token_p90_us": steps_us[int(0.9 * (len(steps_us) - 1))],
    }


def main() -> None:
    import transformers

    from lragent.model_config import ModelConfig
    from lragent.models.hub import resolve_model

    torch.set_num_threads(1)
    folder = resolve_model("smollm2-135m-instruct")
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
    vocab_size = ModelConfig.from_file(folder / "config.json").vocab_size
    tokens = tokenizer.encode(json.dumps(TOOL_CALL, separators=(",", ":")), add_special_tokens=False)
    rows = [bench(tokenizer, vocab_size, tokens, reps=20) for bench in (bench_xgrammar, bench_llguidance)]
    cols = ("library", "setup_ms", "compile_ms", "first_fill_us", "token_median_us", "token_p90_us", "token_mean_us")
    print(f"SmolLM2 tokenizer, vocab {vocab_size}, tool-call schema, {len(tokens)} tokens + EOS, 1 thread")
    print(" ".join(f"{c:>16}" for c in cols))
    for row in rows:
        print(" ".join(f"{row[c]:>16}" if isinstance(row[c], str) else f"{row[c]:>16.1f}" for c in cols))
    # a decode step waits for the sum over its tokens, so the mean (spikes included) decides; the median is shown
    xg, ll = rows
    best = min(rows, key=lambda r: r["token_mean_us"])["library"]
    print(
        f"summary: fill+accept per token mean/median/p90 {xg['token_mean_us']:.1f}/{xg['token_median_us']:.1f}/"
        f"{xg['token_p90_us']:.1f} us (xgrammar) vs {ll['token_mean_us']:.1f}/{ll['token_median_us']:.1f}/"
        f"{ll['token_p90_us']:.1f} us (llguidance); compile {xg['compile_ms']:.1f} vs {ll['compile_ms']:.1f} ms; "
        f"setup {xg['setup_ms']:.0f} vs {ll['setup_ms']:.0f} ms; lower mean per token: {best}"
    )


if __name__ == "__main__":
    main()
