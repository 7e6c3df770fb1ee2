"""One-launch split-KV decode (`merge="last_split"`): the split program that finishes last for a (sequence, kv head)
merges every split's partials, against the two-launch merge ("kernel") and the float64 reference.

On the CPU the kernels run under TRITON_INTERPRET=1, where programs run one after another (the last split in grid
order is the last to finish), so the merge helper is also tested on its own, on partials written here. With CUDA the
same cases run compiled, and the `gpu` tests add many concurrent splits, repeated launches and CUDA graph replays
(the atomics' ordering is only exercised there).
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

CUDA = torch.cuda.is_available()
if not CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")  # must precede the first @triton.jit of the kernel modules

import triton  # noqa: E402
import triton.language as tl  # noqa: E402
from test_kernels import DECODE_SMALL, DEVICE, TOL, make_case, rel_err, run_kernel  # noqa: E402
from test_key_adapters import DECODE as KEY_DECODE  # noqa: E402
from test_key_adapters import _key_lr, key_case  # noqa: E402
from test_stacked_lr import stacked_case  # noqa: E402

from lragent.kernels import counters as kc  # noqa: E402
from lragent.kernels import triton_attention as ta  # noqa: E402
from lragent.kernels.triton_attention import _merge_head, decode_counters, paged_decode  # noqa: E402

F32 = TOL[torch.float32]
gpu = pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")


def _f32(t: torch.Tensor | None) -> torch.Tensor | None:
    return None if t is None else t.to(DEVICE, torch.float32)


def _dev(t: torch.Tensor) -> torch.Tensor:
    return t.to(DEVICE)


def counters_zero(device: torch.device = DEVICE) -> bool:
    buf = kc.counters_of(ta.DECODE_COUNTERS_OWNER, device)
    return buf is None or not bool(buf.any())


def both_merges(call, splits: int) -> torch.Tensor:
    """The same decode with both merges; they agree (to rounding), the counters are left zero. Returns last_split's."""
    two = call(num_splits=splits, merge="kernel")
    one = call(num_splits=splits, merge="last_split")
    assert counters_zero()
    assert not torch.isnan(one).any()
    torch.testing.assert_close(one, two, rtol=1e-6, atol=1e-6)
    return one


# ------------------------------------------------------------------------------------------------------------
# the kernel: last_split == kernel == the reference
# ------------------------------------------------------------------------------------------------------------
SPLITS = [1, 2, 3, 7]


@pytest.mark.parametrize("case_id", range(len(DECODE_SMALL)))
@pytest.mark.parametrize("splits", SPLITS)
def test_last_split_equals_kernel_and_reference(case_id, splits):
    """Batches 4 / 2 / 1, mixed adapters incl. slot 0, GQA 4 / 1 / 8, ranks 8 / 3 / 64."""
    seqs, hq, hkv, d, rank, bs = DECODE_SMALL[case_id]
    case = make_case(seqs, hq, hkv, d, rank, bs, torch.float32, seed=100 + case_id)
    out = both_merges(lambda **kw: run_kernel(case, decode=True, **kw), splits)
    assert rel_err(out, case.ref) < F32


@pytest.mark.parametrize("block_d", [0, 16, 32])
def test_merge_kernel_d_slices(block_d, monkeypatch):
    """The merge kernel with D cut into slices (several programs per head; 0: all of D in one) equals the last
    split's whole-D merge and the reference, head dim 64."""
    monkeypatch.setattr(ta, "MERGE_BLOCK_D", block_d)
    case = make_case([(40, 1, 1), (9, 1, 0), (23, 1, 2)], 4, 2, 64, 4, 8, torch.float32, seed=31)
    out = both_merges(lambda **kw: run_kernel(case, decode=True, **kw), 5)
    assert rel_err(out, case.ref) < F32


def test_ragged_batch_of_six():
    seqs = [(45, 1, 2), (0, 1, 0), (17, 1, 1), (90, 1, 3), (3, 1, 0), (31, 1, 1)]
    case = make_case(seqs, 4, 2, 16, 4, 8, torch.float32, seed=5)
    out = both_merges(lambda **kw: run_kernel(case, decode=True, **kw), 5)
    assert rel_err(out, case.ref) < F32


@pytest.mark.parametrize("splits", [3, 7])
def test_no_lr_pool(splits):
    """FullShared: no LR pool, value_up None (the merge adds no LR term)."""
    case = make_case([(20, 1, 1), (3, 1, 0)], 4, 1, 16, None, 4, torch.float32, seed=12)
    out = both_merges(lambda **kw: run_kernel(case, decode=True, **kw), splits)
    assert rel_err(out, case.ref) < F32


