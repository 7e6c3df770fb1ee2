"""The gathered prefill route (`lragent.kernels.value_lr_prefill`): keys gathered and V_base + s R B_v written once
per reader into contiguous scratches, then the prefill kernel without its LR term, against the float64 reference of
Flash-LoRA-Attention."""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # must precede the first @triton.jit of the kernel modules

from test_kernels import DEVICE, TOL, make_case, rel_err, run_kernel  # noqa: E402

from lragent.kernels import value_lr_prefill  # noqa: E402
from lragent.kernels.backend import KeyLR  # noqa: E402
from lragent.kernels.reference import gather_positions  # noqa: E402
from lragent.kernels.triton_backend import TritonBackend  # noqa: E402
from lragent.kernels.value_lr_prefill import (  # noqa: E402
    ScratchRows,
    gather_rows,
    gathered_prefill_args,
    gathered_route_worth_it,
    materialize_values,
    materialize_values_reference,
)


def _pool_case(layout: str, seed: int):
    """Random pools with NaN in every row no sequence owns; `layout`: "plain" (an LR row is one adapter's R),
    "stacked" (every slot's R side by side) or "key" ([R_v | R_k])."""
    gen = torch.Generator().manual_seed(seed)
    bs, hkv, d, rank, slots = 4, 2, 16, 3, 4
    ctx = [9, 0, 14, 5]
    seq_slots = [2, 1, 0, 3]
    nblocks = [-(-c // bs) for c in ctx]
    total = sum(nblocks) + 2
    width = {"plain": rank, "stacked": rank * (slots - 1), "key": 2 * rank}[layout]
    value = torch.full((total, bs, hkv, d), float("nan"))
    lr = torch.full((total, bs, width), float("nan"))
    perm, lperm = torch.randperm(total, generator=gen).tolist(), torch.randperm(total, generator=gen).tolist()
    tables, ltables, used = [], [], 0
    for c, nb, slot in zip(ctx, nblocks, seq_slots):
        bt, lbt = perm[used : used + nb], lperm[used : used + nb]
        used += nb
        for pos in range(c):
            value[bt[pos // bs], pos % bs] = torch.randn(hkv, d, generator=gen)
            if slot:
                lr[lbt[pos // bs], pos % bs] = torch.randn(width, generator=gen)
        pad = max(nblocks) - nb
        tables.append(bt + [-1] * pad)
        ltables.append((lbt if slot else [-1] * nb) + [-1] * pad)
    value_up = torch.randn(slots, rank, hkv * d, generator=gen)
    value_up[0] = 0
    scaling = torch.rand(slots, generator=gen) + 0.5
    key_lr = None
    if layout == "key":
        key_lr = KeyLR(
            up=torch.randn(slots, rank, hkv * d, generator=gen), cos=torch.ones(32, d), sin=torch.zeros(32, d)
        )
    args = (
        value.to(DEVICE),
        lr.to(DEVICE),
        torch.tensor(tables, dtype=torch.int32, device=DEVICE),
        torch.tensor(ltables, dtype=torch.int32, device=DEVICE),
        torch.tensor(seq_slots, dtype=torch.int64, device=DEVICE),
        value_up.to(DEVICE),
        scaling.to(DEVICE),
        ctx,
    )
    return args, key_lr


@pytest.mark.parametrize("layout", ["plain", "stacked", "key"])
def test_materialized_values_equal_the_reference(layout):
    """Every reader's V_base + s R B_v from its own LR slice (slot 0: the base values, no LR row read, its rows
    NaN-poisoned), sequences back to back, an empty context in the middle."""
    args, key_lr = _pool_case(layout, seed=len(layout))
    rows = ScratchRows.of(args[-1], DEVICE)
    values = materialize_values(*args[:-1], rows, key_lr=key_lr)
    ref, ref_starts = materialize_values_reference(*args, key_lr=key_lr)
    assert torch.equal(rows.starts.cpu(), ref_starts.cpu())
    assert values.shape == ref.shape == (sum(args[-1]), 2, 16)
    assert not torch.isnan(values).any()
    assert rel_err(values, ref) < 1e-6
    # the term is there: the base values alone differ
    base_only, _ = materialize_values_reference(*args[:4], torch.zeros_like(args[4]), *args[5:], key_lr=key_lr)
    assert rel_err(base_only, ref) > 1e-2


def test_gather_rows_copies_each_context():
    """Keys (or adapter-free values) of every sequence back to back, exactly, NaN tails left behind."""
    args, _ = _pool_case("plain", seed=9)
    pool, tables, lens = args[0], args[2], args[-1]
    out = gather_rows(pool, tables, ScratchRows.of(lens, DEVICE))
    flat = pool.view(-1, *pool.shape[2:])
    ref = torch.cat([flat[gather_positions(tables[i], n, pool.shape[1])] for i, n in enumerate(lens)])
    assert torch.equal(out, ref)


# (seqs, hq, hkv, d, rank, block_size, block_n): the kernel tests' shapes, pages of whole key tiles for TMA
CASES = [
    ([(0, 5, 1), (13, 7, 2), (16, 16, 0), (3, 1, 3), (40, 9, 2)], 8, 2, 32, 8, 16, 16),
    ([(7, 20, 2), (33, 3, 1), (64, 31, 0)], 4, 1, 16, 4, 32, 16),
]


def _gathered(case, value_up=None, **kw):
    """The prefill kernel over gathered keys and values materialised with `value_up` (None: the case's own)."""
    c, m = case.cache, case.meta
    args = gathered_prefill_args(
        c.key[0], c.value[0], c.lr[0], m.base_block_tables, m.lr_block_tables, m.seq_lora_slots,
        case.value_up if value_up is None else value_up, case.scaling, ScratchRows.of(m.context_lens, DEVICE),
    )  # fmt: skip
    value_up, case.value_up = case.value_up, None
    try:
        return run_kernel(case, decode=False, key_rows=args["key_rows"], value_rows=args["value_rows"], **kw)
    finally:
        case.value_up = value_up


@pytest.mark.parametrize("case_id", range(len(CASES)))
@pytest.mark.parametrize("tma", [False, True])
@pytest.mark.parametrize("splits", [1, 3])
def test_prefill_over_gathered_rows_equals_the_reference(case_id, tma, splits):
    """The kernel reads each reader's scratch rows (pointer tiles, or tiles through descriptors over the scratches,
    here of more keys than a page holds) and adds no LR term; the output is the reference's P (V_base + s R B)."""
    seqs, hq, hkv, d, rank, bs, bn = CASES[case_id]
    case = make_case(seqs, hq, hkv, d, rank, bs, torch.float32, seed=70 + case_id)
    bn = 2 * bn if tma else bn  # TMA over a scratch: tiles need not fit a page
    out = _gathered(case, num_splits=splits, tma=tma, block_n=bn)
    assert rel_err(out, case.ref) < TOL[torch.float32]
    # values materialised without the term give another output: the test sees the term
    without = _gathered(case, torch.zeros_like(case.value_up), num_splits=splits, tma=tma, block_n=bn)
    assert rel_err(without, case.ref) > 1e-3


def test_value_rows_exclude_value_up():
    case = make_case([(3, 5, 1)], 2, 1, 16, 4, 4, torch.float32, seed=3)
    rows = (case.cache.value[0].view(-1, 1, 16), torch.zeros(1, dtype=torch.int64, device=DEVICE))
    with pytest.raises(ValueError, match="value_up=None"):
        run_kernel(case, decode=False, value_rows=rows)


def test_worth_it_weighs_query_key_pairs_per_key():
    cuda = torch.device("cuda")
    n = value_lr_prefill.MIN_PAIRS
    assert gathered_route_worth_it([2 * n], [2 * n], cuda)  # a whole prompt: n causal pairs a key
    assert not gathered_route_worth_it([2 * n - 2], [2 * n - 2], cuda)
    assert gathered_route_worth_it([8192], [8192 + 32768], cuda)
    q_hi, q_lo = 11 * n // 10, 9 * n // 10  # a chunk after a prefix of 8 n: each prefix key pairs with every query
    assert gathered_route_worth_it([q_hi], [q_hi + 8 * n], cuda)
    assert not gathered_route_worth_it([q_lo], [q_lo + 8 * n], cuda)
    assert not gathered_route_worth_it([24], [33792], cuda)  # a short chunk after a long context
    # summed over the step: one long prompt next to a short chunk after a long context
    assert not gathered_route_worth_it([2 * n, 16], [2 * n, 8 * n], cuda)
    assert not gathered_route_worth_it([], [], cuda)
    limit = value_lr_prefill.MAX_SCRATCH_BYTES  # scratches past the limit keep the on-chip route
    assert gathered_route_worth_it([8192], [8192], cuda, row_bytes=limit // 8192)
    assert not gathered_route_worth_it([8192], [8192], cuda, row_bytes=limit // 8192 + 1)
    assert gathered_route_worth_it([8192], [8192], cuda, mode="materialize", row_bytes=limit)
    assert not gathered_route_worth_it([8192], [8192], torch.device("cpu"))  # auto: GPUs only
    assert gathered_route_worth_it([1], [1], torch.device("cpu"), mode="materialize")
    assert not gathered_route_worth_it([8192], [8192], cuda, mode="on_chip")
    with pytest.raises(ValueError, match="must be one of"):
        gathered_route_worth_it([1], [1], cuda, mode="always")


def test_backend_routes_long_prefill_through_gathered_rows(monkeypatch):
    """The backend gathers when the policy says so (forced here), uploads the scratch rows once per step, and gives
    the on-chip route's output."""
    case = make_case([(0, 21, 1), (9, 13, 2), (4, 6, 0)], 8, 2, 16, 4, 4, torch.float32, seed=5)
    backend = TritonBackend()
    on_chip = backend.attend(case.cache, 0, case.query, case.value_up, case.scaling, case.meta)
    calls = []
    real = value_lr_prefill.gathered_prefill_args

    def spy(*a, **k):
        calls.append(a[8])  # the scratch rows
        return real(*a, **k)

    monkeypatch.setattr(value_lr_prefill, "gathered_prefill_args", spy)
    monkeypatch.setattr(value_lr_prefill, "VALUE_LR_PREFILL", "materialize")
    out = backend.attend(case.cache, 0, case.query, case.value_up, case.scaling, case.meta)
    again = backend.attend(case.cache, 0, case.query, case.value_up, case.scaling, case.meta)  # the next layer
    assert [r.lens for r in calls] == [[21, 22, 10]] * 2 and calls[0] is calls[1]
    assert rel_err(out, case.ref) < TOL[torch.float32]
    assert rel_err(out, on_chip) < TOL[torch.float32]
    assert torch.equal(out, again)
    monkeypatch.setattr(value_lr_prefill, "VALUE_LR_PREFILL", "on_chip")
    backend.attend(case.cache, 0, case.query, case.value_up, case.scaling, case.meta)
    assert len(calls) == 2
