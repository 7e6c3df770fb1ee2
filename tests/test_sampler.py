"""The sampler against its definitions: greedy = argmax, log-probs under the unfiltered softmax, top-k / top-p masks."""

from __future__ import annotations

import torch

from lragent.engine.sampler import filter_logits, sample
from lragent.sampling import SamplingParams


def test_logprobs_are_those_of_the_unfiltered_softmax():
    gen = torch.Generator().manual_seed(0)
    logits = 4 * torch.randn(5, 300, generator=gen)
    logits[1, :100] = float("-inf")  # a masked row part (e.g. a grammar) must not break the reduction
    params = [
        SamplingParams(temperature=0.0),
        SamplingParams(temperature=0.0),
        SamplingParams(temperature=0.8, top_k=5, seed=1),
        SamplingParams(temperature=1.0, top_p=0.5, seed=2),
        SamplingParams(temperature=0.0),
    ]
    gens = [None, None, torch.Generator().manual_seed(1), torch.Generator().manual_seed(2), None]
    tokens, logprobs = sample(logits, params, gens)
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