@pytest.mark.parametrize("splits", [2, 7])
def test_stacked_lr_slices(splits):
    """Each sequence's slice of stacked LR rows, slot 0 reading none."""
    c = stacked_case([(0, 1, 1), (30, 1, 3), (16, 1, 0), (41, 1, 2)], 8, 2, 16, 8, 4, 4, seed=7)
    m = c.meta

    def call(**kw):
        return paged_decode(
            _f32(c.query), _f32(c.key), _f32(c.value), _f32(c.wide), _dev(m.base_block_tables),
            _dev(m.lr_block_tables), _dev(m.context_lens_t), _dev(m.seq_lora_slots), _f32(c.value_up),
            _f32(c.scaling), **kw,
        )  # fmt: skip

    out = both_merges(call, splits)
    assert rel_err(out.cpu(), c.ref) < F32


@pytest.mark.parametrize("case_id", range(len(KEY_DECODE)))
@pytest.mark.parametrize("splits", [3, 7])
def test_key_lr(case_id, splits):
    """Keys rebuilt from R_k (the `key_lr=` argument), with and without adapted values."""
    seqs, hq, hkv, d, rank, slots, bs, values, keys = KEY_DECODE[case_id]
    c = key_case(seqs, hq, hkv, d, rank, slots, bs, seed=10 + case_id, values=values, keys=keys)
    m = c.meta

    def call(**kw):
        return paged_decode(
            _f32(c.query), _f32(c.key), _f32(c.value), _f32(c.lr), _dev(m.base_block_tables),
            _dev(m.lr_block_tables), _dev(m.context_lens_t), _dev(m.seq_lora_slots), _f32(c.value_up),
            _f32(c.scaling), key_lr=_key_lr(c), **kw,
        )  # fmt: skip

    out = both_merges(call, splits)
    assert rel_err(out.cpu(), c.ref) < F32


@pytest.mark.parametrize("splits", [7, 16])
def test_contexts_shorter_than_the_split_count(splits):
    """Most splits hold no key (contexts 1..5, one key tile): they still count, and merge to no NaN."""
    case = make_case([(0, 1, 1), (2, 1, 0), (4, 1, 2)], 4, 2, 16, 4, 4, torch.float32, seed=3)
    out = both_merges(lambda **kw: run_kernel(case, decode=True, **kw), splits)
    assert rel_err(out, case.ref) < F32


def test_consecutive_launches_reuse_the_counters():
    """Two launches on one counter buffer, the second with other queries, lengths and more rows: each is right
    (a counter left non-zero would make some split merge early, from the other launch's partials)."""
    first = make_case([(30, 1, 1), (9, 1, 2)], 8, 2, 16, 8, 4, torch.float32, seed=21)
    second = make_case([(12, 1, 2), (50, 1, 0), (33, 1, 3)], 8, 2, 16, 8, 4, torch.float32, seed=22)
    for case in (first, second, first):
        buf = decode_counters(1, DEVICE)
        assert rel_err(run_kernel(case, decode=True, num_splits=3, merge="last_split"), case.ref) < F32
        assert decode_counters(1, DEVICE) is buf  # no new buffer, and every counter back to 0
        assert counters_zero()


# ------------------------------------------------------------------------------------------------------------
# selection, the counter buffer
# ------------------------------------------------------------------------------------------------------------
def test_merge_selection(monkeypatch):
    """`DECODE_MERGE` (from LRAGENT_DECODE_MERGE) is the default; `merge=` overrides it; one split merges nothing."""
    case = make_case([(30, 1, 1), (9, 1, 0)], 4, 2, 16, 4, 4, torch.float32, seed=8)
    launches: list[int] = []
    real = ta._merge_splits
    monkeypatch.setattr(ta, "_merge_splits", lambda *a, **k: launches.append(1) or real(*a, **k))
    for default, merge, splits, second_launch in [
        ("kernel", None, 3, True),
        ("last_split", None, 3, False),
        ("last_split", "kernel", 3, True),
        ("kernel", "last_split", 3, False),
        ("kernel", None, 1, False),
        ("last_split", None, 1, False),
    ]:
        launches.clear()
        monkeypatch.setattr(ta, "DECODE_MERGE", default)
        out = run_kernel(case, decode=True, num_splits=splits, merge=merge)
        assert rel_err(out, case.ref) < F32
        assert bool(launches) == second_launch, (default, merge, splits)
    with pytest.raises(ValueError, match="merge must be"):
        run_kernel(case, decode=True, num_splits=3, merge="merge_kernel")


def test_environment_variable_is_read_at_import():
    code = "from lragent.kernels import triton_attention as t; print(t.DECODE_MERGE)"
    env = {**os.environ, "TRITON_INTERPRET": "1", "LRAGENT_DECODE_MERGE": "last_split"}
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "last_split"
    env["LRAGENT_DECODE_MERGE"] = "bogus"
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert done.returncode != 0 and "LRAGENT_DECODE_MERGE must be" in done.stderr


