"""Triton kernels against the PyTorch reference (float64 oracle), on fresh random inputs with outputs poisoned first.

Without CUDA the kernels run under TRITON_INTERPRET=1 on small shapes (CI). With CUDA the same small cases run
compiled, and the `gpu`-marked matrix adds the real shapes (head_dim 64/128/256, GQA 1/4/8, ranks 1..64, bf16/fp16).
Unused pool slots hold NaN, so a read outside a sequence's blocks (or of a slot-0 sequence's LR rows) shows up.
"""

from __future__ import annotations

import os
import random
from types import SimpleNamespace

import pytest
import torch

CUDA = torch.cuda.is_available()
if not CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")  # must precede the first @triton.jit of the kernel modules

from lragent.kernels.counters import counters_of  # noqa: E402
from lragent.kernels.metadata import AttentionMetadata  # noqa: E402
from lragent.kernels.reference import TorchReferenceBackend  # noqa: E402
from lragent.kernels.triton_attention import paged_decode, paged_prefill  # noqa: E402
from lragent.kernels.triton_backend import TritonBackend  # noqa: E402
from lragent.kernels.triton_lora import (  # noqa: E402
    SHRINK_COUNTERS_OWNER,
    TritonLoRABank,
    lora_expand,
    lora_shrink,
    shared_shrink,
)
from lragent.kernels.triton_store import store_kv_lr  # noqa: E402
from lragent.lora.adapter import LoRAAdapter  # noqa: E402
from lragent.lora.bank import LoRABank  # noqa: E402
from lragent.lora.metadata import group_by_slot  # noqa: E402

DEVICE = torch.device("cuda" if CUDA else "cpu")
TOL = {torch.float32: 2e-5, torch.float16: 5e-3, torch.bfloat16: 2e-2}
gpu = pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")


class Case(SimpleNamespace):
    def __repr__(self) -> str:  # keep pytest's failure report short (no tensor dumps)
        return f"Case(seqs={self.seqs})"


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    out, ref = out.detach().cpu().double(), ref.detach().cpu().double()
    assert not torch.isnan(out).any(), "NaN in the output (unwritten element or a poisoned read)"
    return ((out - ref).norm() / ref.norm().clamp_min(1e-30)).item()


