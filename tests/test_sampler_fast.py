"""The sampler's fast paths against its torch path and its row-by-row reference: the fused Triton top-k kernels
(`impl="triton"`, run under TRITON_INTERPRET=1 on the CPU, set by conftest) draw the same tokens with the same
log-probs for greedy and sampled rows, top-k / top-p / min-p, masked (-inf) logits, bias and penalties, top
log-probs and broken rows; `resolve_impl` falls back where a path does not serve a batch. On a CUDA GPU the graph
and Triton implementations (and Triton captured in a graph) equal the torch path on a 32 x 128k batch."""

from __future__ import annotations

import math
import os

import pytest
import torch

from lragent.engine.sampler import SamplingBatch, resolve_impl, sample, sample_reference
from lragent.sampling import SamplingParams

# CUDA when there is one (the kernels compiled), else the CPU under the interpreter
DEV = torch.device("cuda" if torch.cuda.is_available() else "cpu")
MIX = [
    SamplingParams(temperature=0.0),
    SamplingParams(temperature=0.9, top_p=0.75, top_k=40),
    SamplingParams(temperature=1.3, top_k=1),
    SamplingParams(temperature=0.7, top_k=5, min_p=0.1),
    SamplingParams(temperature=1.1, top_k=40),
    SamplingParams(temperature=0.5, top_k=5, top_p=0.6),
    SamplingParams(temperature=0.0),
]


def make(params, vocab, gen, device=DEV):
    n = len(params)
    seeds = torch.randint(-(1 << 62), 1 << 62, (n,), generator=gen).tolist()
    positions = torch.randint(0, 100_000, (n,), generator=gen).tolist()
    batch = SamplingBatch.build(params, seeds, positions, None, None, vocab, device)
    return batch, seeds, positions


def check_same(logits, batch, impl="triton", want_impl="triton"):
    """`impl` really runs (no silent fallback), and draws the torch path's tokens and log-probs."""
    logits = logits.to(DEV)
    assert resolve_impl(impl, logits, batch) == want_impl
    got, want = sample(logits, batch, impl=impl), sample(logits, batch, impl="torch")
    assert got.tokens == want.tokens
    assert got.logprobs == pytest.approx(want.logprobs, abs=1e-5, rel=1e-5)
    return got


@pytest.mark.parametrize("seed", range(4))
def test_triton_equals_torch_and_the_reference(seed):
    gen = torch.Generator().manual_seed(seed)
    vocab = 3000  # three 1024-wide chunks, the last one partial
    logits = 3 * torch.randn(len(MIX), vocab, generator=gen)
    logits[3, :1500] = float("-inf")  # a structured-output mask over whole chunks
    logits[4, torch.randperm(vocab, generator=gen)[:2990]] = float("-inf")  # fewer allowed tokens than its top-k
    batch, seeds, positions = make(MIX, vocab, gen)
    got = check_same(logits, batch)
    assert got.tokens == sample_reference(logits, MIX, seeds, positions)
    want_lp = torch.log_softmax(logits.double(), dim=-1)
    for row, (tok, lp) in enumerate(zip(got.tokens, got.logprobs)):
        assert abs(lp - want_lp[row, tok].item()) < 1e-5


def test_triton_draws_vary_with_the_noise_key():
    """Many draws of one row over positions: the same tokens as the torch path every time, and not one token."""
    gen = torch.Generator().manual_seed(7)
    row = torch.randn(1, 2000, generator=gen)
    params = [SamplingParams(temperature=1.0, top_k=40, top_p=0.9)] * 24
    logits = row.expand(len(params), -1).contiguous()
    batch = SamplingBatch.build(params, [11] * 24, list(range(24)), None, None, 2000, DEV)
    assert len(set(check_same(logits, batch).tokens)) > 5


def test_triton_chunks_and_slots_do_not_change_the_draw():
    """The kernels' own split (chunk width, candidate slots) is invisible in the result."""
    from lragent.kernels.triton_sampling import topk_sample

    gen = torch.Generator().manual_seed(3)
    logits = 2 * torch.randn(len(MIX), 3000, generator=gen)
    batch, _, _ = make(MIX, 3000, gen)
    logits = logits.to(DEV)
    want = sample(logits, batch, impl="torch")
    args = (batch.temperature, batch.greedy, batch.top_k, batch.top_p, batch.min_p, batch.keys)
    for chunk, kcap in ((256, 64), (512, 128), (4096, 64)):
        out = topk_sample(logits, None, *args, kcap=kcap, chunk=chunk)
        assert [int(t) for t in out[: len(MIX)]] == want.tokens, (chunk, kcap)
    with pytest.raises(ValueError):
        topk_sample(logits, None, *args, kcap=48)