def test_counter_buffer_grows_outside_capture_only(monkeypatch):
    """Grows (keeping the old buffer alive for graphs captured on it); growth during a CUDA graph capture raises."""
    dev = torch.device("cpu")
    monkeypatch.setattr(kc, "_BUFFERS", {})
    monkeypatch.setattr(kc, "_RETIRED", [])
    small = decode_counters(10, dev)
    assert small.numel() >= 10 and small.dtype == torch.int32 and not small.any()
    assert decode_counters(small.numel(), dev) is small
    big = decode_counters(small.numel() + 1, dev)
    assert big.numel() >= 2 * small.numel() and not big.any() and kc._RETIRED == [small]
    monkeypatch.setattr(kc, "_capturing", lambda device: True)
    assert decode_counters(big.numel(), dev) is big  # large enough: fine while capturing
    with pytest.raises(RuntimeError, match="CUDA graph is being captured"):
        decode_counters(big.numel() + 1, dev)


# ------------------------------------------------------------------------------------------------------------
# the merge helper on its own, on partials written here
# ------------------------------------------------------------------------------------------------------------
@triton.jit
def _merge_probe(
    pacc_ptr, pr_ptr, pml_ptr, slot_ptr, vup_ptr, scaling_ptr, out_ptr, stride_vs, stride_vr, NUM_SPLITS,
    HKV: tl.constexpr, G: tl.constexpr, D: tl.constexpr, R: tl.constexpr, R_PAD: tl.constexpr,
    NS_PAD: tl.constexpr, CHUNK: tl.constexpr, HAS_LR: tl.constexpr,
):  # fmt: skip
    """Program (kv head, row): its G query heads, as the decode kernel's last split merges them."""
    g = tl.program_id(0)
    b = tl.program_id(1)
    offs_d = tl.arange(0, D)
    for i in range(G):
        h = g * G + i
        out = _merge_head(
            pacc_ptr, pr_ptr, pml_ptr, slot_ptr, vup_ptr, scaling_ptr, b, h, offs_d, stride_vs, stride_vr,
            NUM_SPLITS, HKV * G, G, D, R, R_PAD, NS_PAD, CHUNK, HAS_LR,
        )  # fmt: skip
        tl.store(out_ptr + (b * HKV * G + h) * D + offs_d, out)


def merge_reference(pacc, pr, pml, slots, vup, scaling, hkv: int, rank: int) -> torch.Tensor:
    """Log-sum-exp merge in float64: partials [B, S, Hq, ...] (max in log2 units) -> [B, Hq, d]."""
    pacc, pr, pml = pacc.double(), pr.double(), pml.double()
    m, ell = pml[..., 0], pml[..., 1]
    m_max = m.amax(1, keepdim=True)
    m_max = torch.where(torch.isinf(m_max), torch.zeros_like(m_max), m_max)
    w = torch.exp2(m - m_max)  # [B, S, Hq]
    big_l = (w * ell).sum(1)
    acc = (w[..., None] * pacc).sum(1)
    acc_r = (w[..., None] * pr[..., :rank]).sum(1)  # [B, Hq, r]
    b, hq, d = acc.shape
    g = hq // hkv
    up = vup.double()[slots].view(b, rank, hkv, d).repeat_interleave(g, 2)  # [B, r, Hq, d]
    lr = torch.einsum("bhr,brhd->bhd", acc_r, up) * scaling.double()[slots].view(b, 1, 1)
    lr[slots == 0] = 0
    big_l = torch.where(big_l == 0, torch.ones_like(big_l), big_l)
    return (acc + lr) / big_l[..., None]


