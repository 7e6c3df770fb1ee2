"""One shrink launch for q_proj's LoRA delta and v_proj's LR rows (`grouped_shrink`,
`TritonLoRABank.query_delta_and_values`): the same results as the two separate shrinks / the reference bank."""

from __future__ import annotations

import os

import pytest
import torch

CUDA = torch.cuda.is_available()
if not CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")  # must precede the first @triton.jit of the kernel modules

from lragent.kernels import triton_lora  # noqa: E402
from lragent.kernels.counters import counters_of  # noqa: E402
from lragent.kernels.triton_lora import (  # noqa: E402
    SHRINK_COUNTERS_OWNER,
    SegmentPlan,
    ShrinkJob,
    TritonLoRABank,
    grouped_shrink,
)
from lragent.lora.adapter import LoRAAdapter  # noqa: E402
from lragent.lora.bank import LoRABank  # noqa: E402
from lragent.lora.metadata import group_by_slot  # noqa: E402

DEVICE = torch.device("cuda" if CUDA else "cpu")
I32 = dict(dtype=torch.int32, device=DEVICE)


def _counters_zero() -> bool:
    buf = counters_of(SHRINK_COUNTERS_OWNER, DEVICE)
    return buf is None or not bool(buf.any())


def _q_job(t: int, seg_lens: list[int], d_in: int, rank: int, covered: bool, gen: torch.Generator) -> ShrinkJob:
    """Per-adapter segments (slots 1..3 in turn) over shuffled rows; the rows past sum(seg_lens) lie in none."""
    a = (torch.randn(4, d_in, rank, generator=gen) / d_in**0.5).to(DEVICE)
    rows = torch.randperm(t, generator=gen)[: sum(seg_lens)].to(DEVICE, torch.int32)
    starts = [0]
    for n in seg_lens:
        starts.append(starts[-1] + n)
    slots = [1 + i % 3 for i in range(len(seg_lens))]
    seg_start, seg_slot = torch.tensor(starts, **I32), torch.tensor(slots, **I32)
    return ShrinkJob(a, seg_start, seg_slot, max(seg_lens), rows, torch.float32, covered)


def _v_job(t: int, d_in: int, rank: int, shared: bool, dtype: torch.dtype, gen: torch.Generator) -> ShrinkJob:
    """One segment over all rows in order (BaseLRShared's shared A), or one segment per row."""
    a = (torch.randn(3, d_in, rank, generator=gen) / d_in**0.5).to(DEVICE)
    if shared:
        return ShrinkJob(a, torch.tensor([0, t], **I32), torch.tensor([2], **I32), t, None, dtype, True)
    slots = [(i % 2) + 1 for i in range(t)]
    return ShrinkJob(a, torch.arange(t + 1, **I32), torch.tensor(slots, **I32), 1, None, dtype, True)


