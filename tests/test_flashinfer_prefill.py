"""The gathered route's attention through FlashInfer's ragged prefill (`lragent.kernels.flashinfer_prefill`).

On the CPU a stand-in module with FlashInfer's wrapper interface checks the plan the engine makes (offsets, heads,
causal alignment) by computing what that plan describes; on a GPU with FlashInfer installed the library's output is
compared with an exact per-sequence reference, and the engine's tokens with and without the library."""

from __future__ import annotations

import math

import pytest
import torch

from lragent.kernels import flashinfer_prefill as fp


def reference(query, keys, values, query_lens, context_lens) -> torch.Tensor:
    """float64 causal attention of each sequence's queries over its keys, the queries aligned with the keys' end."""
    out, q0, k0 = [], 0, 0
    group = query.shape[1] // keys.shape[1]
    for nq, nk in zip(query_lens, context_lens):
        q = query[q0 : q0 + nq].double().transpose(0, 1)
        k = keys[k0 : k0 + nk].double().repeat_interleave(group, 1).transpose(0, 1)
        v = values[k0 : k0 + nk].double().repeat_interleave(group, 1).transpose(0, 1)
        scores = q @ k.transpose(1, 2) / math.sqrt(q.shape[-1])
        visible = torch.arange(nk)[None, :] <= torch.arange(nq)[:, None] + (nk - nq)
        scores = scores.masked_fill(~visible.to(scores.device), float("-inf"))
        out.append((scores.softmax(-1) @ v).transpose(0, 1))
        q0, k0 = q0 + nq, k0 + nk
    return torch.cat(out)


class _StandIn:
    """FlashInfer's `BatchPrefillWithRaggedKVCacheWrapper` interface, computing the planned attention exactly."""

    plans: list[dict] = []

    class BatchPrefillWithRaggedKVCacheWrapper:
        def __init__(self, workspace, layout):
            assert layout == "NHD" and workspace.numel() == fp.WORKSPACE_BYTES

        def plan(self, qo_indptr, kv_indptr, num_qo_heads, num_kv_heads, head_dim, **kw):
            self.qo, self.kv = qo_indptr.tolist(), kv_indptr.tolist()
            _StandIn.plans.append(dict(qo=self.qo, kv=self.kv, heads=(num_qo_heads, num_kv_heads, head_dim), **kw))

        def run(self, q, k, v):
            qlens = [b - a for a, b in zip(self.qo, self.qo[1:])]
            klens = [b - a for a, b in zip(self.kv, self.kv[1:])]
            return reference(q, k, v, qlens, klens).to(q.dtype)


def test_the_plan_describes_the_gathered_rows(monkeypatch):
    """Offsets from the step's lengths (queries and gathered contexts back to back), causal, the query's heads: run
    over random rows it gives the per-sequence reference; and a wrong alignment would not."""
    monkeypatch.setattr(fp, "library", lambda: _StandIn)
    monkeypatch.setattr(_StandIn, "plans", [])
    torch.manual_seed(0)
    query_lens, context_lens = [5, 1, 12], [9, 30, 12]
    q = torch.randn(sum(query_lens), 6, 16)
    k, v = torch.randn(sum(context_lens), 2, 16), torch.randn(sum(context_lens), 2, 16)
    plan = fp.RaggedPrefill(query_lens, context_lens, q, kv_heads=2)
    (made,) = _StandIn.plans
    assert made["qo"] == [0, 5, 6, 18] and made["kv"] == [0, 9, 39, 51]
    assert made["heads"] == (6, 2, 16) and made["causal"] is True and made["q_data_type"] == torch.float32
    out = plan.run(q, k, v)
    torch.testing.assert_close(out.double(), reference(q, k, v, query_lens, context_lens))
    top_aligned = reference(q, k, v, query_lens, query_lens[:2] + [12])  # not the end-aligned mask
    assert not torch.allclose(out[:5].double(), top_aligned[:5])


def test_the_library_serves_only_where_it_runs(monkeypatch):
    """Never on the CPU, never in fp32, never when turned off or not installed."""
    monkeypatch.setattr(fp, "library", lambda: _StandIn)
    assert not fp.serves(torch.zeros(2, 4, 16, dtype=torch.bfloat16))  # CPU
    monkeypatch.setattr(fp, "library", lambda: None)
    if torch.cuda.is_available():
        assert not fp.serves(torch.zeros(2, 4, 16, dtype=torch.bfloat16, device="cuda"))


GPU_LIBRARY = torch.cuda.is_available() and fp.library() is not None


@pytest.mark.skipif(not GPU_LIBRARY, reason="needs a CUDA GPU with flashinfer installed (an optional library)")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_flashinfer_prefill_equals_the_reference(dtype):
    torch.manual_seed(1)
    query_lens, context_lens = [300, 1, 77, 1024], [1324, 4000, 77, 1024]
    q = torch.randn(sum(query_lens), 32, 128, dtype=dtype, device="cuda")
    k = torch.randn(sum(context_lens), 8, 128, dtype=dtype, device="cuda")
    v = torch.randn(sum(context_lens), 8, 128, dtype=dtype, device="cuda")
    assert fp.serves(q)
    out = fp.RaggedPrefill(query_lens, context_lens, q, kv_heads=8).run(q, k, v)
    want = reference(q, k, v, query_lens, context_lens)
    torch.testing.assert_close(out.double(), want, atol=2e-2, rtol=2e-2)


@pytest.mark.skipif(not GPU_LIBRARY, reason="needs a CUDA GPU with flashinfer installed (an optional library)")
def test_engine_tokens_with_and_without_the_library(tiny_llama, monkeypatch):
    """base_lr_shared, eager prefill long enough for the gathered route: the same greedy tokens through FlashInfer
    as through our kernel, and the library really ran."""
    from lragent import LLM, SamplingParams

    model, adapters = tiny_llama
    calls = []
    run = fp.RaggedPrefill.run
    monkeypatch.setattr(fp.RaggedPrefill, "run", lambda self, *a: calls.append(1) or run(self, *a))
    params = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
    prompts = [[(13 * i + j) % 997 + 1 for j in range(3500 + 300 * i)] for i in range(2)]  # one step, gathered
    tokens = {}
    for library in ("auto", "triton"):
        monkeypatch.setattr(fp, "LIBRARY", library)
        fp.library.cache_clear()
        llm = LLM(
            model=model, adapters=adapters, sharing="base_lr_shared", allow_unshared_a=True, device="cuda",
            cuda_graph_prefill_tokens=0, max_num_batched_tokens=8192,
        )  # fmt: skip
        tokens[library] = [
            o.token_ids for o in llm.generate(prompts, adapter=["plan", "action"], sampling_params=params)
        ]
        llm.close()
    fp.library.cache_clear()
    assert calls and tokens["auto"] == tokens["triton"]