@pytest.mark.parametrize("splits,chunk", [(1, 16), (5, 16), (40, 16), (40, 64)])
def test_merge_helper(splits, chunk):
    """Random partials with empty splits (max -inf, sum 0, acc 0), a row with no key at all (-> 0), slot-0 rows;
    chunk < splits walks the partials in several steps."""
    gen = torch.Generator().manual_seed(splits * 100 + chunk)
    b, hkv, g, d, rank, r_pad = 4, 2, 3, 16, 5, 16
    hq = hkv * g
    pacc = torch.randn(b, splits, hq, d, generator=gen)
    pr = torch.randn(b, splits, hq, r_pad, generator=gen)
    pml = torch.stack(
        [torch.rand(b, splits, hq, generator=gen) * 20 - 10, torch.rand(b, splits, hq, generator=gen)], -1
    )
    empty = torch.rand(b, splits, 1, generator=gen) < 0.3
    empty[2] = True  # row 2: every split empty
    empty = empty.expand(b, splits, hq)
    pml[..., 0][empty] = float("-inf")
    pml[..., 1][empty] = 0
    pacc[empty] = 0
    pr[empty] = 0
    slots = torch.tensor([1, 0, 2, 3])
    vup = torch.randn(4, rank, hkv * d, generator=gen)
    vup[0] = 0
    scaling = torch.rand(4, generator=gen) + 0.5
    scaling[0] = 0
    want = merge_reference(pacc, pr, pml, slots, vup, scaling, hkv, rank)
    for has_lr in (True, False):
        out = torch.full((b, hq, d), float("nan"), device=DEVICE)
        ns_pad = max(16, triton.next_power_of_2(splits))
        _merge_probe[(hkv, b)](
            _dev(pacc), _dev(pr), _dev(pml), _dev(slots), _dev(vup), _dev(scaling), out, vup.stride(0), vup.stride(1),
            splits, HKV=hkv, G=g, D=d, R=rank, R_PAD=r_pad, NS_PAD=ns_pad, CHUNK=min(chunk, ns_pad), HAS_LR=has_lr,
        )  # fmt: skip
        ref = want if has_lr else merge_reference(pacc, pr * 0, pml, slots, vup, scaling, hkv, rank)
        assert not out.isnan().any()
        torch.testing.assert_close(out.cpu().double(), ref, rtol=1e-5, atol=1e-5)
        assert not out[2].any()  # no key: 0


def test_bench_merge_compare_smoke(tmp_path):
    """`lragent bench kernels --merge-compare`: both merges side by side (timings meaningless here)."""
    import json

    from lragent.bench.kernels import main

    out = tmp_path / "bench.json"
    argv = ["--smoke", "--only", "merge", "--merge-compare", "0,3,1", "--json", str(out)]
    assert main(argv + ["--warmup-ms", "1", "--rep-ms", "1"]) == 0
    res = json.loads(out.read_text())
    rows = res["decode_merge"]  # smoke: batches 1, 2 at context 40, where the default count is 1
    assert not res["decode"] and [(r["batch"], r["num_splits"]) for r in rows] == [(1, 1), (1, 3), (2, 1), (2, 3)]
    assert all(r["kernel_ms"] > 0 and r["last_split_ms"] > 0 and "last_split_pct_copy_bw" in r for r in rows)


# ------------------------------------------------------------------------------------------------------------
# GPU: concurrent splits (the atomics' ordering), repeated launches, CUDA graph replays
# ------------------------------------------------------------------------------------------------------------
@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_gpu_last_split_under_contention(dtype):
    """Llama-3.1-8B heads, many splits racing for each counter, 50 launches: always equal to the two-launch merge."""
    seqs = [(8191, 1, 1), (4000, 1, 0), (123, 1, 2), (20000, 1, 3)]
    case = make_case(seqs, 32, 8, 128, 8, 16, dtype, seed=1)
    tol = 1e-6 if dtype == torch.float32 else 1e-2
    for splits in (2, 64, 256):
        want = run_kernel(case, decode=True, num_splits=splits, merge="kernel")
        assert rel_err(want, case.ref) < TOL[dtype]
        for _ in range(50):
            got = run_kernel(case, decode=True, num_splits=splits, merge="last_split")
            torch.testing.assert_close(got, want, rtol=tol, atol=tol)
        assert counters_zero()


@gpu
@pytest.mark.gpu
def test_gpu_last_split_in_a_cuda_graph():
    """Warm up eagerly (the buffer grows there), capture, replay with new queries: right every time, counters 0."""
    case = make_case([(5000, 1, 1), (77, 1, 2)], 32, 8, 128, 8, 16, torch.bfloat16, seed=2)
    c, m = case.cache, case.meta
    q = case.query.clone()
    out = torch.empty_like(q)

    def step():
        paged_decode(
            q, c.key[0], c.value[0], c.lr[0], m.base_block_tables, m.lr_block_tables, m.context_lens_t,
            m.seq_lora_slots, case.value_up, case.scaling, num_splits=64, out=out, merge="last_split",
        )  # fmt: skip

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        step()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    gen = torch.Generator(device="cuda").manual_seed(0)
    for _ in range(20):
        q.copy_(torch.randn(q.shape, generator=gen, device="cuda", dtype=q.dtype))
        graph.replay()
        want = run_kernel(SimpleCase(case, q), decode=True, num_splits=64, merge="kernel")
        torch.testing.assert_close(out, want, rtol=1e-2, atol=1e-2)
    torch.cuda.synchronize()
    assert counters_zero(q.device)


class SimpleCase:
    """A case with other queries (for `run_kernel`)."""

    def __init__(self, case, query: torch.Tensor):
        self.cache, self.meta, self.value_up, self.scaling, self.query = (
            case.cache, case.meta, case.value_up, case.scaling, query,
        )  # fmt: skip
