"""stacked_lr: BaseLRShared's compute with independent adapters (issue 16).

Whoever computes a token stores X [A_1 | ... | A_N] (every loaded adapter's v_proj A at once); agent j reads its own
slice X A_j. Exactness against non_shared needs agents whose hidden states agree below the adapted layer, so the
engine tests use adapters on the last layer of the 2-layer `tiny_llama` only: there every sharing scheme that reads
the right entries is exact, and one that reads another agent's LR entries (base_lr_shared without shared A) is not.
"""

from __future__ import annotations

import argparse
import os
import random
from types import SimpleNamespace

import pytest
import torch
import turns

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # must precede the first @triton.jit of the kernel modules

from turns import GREEDY, PREFIX, ROLES, exact_llm, run_turns, same_outputs  # noqa: E402

from lragent import LLM, SamplingParams  # noqa: E402
from lragent.bench.adapters import write_peft_adapter  # noqa: E402
from lragent.cache.sharing import SCHEME_NAMES, Keying, PoolKind, get_scheme  # noqa: E402
from lragent.config import EngineConfig  # noqa: E402
from lragent.engine_args import add_engine_args, engine_config  # noqa: E402
from lragent.kernels.metadata import AttentionMetadata  # noqa: E402
from lragent.kernels.reference import TorchReferenceBackend  # noqa: E402
from lragent.kernels.triton_attention import paged_decode, paged_prefill  # noqa: E402
from lragent.kernels.triton_lora import TritonLoRABank  # noqa: E402
from lragent.lora.adapter import AdapterError, LoRAAdapter  # noqa: E402
from lragent.lora.bank import LoRABank  # noqa: E402
from lragent.lora.metadata import group_by_slot  # noqa: E402
from lragent.lora.registry import AdapterRegistry  # noqa: E402
from lragent.model_config import ModelConfig  # noqa: E402

DEV = torch.device(turns.DEV)


@pytest.fixture(scope="module")
def last_layer(tiny_llama, tmp_path_factory) -> dict[str, str]:
    """Independent q/v adapters (different A and B) on the last layer only, plus `other` and `k_adapter`."""
    model, _ = tiny_llama
    config = ModelConfig.from_file(f"{model}/config.json")
    root = tmp_path_factory.mktemp("stacked")
    top = (config.num_layers - 1,)
    out = {
        name: str(write_peft_adapter(root / name, config, seed=60 + i, b_scale=0.5, layers=top))
        for i, name in enumerate((*ROLES, "other"))
    }
    out["k_adapter"] = str(write_peft_adapter(root / "k", config, ("q_proj", "k_proj", "v_proj"), seed=70))
    return out


def engine(tiny_llama, adapters: dict[str, str], sharing: str = "stacked_lr", **kw) -> LLM:
    return exact_llm(tiny_llama[0], adapters, sharing, **kw)


# ------------------------------------------------------------------------------------------------------------
# the declaration, the keys, the CLI
# ------------------------------------------------------------------------------------------------------------
def test_scheme_declares_a_stacked_lr_pool_keyed_by_the_stack():
    scheme = get_scheme("stacked_lr")
    assert "stacked_lr" in SCHEME_NAMES
    kv, lr = scheme.spec(PoolKind.KV), scheme.spec(PoolKind.LR)
    assert kv is not None and kv.keyed_by is Keying.TOKENS
    assert lr is not None and lr.keyed_by is Keying.VALUE_A_STACK and lr.stacked and not lr.per_agent
    assert scheme.stacks_lr and not scheme.requires_shared_a and not scheme.allows_key_adapter
    assert scheme.lr_width(8, 5) == 40 and get_scheme("base_lr_shared").lr_width(8, 5) == 16  # [X A_v | X A_k]
    spaces = scheme.namespaces("lora:c", "A:a", "tenant", stack_key="stack:s")
    assert spaces == {"kv": "salt:tenant|", "lr": "salt:tenant|stack:s"}  # the adapter's own keys play no part


def _adapter(name: str, seed: int, layers: int = 2, d: int = 12, rank: int = 2) -> LoRAAdapter:
    gen = torch.Generator().manual_seed(seed)
    weights = {
        (layer, "v_proj"): (torch.randn(d, rank, generator=gen), torch.randn(rank, 6, generator=gen))
        for layer in range(layers)
    }
    return LoRAAdapter(name, rank, 2.0, frozenset({"v_proj"}), weights)


