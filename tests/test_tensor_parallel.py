"""Tensor parallelism on the CPU over gloo: TP=2 gives TP=1's greedy tokens under every sharing scheme.

A 4-kv-head random Llama (the shared tiny_llama's 3 kv heads do not split in two) with GQA (8 query heads), and
mixed adapters: q/v, q/v/o + MLP, q/v + down_proj, so column- and row-parallel LoRA both run. The workload is the
multi-agent one the schemes exist for: a batch of agents on one shared prefix, then agents taking turns on a
growing trajectory. Each TP=2 engine starts one worker process (a few seconds on a 2-core runner).
"""

from __future__ import annotations

import pytest
import torch

from lragent import LLM, SamplingParams
from lragent.bench.adapters import write_peft_adapter, write_random_llama
from lragent.cache.sharing import SCHEME_NAMES
from lragent.distributed.tensor_parallel import Shard, check_divisible
from lragent.lora.adapter import LoRAAdapter

GREEDY = SamplingParams(max_tokens=5, temperature=0.0, ignore_eos=True)
TARGETS = {
    "plan": ("q_proj", "v_proj"),
    "action": ("q_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
    "reflect": ("q_proj", "v_proj", "down_proj"),
}


@pytest.fixture(scope="module")
def tp_model(tmp_path_factory) -> tuple[str, dict[str, str], dict[str, str]]:
    """(model folder, independent adapters, adapters sharing their v_proj A)."""
    root = tmp_path_factory.mktemp("tp_llama")
    config = write_random_llama(
        root / "model",
        vocab_size=512,
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=8,
        num_key_value_heads=4,
        head_dim=16,
        max_position_embeddings=1024,
        tie_word_embeddings=False,
    )
    shared: dict[int, torch.Tensor] = {}
    independent, shared_a = {}, {}
    for i, (role, targets) in enumerate(TARGETS.items()):
        independent[role] = str(write_peft_adapter(root / role, config, targets, rank=4, seed=40 + i, b_scale=0.2))
        shared_a[role] = str(
            write_peft_adapter(
                root / f"{role}-a", config, targets, rank=4, seed=50 + i, b_scale=0.2, shared_value_a=shared
            )
        )
    return str(root / "model"), independent, shared_a


def workload(llm: LLM, adapters: dict[str, str]) -> list[tuple[list[int], list[float]]]:
    """A batch of agents (and the base model) on one shared prefix, three turns on a growing trajectory, then an
    adapter unloaded and loaded again under another name (runtime loads are forwarded to every rank too)."""
    prefix = [(37 * i) % 500 + 3 for i in range(40)]
    batch = llm.generate([prefix + [7], prefix + [8], prefix + [9]], GREEDY, adapter=["plan", "action", None])
    outs = list(batch)
    traj = prefix + batch[0].token_ids
    for role in ("action", "reflect", "plan"):
        out = llm.generate([traj], GREEDY, adapter=role)[0]
        outs.append(out)
        traj = traj + out.token_ids + [11, 12, 13]
    llm.unload_adapter("reflect")
    llm.load_adapter("reflect-again", adapters["reflect"])
    outs.append(llm.generate([traj], GREEDY, adapter="reflect-again")[0])
    return [(o.token_ids, o.logprobs) for o in outs]


@pytest.mark.parametrize("scheme", SCHEME_NAMES)
def test_tp2_matches_tp1(tp_model, scheme):
    model, independent, shared_a = tp_model
    adapters = shared_a if scheme == "base_lr_shared" else independent
    kwargs = dict(model=model, adapters=adapters, sharing=scheme, block_size=4, kv_cache_bytes=16 << 20)
    with LLM(**kwargs) as llm:
        want = workload(llm, adapters)
    llm = LLM(**kwargs, tensor_parallel_size=2)
    workers = llm.engine.workers
    assert workers is not None and len(workers.processes) == 1
    assert llm.engine.model_config.num_kv_heads == 2 and llm.engine.base_config.num_kv_heads == 4
    try:
        got = workload(llm, adapters)
    finally:
        llm.close()
    for (want_ids, want_lp), (got_ids, got_lp) in zip(want, got):
        assert got_ids == want_ids, (scheme, want, got)
        assert max(abs(a - b) for a, b in zip(want_lp, got_lp)) < 1e-4, (scheme, want_lp, got_lp)
    # closing the LLM stopped its worker: no stray process
    assert all(proc.poll() is not None for proc in workers.processes)


def test_size_must_divide_kv_heads(tp_model, tiny_llama):
    model, _ = tiny_llama  # 3 kv heads
    with pytest.raises(ValueError, match="tensor_parallel_size=2 must divide the model's key/value heads"):
        LLM(model=model, tensor_parallel_size=2)
    with pytest.raises(ValueError, match="tensor_parallel_size must be positive"):
        LLM(model=model, tensor_parallel_size=0)


def test_adapter_split():
    """Column-parallel targets keep A whole and split B; row-parallel ones split A and keep B."""
    a, b = torch.randn(16, 4), torch.randn(4, 32)
    adapter = LoRAAdapter("x", 4, 2.0, frozenset({"q_proj", "o_proj"}), {(0, "q_proj"): (a, b), (0, "o_proj"): (a, b)})
    part = Shard(1, 2).adapter(adapter)
    qa, qb = part.weights[(0, "q_proj")]
    oa, ob = part.weights[(0, "o_proj")]
    assert torch.equal(qa, a) and torch.equal(qb, b[:, 16:])
    assert torch.equal(oa, a[8:]) and torch.equal(ob, b)


def test_dummy_70b_preset_splits_over_4_and_8():
    from lragent.distributed.tensor_parallel import read_model_config

    config = read_model_config("dummy:llama-3.1-70b")
    assert (config.num_layers, config.hidden_size, config.num_kv_heads) == (80, 8192, 8)
    for size in (2, 4, 8):
        check_divisible(config, size)
        local = Shard(0, size).config(config)
        assert local.num_kv_heads == 8 // size and local.intermediate_size * size == 28672


def test_dummy_weights_are_slices_of_the_tp1_draw(monkeypatch):
    """A dummy model's rank holds the slices of the weights TP=1 draws, so dummy runs agree across sizes."""
    from lragent.distributed.tensor_parallel import load_model_shard, param_split_dim
    from lragent.models import presets
    from lragent.models.loader import load_model

    tiny = dict(presets.PRESETS["smollm2-135m"], num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2)
    tiny.update(hidden_size=64, intermediate_size=96, head_dim=16, vocab_size=128, max_position_embeddings=64)
    monkeypatch.setitem(presets.PRESETS, "tiny-tp", tiny)
    cpu = torch.device("cpu")
    whole = dict(load_model("dummy:tiny-tp", torch.float32, cpu).model.named_parameters())
    part = load_model_shard("dummy:tiny-tp", torch.float32, cpu, None, Shard(1, 2))
    assert part.config.num_kv_heads == 2 and part.model.config.num_kv_heads == 1
    for name, param in part.model.named_parameters():
        dim = param_split_dim(name)
        assert torch.equal(param, whole[name] if dim is None else Shard(1, 2).split(whole[name], dim)), name
