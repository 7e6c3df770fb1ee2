"""Start-up warm-up: compile what serving will need before the first request, not inside it.

On a GPU the first long request of a fresh process paid ~4-5 s of Triton compilation (and graph captures) inside
its latency. The warm-up runs a small synthetic workload through the engine's own step, shaped to take every
path a real workload takes: a prompt longer than one prefill chunk (chunked prefill, then a partial chunk), a
mini trace where the agents and the base model take turns appending to that prefix in each of the kernels' tile
sizes (prefix hits, LR prefill under the base-sharing schemes, split-KV over the long context), greedy and sampled
decoding with log-probabilities, a batch of short requests decoding together; then it captures the decode graph
of every batch size the engine will replay, and forgets the blocks and counters it left. Triton keeps compiled
kernels on disk (`TRITON_CACHE_DIR`, default `~/.triton/cache`), so a later process on the same machine skips the
compilation and pays only the runs and captures.
"""

from __future__ import annotations

import logging
import random
import time
from typing import TYPE_CHECKING

import torch

from lragent.sampling import SamplingParams

if TYPE_CHECKING:
    from lragent.engine.llm_engine import LLMEngine

logger = logging.getLogger(__name__)

PREFIX = "__warmup-"  # request ids of the synthetic workload (never returned to anyone)
SAMPLED = SamplingParams(
    max_tokens=3, temperature=0.9, top_p=0.75, top_k=40, logprobs=True, top_logprobs=2, seed=0, ignore_eos=True
)
GREEDY = SamplingParams(max_tokens=3, temperature=0.0, ignore_eos=True, seed=0)  # seeded: the engine RNG stays put


def warm_up(engine: LLMEngine) -> float:
    """Run the synthetic workload and capture every decode graph; returns the seconds it took."""
    if engine.has_unfinished():
        raise RuntimeError("warm up an idle engine")
    start = time.perf_counter()
    rng = random.Random(0)
    agents = [None, *sorted(engine.registry.adapters)[:2]]
    long_prompt = _tokens(rng, engine, _long_length(engine))
    _run(engine, [(long_prompt, SAMPLED, agents[-1]), (_tokens(rng, engine, 37), GREEDY, None)])
    # then a mini trace over the long context: the agents take turns, one request at a time, each appending new
    # tokens in each of the kernels' tile buckets (<= 16, <= 32, > 32): a turn hits the keys and base values of
    # everything before it and LR-prefills what the other agents appended since its own last turn
    trajectory = long_prompt
    for new in (6, 24, 48):
        for agent in agents:
            if len(trajectory) + new + SAMPLED.max_tokens >= engine.max_model_len:
                break  # a short context: the turns that fit
            trajectory = trajectory + _tokens(rng, engine, new)
            _run(engine, [(trajectory, SAMPLED, agent)])
    batch = min(engine.config.max_num_seqs, 8)
    _run(engine, [(_tokens(rng, engine, 19 + i), SAMPLED, agents[i % len(agents)]) for i in range(batch)])
    _warm_masks(engine)
    engine.runner.capture_graphs()
    engine.reset_prefix_cache()
    took = time.perf_counter() - start
    logger.info("warm-up: kernels compiled and %s in %.1f s", _graph_note(engine), took)
    return took


def _graph_note(engine: LLMEngine) -> str:
    runner = engine.runner
    if runner.graphs is None:
        return "no decode graphs"
    prefill = runner.prefill_graphs
    n_prefill = len(prefill.sizes) if prefill is not None and prefill.enabled else 0
    return f"{len(runner.graphs.sizes)} decode graphs and {n_prefill} prefill graphs captured"


def _long_length(engine: LLMEngine) -> int:
    """Longer than one prefill chunk (a chunk boundary, then a partial chunk), within the context length, whole
    blocks (so an append's new tokens are exactly what the next step computes)."""
    chunk, block = engine.config.max_num_batched_tokens, engine.config.block_size
    length = min(chunk + chunk // 2, engine.max_model_len - 256, 16_384)
    return max(block, length // block * block)


def _tokens(rng: random.Random, engine: LLMEngine, n: int) -> list[int]:
    vocab = engine.model_config.vocab_size
    lo = min(1000, vocab // 4)
    return [rng.randrange(lo, vocab) for _ in range(n)]


def _run(engine: LLMEngine, requests: list[tuple[list[int], SamplingParams, str | None]]) -> None:
    """Queue the requests and step until they finish; a request that fails here fails the start-up."""
    for i, (prompt, params, adapter) in enumerate(requests):
        engine.add_request(prompt, params, adapter, request_id=f"{PREFIX}{i}-{time.monotonic_ns()}")
    while engine.has_unfinished():
        for out in engine.step():
            if out.finished and out.finish_reason == "error":
                raise RuntimeError(f"warm-up request {out.request_id} failed: {out.error}")


def _warm_masks(engine: LLMEngine) -> None:
    """Structured output's device kernel (xgrammar's Triton one on CUDA) compiles on first use: use it once."""
    if engine.tokenizer is None or engine.device.type != "cuda":
        return
    try:
        from lragent.engine.structured import allocate_bitmask, apply_bitmask

        vocab = engine.model_config.vocab_size
        logits = torch.zeros(2, vocab, dtype=torch.float32, device=engine.device)
        apply_bitmask(logits, allocate_bitmask(2, vocab, engine.device), [0])
    except ImportError:  # structured output not installed: nothing to compile
        return
