"""The batched sampler on a CUDA device against its CPU reference: exact for greedy and top-k 1 rows, the same
tokens for the sampled settings up to float rounding at a cut (the noise is the same hash on both devices), seeded
rows independent of their batch, the filtered distribution, and structured-output masks applied on the device
exactly as the reference applies them. Needs a CUDA GPU (run on the GPU machine)."""

from __future__ import annotations

import pytest
import torch

from lragent.engine.sampler import SamplingBatch, filter_logits, sample, sample_reference
from lragent.sampling import SamplingParams

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
CUDA = torch.device("cuda")
EXACT = [SamplingParams(temperature=0.0), SamplingParams(temperature=1.3, top_k=1),
         SamplingParams(temperature=0.0, logit_bias={11: 30.0})]  # fmt: skip
SAMPLED = [
    SamplingParams(temperature=0.9, top_p=0.75, top_k=40),
    SamplingParams(temperature=0.7),
    SamplingParams(temperature=1.1, top_p=0.9),
    SamplingParams(temperature=1.0, min_p=0.05),
    SamplingParams(temperature=0.9, repetition_penalty=1.3, presence_penalty=0.5, frequency_penalty=0.4),
]


def cuda_draw(logits, params, seeds, positions, hist=None, plens=None):
    batch = SamplingBatch.build(params, seeds, positions, hist, plens, logits.shape[-1], CUDA)
    return sample(logits.to(CUDA), batch)


# the reference walks every kept candidate in Python: large vocabularies only with a top-k cut
CASES = [(1000, EXACT + SAMPLED, 3), (32_000, EXACT + SAMPLED[:1], 2), (128_256, EXACT + SAMPLED[:1], 1)]


@pytest.mark.parametrize("vocab,settings,trials", CASES)
def test_cuda_sampler_equals_the_reference(vocab, settings, trials):
    gen = torch.Generator().manual_seed(vocab)
    params = settings * 4
    n = len(params)
    agree = total = 0
    for _ in range(trials):
        logits = 4 * torch.randn(n, vocab, generator=gen)
        logits[::5, : vocab // 3] = float("-inf")  # masked parts, as a grammar leaves them
        seeds = torch.randint(-(1 << 62), 1 << 62, (n,), generator=gen).tolist()
        positions = torch.randint(0, 100_000, (n,), generator=gen).tolist()
        hist = [torch.randint(0, vocab, (64,), generator=gen).tolist() for _ in range(n)]
        plens = [16] * n
        got = cuda_draw(logits, params, seeds, positions, hist, plens)
        want = sample_reference(logits, params, seeds, positions, hist, plens)
        ref_lp = torch.log_softmax(logits.double(), dim=-1)
        for i, p in enumerate(params):
            assert abs(got.logprobs[i] - ref_lp[i, got.tokens[i]].item()) < 1e-3
            if p in EXACT:
                assert got.tokens[i] == want[i], (i, p)
            else:
                agree += got.tokens[i] == want[i]
                total += 1
    assert agree / total >= 0.97, f"{agree}/{total}"


def test_cuda_seeded_row_is_independent_of_its_batch():
    gen = torch.Generator().manual_seed(1)
    mine = SamplingParams(temperature=0.9, top_p=0.75, top_k=40, seed=7)
    row = 3 * torch.randn(1, 128_256, generator=gen)
    alone = cuda_draw(row, [mine], [7], [123]).tokens[0]
    for size in (3, 32, 100):
        others = 3 * torch.randn(size - 1, 128_256, generator=gen)
        at = size // 3
        params = [SamplingParams(temperature=0.5 + 0.01 * i, top_p=0.9) for i in range(size - 1)]
        logits = torch.cat([others[:at], row, others[at:]])
        seeds = list(range(size))
        seeds[at] = 7
        positions = [50] * size
        positions[at] = 123
        assert cuda_draw(logits, params[:at] + [mine] + params[at:], seeds, positions).tokens[at] == alone


@pytest.mark.parametrize(
    "params", [SamplingParams(temperature=0.9, top_k=6, top_p=0.8), SamplingParams(temperature=0.6)]
)
def test_cuda_draws_follow_the_filtered_distribution(params):
    logits = torch.tensor([[2.0, 1.5, 1.2, 1.0, 0.4, 0.1, -0.5, -1.0, -2.0, -3.0]])
    want = torch.softmax(filter_logits(logits[0] / params.temperature, params.top_k, params.top_p), -1)
    n = 20_000
    got = cuda_draw(logits.expand(n, -1).contiguous(), [params] * n, list(range(n)), [0] * n).tokens
    counts = torch.bincount(torch.tensor(got), minlength=10).double() / n
    assert counts[want == 0].sum() == 0
    assert (counts - want).abs().max() < 0.015


def test_structured_masks_on_the_device_equal_the_reference():
    pytest.importorskip("xgrammar")
    from lragent.engine.structured import allocate_bitmask, apply_bitmask, apply_bitmask_reference

    gen = torch.Generator().manual_seed(5)
    vocab = 50_000
    bitmask = allocate_bitmask(8, vocab, CUDA)
    bitmask.copy_(torch.randint(-(1 << 31), 1 << 31, bitmask.shape, generator=gen, dtype=torch.int64).int())
    logits = torch.randn(8, vocab, generator=gen)
    want = logits[:3].clone()
    apply_bitmask_reference(want, bitmask[:3])
    for rows in (None, [0, 2]):
        got = logits.to(CUDA)
        apply_bitmask(got, bitmask, rows)
        torch.cuda.synchronize()
        check = range(3) if rows is None else rows
        for i in check:
            assert torch.equal(got[i].cpu(), want[i]), (rows, i)
        if rows is not None:
            assert torch.equal(got[1].cpu(), logits[1])  # rows left out are untouched