def test_stack_key_follows_every_slot_a():
    reg = AdapterRegistry(get_scheme("stacked_lr"), num_layers=2, max_loras=3)
    keys = [reg.stack_key]
    reg.add(_adapter("plan", 1))
    keys.append(reg.stack_key)
    reg.add(_adapter("action", 2))
    keys.append(reg.stack_key)
    assert len(set(keys)) == 3  # every load changes the key
    reg.remove("action")
    assert reg.stack_key == keys[1]  # the same adapters in the same slots: the same key (their cache is valid)
    reg.add(_adapter("action", 3))  # same name and slot, another A
    assert reg.stack_key not in keys
    reg.remove("action")
    reg.remove("plan")
    assert reg.stack_key == keys[0]
    reg.add(_adapter("action", 2))  # in slot 1 now: its A sits in other columns
    reg.add(_adapter("plan", 1))
    assert reg.stack_key != keys[2]
    # only the v_proj A counts: another B keeps the key (a stacked row is X A)
    reg.add(_adapter("critic", 4))
    with_b = reg.stack_key
    reg.remove("critic")
    other_b = _adapter("critic", 4)
    other_b.weights = {k: (a, b + 1) for k, (a, b) in other_b.weights.items()}
    reg.add(other_b)
    assert reg.stack_key == with_b


def test_cli_and_config_accept_stacked_lr():
    parser = argparse.ArgumentParser()
    add_engine_args(parser)
    config = engine_config(parser.parse_args(["--sharing", "stacked_lr"]))
    assert config.sharing == "stacked_lr" and EngineConfig(sharing="stacked_lr").sharing == "stacked_lr"


# ------------------------------------------------------------------------------------------------------------
# the stacked projection at store time
# ------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("bank_class", [LoRABank, TritonLoRABank])
def test_bank_projects_through_every_slot_at_once(bank_class, tiny_llama):
    model_config = ModelConfig.from_file(f"{tiny_llama[0]}/config.json")
    gen = torch.Generator().manual_seed(3)
    d = model_config.hidden_size
    bank = bank_class(model_config, 3, 4, torch.float32, DEV, stack_values=True)
    plain = LoRABank(model_config, 3, 4, torch.float32, DEV)
    adapters = {
        slot: LoRAAdapter(
            f"a{slot}",
            rank,
            2.0,
            frozenset({"v_proj"}),
            {
                (0, "v_proj"): (
                    torch.randn(d, rank, generator=gen),
                    torch.randn(rank, model_config.kv_size, generator=gen),
                )
            },
        )  # fmt: skip
        for slot, rank in ((1, 4), (3, 2))  # slot 2 empty, slot 3 of a lower rank (zero-padded)
    }
    for slot, adapter in adapters.items():
        bank.load(slot, adapter)
        plain.load(slot, adapter)
    x = torch.randn(5, d, generator=gen).to(DEV)
    slots = [0, 1, 3, 3, 2]
    stacked = bank.value_shrink(x, 0, group_by_slot(slots, x.device))
    assert stacked.shape == (5, 12) and bank.value_width == 12
    for slot in (1, 2, 3):  # every token's row holds every slot's projection, whatever the token's own adapter
        own = plain.value_shrink(x, 0, group_by_slot([slot] * 5, x.device))
        torch.testing.assert_close(stacked[:, (slot - 1) * 4 : slot * 4], own)
    bank.unload(1)
    assert bank.value_shrink(x, 0, [])[:, :4].abs().max() == 0
    assert bank.value_shrink(x, 1, []).shape == (5, 12)  # a layer no adapter targets: zeros of the full width


