"""droidspeak: FULL_SHARED outside a set of critical layers, which each agent recomputes from cached hidden states.

On a 4-layer random Llama with independent q/v adapters on every layer: every layer critical is non_shared, no layer
critical is full_shared, and a middle set matches a hand-written reference that recomputes the critical layers' keys
and values of the producer's tokens from the producer's hidden states.
"""

from __future__ import annotations

import argparse
import json
import math

import pytest
import torch
import torch.nn.functional as F
import turns
from turns import DEV, PREFIX, exact_llm, same_outputs

from lragent import LLM, SamplingParams
from lragent.bench.droidspeak_layers import layer_sensitivity, pick_layers, top_kl
from lragent.cache.sharing import (
    PAPER_CRITICAL_LAYERS,
    Keying,
    PoolKind,
    default_critical_layers,
    get_scheme,
    hidden_boundaries,
)
from lragent.config import EngineConfig
from lragent.engine_args import add_engine_args, engine_config
from lragent.lora.adapter import load_peft_adapter
from lragent.model_config import ModelConfig

BLOCK = 8
GREEDY = SamplingParams(max_tokens=5, temperature=0.0, ignore_eos=True, logprobs=True)


@pytest.fixture(scope="module")
def four_layers(tmp_path_factory) -> tuple[str, dict[str, str]]:
    """tiny_llama's shape with 4 layers, and three independent q/v adapters on every layer (B large enough that
    the agents' caches differ visibly)."""
    from conftest import write_tiny_llama

    return write_tiny_llama(tmp_path_factory.mktemp("droidspeak"), layers=4, seed=40, b_scale=0.5)


def engine(model: tuple[str, dict[str, str]], sharing: str = "droidspeak", **kw) -> LLM:
    kw.setdefault("attention_backend", "torch")
    return exact_llm(model[0], model[1], sharing, block_size=BLOCK, **kw)


def run_turns(llm: LLM):
    return turns.run_turns(llm, params=GREEDY)


same = same_outputs


# ------------------------------------------------------------------------------------------------------------
# the declaration
# ------------------------------------------------------------------------------------------------------------
def test_scheme_declares_shared_kv_hidden_states_and_own_critical_kv():
    scheme = get_scheme("droidspeak").with_critical_layers((0, 2, 3), 6)
    kinds = [(p.kind, p.keyed_by, p.per_agent) for p in scheme.pools]
    assert kinds == [
        (PoolKind.KV, Keying.TOKENS, False),
        (PoolKind.HIDDEN, Keying.TOKENS, False),
        (PoolKind.CRITICAL_KV, Keying.ADAPTER, True),
    ]
    assert scheme.critical_layers == (0, 2, 3) and scheme.splits_layers and scheme.expand_values
    assert hidden_boundaries((0, 2, 3)) == (2,)  # layer 0's input is the embedding: nothing to store
    assert hidden_boundaries((1, 2, 4)) == (1, 4)
    # no layer critical: FULL_SHARED's pools; every layer critical: no hidden state, an empty shared KV pool
    assert get_scheme("droidspeak").with_critical_layers((), 4).pools == get_scheme("full_shared").pools
    every = get_scheme("droidspeak").with_critical_layers((0, 1, 2, 3), 4)
    assert [p.kind for p in every.pools] == [PoolKind.KV, PoolKind.CRITICAL_KV]
    assert get_scheme("base_shared").with_critical_layers((0,), 4) is get_scheme("base_shared")


def test_default_critical_layers():
    llama8b = ModelConfig("llama", 128256, 4096, 14336, 32, 32, 8, 128, 1e-5, 5e5, 131072, False, False)
    assert default_critical_layers(llama8b) == PAPER_CRITICAL_LAYERS
    other = ModelConfig("llama", 1000, 192, 256, 7, 3, 3, 64, 1e-5, 1e4, 4096, True, False)
    assert default_critical_layers(other) == (0, 3, 6)


