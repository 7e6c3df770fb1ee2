"""The batched sampler against its definitions and its row-by-row reference: greedy = argmax, log-probs under the
unfiltered softmax, top-k / top-p / min-p masks, penalties and bias, seeded draws independent of the batch, and the
distribution of sampled tokens."""

from __future__ import annotations

import math

import pytest
import torch

from lragent.engine.sampler import SamplingBatch, filter_logits, sample, sample_reference
from lragent.sampling import SamplingParams

CPU = torch.device("cpu")


def draw(logits, params, seeds=None, positions=None, histories=None, prompt_lens=None):
    n = len(params)
    seeds = seeds if seeds is not None else list(range(1, n + 1))
    positions = positions if positions is not None else [7] * n
    batch = SamplingBatch.build(params, seeds, positions, histories, prompt_lens, logits.shape[-1], CPU)
    return sample(logits, batch)


def test_logprobs_are_those_of_the_unfiltered_softmax():
    gen = torch.Generator().manual_seed(0)
    logits = 4 * torch.randn(5, 300, generator=gen)
    logits[1, :100] = float("-inf")  # a masked row part (e.g. a grammar) must not break the reduction
    params = [SamplingParams(temperature=0.0), SamplingParams(temperature=0.0),
              SamplingParams(temperature=0.8, top_k=5, seed=1), SamplingParams(temperature=1.0, top_p=0.5, seed=2),
              SamplingParams(temperature=0.0)]  # fmt: skip
    tokens, logprobs, _ = draw(logits, params)
    want = torch.log_softmax(logits.double(), dim=-1)
    for row, (tok, lp) in enumerate(zip(tokens, logprobs)):
        assert abs(lp - want[row, tok].item()) < 1e-5
    for row in (0, 1, 4):
        assert tokens[row] == int(logits[row].argmax())
    assert tokens[2] in torch.topk(logits[2], 5).indices.tolist()


def test_filters_keep_top_k_and_the_token_crossing_top_p():
    logits = torch.log(torch.tensor([0.5, 0.3, 0.15, 0.05]))
    assert torch.isfinite(filter_logits(logits, 2, 1.0)).tolist() == [True, True, False, False]
    assert torch.isfinite(filter_logits(logits, 0, 0.6)).tolist() == [True, True, False, False]
    assert torch.isfinite(filter_logits(logits, 0, 0.5)).tolist() == [True, False, False, False]
    assert torch.isfinite(filter_logits(logits, 0, 1.0, min_p=0.5)).tolist() == [True, True, False, False]


SETTINGS = [
    SamplingParams(temperature=0.0),
    SamplingParams(top_k=1, temperature=1.3),
    SamplingParams(temperature=0.9, top_p=0.75, top_k=40),
    SamplingParams(temperature=0.7),
    SamplingParams(temperature=1.1, top_p=0.9),
    SamplingParams(temperature=1.0, min_p=0.05),
    SamplingParams(temperature=0.8, top_k=3, logit_bias={17: 5.0, 3: -100.0}),
    SamplingParams(temperature=0.0, logit_bias={11: 30.0}),
    SamplingParams(temperature=0.9, repetition_penalty=1.3, presence_penalty=0.5, frequency_penalty=0.4),
]


@pytest.mark.parametrize("vocab", [97, 1000])
def test_batched_sampler_equals_the_row_by_row_reference(vocab):
    gen = torch.Generator().manual_seed(vocab)
    for trial in range(12):
        logits = 3 * torch.randn(len(SETTINGS), vocab, generator=gen)
        seeds = torch.randint(-(1 << 62), 1 << 62, (len(SETTINGS),), generator=gen).tolist()
        positions = torch.randint(0, 5000, (len(SETTINGS),), generator=gen).tolist()
        hist = [torch.randint(0, vocab, (30,), generator=gen).tolist() for _ in SETTINGS]
        plens = [10] * len(SETTINGS)
        got = draw(logits, SETTINGS, seeds, positions, hist, plens).tokens
        assert got == sample_reference(logits, SETTINGS, seeds, positions, hist, plens), f"trial {trial}"


def test_a_seeded_row_draws_the_same_token_whatever_its_batch():
    gen = torch.Generator().manual_seed(3)
    mine = SamplingParams(temperature=1.0, top_p=0.9, seed=42)
    row = torch.randn(1, 500, generator=gen)
    alone = draw(row, [mine], [42], [9]).tokens[0]
    for size in (2, 5, 17):
        others = 2 * torch.randn(size - 1, 500, generator=gen)
        params = [SamplingParams(temperature=0.5, top_k=i + 1) for i in range(size - 1)]
        at = size // 2
        logits = torch.cat([others[:at], row, others[at:]])
        tokens = draw(logits, params[:at] + [mine] + params[at:], [5] * at + [42] + [6] * (size - 1 - at),
                      [3] * at + [9] + [4] * (size - 1 - at)).tokens  # fmt: skip
        assert tokens[at] == alone
    assert len({draw(row, [mine], [42], [p]).tokens[0] for p in range(40)}) > 5  # positions draw afresh


