"""Decode steps replayed from CUDA graphs against eager steps (float32, all four schemes, mixed adapters).

The graph path pads batches to a captured size, reads static buffers and uses a fixed split-KV count, so its
greedy tokens must equal the eager path's and its log-probs agree to float32 rounding. Needs a CUDA GPU; the
size ladder is checked everywhere.
"""

from __future__ import annotations

import pytest
import torch

from lragent.bench.adapters import write_peft_adapter, write_random_llama
from lragent.engine.cuda_graph import capture_sizes
from lragent.llm import LLM
from lragent.model_config import ModelConfig
from lragent.sampling import SamplingParams

CUDA = torch.cuda.is_available()
gpu = pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
SCHEMES = ("non_shared", "full_shared", "base_shared", "base_lr_shared")


def test_capture_sizes_cover_every_batch():
    for top in (1, 3, 8, 16, 40, 256):
        sizes = capture_sizes(top)
        assert sizes[-1] == top and sizes == sorted(set(sizes))
        assert all(any(s >= b for s in sizes) for b in range(1, top + 1))


@pytest.fixture(scope="module")
def tiny_gqa(tmp_path_factory) -> tuple[str, dict[str, str]]:
    """4 layers, 8 q heads over 2 kv heads, d 64; shared-A q/v adapters plus one that also targets o_proj/MLP."""
    root = tmp_path_factory.mktemp("tiny_gqa")
    config = write_random_llama(
        root / "model",
        vocab_size=512,
        hidden_size=512,
        intermediate_size=768,
        num_hidden_layers=4,
        num_attention_heads=8,
        num_key_value_heads=2,
        head_dim=64,
        max_position_embeddings=2048,
        tie_word_embeddings=False,
    )
    shared: dict[int, torch.Tensor] = {}
    adapters = {
        role: str(write_peft_adapter(root / role, config, ("q_proj", "v_proj"), seed=40 + i, shared_value_a=shared))
        for i, role in enumerate(("plan", "action", "reflect"))
    }
    adapters["wide"] = str(
        write_peft_adapter(
            root / "wide", config, ("q_proj", "v_proj", "o_proj", "up_proj"), rank=8, seed=50, shared_value_a=shared
        )
    )
    return str(root / "model"), adapters


def _workload() -> tuple[list[list[int]], list[str | None], list[SamplingParams]]:
    """Seven requests over one shared context, of different adapters (and the base model) and lengths, so the
    decode batch shrinks through several captured sizes (7 -> 8, then 4, 2, 1)."""
    context = [(11 * i) % 500 + 3 for i in range(300)]
    prompts = [context + [100 + i] * (i + 1) for i in range(7)]
    adapters = ["plan", "action", "reflect", None, "wide", "plan", "action"]
    params = [SamplingParams(max_tokens=6 + 5 * i, temperature=0.0, ignore_eos=True, logprobs=True) for i in range(7)]
    return prompts, adapters, params


def _run(model: str, adapters: dict[str, str], scheme: str, eager: bool):
    llm = LLM(
        model=model,
        adapters=adapters,
        sharing=scheme,
        device="cuda",
        dtype="float32",
        warmup=False,  # these tests time lazy captures and compare paths, not the warm-up
        kv_cache_bytes=64 << 20,
        enforce_eager=eager,
        max_model_len=1024,
    )
    prompts, names, params = _workload()
    outs = llm.generate(prompts, adapter=names, sampling_params=params)
    return llm, outs


@gpu
@pytest.mark.parametrize("scheme", SCHEMES)
def test_graph_decode_matches_eager(tiny_gqa, scheme):
    model, adapters = tiny_gqa
    _, eager = _run(model, adapters, scheme, eager=True)
    llm, graphed = _run(model, adapters, scheme, eager=False)
    captured = sorted(llm.engine.runner.graphs._graphs)
    assert captured and set(captured) <= set(capture_sizes(256)), captured
    assert len(captured) >= 3  # the batch shrank through several sizes
    for e, g in zip(eager, graphed):
        assert g.token_ids == e.token_ids
        assert max(abs(a - b) for a, b in zip(g.logprobs, e.logprobs)) < 1e-3


@gpu
def test_adapter_load_recaptures(tiny_gqa, tmp_path):
    """A runtime-loaded adapter targeting a module no graph has seen must take effect in graph replays."""
    model, adapters = tiny_gqa
    config = ModelConfig.from_file(f"{model}/config.json")
    extra = str(write_peft_adapter(tmp_path / "mlp", config, ("q_proj", "v_proj", "down_proj"), seed=60))
    results = {}
    for eager in (True, False):
        llm = LLM(
            model=model,
            adapters={"plan": adapters["plan"]},
            sharing="base_shared",
            device="cuda",
            dtype="float32",
            warmup=False,  # these tests time lazy captures and compare paths, not the warm-up
            kv_cache_bytes=64 << 20,
            enforce_eager=eager,
            max_model_len=1024,
        )
        params = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
        before = llm.generate([[5, 6, 7, 8]] * 3, adapter="plan", sampling_params=params)
        llm.engine.load_adapter("mlp", extra)
        after = llm.generate([[5, 6, 7, 8]] * 3, adapter=["plan", "mlp", None], sampling_params=params)
        results[eager] = [o.token_ids for o in before + after]
    assert results[False] == results[True]
    assert results[False][3] != results[False][4]  # the new adapter changes the output


