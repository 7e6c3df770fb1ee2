"""The start-up warm-up: it runs the engine's real paths (chunked prefill, a prefix hit with LR prefill, greedy and
sampled decoding, a decode batch), then leaves nothing behind: no request, no cached block, no hit counted, and
later requests get exactly what an engine that never warmed up gives them. On CUDA it also captures every decode
graph size, so no request waits for a capture."""

from __future__ import annotations

import pytest
import torch

from lragent.engine.warmup import PREFIX
from lragent.llm import LLM
from lragent.sampling import SamplingParams

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
PROMPTS = [[(5 * i + 11 * j) % 900 + 20 for j in range(40 + 9 * i)] for i in range(4)]
PARAMS = [
    SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True),
    SamplingParams(max_tokens=8, temperature=0.9, top_p=0.75, top_k=40, seed=3, ignore_eos=True, logprobs=True),
    SamplingParams(max_tokens=8, temperature=1.0, seed=5, ignore_eos=True),
    SamplingParams(max_tokens=8, temperature=1.0, ignore_eos=True),  # unseeded: a seed from the engine's RNG
]


def build(tiny_llama, warmup: bool, **kw) -> LLM:
    model, roles = tiny_llama
    return LLM(
        model=model, adapters=roles, sharing="base_shared", block_size=8, device=DEVICE,
        max_num_batched_tokens=64, warmup=warmup, kv_cache_bytes=64 << 20, **kw,
    )  # fmt: skip


def run(llm: LLM) -> list[tuple[list[int], list[float]]]:
    outs = []
    for adapter in ("plan", "action"):
        for out in llm.generate(PROMPTS, PARAMS, adapter=adapter):
            outs.append((out.token_ids, out.logprobs))
    return outs


def test_warm_engine_is_clean_and_answers_like_a_cold_one(tiny_llama):
    cold = build(tiny_llama, warmup=False)
    want = run(cold)
    assert cold.engine.warmup_s == 0.0
    cold.close()
    warm = build(tiny_llama, warmup=True)
    engine = warm.engine
    assert engine.warmup_s > 0.0
    assert not engine.has_unfinished() and not any(k.startswith(PREFIX) for k in engine._seqs)
    for pool in engine.block_manager.pools.values():
        usage = pool.usage()
        assert usage["blocks_in_use"] == 0 and usage["blocks_cached"] == 0 and usage["hit_blocks"] == 0
    got = run(warm)
    assert [t for t, _ in got] == [t for t, _ in want]
    for (_, a), (_, b) in zip(got, want):
        assert a == pytest.approx(b, abs=1e-4)
    warm.close()


def test_warm_up_takes_the_paths_serving_takes(tiny_llama, monkeypatch):
    """Chunked prefill, a prefix hit (LR prefill), sampled and greedy rows: each shows up in the warm-up's steps."""
    from lragent.engine.model_runner import ModelRunner

    seen = {"chunked": 0, "lr_prefill": 0, "sampled": 0, "greedy": 0, "decode_batch": 0}
    real = ModelRunner.run

    def spy(self, batch):
        if batch.is_prefill and any(s.num_computed > 0 for s in batch.seqs):
            seen["chunked"] += 1
        rows = self.inputs(batch).rows
        if rows.kv_write_idx is not None:
            seen["lr_prefill"] += 1
        for s in batch.sampling_seqs:
            seen["greedy" if s.params.greedy else "sampled"] += 1
        if not batch.is_prefill and len(batch.seqs) >= 4:
            seen["decode_batch"] += 1
        return real(self, batch)

    monkeypatch.setattr(ModelRunner, "run", spy)
    llm = build(tiny_llama, warmup=True)
    assert all(seen.values()), seen
    llm.close()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_every_decode_graph_is_captured_at_start_up(tiny_llama):
    llm = build(tiny_llama, warmup=True, max_num_seqs=40)
    graphs = llm.engine.runner.graphs
    assert graphs is not None and sorted(graphs._graphs) == graphs.sizes
    llm.close()