def test_triton_greedy_ties_take_the_first_token_and_small_vocabularies_sort_all():
    gen = torch.Generator().manual_seed(5)
    vocab = 97  # smaller than the candidate cap: rows without top-k are served too
    params = [SamplingParams(temperature=0.0), SamplingParams(temperature=1.1, top_p=0.9),
              SamplingParams(temperature=0.8, min_p=0.05), SamplingParams(temperature=0.0)]  # fmt: skip
    logits = torch.randn(len(params), vocab, generator=gen)
    logits[0, [10, 60]] = 9.0  # a tie at the top: argmax takes the first
    logits[3] = 0.0  # all equal
    batch, seeds, positions = make(params, vocab, gen)
    got = check_same(logits, batch)
    assert got.tokens[0] == 10 and got.tokens[3] == 0
    assert got.tokens == sample_reference(logits, params, seeds, positions)


def test_triton_top_p_drops_a_token_whose_mass_before_it_reaches_top_p_exactly():
    """Four equal candidates (probability 1/4 each, exact in float32) under top-p 0.5: the third has exactly 0.5
    before it and is dropped, so only two tokens are ever drawn."""
    logits = torch.full((1, 1500), -5.0)
    logits[0, [100, 700, 1100, 1400]] = 3.0
    n = 64
    params = [SamplingParams(temperature=1.0, top_k=4, top_p=0.5)] * n
    batch = SamplingBatch.build(params, list(range(n)), [0] * n, None, None, 1500, DEV)
    logits = logits.to(DEV)
    for impl in ("triton", "torch"):
        assert len(set(sample(logits.expand(n, -1).contiguous(), batch, impl=impl).tokens)) == 2, impl


def test_triton_with_bias_penalties_and_top_logprobs():
    gen = torch.Generator().manual_seed(9)
    vocab = 2500
    params = [
        SamplingParams(temperature=0.8, top_k=3, logit_bias={17: 5.0, 3: -100.0}),
        SamplingParams(temperature=0.0, logit_bias={11: 30.0}),
        SamplingParams(temperature=0.9, top_k=20, repetition_penalty=1.3, presence_penalty=0.5, frequency_penalty=0.4),
        SamplingParams(temperature=0.9, top_k=40, top_p=0.75, logprobs=True, top_logprobs=3),
    ]
    for trial in range(3):
        logits = 3 * torch.randn(len(params), vocab, generator=gen)
        logits[:, 17] += 4.0
        seeds = torch.randint(-(1 << 62), 1 << 62, (len(params),), generator=gen).tolist()
        positions = [trial] * len(params)
        hist = [torch.randint(0, vocab, (40,), generator=gen).tolist() for _ in params]
        batch = SamplingBatch.build(params, seeds, positions, hist, [10] * len(params), vocab, DEV)
        got = check_same(logits, batch)
        assert got.tokens == sample_reference(logits, params, seeds, positions, hist, [10] * len(params))
        want = sample(logits.to(DEV), batch, impl="torch")
        assert [t for t, _ in got.top_logprobs[3]] == [t for t, _ in want.top_logprobs[3]]
        assert [v for _, v in got.top_logprobs[3]] == pytest.approx([v for _, v in want.top_logprobs[3]], abs=1e-5)
        assert got.top_logprobs[:3] == [[], [], []]


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # numpy, interpreting the kernels on NaN / inf rows
def test_triton_broken_rows_get_a_nonfinite_logprob_and_nothing_else_does():
    gen = torch.Generator().manual_seed(4)
    logits = torch.randn(len(MIX), 3000, generator=gen)
    logits[1, 2500] = float("nan")
    logits[2] = float("-inf")
    logits[5, 7] = float("inf")
    batch, _, _ = make(MIX, 3000, gen)
    logits = logits.to(DEV)
    assert resolve_impl("triton", logits, batch) == "triton"
    got, want = sample(logits, batch, impl="triton"), sample(logits, batch, impl="torch")
    for row in range(len(MIX)):
        if row in (1, 2, 5):
            assert not math.isfinite(got.logprobs[row]) and 0 <= got.tokens[row] < 3000
        else:
            assert got.tokens[row] == want.tokens[row]
            assert got.logprobs[row] == pytest.approx(want.logprobs[row], abs=1e-5)