def test_bad_critical_layers_get_clear_errors(four_layers):
    with pytest.raises(ValueError, match="more than once"):
        EngineConfig(sharing="droidspeak", critical_layers=(1, 1))
    with pytest.raises(ValueError, match="out of range"):
        EngineConfig(sharing="droidspeak", critical_layers=(-1,))
    with pytest.raises(ValueError, match="comma-separated"):
        EngineConfig(sharing="droidspeak", critical_layers="0;2")
    with pytest.raises(ValueError, match=r"out of range: the model's layers are 0\.\.3"):
        engine(four_layers, critical_layers=(1, 4))
    with pytest.raises(ValueError, match="attention_backend='torch'"):
        engine(four_layers, critical_layers=(1,), attention_backend="triton")


def test_cli_critical_layers():
    parser = argparse.ArgumentParser()
    add_engine_args(parser)
    config = engine_config(parser.parse_args(["--sharing", "droidspeak", "--critical-layers", "16,0,2"]))
    assert config.sharing == "droidspeak" and config.critical_layers == (0, 2, 16)
    assert engine_config(parser.parse_args(["--critical-layers", "none"])).critical_layers == ()
    assert engine_config(parser.parse_args([])).critical_layers is None
    with pytest.raises(ValueError, match="more than once"):
        engine_config(parser.parse_args(["--critical-layers", "0,2,2"]))


# ------------------------------------------------------------------------------------------------------------
# exactness at both ends, and against a hand-written reference in between
# ------------------------------------------------------------------------------------------------------------
def test_every_layer_critical_is_non_shared_and_none_is_full_shared(four_layers):
    want_non = run_turns(engine(four_layers, "non_shared"))
    want_full = run_turns(engine(four_layers, "full_shared"))
    every = run_turns(engine(four_layers, critical_layers=(0, 1, 2, 3)))
    none = run_turns(engine(four_layers, critical_layers=()))
    assert all(same(g, w) for g, w in zip(every, want_non)), (every, want_non)
    assert all(same(g, w) for g, w in zip(none, want_full)), (none, want_full)
    assert [o.token_ids for o in want_non] != [o.token_ids for o in want_full]  # the two ends differ here


