"""Prefill steps through the CUDA-graph inputs (`PrefillGraphs`) against eager prefill.

On the CPU (Triton interpreted) every prefill step a graph would replay also runs through the graph's static,
bucket-padded inputs without a capture, and its hidden states must equal the eager step's: that checks the padding
(token rows writing nowhere, empty sequence rows), the bucket-sized metadata and the per-token LoRA rows. On a GPU
the engine with prefill graphs must produce the eager engine's greedy tokens, with steps counted as replays, also
over a context long enough for the bucket's split-KV path.
"""

from __future__ import annotations

import pytest
import torch

from lragent.engine.prefill_graph import PrefillGraphs, prefill_buckets
from lragent.sampling import SamplingParams
from tests.turns import PREFIX, ROLES, exact_llm, same_outputs

CUDA = torch.cuda.is_available()
GREEDY = SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True)


def test_prefill_buckets():
    assert prefill_buckets(0) == []
    assert prefill_buckets(16) == [16]
    assert prefill_buckets(100) == [16, 32, 64, 100]
    assert prefill_buckets(512) == [16, 32, 64, 128, 256, 512]


def _unshared_a(sharing: str) -> dict:
    """tiny_llama's adapters have their own v_proj A each: base_lr_shared accepts them only when told to."""
    return {"allow_unshared_a": True} if sharing == "base_lr_shared" else {}


def _turns(llm, appended: int = 12) -> None:
    """A prompt longer than the largest bucket, each agent appending a short chunk and answering in turn (under
    NON_SHARED an agent recomputes what the others appended), then two sequences prefilling in one step, then a
    request for prompt log-probs."""
    traj = list(PREFIX)
    for i, role in enumerate(ROLES):
        out = llm.generate([traj], adapter=role, sampling_params=GREEDY)[0]
        traj = traj + out.token_ids + [200 + i] * appended
    last = ROLES[-1]  # whose cached prefix reaches furthest under every scheme
    llm.generate([traj + [7] * 5, traj + [9] * 11], adapter=[last, last], sampling_params=GREEDY)
    llm.generate([traj + [5] * 3], adapter=last, sampling_params=SamplingParams(max_tokens=1, prompt_logprobs=1))


@pytest.mark.parametrize("sharing", ["non_shared", "base_lr_shared", "base_shared", "full_shared", "stacked_lr"])
def test_graph_inputs_give_the_eager_hidden_states(tiny_llama, sharing):
    """Every step a graph supports: its padded static inputs give the eager hidden states, also a step owing only
    some pools' entries (BASE_SHARED: LR prefill of keys another agent cached). Every other step is one a graph must
    not replay (too long, prompt log-probs)."""
    model, adapters = tiny_llama
    llm = exact_llm(model, adapters, sharing, attention_backend="triton", **_unshared_a(sharing))
    runner = llm.engine.runner
    top = 128 if sharing == "base_shared" else 64  # there an agent's first turn LR-prefills the whole prompt
    graphs = PrefillGraphs(runner, pool=lambda: None, max_tokens=top, max_model_len=llm.engine.max_model_len)
    assert graphs.enabled
    forward, checked, eager_steps = runner._forward, [], []

    def checking_forward(batch, feed=None):
        step = runner.inputs(batch)
        n = len(step.token_ids)
        if graphs.supports(step):
            size = graphs.bucket(n)
            ids, ctx, _ = runner.prepare(batch, step)
            eager = runner.model(ids, ctx)
            graphs.fill(step, size)
            padded = runner.model(graphs.tokens[0, :size], graphs._context(size))
            torch.testing.assert_close(padded[:n], eager, rtol=1e-4, atol=1e-4)
            checked.append((n, size, step.rows.num_seqs, bool(step.write_idx)))
        elif not step.rows.is_decode:
            assert n > top or step.scores is not None or step.rows.num_seqs > graphs.max_seqs
            eager_steps.append((n, step.scores is not None))
        return forward(batch, feed)

    runner._forward = checking_forward
    _turns(llm)
    assert any(size > n for n, size, *_ in checked), checked  # padded token rows
    assert any(seqs == 2 for _, _, seqs, _ in checked), checked  # two sequences (and 30 empty sequence rows)
    assert any(scored for _, scored in eager_steps)  # prompt log-probs stay eager
    if sharing == "base_shared":  # another agent's tokens: only their LR rows are owed (stored), in the graph too
        assert any(subset for *_, subset in checked), checked


@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
@pytest.mark.parametrize("sharing", ["non_shared", "base_lr_shared", "base_shared", "full_shared", "stacked_lr"])
def test_engine_with_prefill_graphs_matches_eager(tiny_llama, sharing):
    model, adapters = tiny_llama
    outs, replays = [], 0
    for eager in (True, False):
        llm = exact_llm(
            model, adapters, sharing, attention_backend="triton", enforce_eager=eager, max_model_len=4096,
            **_unshared_a(sharing),
        )  # fmt: skip
        traj = [(13 * i) % 997 + 1 for i in range(3000)]  # long enough to exercise long-context chunks
        got = []
        for i, role in enumerate([*ROLES, *ROLES, ROLES[-1]]):  # two rounds, then the last agent again
            out = llm.generate([traj], adapter=role, sampling_params=GREEDY)[0]
            got.append(out)
            traj = traj + out.token_ids + [300 + i] * (5 + 9 * i)
        outs.append(got)
        if not eager:
            replays = llm.engine.runner.prefill_graphs.replays
        llm.engine.close()
    assert replays >= 3
    assert all(same_outputs(g, w) for g, w in zip(outs[1], outs[0])), [o.token_ids for o in outs[1]]
