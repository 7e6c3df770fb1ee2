"""Cascade decode (lragent.kernels.triton_cascade): rows sharing leading cache blocks read them once per step.

On random paged batches (interpreted Triton on the CPU, float32) the cascade kernels must give what plain split-KV
decode gives, what the torch cascade route gives, and what the per-sequence float64 oracle gives: mixed adapters in a
group, ragged own suffixes, two groups in one batch, a would-be group of one, a row sharing nothing; every LR row
layout (r wide, none, stacked, [R_v | R_k] with keys rebuilt per reader). Unowned pool rows hold NaN, so a read
outside what a row may see shows up. Then the engine: greedy outputs with cascade on equal those with it off.
"""

from __future__ import annotations

import os
import random
from dataclasses import replace
from types import SimpleNamespace

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # must precede the first @triton.jit of the kernel modules

from lragent import SamplingParams  # noqa: E402
from lragent.kernels.backend import KeyLR  # noqa: E402
from lragent.kernels.metadata import BatchRows  # noqa: E402
from lragent.kernels.reference import TorchReferenceBackend, cascade_decode_attention  # noqa: E402
from lragent.kernels.triton_backend import TritonBackend  # noqa: E402
from lragent.kernels.triton_cascade import CascadeOptions, cascade_decode, find_groups  # noqa: E402
from lragent.models.rope import RotaryEmbedding  # noqa: E402
from tests.turns import PREFIX, ROLES, exact_llm, same_outputs  # noqa: E402

DEV = torch.device("cuda" if torch.cuda.is_available() else "cpu")
TOL = 2e-5


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    out, ref = out.detach().cpu().double(), ref.detach().cpu().double()
    assert not torch.isnan(out).any(), "NaN in the output (a poisoned read)"
    return ((out - ref).norm() / ref.norm()).item()