@pytest.mark.skipif(
    os.environ.get("TRITON_INTERPRET") != "1", reason="the CPU's choices (conftest interprets Triton there)"
)
def test_impls_fall_back_where_they_do_not_serve():
    gen = torch.Generator().manual_seed(1)
    logits = torch.randn(3, 5000, generator=gen)
    topk, _, _ = make([SamplingParams(temperature=0.9, top_k=40), SamplingParams(temperature=0.0)] * 1, 5000, gen)
    no_topk, _, _ = make([SamplingParams(temperature=0.9, top_p=0.9), SamplingParams(temperature=0.9, top_k=40)],
                         5000, gen)  # fmt: skip
    big_k, _, _ = make([SamplingParams(temperature=0.9, top_k=500)], 5000, gen)
    two = logits[:2]
    assert resolve_impl("auto", two, topk) == "torch"  # the CPU runs the torch path unless told
    assert resolve_impl("triton", two, topk) == "triton"
    assert resolve_impl("triton+graph", two, topk) == "triton"  # graphs are CUDA-only
    assert resolve_impl("graph", two, topk) == "torch"
    assert resolve_impl("triton", two, no_topk) == "torch"  # a row without top-k: the whole vocabulary
    assert resolve_impl("triton", logits[:1], big_k) == "torch"  # above the kernels' candidate cap
    assert resolve_impl("triton", two.double(), topk) == "torch"
    with pytest.raises(ValueError, match="unknown sampler impl"):
        resolve_impl("fast", two, topk)
    assert sample(two, no_topk, impl="triton").tokens == sample(two, no_topk, impl="torch").tokens


# ---- CUDA: every implementation equals the torch path on the size ------------------------------------------
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
AUTOACT = SamplingParams(temperature=0.9, top_p=0.75, top_k=40)


@cuda
@pytest.mark.parametrize("impl", ["graph", "triton", "triton+graph"])
def test_cuda_impls_equal_torch_at_32_x_128k(impl):
    dev = torch.device("cuda")
    gen = torch.Generator().manual_seed(0)
    vocab = 128_256
    mixes = [
        [AUTOACT] * 32,
        (MIX * 5)[:32],
        [SamplingParams(temperature=0.0)] * 32,
        [SamplingParams(temperature=0.9, top_k=64, min_p=0.02)] * 5,  # padded to 8 rows in a graph
        (MIX * 6)[:33],  # padded to 64
    ]
    for params in mixes:
        for trial in range(3):  # replays refill the static inputs (captured under inference mode, as the engine does)
            logits = (4 * torch.randn(len(params), vocab, generator=gen)).to(dev)
            logits[::7, : vocab // 3] = float("-inf")
            batch, _, _ = make(params, vocab, gen, dev)
            with torch.inference_mode(trial == 0):
                check_same(logits, batch, impl, impl)


@cuda
def test_cuda_graph_of_the_torch_path_equals_torch():
    dev = torch.device("cuda")
    gen = torch.Generator().manual_seed(1)
    for params in ([SamplingParams(temperature=0.9)] * 32, [SamplingParams(temperature=1.1, top_p=0.9)] * 8):
        for _ in range(2):
            logits = (3 * torch.randn(len(params), 128_256, generator=gen)).to(dev)
            batch, _, _ = make(params, 128_256, gen, dev)
            check_same(logits, batch, "graph", "graph")
            check_same(logits, batch, "triton+graph", "graph")  # no top-k: the torch path, captured
    biased = [SamplingParams(temperature=0.9, top_k=40, logit_bias={5: 3.0})] * 4
    logits = torch.randn(4, 1000, generator=gen).to(dev)
    batch, _, _ = make(biased, 1000, gen, dev)
    check_same(logits, batch, "triton+graph", "triton")  # bias: eager Triton


@cuda
def test_cuda_auto_uses_the_fast_path():
    dev = torch.device("cuda")
    gen = torch.Generator().manual_seed(2)
    logits = torch.randn(4, 32_000, generator=gen).to(dev)
    batch, _, _ = make([AUTOACT] * 4, 32_000, gen, dev)
    assert resolve_impl("auto", logits, batch) in ("triton", "triton+graph")
    assert sample(logits, batch).tokens == sample(logits, batch, impl="torch").tokens