# ------------------------------------------------------------------------------------------------------------
# a random paged batch
# ------------------------------------------------------------------------------------------------------------
def make_case(
    seqs: list[tuple[int, int, int]],
    hq: int,
    hkv: int,
    d: int,
    rank: int | None,
    block_size: int,
    dtype: torch.dtype,
    seed: int,
    num_slots: int = 4,
    device: torch.device = DEVICE,
):
    """seqs: (cached prefix, new tokens, adapter slot) per sequence. rank None: no LR pool (FullShared)."""
    gen = torch.Generator().manual_seed(seed)
    rng = random.Random(seed)
    ctx = [p + q for p, q, _ in seqs]
    nblocks = [-(-c // block_size) for c in ctx]
    total = sum(nblocks) + 3
    base_ids = list(range(total))
    rng.shuffle(base_ids)
    lr_ids = list(range(total))
    rng.shuffle(lr_ids)
    key = torch.randn(total, block_size, hkv, d, generator=gen)
    value = torch.randn(total, block_size, hkv, d, generator=gen)
    lr = torch.randn(total, block_size, rank, generator=gen) if rank else None
    base_valid = torch.zeros(total, block_size, dtype=torch.bool)
    lr_valid = torch.zeros(total, block_size, dtype=torch.bool)
    tables, lr_tables, used = [], [], 0
    width = max(nblocks)
    for (_, _, slot), c, nb in zip(seqs, ctx, nblocks):
        bt = base_ids[used : used + nb]
        lbt = lr_ids[used : used + nb]
        used += nb
        pos = torch.arange(c)
        base_valid[torch.tensor(bt)[pos // block_size], pos % block_size] = True
        if slot != 0:
            lr_valid[torch.tensor(lbt)[pos // block_size], pos % block_size] = True
        tables.append(bt + [-1] * (width - nb))
        lr_tables.append((lbt if slot != 0 else [-1] * nb) + [-1] * (width - nb))
    # poison every slot no sequence owns (block tails, spare blocks, slot-0 sequences' LR rows)
    key[~base_valid] = float("nan")
    value[~base_valid] = float("nan")
    if lr is not None:
        lr[~lr_valid] = float("nan")
    q_lens = [q for _, q, _ in seqs]
    t = sum(q_lens)
    query = torch.randn(t, hq, d, generator=gen)
    value_up = torch.randn(num_slots, rank, hkv * d, generator=gen) / max(rank, 1) ** 0.5 if rank else None
    scaling = torch.rand(num_slots, generator=gen) + 0.5
    if value_up is not None:
        value_up[0] = 0
    scaling[0] = 0
    qs = [0]
    for q in q_lens:
        qs.append(qs[-1] + q)
    meta = AttentionMetadata(
        query_lens=q_lens,
        context_lens=ctx,
        query_start=torch.tensor(qs, dtype=torch.int32, device=device),
        context_lens_t=torch.tensor(ctx, dtype=torch.int32, device=device),
        base_block_tables=torch.tensor(tables, dtype=torch.int32, device=device),
        lr_block_tables=torch.tensor(lr_tables, dtype=torch.int32, device=device) if rank else None,
        seq_lora_slots=torch.tensor([s for _, _, s in seqs], dtype=torch.int64, device=device),
        base_write_idx=None,
        base_slots=torch.zeros(0, dtype=torch.int64, device=device),
        lr_slots=None,
        is_decode=all(q == 1 for q in q_lens),
    )

    def cache_in(dt, dev):
        return SimpleNamespace(
            key=[key.to(dev, dt)],
            value=[value.to(dev, dt)],
            lr=[lr.to(dev, dt)] if lr is not None else None,
            block_size=block_size,
            num_kv_heads=hkv,
            head_dim=d,
            lr_rank=rank or 0,
        )

    cache = cache_in(dtype, device)
    vup = value_up.to(device, dtype) if value_up is not None else None
    case = Case(
        cache=cache, meta=meta, query=query.to(device, dtype), value_up=vup, scaling=scaling.to(device), seqs=seqs
    )
    # float64 oracle from the same (rounded) inputs, on the CPU
    ref_meta = AttentionMetadata(
        **{k: (v.cpu() if isinstance(v, torch.Tensor) else v) for k, v in meta.__dict__.items()}
    )
    # the per-sequence loop reads only each sequence's own positions; the batched decode path pads contexts and would
    # multiply the poisoned (NaN) padding by zero probabilities
    ref_meta.is_decode = False
    ref_cache = SimpleNamespace(**{**cache.__dict__})
    ref_cache.key = [cache.key[0].cpu().double()]
    ref_cache.value = [cache.value[0].cpu().double()]
    ref_cache.lr = [cache.lr[0].cpu().double()] if cache.lr is not None else None
    case.ref = TorchReferenceBackend().attend(
        ref_cache, 0, case.query.cpu().double(), vup.cpu().double() if vup is not None else None, scaling, ref_meta
    )
    return case


def run_kernel(case, decode: bool, **kw):
    c, m = case.cache, case.meta
    out = torch.full_like(case.query, float("nan"))
    args = dict(
        key_pool=c.key[0],
        value_pool=c.value[0],
        lr_pool=c.lr[0] if c.lr is not None else None,
        base_block_tables=m.base_block_tables,
        lr_block_tables=m.lr_block_tables,
        seq_lora_slots=m.seq_lora_slots,
        value_up=case.value_up,
        lora_scaling=case.scaling,
        out=out,
    )
    if decode:
        return paged_decode(case.query, context_lens=m.context_lens_t, max_context=max(m.context_lens), **args, **kw)
    # max_context lets a GPU pick split-KV on its own for the small grids of these cases
    return paged_prefill(
        case.query,
        query_start=m.query_start,
        context_lens=m.context_lens_t,
        max_query_len=max(m.query_lens),
        max_context=max(m.context_lens),
        **args,
        **kw,
    )


# ------------------------------------------------------------------------------------------------------------
# small cases: interpreted on the CPU (CI), compiled on a GPU
# ------------------------------------------------------------------------------------------------------------
# (seqs, hq, hkv, d, rank, block_size)
PREFILL_SMALL = [
    # ragged lengths, prefixes crossing block boundaries, mixed adapters incl. slot 0, GQA 4
    ([(0, 5, 1), (13, 7, 2), (16, 16, 0), (3, 1, 3)], 8, 2, 32, 8, 4),
    # GQA 1 (MHA), rank 1, a query tile that spans two tiles (q_len 20 > 16)
    ([(7, 20, 2), (0, 3, 1)], 2, 2, 16, 1, 8),
    # GQA 8, rank 16, block size 16, long prefix
    ([(40, 9, 3), (1, 17, 2)], 8, 1, 16, 16, 16),
    # rank 64, head_dim 64
    ([(5, 6, 1)], 2, 1, 64, 64, 4),
]


@pytest.mark.parametrize("case_id", range(len(PREFILL_SMALL)))
@pytest.mark.parametrize("splits", [1, 3])
def test_prefill_small(case_id, splits):
    """splits 3: split-KV prefill (short chunks after long contexts), merged per query token."""
    seqs, hq, hkv, d, rank, bs = PREFILL_SMALL[case_id]
    case = make_case(seqs, hq, hkv, d, rank, bs, torch.float32, seed=case_id)
    assert rel_err(run_kernel(case, decode=False, num_splits=splits), case.ref) < TOL[torch.float32]


@pytest.mark.parametrize("pack", ["1", "0"])
@pytest.mark.parametrize("splits", [1, 3])
@pytest.mark.parametrize("hq,hkv", [(6, 2), (8, 2), (9, 3)])
def test_prefill_gqa_packing(hq, hkv, splits, pack, monkeypatch):
    """A program's rows are tokens x the G query heads of its kv head (G = 3: a tile's last row is padding), or one
    query head's tokens (LRAGENT_PREFILL_GQA_PACK=0): both give the reference's output."""
    import lragent.kernels.triton_attention as ta

    monkeypatch.setattr(ta, "PREFILL_GQA_PACK", pack)
    case = make_case([(0, 11, 1), (13, 7, 2), (5, 1, 0), (30, 18, 3)], hq, hkv, 16, 4, 8, torch.float32, seed=hq)
    assert rel_err(run_kernel(case, decode=False, num_splits=splits), case.ref) < TOL[torch.float32]


def test_gqa_packing_policy(monkeypatch):
    """ "auto" packs short chunks only (long ones are compute-bound: more diagonal tiles cost more there)."""
    import lragent.kernels.triton_attention as ta

    for mode, short, long in (("auto", True, False), ("1", True, True), ("0", False, False)):
        monkeypatch.setattr(ta, "PREFILL_GQA_PACK", mode)
        assert ta._gqa_pack(ta.GQA_PACK_ROWS) is short and ta._gqa_pack(ta.GQA_PACK_ROWS + 1) is long


@pytest.mark.parametrize("splits", [1, 2])
def test_prefill_no_lr_pool(splits):
    """FullShared: no LR pool, value_up None."""
    case = make_case([(6, 4, 1), (0, 9, 2)], 4, 2, 16, None, 4, torch.float32, seed=11)
    assert rel_err(run_kernel(case, decode=False, num_splits=splits), case.ref) < TOL[torch.float32]


# (seqs, hq, hkv, d, rank, block_size, block_n): pages of whole key tiles, as the TMA tiles need
PREFILL_TMA = [
    ([(0, 5, 1), (13, 7, 2), (16, 16, 0), (3, 1, 3), (40, 9, 2)], 8, 2, 32, 8, 16, 16),
    ([(7, 20, 2), (33, 3, 1), (64, 31, 0)], 4, 1, 16, 4, 32, 16),
    ([(50, 17, 3), (0, 40, 1)], 4, 2, 16, 16, 32, 32),
    ([(21, 9, 1), (2, 30, 2)], 4, 4, 16, None, 16, 16),
]


@pytest.mark.parametrize("case_id", range(len(PREFILL_TMA)))
@pytest.mark.parametrize("splits", [1, 3])
def test_prefill_tma_tiles(case_id, splits):
    """Page-run tiles through tensor descriptors (Hopper's path, forced here): the reference's output, block tails
    poisoned with NaN (a masked tile must not let them into P V), with and without split-KV."""
    seqs, hq, hkv, d, rank, bs, bn = PREFILL_TMA[case_id]
    case = make_case(seqs, hq, hkv, d, rank, bs, torch.float32, seed=40 + case_id)
    out = run_kernel(case, decode=False, num_splits=splits, tma=True, block_n=bn)
    assert rel_err(out, case.ref) < TOL[torch.float32]


def test_prefill_tma_needs_whole_tiles():
    case = make_case([(3, 5, 1)], 2, 1, 16, 4, 16, torch.float32, seed=3)
    with pytest.raises(ValueError, match="pages of whole key tiles"):
        run_kernel(case, decode=False, tma=True, block_n=32)


DECODE_SMALL = [
    ([(0, 1, 1), (30, 1, 2), (16, 1, 0), (63, 1, 3)], 8, 2, 32, 8, 4),
    ([(100, 1, 2), (5, 1, 1)], 4, 4, 16, 3, 16),
    ([(77, 1, 3)], 8, 1, 16, 64, 8),
]


@pytest.mark.parametrize("case_id", range(len(DECODE_SMALL)))
@pytest.mark.parametrize("splits", [1, 3])
def test_decode_small(case_id, splits):
    seqs, hq, hkv, d, rank, bs = DECODE_SMALL[case_id]
    case = make_case(seqs, hq, hkv, d, rank, bs, torch.float32, seed=100 + case_id)
    assert rel_err(run_kernel(case, decode=True, num_splits=splits), case.ref) < TOL[torch.float32]


def test_decode_no_lr_pool():
    case = make_case([(20, 1, 1), (3, 1, 0)], 4, 1, 16, None, 4, torch.float32, seed=12)
    assert rel_err(run_kernel(case, decode=True, num_splits=2), case.ref) < TOL[torch.float32]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_small(dtype):
    if dtype == torch.bfloat16 and not CUDA:
        pytest.skip("Triton's interpreter computes bf16 dots wrongly (numpy has no bf16); bf16 runs in the GPU matrix")
    case = make_case([(9, 5, 1), (4, 1, 2)], 4, 2, 16, 8, 4, dtype, seed=13)
    assert rel_err(run_kernel(case, decode=False), case.ref) < TOL[dtype]
    dcase = make_case([(9, 1, 1), (30, 1, 2)], 4, 2, 16, 8, 4, dtype, seed=14)
    assert rel_err(run_kernel(dcase, decode=True, num_splits=2), dcase.ref) < TOL[dtype]


def _store_inputs(n, t, hkv, d, rank, num_blocks, bs, dtype, seed, device=DEVICE):
    gen = torch.Generator().manual_seed(seed)
    slots = torch.randperm(num_blocks * bs, generator=gen)
    base_slots = slots[:n].clone()
    lr_slots = torch.randperm(num_blocks * bs, generator=gen)[:t].clone()
    if n > 2:
        base_slots[1] = -1  # a padding row: skipped
    key = torch.randn(n, hkv, d, generator=gen).to(device, dtype)
    value = torch.randn(n, hkv, d, generator=gen).to(device, dtype)
    lr = torch.randn(t, rank, generator=gen).to(device, torch.float32)  # float32 shrink output, cast on store
    pools = [torch.randn(num_blocks, bs, hkv, d, generator=gen).to(device, dtype) for _ in range(2)]
    lr_pool = torch.randn(num_blocks, bs, rank, generator=gen).to(device, dtype)
    return key, value, lr, base_slots.to(device), lr_slots.to(device), pools, lr_pool


def _check_store(n, t, hkv, d, rank, bs, dtype, seed):
    num_blocks = -(-max(n, t) // bs) + 2
    key, value, lr, base_slots, lr_slots, (kp, vp), lp = _store_inputs(n, t, hkv, d, rank, num_blocks, bs, dtype, seed)
    ref = [kp.clone(), vp.clone(), lp.clone()]
    store_kv_lr(kp, vp, lp, key, value, base_slots, lr, lr_slots)
    keep = base_slots >= 0
    ref[0].view(-1, hkv, d)[base_slots[keep]] = key[keep]
    ref[1].view(-1, hkv, d)[base_slots[keep]] = value[keep]
    ref[2].view(-1, rank)[lr_slots] = lr.to(dtype)
    assert torch.equal(kp, ref[0]) and torch.equal(vp, ref[1]) and torch.equal(lp, ref[2])


@pytest.mark.parametrize("n,t,rank", [(5, 9, 8), (9, 4, 1), (0, 6, 16), (6, 6, 64)])
def test_store_small(n, t, rank):
    _check_store(n, t, 2, 16, rank, 4, torch.float32, seed=n * 31 + t)


def _check_lora(t, d_in, d_out, rank, token_slots, dtype, seed, split_k=None):
    gen = torch.Generator().manual_seed(seed)
    s = 4
    x = torch.randn(t, d_in, generator=gen).to(DEVICE, dtype)
    a = (torch.randn(s, d_in, rank, generator=gen) / d_in**0.5).to(DEVICE, dtype)
    b = torch.randn(s, rank, d_out, generator=gen).to(DEVICE, dtype)
    a[0] = 0
    b[0] = 0
    scaling = (torch.rand(s, generator=gen) + 0.5).to(DEVICE)
    segs = group_by_slot(token_slots, DEVICE)
    starts, slots, idx = [0], [], []
    for slot, rows in segs:
        rows = torch.arange(t, device=DEVICE) if rows is None else rows
        idx.append(rows)
        starts.append(starts[-1] + rows.numel())
        slots.append(slot)
    tokens = torch.cat(idx).to(torch.int32) if idx else torch.zeros(0, dtype=torch.int32, device=DEVICE)
    seg_start = torch.tensor(starts, dtype=torch.int32, device=DEVICE)
    seg_slot = torch.tensor(slots, dtype=torch.int32, device=DEVICE)
    max_len = max((r.numel() for r in idx), default=0)
    y = lora_shrink(x, a, seg_start, seg_slot, max_len, tokens=tokens, out_dtype=torch.float32, split_k=split_k)
    sl = torch.tensor(token_slots)
    x64, a64, b64 = x.cpu().double(), a.cpu().double(), b.cpu().double()
    y_ref = torch.einsum("tk,tkr->tr", x64, a64[sl])
    tol = TOL[dtype]
    assert rel_err(y.cpu(), y_ref) < tol or y_ref.abs().max() == 0
    base = torch.randn(t, d_out, generator=gen).to(DEVICE, dtype)
    out = base.clone()
    lora_expand(y, b, seg_start, seg_slot, max_len, scaling, out=out, add=True, tokens=tokens)
    delta = torch.einsum("tr,trn->tn", y_ref, b64[sl]) * scaling.cpu().double()[sl][:, None]
    ref = base.cpu().double() + delta
    assert rel_err(out.cpu(), ref) < tol
    fresh = lora_expand(y, b, seg_start, seg_slot, max_len, scaling, tokens=tokens)
    assert rel_err(fresh.cpu() + base.cpu().double(), ref) < tol


@pytest.mark.parametrize(
    "t,rank,slots,split_k",
    [
        (7, 8, "mixed", None),  # tokens of 3 adapters and slot 0, interleaved
        (5, 1, "mixed", 3),  # rank 1, split-K (the last split sums)
        (20, 16, "one", None),  # one adapter for all tokens (segment None)
        (6, 64, "mixed", 2),  # rank 64
    ],
)
def test_lora_small(t, rank, slots, split_k):
    rng = random.Random(t * rank)
    token_slots = [rng.randrange(4) for _ in range(t)] if slots == "mixed" else [2] * t
    _check_lora(t, 96, 80, rank, token_slots, torch.float32, seed=t + rank, split_k=split_k)


# (x dtype, out dtype): the engine's q/k/o deltas shrink to float32, the value shrink (LR rows) to the model's dtype.
# bf16 x needs a GPU (the interpreter's bf16 dots are wrong, see test_half_precision_small); a bf16 output does not.
SHRINK_DTYPES = [
    (torch.float32, torch.float32),
    (torch.float16, torch.float16),
    (torch.float16, torch.float32),
    (torch.float32, torch.bfloat16),
    (torch.float32, torch.float16),
    (torch.bfloat16, torch.bfloat16),
    (torch.bfloat16, torch.float32),
]


def _shrink_case(t: int, seg_lens: list[int], dtype: torch.dtype, seed: int, d_in: int = 100, rank: int = 12):
    """Segments of shuffled rows (slots 1..3 in turn) over the first sum(seg_lens) rows of a random permutation; the
    other rows lie in no segment. Returns the kernel's inputs and the float64 result (zero rows outside segments)."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(t, d_in, generator=gen)
    a = torch.randn(4, d_in, rank, generator=gen) / d_in**0.5
    rows = torch.randperm(t, generator=gen)[: sum(seg_lens)]
    slots = [1 + i % 3 for i in range(len(seg_lens))]
    starts = [0]
    for n in seg_lens:
        starts.append(starts[-1] + n)
    x, a = x.to(dtype), a.to(dtype)
    ref = torch.zeros(t, rank, dtype=torch.float64)
    for g, slot in enumerate(slots):
        seg_rows = rows[starts[g] : starts[g + 1]]
        ref[seg_rows] = x[seg_rows].double() @ a[slot].double()
    i32 = dict(dtype=torch.int32, device=DEVICE)
    inputs = (x.to(DEVICE), a.to(DEVICE), torch.tensor(starts, **i32), torch.tensor(slots, **i32), max(seg_lens))
    return inputs, rows.to(DEVICE, torch.int32), ref


def _shrink_counters_zero() -> bool:
    buf = counters_of(SHRINK_COUNTERS_OWNER, DEVICE)
    return buf is not None and not bool(buf.any())


@pytest.mark.parametrize("t", [1, 3])
def test_lora_shrink_decode_shape_auto_split(t):
    """An 8B decode shape (d_in 4096, rank 8, one adapter): the split count the heuristic picks on a GPU (several;
    8 interpreted), merged by
    the last split, equals the reference; the counters are zero again."""
    inputs, tokens, ref = _shrink_case(t, [t], torch.float32, seed=t, d_in=4096, rank=8)
    split = None if CUDA else 8  # the interpreter never splits by itself
    y = lora_shrink(*inputs, tokens=tokens, out_dtype=torch.float32, rows_covered=True, split_k=split)
    assert rel_err(y, ref) < TOL[torch.float32]
    assert _shrink_counters_zero()


@pytest.mark.parametrize("given_out", [False, True])
@pytest.mark.parametrize("covered", [True, False])
@pytest.mark.parametrize("dtypes", SHRINK_DTYPES, ids=lambda d: f"{str(d[0])[6:]}-{str(d[1])[6:]}")
def test_lora_shrink_split_k_last_split_sums(dtypes, covered, given_out):
    """Split-K (4 splits over d_in 100 / 460 on a GPU, the last one short) merged by the last split in one launch:
    three segments, two of them two m tiles (BLOCK_M 16 interpreted), rows outside segments zero. Each call leaves
    every counter zero, so the second call is right too, and it is bitwise the first (the splits are summed in a
    fixed order)."""
    x_dtype, out_dtype = dtypes
    if x_dtype == torch.bfloat16 and not CUDA:
        pytest.skip("Triton's interpreter computes bf16 dots wrongly (numpy has no bf16)")
    tol = max(TOL[x_dtype], TOL[out_dtype])
    t, seg_lens = (40, [19, 3, 18]) if covered else (40, [17, 5, 9])
    # d_in: four K splits of the launch's BLOCK_K (32 interpreted, 128 compiled), the last one short
    inputs, tokens, ref = _shrink_case(t, seg_lens, x_dtype, seed=len(seg_lens) + t, d_in=460 if CUDA else 100)
    results = []
    for _ in range(2):
        # a given output may hold anything on rows the segments cover (NaN here) and must be zero on the others
        out = torch.zeros(t, ref.shape[1], dtype=out_dtype, device=DEVICE) if given_out else None
        if out is not None and covered:
            out.fill_(float("nan"))
        y = lora_shrink(*inputs, tokens=tokens, out=out, out_dtype=out_dtype, split_k=4, rows_covered=covered)
        assert y.dtype == out_dtype and y.shape == ref.shape and (out is None or y is out)
        assert _shrink_counters_zero()
        results.append(y)
    first, second = results
    assert rel_err(first, ref) < tol
    assert torch.equal(first, second)
    outside = ref.abs().sum(1) == 0
    assert covered == (not outside.any()) and not first.cpu()[outside].any()
    one = lora_shrink(*inputs, tokens=tokens, out_dtype=out_dtype, split_k=1, rows_covered=covered)
    torch.testing.assert_close(first, one, rtol=tol, atol=tol)


@pytest.mark.parametrize("split_k", [1, 4])
def test_lora_shrink_covered_rows_need_no_fill_or_conversion(split_k):
    """rows_covered: the shrink is the only work, whatever split_k (no zeroed buffer, no dtype conversion after it);
    otherwise the result is zero-filled first (rows in no segment read zero)."""
    from torch.profiler import profile

    inputs, tokens, ref = _shrink_case(24, [24], torch.float16, seed=9)
    lora_shrink(*inputs, tokens=tokens, split_k=split_k, rows_covered=True)  # counters allocated outside the profile
    extra = {"aten::zeros", "aten::zero_", "aten::fill_", "aten::to", "aten::_to_copy"}
    for covered in (True, False):
        with profile() as prof:
            y = lora_shrink(*inputs, tokens=tokens, split_k=split_k, rows_covered=covered)
        ops = {e.name for e in prof.events()}
        assert bool(ops & extra) != covered, ops & extra
        assert rel_err(y, ref) < TOL[torch.float16]


def test_shared_shrink_small():
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(11, 72, generator=gen).to(DEVICE)
    a = torch.randn(72, 8, generator=gen).to(DEVICE)
    y = shared_shrink(x, a)
    assert rel_err(y.cpu(), x.cpu().double() @ a.cpu().double()) < TOL[torch.float32]


class _Cfg:
    def __init__(self, h, q, kv, inter):
        self.shapes = {
            "q_proj": (h, q),
            "v_proj": (h, kv),
            "o_proj": (q, h),
            "k_proj": (h, kv),
            "gate_proj": (h, inter),
            "up_proj": (h, inter),
            "down_proj": (inter, h),
        }

    def module_shapes(self):
        return self.shapes


def _adapter(name, rank, layers, modules, cfg, seed, shared_a=None):
    gen = torch.Generator().manual_seed(seed)
    w = {}
    for layer in range(layers):
        for mod in modules:
            d_in, d_out = cfg.module_shapes()[mod]
            a = torch.randn(d_in, rank, generator=gen) / d_in**0.5
            if mod == "v_proj" and shared_a is not None:
                a = shared_a.setdefault(layer, a)
            w[(layer, mod)] = (a, torch.randn(rank, d_out, generator=gen))
    return LoRAAdapter(name=name, rank=rank, scaling=16 / rank, targets=frozenset(modules), weights=w)


@pytest.mark.parametrize("shared", [False, True])
def test_triton_lora_bank_matches_bank(shared):
    """The opt-in engine hook gives the reference bank's delta / value_shrink on a mixed batch."""
    cfg = _Cfg(48, 64, 32, 80)
    kw = dict(config=cfg, max_loras=3, max_rank=16, dtype=torch.float32, device=DEVICE)
    ref_bank, bank = LoRABank(**kw), TritonLoRABank(**kw)
    shared_a = {} if shared else None
    specs = [(8, ("q_proj", "v_proj")), (4, ("v_proj", "o_proj")), (16, ("v_proj",))]
    if shared:  # one v_proj A for all: same rank
        specs = [(8, mods) for _, mods in specs]
    for slot, (rank, mods) in enumerate(specs, 1):
        ad = _adapter(f"a{slot}", rank, 2, mods, cfg, seed=slot, shared_a=shared_a)
        ref_bank.load(slot, ad)
        bank.load(slot, ad)
    gen = torch.Generator().manual_seed(3)
    token_slots = [1, 1, 2, 0, 3, 3, 3, 1, 2] if not shared else [1, 1, 2, 3, 3, 2]
    x = torch.randn(len(token_slots), 48, generator=gen).to(DEVICE)
    segs = group_by_slot(token_slots, DEVICE)
    for layer in range(2):
        for mod in ("q_proj", "v_proj", "o_proj", "k_proj"):
            xin = x if mod != "o_proj" else torch.randn(len(token_slots), 64, generator=gen).to(DEVICE)
            ref, got = ref_bank.delta(xin, layer, mod, segs), bank.delta(xin, layer, mod, segs)
            assert (ref is None) == (got is None), mod
            if ref is not None:
                assert rel_err(got.cpu(), ref.cpu()) < 1e-5, mod
                y = torch.randn_like(ref)
                assert rel_err(bank.add_delta(y.clone(), xin, layer, mod, segs).cpu(), (y + ref).cpu()) < 1e-5
        ref_r, got_r = ref_bank.value_shrink(x, layer, segs), bank.value_shrink(x, layer, segs)
        assert rel_err(got_r.cpu(), ref_r.cpu()) < 1e-5
    if shared:
        assert bank._v_shared(0)


def test_backend_store_then_attend():
    """TritonBackend end to end: store new tokens through the kernel, then attend; vs the reference backend."""
    seqs = [(5, 3, 1), (0, 6, 2), (12, 2, 0)]
    case = make_case(seqs, 4, 2, 16, 8, 4, torch.float32, seed=21)
    gen = torch.Generator().manual_seed(22)
    m = case.meta
    # the new tokens' entries are written by the store kernel (the case's pools hold them already: overwrite)
    slots, lr_slots = [], []
    for i, (p, q, _) in enumerate(seqs):
        for pos in range(p, p + q):
            slots.append(int(m.base_block_tables[i, pos // 4]) * 4 + pos % 4)
            lb = int(m.lr_block_tables[i, pos // 4])
            lr_slots.append(lb * 4 + pos % 4 if lb >= 0 else -1)
    t = len(slots)
    key = torch.randn(t, 2, 16, generator=gen).to(DEVICE)
    value = torch.randn(t, 2, 16, generator=gen).to(DEVICE)
    lr = torch.randn(t, 8, generator=gen).to(DEVICE)
    m.base_slots = torch.tensor(slots, device=DEVICE)
    m.lr_slots = torch.tensor(lr_slots, device=DEVICE)
    ref_cache = SimpleNamespace(**case.cache.__dict__)
    ref_cache.key = [case.cache.key[0].clone()]
    ref_cache.value = [case.cache.value[0].clone()]
    ref_cache.lr = [case.cache.lr[0].clone()]
    tb, rb = TritonBackend(), TorchReferenceBackend()
    tb.store(case.cache, 0, key, value, lr, m)
    keep = m.lr_slots >= 0
    ref_cache.key[0].view(-1, 2, 16)[m.base_slots] = key
    ref_cache.value[0].view(-1, 2, 16)[m.base_slots] = value
    ref_cache.lr[0].view(-1, 8)[m.lr_slots[keep]] = lr[keep]
    assert torch.equal(case.cache.key[0].nan_to_num(7.0), ref_cache.key[0].nan_to_num(7.0))
    assert torch.equal(case.cache.lr[0].nan_to_num(7.0), ref_cache.lr[0].nan_to_num(7.0))
    out = tb.attend(case.cache, 0, case.query, case.value_up, case.scaling, m)
    ref = rb.attend(ref_cache, 0, case.query, case.value_up, case.scaling, m)
    assert rel_err(out.cpu(), ref.cpu()) < 1e-5


# ------------------------------------------------------------------------------------------------------------
# the GPU shape matrix (compiled kernels; skipped without CUDA)
# ------------------------------------------------------------------------------------------------------------
def _ragged(rng: random.Random, n: int, max_prefix: int, max_q: int, slots: int, decode: bool):
    return [
        (
            rng.choice([0, rng.randrange(max_prefix + 1)]),
            1 if decode else rng.randrange(1, max_q + 1),
            rng.randrange(slots),
        )
        for _ in range(n)
    ]


GPU_MATRIX = [
    (hq, hkv, d, rank, dtype)
    for d in (64, 128, 256)
    for hq, hkv in ((8, 8), (16, 4), (32, 4))
    for rank, dtype in ((1, torch.bfloat16), (8, torch.bfloat16), (16, torch.float16), (64, torch.float32))
]


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("cfg", GPU_MATRIX, ids=lambda c: f"hq{c[0]}-hkv{c[1]}-d{c[2]}-r{c[3]}-{str(c[4])[6:]}")
def test_gpu_matrix(cfg):
    hq, hkv, d, rank, dtype = cfg
    index = GPU_MATRIX.index(cfg)
    rng = random.Random(index)
    for bs in ((16, 32)[index % 2],):  # both block sizes over the matrix, one per config (compile time)
        pre = make_case(_ragged(rng, 5, 700, 300, 4, False), hq, hkv, d, rank, bs, dtype, seed=rng.randrange(1 << 30))
        err = rel_err(run_kernel(pre, decode=False).cpu(), pre.ref)
        assert err < TOL[dtype], f"prefill bs={bs}: {err}"
        big = (64, 128)[index % 2]  # pages of 64 / 128 tokens: Hopper's TMA tiles by default
        pre = make_case(_ragged(rng, 4, 900, 300, 4, False), hq, hkv, d, rank, big, dtype, seed=rng.randrange(1 << 30))
        err = rel_err(run_kernel(pre, decode=False).cpu(), pre.ref)
        assert err < TOL[dtype], f"prefill bs={big}: {err}"
        dec = make_case(_ragged(rng, 7, 3000, 1, 4, True), hq, hkv, d, rank, bs, dtype, seed=rng.randrange(1 << 30))
        for splits in (None, 1):
            err = rel_err(run_kernel(dec, decode=True, num_splits=splits).cpu(), dec.ref)
            assert err < TOL[dtype], f"decode bs={bs} splits={splits}: {err}"


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("rank", [1, 8, 16, 64])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_gpu_store_and_lora(rank, dtype):
    _check_store(300, 500, 8, 128, rank, 16, dtype, seed=rank)
    rng = random.Random(rank)
    for t in (1, 32, 700):
        token_slots = [rng.randrange(4) for _ in range(t)]
        _check_lora(t, 2048, 1024, rank, token_slots, dtype, seed=t + rank)


def test_bench_kernels_smoke(tmp_path):
    """`lragent bench kernels --smoke`: the benchmark's code path on tiny shapes (timings meaningless here)."""
    from lragent.bench.kernels import main

    out = tmp_path / "bench.json"
    assert main(["--smoke", "--json", str(out), "--warmup-ms", "1", "--rep-ms", "1"]) == 0
    import json

    res = json.loads(out.read_text())
    assert res["decode"] and res["prefill"] and res["lora"] and "targets" in res
    assert all(r["layers"] == 32 and r["layer_ms"] > 0 for r in res["decode"])  # per layer of a step, too


def test_bench_kernels_decode_targets():
    """Issue 17's batch-1 decode target read off the 8k row, timed alone and per layer of a step."""
    from lragent.bench.kernels import targets

    row = {"batch": 1, "context": 8192, "ours_pct_copy_bw": 30.3, "layer_pct_copy_bw": 61.0, "ours_over_sdpa": 1.0}
    out = targets([row, {**row, "batch": 8, "layer_pct_copy_bw": 10.0}], [])
    assert out["decode_b1_8k_layer_pct_copy_bw"] == 61.0 and out["met"]["decode_b1_8k_layer_60pct_copy_bw"]
    assert not out["met"]["decode_b1_8k_60pct_copy_bw"]
    assert not targets([{**row, "layer_pct_copy_bw": 59.0}], [])["met"]["decode_b1_8k_layer_60pct_copy_bw"]


def test_bench_kernels_prefill_targets():
    """Issue 17's prefill targets read off the rows: 8k new tokens alone at >= 60% of the matmul rate, and no shape
    slower than SDPA."""
    from lragent.bench.kernels import targets

    rows = [
        {"new_tokens": 8192, "prefix": 0, "ours_pct_matmul": 61.1, "ours_over_sdpa": 0.75},
        {"new_tokens": 32, "prefix": 1024, "ours_pct_matmul": 2.4, "ours_over_sdpa": 1.69},
    ]
    met = targets([], rows)["met"]
    assert met["prefill_8k_60pct_matmul"] and not met["prefill_no_slower_than_sdpa"]
    met = targets([], [{**rows[0], "ours_pct_matmul": 59.9}])["met"]
    assert not met["prefill_8k_60pct_matmul"] and met["prefill_no_slower_than_sdpa"]


def test_triton_lora_bank_plans_interleaved_and_per_token():
    """Two segment lists used alternately (FULL_SHARED: all tokens for q, the base-written subset for k/v) hit their
    own cached plans; the one-segment-per-row plan of CUDA-graph decode (slot 0 rows included) gives the same deltas."""
    from lragent.kernels.triton_lora import SegmentPlan

    cfg = _Cfg(48, 64, 32, 80)
    kw = dict(config=cfg, max_loras=3, max_rank=16, dtype=torch.float32, device=DEVICE)
    ref_bank, bank = LoRABank(**kw), TritonLoRABank(**kw)
    for slot, (rank, mods) in enumerate([(8, ("q_proj", "v_proj")), (4, ("v_proj", "o_proj")), (16, ("q_proj",))], 1):
        ad = _adapter(f"a{slot}", rank, 2, mods, cfg, seed=10 + slot)
        ref_bank.load(slot, ad)
        bank.load(slot, ad)
    gen = torch.Generator().manual_seed(5)
    token_slots = [2, 1, 0, 3, 1, 2, 3]
    x = torch.randn(len(token_slots), 48, generator=gen).to(DEVICE)
    subset = [0, 2, 3, 6]
    segs = group_by_slot(token_slots, DEVICE)
    sub_segs = group_by_slot([token_slots[i] for i in subset], DEVICE)
    per_token = SegmentPlan.per_token(
        torch.arange(len(token_slots) + 1, dtype=torch.int32, device=DEVICE),
        torch.tensor(token_slots, dtype=torch.int32, device=DEVICE),
    )
    for layer in range(2):
        for mod in ("q_proj", "v_proj", "o_proj"):
            xin = x if mod != "o_proj" else torch.randn(len(token_slots), 64, generator=gen).to(DEVICE)
            ref = ref_bank.delta(xin, layer, mod, segs)
            ref_sub = ref_bank.delta(xin[subset], layer, mod, sub_segs)
            assert rel_err(bank.delta(xin, layer, mod, segs).cpu(), ref.cpu()) < 1e-5, mod
            assert rel_err(bank.delta(xin[subset], layer, mod, sub_segs).cpu(), ref_sub.cpu()) < 1e-5, mod
            assert rel_err(bank.delta(xin, layer, mod, per_token).cpu(), ref.cpu()) < 1e-5, mod
        ref_r = ref_bank.value_shrink(x, layer, segs)
        assert rel_err(bank.value_shrink(x, layer, per_token).cpu(), ref_r.cpu()) < 1e-5
    assert len(bank._plans) <= TritonLoRABank._PLANS_KEPT


def test_default_block_size():
    """Block size 0 (the default) resolves per device: 16 off Hopper (here), 64 on Hopper-or-newer GPUs (TMA tiles)."""
    from lragent.config import EngineConfig, default_block_size

    assert EngineConfig(device="cpu").block_size == default_block_size("cpu") == 16
    assert EngineConfig(device="cpu", block_size=32).block_size == 32
    if CUDA:
        major = torch.cuda.get_device_capability()[0]
        assert EngineConfig(device="cuda").block_size == (64 if major >= 9 else 16)
    with pytest.raises(ValueError, match="power of two"):
        EngineConfig(device="cpu", block_size=48)