@pytest.mark.parametrize(
    "params",
    [SamplingParams(temperature=0.9, top_k=6, top_p=0.8), SamplingParams(temperature=1.5, min_p=0.2),
     SamplingParams(temperature=0.6)],
)  # fmt: skip
def test_draws_follow_the_filtered_distribution(params):
    logits = torch.tensor([[2.0, 1.5, 1.2, 1.0, 0.4, 0.1, -0.5, -1.0, -2.0, -3.0]])
    want = torch.softmax(filter_logits(logits[0] / params.temperature, params.top_k, params.top_p, params.min_p), -1)
    n = 4000
    batch = SamplingBatch.build([params] * n, list(range(n)), [0] * n, None, None, 10, CPU)
    counts = torch.bincount(torch.tensor(sample(logits.expand(n, -1), batch).tokens), minlength=10).double() / n
    assert counts[want == 0].sum() == 0  # never a filtered token
    assert (counts - want).abs().max() < 0.03


def test_penalties_and_bias_steer_the_draw():
    logits = torch.tensor([[5.0, 4.9, 0.0, -1.0]])
    greedy = SamplingParams(temperature=0.0)
    assert draw(logits, [greedy]).tokens == [0]
    rep = SamplingParams(temperature=0.0, repetition_penalty=2.0)
    assert draw(logits, [rep], histories=[[0]], prompt_lens=[1]).tokens == [1]  # 5 / 2 < 4.9
    freq = SamplingParams(temperature=0.0, frequency_penalty=0.2)
    assert draw(logits, [freq], histories=[[3, 0]], prompt_lens=[1]).tokens == [1]  # 5 - 0.2 < 4.9
    assert draw(logits, [freq], histories=[[0, 3]], prompt_lens=[1]).tokens == [0]  # the prompt is not penalised
    assert draw(logits, [SamplingParams(temperature=0.0, logit_bias={3: 10.0})]).tokens == [3]
    forced = SamplingParams(temperature=1.0, logit_bias={2: 100.0})
    assert {draw(logits, [forced], [s], [0]).tokens[0] for s in range(50)} == {2}


def test_top_logprobs_are_the_most_likely_alternatives():
    gen = torch.Generator().manual_seed(1)
    logits = torch.randn(3, 50, generator=gen)
    params = [SamplingParams(logprobs=True, top_logprobs=4), SamplingParams(), SamplingParams(logprobs=True)]
    result = draw(logits, params)
    want = torch.log_softmax(logits.double(), -1)
    top = torch.topk(want[0], 4)
    assert [t for t, _ in result.top_logprobs[0]] == top.indices.tolist()
    assert all(abs(lp - v) < 1e-5 for (_, lp), v in zip(result.top_logprobs[0], top.values.tolist()))
    assert result.top_logprobs[1] == [] and result.top_logprobs[2] == []


def test_a_broken_row_gets_a_nonfinite_logprob_and_nothing_else_does():
    logits = torch.randn(4, 50)
    logits[1, 4] = float("nan")
    logits[2] = float("-inf")
    params = [SamplingParams(temperature=0.7, top_p=0.9), SamplingParams(temperature=0.7),
              SamplingParams(temperature=0.0), SamplingParams(temperature=1.0, top_k=5)]  # fmt: skip
    _, lps, _ = draw(logits, params)
    assert math.isfinite(lps[0]) and math.isfinite(lps[3])
    assert not math.isfinite(lps[1]) and not math.isfinite(lps[2])


def test_race_noise_is_finite_at_the_extremes_of_the_hash():
    """Every hash value maps to finite noise (a +inf would turn a masked -inf logit into a NaN argmax winner)."""
    from lragent.engine import sampler

    extremes = torch.tensor([0, -1, (1 << 63) - 1, -(1 << 63)], dtype=torch.int64)
    original = sampler._splitmix
    try:
        sampler._splitmix = lambda x: extremes.view(1, -1).expand(x.shape[0], -1)  # the hash's smallest and largest
        noise = sampler.race_noise(torch.zeros(1, dtype=torch.int64), torch.arange(4))
    finally:
        sampler._splitmix = original
    assert torch.isfinite(noise).all()