# ------------------------------------------------------------------------------------------------------------
# the kernel: each sequence reads its own slice of the wide LR rows, in place
# ------------------------------------------------------------------------------------------------------------
def stacked_case(seqs, hq, hkv, d, rank, num_slots, block_size, seed):
    """seqs: (cached prefix, new tokens, adapter slot). Every LR row is num_slots - 1 slices of `rank`; only the
    owning sequence's slice of its rows is finite (a read of another slot's columns or of foreign rows gives NaN)."""
    gen = torch.Generator().manual_seed(seed)
    rng = random.Random(seed)
    width = rank * (num_slots - 1)
    ctx = [p + q for p, q, _ in seqs]
    nblocks = [-(-c // block_size) for c in ctx]
    total = sum(nblocks) + 2
    base_ids, lr_ids = list(range(total)), list(range(total))
    rng.shuffle(base_ids)
    rng.shuffle(lr_ids)
    key = torch.randn(total, block_size, hkv, d, generator=gen, dtype=torch.float64)
    value = torch.randn(total, block_size, hkv, d, generator=gen, dtype=torch.float64)
    wide = torch.full((total, block_size, width), float("nan"), dtype=torch.float64)
    narrow = torch.full((total, block_size, rank), float("nan"), dtype=torch.float64)  # each sequence's slice, copied
    tables, lr_tables, used = [], [], 0
    for (_, _, slot), c, nb in zip(seqs, ctx, nblocks):
        bt, lbt = base_ids[used : used + nb], lr_ids[used : used + nb]
        used += nb
        pos = torch.arange(c)
        rows = torch.tensor(lbt)[pos // block_size], pos % block_size
        if slot:
            own = torch.randn(c, rank, generator=gen, dtype=torch.float64)
            wide[rows[0], rows[1], (slot - 1) * rank : slot * rank] = own
            narrow[rows] = own
        tables.append(bt + [-1] * (max(nblocks) - nb))
        lr_tables.append(lbt + [-1] * (max(nblocks) - nb))
    q_lens = [q for _, q, _ in seqs]
    starts = [0]
    for q in q_lens:
        starts.append(starts[-1] + q)
    meta = AttentionMetadata(
        query_lens=q_lens,
        context_lens=ctx,
        query_start=torch.tensor(starts, dtype=torch.int32),
        context_lens_t=torch.tensor(ctx, dtype=torch.int32),
        base_block_tables=torch.tensor(tables, dtype=torch.int32),
        lr_block_tables=torch.tensor(lr_tables, dtype=torch.int32),
        seq_lora_slots=torch.tensor([s for _, _, s in seqs], dtype=torch.int64),
        base_write_idx=None,
        base_slots=torch.zeros(0, dtype=torch.int64),
        lr_slots=None,
        is_decode=False,  # the per-sequence reference reads each sequence's positions only (no NaN padding)
    )
    value_up = torch.randn(num_slots, rank, hkv * d, generator=gen, dtype=torch.float64) / rank**0.5
    value_up[0] = 0
    scaling = torch.rand(num_slots, generator=gen, dtype=torch.float64) + 0.5
    scaling[0] = 0
    query = torch.randn(sum(q_lens), hq, d, generator=gen, dtype=torch.float64)

    def cache(lr):
        return SimpleNamespace(
            key=[key], value=[value], lr=[lr], block_size=block_size, num_kv_heads=hkv, head_dim=d, lr_rank=lr.shape[-1]
        )

    ref = TorchReferenceBackend().attend(cache(wide), 0, query, value_up, scaling, meta)
    unstacked = TorchReferenceBackend().attend(cache(narrow), 0, query, value_up, scaling, meta)
    return SimpleNamespace(
        meta=meta, key=key, value=value, wide=wide, value_up=value_up, scaling=scaling, query=query, ref=ref,
        unstacked=unstacked,
    )  # fmt: skip


def _f32(t: torch.Tensor) -> torch.Tensor:
    return t.to(DEV, torch.float32)


def _dev(t: torch.Tensor) -> torch.Tensor:
    return t.to(DEV)


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    out = out.cpu()
    assert not torch.isnan(out).any(), "NaN: a read outside the sequence's own slice or rows"
    return ((out.double() - ref).norm() / ref.norm()).item()


# (seqs, hq, hkv, d, rank, slots incl. 0, block size)
STACKED_PREFILL = [
    ([(0, 5, 1), (13, 7, 3), (16, 16, 0), (3, 1, 2)], 4, 2, 16, 8, 4, 4),  # three slices of 8, slot 0 reads none
    ([(7, 20, 2), (0, 3, 1)], 2, 2, 16, 3, 3, 8),  # rank 3 (padded inside), two slices
    ([(21, 9, 5)], 4, 1, 16, 4, 6, 4),  # the last of five slices
]


@pytest.mark.parametrize("case_id", range(len(STACKED_PREFILL)))
@pytest.mark.parametrize("splits", [1, 3])
def test_prefill_kernel_reads_each_sequence_slice(case_id, splits):
    seqs, hq, hkv, d, rank, slots, bs = STACKED_PREFILL[case_id]
    c = stacked_case(seqs, hq, hkv, d, rank, slots, bs, seed=case_id)
    torch.testing.assert_close(c.ref, c.unstacked)  # the reference's slice == the slice copied out
    m = c.meta
    out = paged_prefill(
        _f32(c.query), _f32(c.key), _f32(c.value), _f32(c.wide), _dev(m.base_block_tables), _dev(m.lr_block_tables),
        _dev(m.query_start), _dev(m.context_lens_t), _dev(m.seq_lora_slots), _f32(c.value_up), _f32(c.scaling),
        max(m.query_lens),
        num_splits=splits,
    )  # fmt: skip
    assert rel_err(out, c.ref) < 2e-5


@pytest.mark.parametrize("splits", [1, 2])
def test_decode_kernel_reads_each_sequence_slice(splits):
    seqs = [(0, 1, 1), (30, 1, 3), (16, 1, 0), (41, 1, 2)]
    c = stacked_case(seqs, 8, 2, 16, 8, 4, 4, seed=7)
    torch.testing.assert_close(c.ref, c.unstacked)
    m = c.meta
    out = paged_decode(
        _f32(c.query), _f32(c.key), _f32(c.value), _f32(c.wide), _dev(m.base_block_tables), _dev(m.lr_block_tables),
        _dev(m.context_lens_t), _dev(m.seq_lora_slots), _f32(c.value_up), _f32(c.scaling), num_splits=splits,
    )  # fmt: skip
    assert rel_err(out, c.ref) < 2e-5


def test_batched_reference_decode_reads_each_sequence_slice():
    """The reference's batched decode path (padding masked) against its per-sequence loop, on finite rows."""
    c = stacked_case([(9, 1, 2), (30, 1, 1), (4, 1, 0)], 4, 2, 16, 4, 3, 4, seed=9)
    wide = torch.nan_to_num(c.wide, nan=0.5)  # finite everywhere: the padded positions are masked, not zero
    cache = SimpleNamespace(
        key=[c.key], value=[c.value], lr=[wide], block_size=4, num_kv_heads=2, head_dim=16, lr_rank=8
    )
    loop = TorchReferenceBackend().attend(cache, 0, c.query, c.value_up, c.scaling, c.meta)
    c.meta.is_decode = True
    batched = TorchReferenceBackend().attend(cache, 0, c.query, c.value_up, c.scaling, c.meta)
    torch.testing.assert_close(batched, loop)


def test_lr_rows_of_an_unknown_width_are_refused():
    c = stacked_case([(4, 2, 1)], 2, 1, 16, 4, 3, 4, seed=1)
    m = c.meta
    with pytest.raises(ValueError, match="width"):
        paged_prefill(
            _f32(c.query), _f32(c.key), _f32(c.value), _f32(c.wide[..., :6]), m.base_block_tables, m.lr_block_tables,
            m.query_start, m.context_lens_t, m.seq_lora_slots, _f32(c.value_up), _f32(c.scaling), max(m.query_lens),
        )  # fmt: skip


# ------------------------------------------------------------------------------------------------------------
# the engine: exact against non_shared with independent adapters, no recomputation of other agents' tokens
# ------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_stacked_lr_equals_non_shared_with_independent_adapters(tiny_llama, last_layer, backend):
    roles = {r: last_layer[r] for r in ROLES}
    want = run_turns(engine(tiny_llama, roles, "non_shared"))
    got = run_turns(engine(tiny_llama, roles, "stacked_lr", attention_backend=backend))
    assert all(same_outputs(g, w) for g, w in zip(got, want)), [(g.token_ids, w.token_ids) for g, w in zip(got, want)]
    for i, out in enumerate(got[1:], start=1):  # BaseLRShared's compute: the others' tokens are never recomputed
        new = out.metrics.prompt_tokens - got[i - 1].metrics.prompt_tokens
        assert out.metrics.computed_tokens < new + 8, (i, out.metrics)
    if backend == "torch":  # the control: base_lr_shared reads the producer's X A_i with its own B_j
        forced = run_turns(engine(tiny_llama, roles, "base_lr_shared", allow_unshared_a=True))
        assert same_outputs(forced[0], want[0]) and not any(same_outputs(f, w) for f, w in zip(forced[1:], want[1:]))


def test_key_adapters_are_refused(tiny_llama, last_layer):
    with pytest.raises(AdapterError, match="k_proj"):
        engine(tiny_llama, {"k": last_layer["k_adapter"]})


def test_loading_an_adapter_after_tokens_were_cached(tiny_llama, last_layer):
    """The newcomer LR-prefills the cached tokens (its slice was never computed); the others then read its rows."""
    llm = engine(tiny_llama, {"plan": last_layer["plan"], "action": last_layer["action"]}, max_loras=3)
    ref = engine(tiny_llama, {r: last_layer[r] for r in ROLES}, "non_shared")
    first = llm.generate([PREFIX], "plan", GREEDY)[0]
    assert same_outputs(first, ref.generate([PREFIX], "plan", GREEDY)[0])
    llm.load_adapter("reflect", last_layer["reflect"])
    late = llm.generate([PREFIX + [1, 2]], "reflect", GREEDY)[0]
    assert late.metrics.reused_tokens == 0 and late.metrics.base_reused_tokens >= 64  # keys / base values shared
    assert same_outputs(late, ref.generate([PREFIX + [1, 2]], "reflect", GREEDY)[0])
    after = llm.generate([PREFIX + [1, 2, 3]], "action", GREEDY)[0]  # reads the rows reflect stored (new stack)
    assert after.metrics.reused_tokens >= 64
    assert same_outputs(after, ref.generate([PREFIX + [1, 2, 3]], "action", GREEDY)[0])
    llm.unload_adapter("reflect")  # the first stack again: plan's first rows are valid for it
    again = llm.generate([PREFIX + [4]], "plan", GREEDY)[0]
    assert again.metrics.reused_tokens >= 64
    assert same_outputs(again, ref.generate([PREFIX + [4]], "plan", GREEDY)[0])


def test_rows_written_across_a_stack_change_are_never_published(tiny_llama, last_layer):
    """A request runs while slot 2 changes from action to other and back: its rows written meanwhile hold
    X A_other in slot 2's columns. The stack key comes back to the old one, so they must not have been published
    under it, or action would read another adapter's slice."""
    roles = {"plan": last_layer["plan"], "action": last_layer["action"]}
    llm = engine(tiny_llama, roles, max_loras=2)
    eng = llm.engine
    params = SamplingParams(max_tokens=40, temperature=0.0, ignore_eos=True)
    rid = eng.add_request(PREFIX, params, "plan")
    outs = eng.step()  # the prompt, and the first token
    assert outs and outs[0].request_id == rid
    start_key = eng.registry.stack_key
    llm.unload_adapter("action")
    llm.load_adapter("other", last_layer["other"])  # slot 2 again, another A
    assert eng.registry.slot_of("other") == 2 and eng.registry.stack_key != start_key
    while eng.has_unfinished():
        outs += eng.step()
    plan_out = [o for o in outs if o.finished][0]
    solo = engine(tiny_llama, roles, "non_shared").generate([PREFIX], "plan", params)[0]
    assert same_outputs(plan_out, solo)  # its own slice (slot 1) never changed
    llm.unload_adapter("other")
    llm.load_adapter("action", last_layer["action"])
    assert eng.registry.stack_key == start_key
    prompt = PREFIX + plan_out.token_ids + [5]
    got = llm.generate([prompt], "action", GREEDY)[0]
    assert got.metrics.reused_tokens == 64  # the prompt's blocks, published before the change; no later ones
    assert got.metrics.base_reused_tokens >= 104
    assert same_outputs(got, engine(tiny_llama, roles, "non_shared").generate([prompt], "action", GREEDY)[0])


def test_bench_kernels_smoke_with_stacked_rows(tmp_path):
    """`lragent bench kernels --stacked-lr --smoke`: the micro-benchmark's stacked path (timings meaningless here)."""
    import json

    from lragent.bench.kernels import main

    out = tmp_path / "bench.json"
    argv = [
        "--smoke",
        "--stacked-lr",
        "--only",
        "decode,prefill",
        "--json",
        str(out),
        "--warmup-ms",
        "1",
        "--rep-ms",
        "1",
    ]
    assert main(argv) == 0
    res = json.loads(out.read_text())
    assert res["shape"]["stacked_lr"] and res["decode"] and res["prefill"]