@gpu
def test_measured_cache_budget():
    """Without kv_cache_bytes the budget comes from a warm-up: the activation peak is measured and the pools plus
    everything else fit under gpu_memory_utilization of the card."""
    import gc

    gc.collect()
    torch.cuda.empty_cache()
    llm = LLM(
        model="dummy:smollm2-135m",
        sharing="base_lr_shared",
        device="cuda",
        gpu_memory_utilization=0.3,
        warmup=False,
        max_model_len=4096,
        max_num_batched_tokens=4096,
    )
    engine = llm.engine
    assert engine.activation_peak_bytes > 0
    _, total = torch.cuda.mem_get_info()
    assert 0 < engine.cache_stats()["bytes_allocated"] <= 0.3 * total
    out = llm.generate([[1, 2, 3] * 100], sampling_params=SamplingParams(max_tokens=8, ignore_eos=True))
    assert len(out[0].token_ids) == 8


def test_static_inputs_follow_growing_and_replaced_block_tables():
    """The graph inputs are refilled incrementally (only new block-table entries are written); a sequence whose block
    lists were replaced (preempted and re-admitted), a padding row and a new occupant must all be rewritten whole.
    Runs on the CPU: only the filling is exercised, no capture."""
    from types import SimpleNamespace

    from lragent.cache.kv_cache import CacheLayout, KVCache
    from lragent.cache.sharing import get_scheme
    from lragent.engine.cuda_graph import DecodeGraphs
    from lragent.engine.model_runner import ModelRunner
    from lragent.engine.scheduler import ScheduledBatch
    from lragent.engine.sequence import Sequence
    from lragent.kernels.triton_backend import TritonBackend
    from lragent.model_config import ModelConfig
    from lragent.models.presets import preset
    from lragent.sampling import SamplingParams

    config = ModelConfig.from_dict(preset("smollm2-135m"))
    cache = KVCache(config, CacheLayout(4, {"kv": 64, "lr": 64}, 8), torch.float32, torch.device("cpu"))
    model = SimpleNamespace(config=config)
    runner = ModelRunner(model, cache, get_scheme("base_shared"), TritonBackend(), None, torch.device("cpu"))
    graphs = DecodeGraphs(runner, max_batch=8, max_model_len=128)

    class Seq(Sequence):
        def __init__(self, blocks, lr, pos, slot):
            super().__init__("r", list(range(100, 100 + pos + 1)), SamplingParams(), "a", slot)
            self.base_blocks, self.lr_blocks, self.num_computed = blocks, lr, pos

    def seq(blocks, lr, pos, slot):
        return Seq(blocks, lr, pos, slot)

    def check(seqs, size):
        graphs.fill(runner.inputs(ScheduledBatch(seqs, [1] * len(seqs), False)), size)
        attn = graphs.attn
        for i, s in enumerate(seqs):
            nb = s.num_computed // 4 + 1
            assert attn.tables[0, i, :nb].tolist() == s.base_blocks[:nb]
            assert attn.tables[1, i, :nb].tolist() == s.lr_blocks[:nb]
            pos = s.num_computed
            assert graphs.tokens[:, i].tolist() == [s.token_ids[pos], pos]
            assert attn.i64[:, i].tolist() == [
                s.base_blocks[pos // 4] * 4 + pos % 4,
                s.lr_blocks[pos // 4] * 4 + pos % 4,
                s.lora_slot,
            ]
            assert attn.i32[:, i].tolist() == [pos + 1, s.lora_slot]
        for i in range(len(seqs), size):  # padding: no store, one readable key, no adapter
            assert attn.i64[0:2, i].tolist() == [-1, -1] and attn.i32[:, i].tolist() == [1, 0]
            assert attn.tables[0, i, 0] == 0

    a = seq([5, 9, 2], [7, 1, 3], 10, 1)
    b = seq([11], [12], 2, 2)
    check([a, b], 2)
    a.base_blocks += [30]  # grows in place, as the block manager appends
    a.lr_blocks += [31]
    a.num_computed, a.token_ids = 12, a.token_ids + [7, 8]
    check([a, b], 2)
    b.base_blocks, b.lr_blocks = [40, 41], [42, 43]  # released and re-allocated: new lists
    b.num_computed, b.token_ids = 5, b.token_ids + [1, 2, 3]
    check([a, b], 2)
    check([a], 2)  # b finished: row 1 pads
    c = seq([50, 51, 52, 53], [54, 55, 56, 57], 13, 3)
    check([a, c, b], 4)  # a new occupant in row 1, b moved to row 2