def _rope(model, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    return model.rotary(x, positions, None)


def _layer(model, adapter, i: int, h: torch.Tensor, positions: torch.Tensor, prefix_kv=None):
    """One decoder layer, by hand, over a whole sequence (causal). prefix_kv: (K, V) of the first positions, taken
    as they are (read from a cache) instead of this pass's own. Returns (output, (K, V))."""
    layer = model.model.layers[i]
    attn = layer.self_attn
    cfg = model.config

    def proj(module, x, name):
        y = module(x)
        pair = adapter.weights.get((i, name))
        return y if pair is None else y + adapter.scaling * (x @ pair[0].to(x)) @ pair[1].to(x)

    x = layer.input_layernorm(h)[0]
    t = x.shape[0]
    q = _rope(model, proj(attn.q_proj, x, "q_proj").view(t, cfg.num_heads, cfg.head_dim), positions)
    k = _rope(model, proj(attn.k_proj, x, "k_proj").view(t, cfg.num_kv_heads, cfg.head_dim), positions)
    v = proj(attn.v_proj, x, "v_proj").view(t, cfg.num_kv_heads, cfg.head_dim)
    if prefix_kv is not None:
        m = prefix_kv[0].shape[0]
        k, v = torch.cat([prefix_kv[0], k[m:]]), torch.cat([prefix_kv[1], v[m:]])
    group = cfg.num_heads // cfg.num_kv_heads
    kk, vv = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
    scores = torch.einsum("qhd,khd->hqk", q, kk) / math.sqrt(cfg.head_dim)
    scores = scores.masked_fill(~torch.ones(t, t, dtype=torch.bool, device=h.device).tril(), float("-inf"))
    out = torch.einsum("hqk,khd->qhd", scores.softmax(-1), vv).reshape(t, -1)
    h = h + attn.o_proj(out)
    x = layer.post_attention_layernorm(h)[0]
    mlp = layer.mlp
    return h + mlp.down_proj(F.silu(mlp.gate_proj(x)) * mlp.up_proj(x)), (k, v)


def _forward(model, adapter, tokens: list[int], prefix=None, start: int = 0, stop: int | None = None):
    """Layers start..stop-1 by hand; returns (final hidden state, every layer's input hidden state, K/V per layer).
    prefix: {layer: (K, V)} of the first positions read from a cache."""
    dev = model.model.embed_tokens.weight.device
    positions = torch.arange(len(tokens), device=dev)
    h = model.model.embed_tokens(torch.tensor(tokens, device=dev))
    inputs, kv = {}, {}
    for i in range(start, len(model.model.layers) if stop is None else stop):
        inputs[i] = h
        h, kv[i] = _layer(model, adapter, i, h, positions, None if prefix is None else prefix[i])
    return h, inputs, kv


@torch.inference_mode()
def _reference(llm: LLM, four_layers, critical: tuple[int, ...], producer_tokens, reader_prompt, m: int, steps: int):
    """The reader's greedy tokens and log-probs when the first m positions come from the producer's cache: layers
    outside `critical` read the producer's K/V; each run of critical layers is rerun by the reader over those m
    positions, from the producer's hidden state entering the run (the embedding for a run starting at layer 0)."""
    model, cfg = llm.engine.model, llm.engine.model_config
    producer = load_peft_adapter("plan", four_layers[1]["plan"], cfg)
    reader = load_peft_adapter("action", four_layers[1]["action"], cfg)
    _, hidden, kv = _forward(model, producer, producer_tokens[:m])
    prefix = {i: kv[i] for i in range(cfg.num_layers) if i not in critical}
    positions = torch.arange(m, device=model.model.embed_tokens.weight.device)
    h = hidden[0]
    for i in sorted(critical):
        if i - 1 not in critical:  # a run starts: from the producer's hidden state entering it
            h = hidden[i]
        h, prefix[i] = _layer(model, reader, i, h, positions)
    tokens, logprobs = list(reader_prompt), []
    for _ in range(steps):
        final, _, _ = _forward(model, reader, tokens, prefix)
        logp = torch.log_softmax(model.logits(model.model.norm(final[-1:])[0]), -1)[0]
        tokens.append(int(logp.argmax()))
        logprobs.append(float(logp.max()))
    return tokens[len(reader_prompt) :], logprobs


@pytest.mark.parametrize("critical", [(1, 2), (0, 2, 3)])
def test_middle_set_matches_hand_written_recomputation(four_layers, critical):
    llm = engine(four_layers, critical_layers=critical)
    params = SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True, logprobs=True)
    llm.generate([PREFIX], adapter="plan", sampling_params=SamplingParams(max_tokens=1, ignore_eos=True))
    prompt = PREFIX + [500 + i for i in range(20)]
    out = llm.generate([prompt], adapter="action", sampling_params=params)[0]
    m = len(PREFIX) // BLOCK * BLOCK  # the producer's full blocks: what the reader finds in the cache
    assert out.metrics.base_reused_tokens == m and out.metrics.reused_tokens == 0
    tokens, logprobs = _reference(llm, four_layers, critical, PREFIX, prompt, m, 4)
    assert out.token_ids == tokens
    assert all(math.isclose(a, b, abs_tol=1e-4) for a, b in zip(out.logprobs, logprobs)), (out.logprobs, logprobs)
    # and the recomputation matters: reading the producer's critical entries as they are (full_shared) differs
    full = engine(four_layers, "full_shared")
    full.generate([PREFIX], adapter="plan", sampling_params=SamplingParams(max_tokens=1, ignore_eos=True))
    other = full.generate([prompt], adapter="action", sampling_params=params)[0]
    assert not all(math.isclose(a, b, abs_tol=1e-4) for a, b in zip(other.logprobs, logprobs))