@pytest.mark.parametrize("v_shared", [True, False])
@pytest.mark.parametrize("covered", [True, False])
@pytest.mark.parametrize("x_dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("split_k", [1, 4])
def test_grouped_shrink_equals_two_shrinks(split_k, x_dtype, covered, v_shared):
    """q's job: three adapter segments of shuffled rows (two of them two m tiles), float32 output, rows outside the
    segments zero when not covered; v's job: one shared segment (or one per row: more segments than q's) in x's dtype.
    Split-K over d_in 100 (four splits of 32 interpreted, the last short). Bitwise the separate launches interpreted
    (same tiles and split order); the counters are zero after every launch, so a second launch is the same."""
    gen = torch.Generator().manual_seed(split_k + int(covered) + 2 * int(v_shared))
    t, d_in, rank = 40, 460 if CUDA else 100, 12
    seg_lens = [19, 3, 18] if covered else [17, 5, 9]
    x = torch.randn(t, d_in, generator=gen).to(DEVICE, x_dtype)
    q_job, v_job = _q_job(t, seg_lens, d_in, rank, covered, gen), _v_job(t, d_in, rank, v_shared, x_dtype, gen)
    want_q, want_v = q_job.run(x, split_k), v_job.run(x, split_k)
    for _ in range(2):
        got_q, got_v = grouped_shrink(x, q_job, v_job, split_k=split_k)
        assert _counters_zero()
        assert got_q.dtype == torch.float32 and got_v.dtype == x_dtype
        if CUDA:  # the grouped launch may pick another BLOCK_M (the longer of both jobs' segments)
            torch.testing.assert_close(got_q, want_q, rtol=1e-4, atol=1e-4)
            torch.testing.assert_close(got_v, want_v, rtol=1e-2, atol=1e-2)
        else:
            assert torch.equal(got_q, want_q) and torch.equal(got_v, want_v)
    outside = torch.ones(t, dtype=torch.bool, device=DEVICE)
    outside[q_job.tokens.long()] = False
    assert covered == (not outside.any()) and not got_q[outside].any()
    assert got_q[~outside].abs().sum() > 0 and got_v.abs().sum() > 0


def test_grouped_shrink_rejects_ranks_that_differ():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(4, 64, generator=gen).to(DEVICE)
    with pytest.raises(ValueError):
        grouped_shrink(x, _q_job(4, [4], 64, 8, True, gen), _v_job(4, 64, 12, True, x.dtype, gen))


class _Cfg:
    def __init__(self, h: int, q: int, kv: int):
        self.shapes = {"q_proj": (h, q), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (q, h)}

    def module_shapes(self):
        return self.shapes


def _adapter(name, rank, modules, cfg, seed, shared_a=None):
    gen = torch.Generator().manual_seed(seed)
    w = {}
    for layer in range(2):
        for mod in modules:
            d_in, d_out = cfg.module_shapes()[mod]
            a = torch.randn(d_in, rank, generator=gen) / d_in**0.5
            if mod == "v_proj" and shared_a is not None:
                a = shared_a.setdefault(layer, a)
            w[(layer, mod)] = (a, torch.randn(rank, d_out, generator=gen))
    return LoRAAdapter(name=name, rank=rank, scaling=16 / rank, targets=frozenset(modules), weights=w)


def _banks(shared: bool, **flags):
    """The reference bank and the Triton one with the same adapters: independent A per adapter (ranks differ, one
    adapter without q_proj) or one v_proj A for all (BaseLRShared, q/v adapters)."""
    cfg = _Cfg(48, 64, 32)
    kw = dict(config=cfg, max_loras=3, max_rank=16, dtype=torch.float32, device=DEVICE, **flags)
    ref_bank, bank = LoRABank(**kw), TritonLoRABank(**kw)
    shared_a = {} if shared else None
    specs = [(8, ("q_proj", "v_proj")), (4, ("v_proj", "o_proj")), (16, ("q_proj", "v_proj", "k_proj"))]
    if shared:
        specs = [(8, ("q_proj", "v_proj"))] * 3
    for slot, (rank, mods) in enumerate(specs, 1):
        ad = _adapter(f"a{slot}", rank, mods, cfg, seed=slot + 10 * shared, shared_a=shared_a)
        ref_bank.load(slot, ad)
        bank.load(slot, ad)
    return ref_bank, bank


def _count_grouped(monkeypatch) -> list[int]:
    calls: list[int] = []
    real = triton_lora.grouped_shrink

    def spy(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(triton_lora, "grouped_shrink", spy)
    return calls


@pytest.mark.parametrize("per_token", [False, True], ids=["grouped", "per_token_plan"])
@pytest.mark.parametrize("shared", [False, True], ids=["own_a", "shared_a"])
def test_bank_query_delta_and_values_matches_reference(monkeypatch, shared, per_token):
    """Mixed slots (slot 0 rows too): q's delta lands in place in q's columns of a fused qkv row (the others kept) and
    the LR rows equal the reference bank's, through one grouped shrink per layer; also over the prebuilt per-row plan
    of CUDA-graph decode."""
    ref_bank, bank = _banks(shared)
    calls = _count_grouped(monkeypatch)
    token_slots = [1, 3, 2, 0, 3, 1, 2, 2, 1] if not shared else [1, 2, 3, 3, 2, 1, 1]
    t = len(token_slots)
    gen = torch.Generator().manual_seed(7)
    x = torch.randn(t, 48, generator=gen).to(DEVICE)
    segs = group_by_slot(token_slots, DEVICE)
    plan = SegmentPlan.per_token(torch.arange(t + 1, **I32), torch.tensor(token_slots, **I32))
    for layer in range(2):
        qkv = torch.randn(t, 64 + 2 * 32, generator=gen).to(DEVICE)
        want_qkv = qkv.clone()
        want_lr = ref_bank.query_delta_and_values(want_qkv[:, :64], x, layer, segs)
        got_lr = bank.query_delta_and_values(qkv[:, :64], x, layer, plan if per_token else segs)
        torch.testing.assert_close(qkv, want_qkv, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(got_lr, want_lr, rtol=1e-5, atol=1e-5)
        assert not torch.equal(qkv[:, :64], torch.zeros_like(qkv[:, :64])) and got_lr.abs().sum() > 0
    assert len(calls) == 2  # one grouped shrink per layer
    # the plain calls give the same: the hook is exactly add_delta + value_shrink
    q = torch.zeros(t, 64, device=DEVICE)
    lr = bank.value_shrink(x, 1, segs)
    bank.add_delta(q, x, 1, "q_proj", segs)
    want_q = torch.zeros(t, 64, device=DEVICE)
    torch.testing.assert_close(bank.query_delta_and_values(want_q, x, 1, segs), lr, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(want_q, q, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("flags", [{"stack_values": True}, {"key_lr": True}, {}], ids=["stacked", "key_lr", "no_q"])
def test_bank_query_delta_and_values_falls_back(monkeypatch, flags):
    """Where the LR rows are not the tokens' own v_proj rows (STACKED_LR, key LR) or no token's adapter has a q_proj,
    the hook is the two separate calls, and still the reference's."""
    ref_bank, bank = _banks(False, **flags)
    calls = _count_grouped(monkeypatch)
    token_slots = [2, 2] if not flags else [1, 3, 2, 0, 2]  # slot 2: v_proj and o_proj only
    t = len(token_slots)
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(t, 48, generator=gen).to(DEVICE)
    segs = group_by_slot(token_slots, DEVICE)
    q, want_q = torch.zeros(t, 64, device=DEVICE), torch.zeros(t, 64, device=DEVICE)
    got_lr = bank.query_delta_and_values(q, x, 0, segs)
    torch.testing.assert_close(got_lr, ref_bank.query_delta_and_values(want_q, x, 0, segs), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(q, want_q, rtol=1e-5, atol=1e-5)
    assert got_lr.shape == (t, bank.value_width) and got_lr.abs().sum() > 0 and not calls