# ------------------------------------------------------------------------------------------------------------
# a random paged decode batch with shared leading blocks
# ------------------------------------------------------------------------------------------------------------
def make_batch(seqs, shared, hq, hkv, d, rank, bs, layout, seed, num_slots=4):
    """seqs: (group name or None, own tokens, adapter slot) per row; shared: group name -> shared blocks (block ids
    the same in every pool for its rows). layout: "lr" (rows r wide), "none" (no LR pool), "stacked" (every
    slot's r columns), "key_lr" ([R_v | R_k], keys rebuilt with the reader's B_k)."""
    gen = torch.Generator().manual_seed(seed)
    rng = random.Random(seed)
    width = {"lr": rank, "none": 0, "stacked": rank * (num_slots - 1), "key_lr": 2 * rank}[layout]
    own_blocks = [-(-own // bs) for _, own, _ in seqs]
    total = sum(shared.values()) + sum(own_blocks) + 2
    kv_ids, lr_ids = rng.sample(range(total), total), rng.sample(range(total), total)
    group_kv = {name: [kv_ids.pop() for _ in range(n)] for name, n in shared.items()}
    group_lr = {name: [lr_ids.pop() for _ in range(n)] for name, n in shared.items()}
    key = torch.randn(total, bs, hkv, d, generator=gen)
    value = torch.randn(total, bs, hkv, d, generator=gen)
    lr = torch.randn(total, bs, max(width, 1), generator=gen)
    kv_ok = torch.zeros(total, bs, dtype=torch.bool)
    lr_ok = torch.zeros(total, bs, dtype=torch.bool)
    kv_tables, lr_tables, ctx = [], [], []
    for (group, own, slot), nb in zip(seqs, own_blocks):
        kv = (group_kv[group] if group else []) + [kv_ids.pop() for _ in range(nb)]
        lt = (group_lr[group] if group else []) + [lr_ids.pop() for _ in range(nb)]
        c = (shared[group] if group else 0) * bs + own
        pos = torch.arange(c)
        kv_ok[torch.tensor(kv)[pos // bs], pos % bs] = True
        if slot:
            lr_ok[torch.tensor(lt)[pos // bs], pos % bs] = True
        kv_tables.append(kv)
        lr_tables.append(lt)
        ctx.append(c)
    key[~kv_ok] = float("nan")
    value[~kv_ok] = float("nan")
    lr[~lr_ok] = float("nan")
    b = len(seqs)
    tables = {"kv": kv_tables, "lr": lr_tables} if width else {"kv": kv_tables}
    rows = BatchRows([1] * b, ctx, [s for *_, s in seqs], tables, {p: [0] * b for p in tables}, None, True)

    def up() -> torch.Tensor:
        u = torch.randn(num_slots, rank, hkv * d, generator=gen) / rank**0.5
        u[0] = 0
        return u

    scaling = torch.rand(num_slots, generator=gen) + 0.5
    scaling[0] = 0
    key_lr = None
    if layout == "key_lr":
        rope = RotaryEmbedding(SimpleNamespace(head_dim=d, rope_theta=10000.0, rope_scaling=None), max(ctx) + 1)
        rope.build(torch.device("cpu"))
        key_lr = KeyLR(up(), rope.cos, rope.sin)
    return SimpleNamespace(
        rows=rows, key=key, value=value, lr=lr if width else None, width=width, bs=bs, hkv=hkv, d=d,
        value_up=up() if width else None, scaling=scaling, key_lr=key_lr,
        query=torch.randn(b, hq, d, generator=gen),
    )  # fmt: skip


def _cache(c, dtype):
    return SimpleNamespace(
        key=[c.key.to(DEV, dtype)], value=[c.value.to(DEV, dtype)],
        lr=[c.lr.to(DEV, dtype)] if c.lr is not None else None,
        block_size=c.bs, num_kv_heads=c.hkv, head_dim=c.d, lr_rank=c.width,
    )  # fmt: skip


def _key_lr(c, dtype, dev) -> KeyLR | None:
    k = c.key_lr
    return None if k is None else KeyLR(k.up.to(dev, dtype), k.cos.to(dev), k.sin.to(dev))


def _opt(v, dtype, dev):
    return None if v is None else v.to(dev, dtype)


def run_all(c, min_blocks=2):
    """(cascade metadata, triton cascade, triton plain, torch cascade route, float64 per-sequence oracle)."""
    backend = TritonBackend(cascade=CascadeOptions(c.bs, min_blocks))
    meta = backend.metadata(c.rows, DEV)
    f32 = torch.float32
    args = (0, c.query.to(DEV), _opt(c.value_up, f32, DEV), c.scaling.to(DEV))
    got = backend.attend(_cache(c, f32), *args, meta, key_lr=_key_lr(c, f32, DEV))
    plain = backend.attend(_cache(c, f32), *args, replace(meta, cascade=None), key_lr=_key_lr(c, f32, DEV))
    cpu = replace(meta, **{k: v.cpu() for k, v in meta.__dict__.items() if isinstance(v, torch.Tensor)})
    if cpu.cascade is not None:
        plan = cpu.cascade
        cpu.cascade = replace(plan, **{k: v.cpu() for k, v in plan.__dict__.items() if isinstance(v, torch.Tensor)})
    f64, cpu_dev, hkv, d = torch.float64, torch.device("cpu"), c.hkv, c.d
    ups = (_opt(c.value_up, f64, cpu_dev), c.scaling.double())
    lrs = None if c.lr is None else c.lr.double().view(-1, c.width)
    route = None
    if cpu.cascade is not None:
        route = cascade_decode_attention(
            c.query.double(), c.key.double().view(-1, hkv, d), c.value.double().view(-1, hkv, d), lrs, *ups, cpu,
            c.bs, _key_lr(c, f64, cpu_dev),
        )  # fmt: skip
    cache64 = SimpleNamespace(**{**_cache(c, f64).__dict__})
    cache64.key, cache64.value = [c.key.double()], [c.value.double()]
    cache64.lr = None if c.lr is None else [c.lr.double()]
    oracle = TorchReferenceBackend().attend(
        cache64, 0, c.query.double(), *ups, replace(cpu, is_decode=False), key_lr=_key_lr(c, f64, cpu_dev)
    )
    return meta, got, plain, route, oracle


# rows: (group, own tokens, slot); "solo" has one member (no group); None shares nothing
MIXED = [("a", 1, 1), ("b", 5, 2), ("a", 7, 0), ("solo", 3, 1), ("a", 12, 3), (None, 9, 2), ("b", 2, 2)]
SHARED = {"a": 5, "b": 3, "solo": 4}


@pytest.mark.parametrize("layout", ["lr", "none", "stacked"])
def test_cascade_equals_plain_decode(layout):
    c = make_batch(MIXED, SHARED, 4, 2, 16, 4, 4, layout, seed=1)
    meta, got, plain, route, oracle = run_all(c)
    assert meta.cascade is not None
    assert sorted(sorted(g) for g, _ in meta.cascade.groups) == [[0, 2, 4], [1, 6]]
    assert sorted(n for _, n in meta.cascade.groups) == [12, 20]  # whole shared blocks (tokens)
    assert rel_err(route, oracle) < 1e-12  # the cascade decomposition itself is exact
    assert rel_err(got, oracle) < TOL
    assert rel_err(plain, oracle) < TOL
    assert torch.allclose(got, plain, atol=1e-5, rtol=1e-5)


def test_multiple_row_tiles_and_explicit_splits():
    """GQA 4 over a group of 5 rows: 20 query rows, two 16-row tiles; splits forced on both launches."""
    seqs = [("a", 1 + 3 * i, 1 + i % 3) for i in range(5)] + [(None, 6, 1)]
    c = make_batch(seqs, {"a": 6}, 8, 2, 16, 8, 4, "lr", seed=2)
    meta, got, plain, _, oracle = run_all(c)
    assert rel_err(got, oracle) < TOL and rel_err(plain, oracle) < TOL
    f32 = torch.float32
    cache = _cache(c, f32)
    for shared_splits, own_splits in ((1, 1), (3, 2), (7, 4)):
        out = cascade_decode(
            c.query.to(DEV), cache.key[0], cache.value[0], cache.lr[0], meta.base_block_tables, meta.lr_block_tables,
            meta.context_lens_t, meta.seq_lora_slots, c.value_up.to(DEV), c.scaling.to(DEV), meta.cascade,
            shared_splits=shared_splits, own_splits=own_splits,
        )  # fmt: skip
        assert out is not None and rel_err(out, oracle) < TOL, (shared_splits, own_splits)


def test_key_lr_groups_of_one_adapter_cascade_and_mixed_ones_fall_back():
    """Keys rebuilt with each reader's B_k differ per reader: a group of one slot cascades, a mixed one runs plain."""
    uniform = [("a", 2, 1), ("a", 6, 1), ("b", 3, 0), ("b", 1, 0), (None, 4, 2)]
    c = make_batch(uniform, {"a": 4, "b": 3}, 4, 2, 16, 4, 4, "key_lr", seed=3)
    meta, got, plain, route, oracle = run_all(c)
    assert meta.cascade is not None and meta.cascade.uniform_slots
    assert rel_err(route, oracle) < 1e-12 and rel_err(got, oracle) < TOL and rel_err(plain, oracle) < TOL
    mixed = make_batch([("a", 2, 1), ("a", 6, 2), (None, 4, 2)], {"a": 4}, 4, 2, 16, 4, 4, "key_lr", seed=4)
    meta, got, _, route, oracle = run_all(mixed)
    assert meta.cascade is not None and not meta.cascade.uniform_slots
    assert rel_err(route, oracle) < 1e-12 and rel_err(got, oracle) < TOL
    cache = _cache(mixed, torch.float32)
    assert (
        cascade_decode(
            mixed.query.to(DEV),
            cache.key[0],
            cache.value[0],
            cache.lr[0],
            meta.base_block_tables,
            meta.lr_block_tables,
            meta.context_lens_t,
            meta.seq_lora_slots,
            mixed.value_up.to(DEV),
            mixed.scaling.to(DEV),
            meta.cascade,
            key_lr=_key_lr(mixed, torch.float32, DEV),
        )  # fmt: skip
        is None
    )


# ------------------------------------------------------------------------------------------------------------
# planning
# ------------------------------------------------------------------------------------------------------------
def _rows(tables: list[list[int]], ctx: list[int], lr: list[list[int]] | None = None) -> BatchRows:
    pools = {"kv": tables} if lr is None else {"kv": tables, "lr": lr}
    n = len(tables)
    return BatchRows([1] * n, ctx, [1] * n, pools, {p: [0] * n for p in pools}, None, True)


def test_groups_follow_whole_shared_blocks():
    opt = CascadeOptions(block_size=4, min_blocks=2)
    a = [10, 11, 12, 13, 20]
    b = [10, 11, 12, 14, 21]
    c = [10, 11, 15, 22]
    d = [30, 31, 32]
    assert find_groups(_rows([a, b, c, d], [18, 18, 14, 12]), opt) == [([0, 1, 2], 2)]
    # the savings rule: a third row sharing only 2 of the pair's 3 blocks would cost more than it saves
    opt2 = CascadeOptions(block_size=4, min_blocks=2)
    e, f = [1, 2, 3, 4, 5, 6, 90], [1, 2, 3, 4, 5, 6, 91]
    assert find_groups(_rows([e, f, [1, 2, 7, 92]], [28, 28, 14]), opt2) == [([0, 1], 6)]
    # the block a row writes (its last) is never shared; nor are blocks past its context
    assert find_groups(_rows([[1, 2, 3], [1, 2, 3]], [12, 9]), opt) == [([0, 1], 2)]
    assert find_groups(_rows([[1, 2, 3], [1, 2, 3]], [8, 8]), opt) == []  # 1 usable block < min_blocks
    # block ids must agree in the LR pool too (BASE_SHARED: each agent its own LR blocks over shared keys)
    assert find_groups(_rows([a, b], [18, 18], lr=[[5, 6, 7], [8, 6, 7]]), opt) == []
    assert find_groups(_rows([a, b], [18, 18], lr=[[5, 6, 7, 1], [5, 6, 9, 2]]), opt) == [([0, 1], 2)]
    assert find_groups(_rows([a, b], [18, 18]), CascadeOptions(4, 2, min_seqs=3)) == []


# ------------------------------------------------------------------------------------------------------------
# the engine: several agents over one long prompt, greedy, cascade on == off
# ------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("sharing", ["stacked_lr", "non_shared"])
def test_engine_greedy_outputs_equal_with_cascade(tiny_llama, sharing):
    model, adapters = tiny_llama
    prompt = PREFIX * 2  # 140 tokens: 17 whole blocks of 8 shared by every row that reads them
    prompts = [prompt + [500 + i] for i in range(4)]
    names = [*ROLES, ROLES[0]]  # three adapters; two rows of the first (NON_SHARED groups only those)
    params = SamplingParams(max_tokens=5, temperature=0.0, ignore_eos=True)
    outs = []
    for cascade in (False, True):
        llm = exact_llm(model, adapters, sharing, attention_backend="triton", cascade_decode=cascade)
        backend = llm.engine.backend
        if cascade:
            backend.cascade = CascadeOptions(block_size=8, min_blocks=4)  # the default asks for 1024 tokens
        for role in ROLES:  # cache the prompt under every adapter, so the batch below finds it
            llm.generate([prompt], SamplingParams(max_tokens=1, temperature=0.0), adapter=role)
        outs.append(llm.generate(prompts, params, adapter=names))
        if cascade:
            assert backend.cascade_steps >= 4
    assert all(same_outputs(g, w) for g, w in zip(outs[1], outs[0])), [o.token_ids for o in outs[1]]
