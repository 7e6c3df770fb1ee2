"""Penalised sequences' histories on the device (`PenaltyHistory`) against the host-history build they replace
(`sampler._penalties`, the reference), and the engine's penalised decoding against HF transformers' repetition
penalty and against itself without async scheduling."""

from __future__ import annotations

import random

import pytest
import torch

from lragent import LLM, SamplingParams
from lragent.engine.penalty_history import ZERO_ROW, PenaltyHistory
from lragent.engine.sampler import _penalties
from lragent.engine.sequence import Sequence

CPU = torch.device("cpu")
REP = SamplingParams(repetition_penalty=1.3, frequency_penalty=0.4, presence_penalty=0.2)


def _reference(seqs: list[Sequence], vocab: int):
    def t(values, dtype):
        return torch.tensor(values, dtype=dtype)

    params = [s.params for s in seqs]
    out = _penalties(params, [s.token_ids for s in seqs], [s.prompt_len for s in seqs], vocab, CPU, t)
    return out[0], out[1]


def test_rows_follow_the_draws_as_the_host_history_would():
    """Random prompts (some ids beyond the vocabulary), draws recorded step by step, sequences finishing and their
    rows reused by new ones, unpenalised rows in the batch: every step's gathered rows equal the reference built
    from the host lists."""
    rng, vocab = random.Random(0), 50
    history = PenaltyHistory(CPU)
    live: list[Sequence] = []
    made = 0
    for step in range(60):
        while len(live) < 5:
            params = REP if made % 3 else SamplingParams()
            prompt = [rng.randrange(vocab + 5) for _ in range(rng.randrange(1, 30))]
            live.append(Sequence(f"r{made}", prompt, params, "", 0))
            made += 1
        rows = history.rows(live, vocab)
        assert all((r == ZERO_ROW) == (not s.params.penalized) for r, s in zip(rows, live))
        seen, counts = history.gather(rows)
        want_seen, want_counts = _reference(live, vocab)
        for i, s in enumerate(live):
            if s.params.penalized:
                assert torch.equal(seen[i], want_seen[i]) and torch.equal(counts[i], want_counts[i]), (step, i)
            else:
                assert not seen[i].any() and not counts[i].any()
        drawn = torch.tensor([rng.randrange(vocab) for _ in live], dtype=torch.float64)  # the sampler's dtype
        history.record(rows, drawn)
        for s, token in zip(live, drawn.long().tolist()):
            s.token_ids.append(token)
        for s in [s for s in live if rng.random() < 0.15]:
            s.status = s.status.FINISHED
            live.remove(s)
    assert history.seen.shape[0] <= 8  # finished sequences' rows were reused


def test_forgotten_rows_are_rebuilt_from_the_host():
    history = PenaltyHistory(CPU)
    seq = Sequence("r", [1, 2, 3], REP, "", 0)
    rows = history.rows([seq], 10)
    history.record(rows, torch.tensor([7.0]))  # a draw the engine did not accept (its step failed)
    history.forget([seq])
    seen, counts = history.gather(history.rows([seq], 10))
    want_seen, want_counts = _reference([seq], 10)
    assert torch.equal(seen, want_seen) and torch.equal(counts, want_counts) and not seen[0, 7]


def test_repetition_penalty_matches_hf(model_dir):
    """Greedy with a repetition penalty through the engine (rows on the device) gives HF transformers' tokens."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    prompt, new = "Repeat after me: the cat, the cat, the cat,", 16
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    ids = torch.tensor([tok.encode(prompt, add_special_tokens=False)])
    with torch.no_grad():
        gen = model.generate(ids, max_new_tokens=new, do_sample=False, repetition_penalty=1.3, min_new_tokens=new)
    want = gen[0, ids.shape[1] :].tolist()
    with LLM(sharing="non_shared", block_size=8) as llm:
        params = SamplingParams(max_tokens=new, temperature=0.0, ignore_eos=True, repetition_penalty=1.3)
        got = llm.generate(prompt, params)[0].token_ids
        plain = llm.generate(prompt, SamplingParams(max_tokens=new, temperature=0.0, ignore_eos=True))[0].token_ids
    assert got == want and plain != want  # (the penalty changes this output)


@pytest.mark.parametrize("penalty", ["repetition", "frequency+presence"])
def test_penalised_requests_run_ahead_with_the_same_tokens(tiny_llama, monkeypatch, penalty):
    from test_async_scheduling import both, prompts, same

    kw = {"repetition_penalty": 1.4} if penalty == "repetition" else {"frequency_penalty": 0.7, "presence_penalty": 0.5}
    greedy = SamplingParams(max_tokens=20, temperature=0.0, ignore_eos=True, **kw)
    sampled = SamplingParams(max_tokens=20, temperature=0.9, seed=4, ignore_eos=True, **kw)
    plain = SamplingParams(max_tokens=20, temperature=0.0, ignore_eos=True)
    requests = list(zip(prompts(3), [greedy, sampled, plain], ["plan", "action", None]))
    sync, ahead, launches, _ = both(tiny_llama, monkeypatch, requests)
    assert same(ahead, sync) and len(launches) >= 10
    unpenalised = both(tiny_llama, monkeypatch, [(p, plain, a) for p, _, a in requests])[0]
    assert unpenalised[0][0] != sync[0][0]  # the penalty changes the greedy row's tokens