def test_agents_reuse_shared_layers_and_keep_their_own_critical_ones(four_layers):
    llm = engine(four_layers, critical_layers=(1, 2))
    outs = run_turns(llm)
    for i, out in enumerate(outs):
        m = out.metrics
        assert m.reused_tokens == 0  # each agent's first turn: no critical entries of its own yet
        assert m.computed_tokens == m.prompt_tokens  # (recomputation of the critical layers counts as computed)
        if i > 0:  # the shared layers' entries (and hidden states) of everything before come from the cache
            assert m.base_reused_tokens > outs[i - 1].metrics.prompt_tokens - BLOCK
    # plan's second turn finds its own critical entries too
    traj = PREFIX + outs[0].token_ids + [100] * 5
    again = llm.generate([traj + [7, 8, 9]], adapter="plan", sampling_params=GREEDY)[0]
    assert again.metrics.reused_tokens >= len(PREFIX) - BLOCK


def test_cache_stats_report_hidden_state_memory(four_layers):
    llm = engine(four_layers, critical_layers=(1, 2))
    run_turns(llm)
    stats = llm.cache_stats()
    cfg = llm.engine.model_config
    pools = stats["pools"]
    assert stats["sharing"] == "droidspeak" and stats["critical_layers"] == [1, 2]
    hidden, key, critical = pools["hidden"], pools["key"], pools["critical_key"]
    assert hidden["bytes_used"] > 0 and critical["bytes_used"] > 0
    held = hidden["blocks_in_use"] + hidden["blocks_cached"]
    assert hidden["bytes_used"] == held * BLOCK * cfg.hidden_size * 1 * 4  # one boundary (layer 1), float32
    held = key["blocks_in_use"] + key["blocks_cached"]
    assert key["bytes_used"] == held * BLOCK * cfg.kv_size * 2 * 4  # the 2 shared layers' keys
    assert stats["bytes_used"] == sum(p["bytes_used"] for p in pools.values())
    # three agents over one trajectory: more than full_shared (critical layers per agent + hidden states)
    full = engine(four_layers, "full_shared")
    run_turns(full)
    assert stats["bytes_used"] > full.cache_stats()["bytes_used"]


# ------------------------------------------------------------------------------------------------------------
# the profiling command
# ------------------------------------------------------------------------------------------------------------
def test_top_kl_and_pick():
    p = {1: math.log(0.7), 2: math.log(0.2), 3: math.log(0.1)}
    assert top_kl(p, p) == pytest.approx(0.0, abs=1e-12)
    assert top_kl(p, {1: math.log(0.2), 2: math.log(0.7), 3: math.log(0.1)}) > 0.1
    assert pick_layers([0.1, 0.5, 0.5, 0.2], 2) == (1, 2) and pick_layers([0.3, 0.1, 0.2], 2) == (0, 2)
    with pytest.raises(ValueError):
        pick_layers([0.1], 2)


def test_profiling_picks_a_set_of_the_asked_size(tiny_llama, capsys):
    from lragent.bench.droidspeak_layers import main

    model, adapters = tiny_llama
    kw = dict(device=DEV, dtype="float32", kv_cache_bytes=64 << 20, warmup=False, attention_backend="torch")
    scores = layer_sensitivity(model, adapters, num_prompts=1, prompt_len=40, block_size=8, **kw)
    assert len(scores) == 2 and all(s >= 0 and math.isfinite(s) for s in scores)
    argv = ["--model", model, "--device", DEV, "--dtype", "float32", "--kv-cache-bytes", "64M", "--no-warmup"]
    argv += ["--attention-backend", "torch", "--block-size", "8", "--prompts", "1", "--prompt-len", "40"]
    for name in ("plan", "action"):
        argv += ["--adapter", f"{name}={adapters[name]}"]
    assert main([*argv, "--num-critical", "1"]) == 0
    last = capsys.readouterr().out.strip().splitlines()[-1]
    chosen = json.loads(last)["critical_layers"]  # the parseable summary line
    assert len(chosen) == 1 and 0 <= chosen[0] < 2
