"""Reference Flash-LoRA-Attention equals naive attention with V_base + s R B materialised (float64)."""

from __future__ import annotations

import pytest
import torch

from lragent.cache.kv_cache import CacheLayout, KVCache
from lragent.kernels.metadata import AttentionMetadata
from lragent.kernels.reference import TorchReferenceBackend, lora_attention, naive_lora_attention
from lragent.model_config import ModelConfig


@pytest.mark.parametrize("hq,hkv", [(4, 4), (8, 2), (9, 3), (8, 1)])
@pytest.mark.parametrize("rank", [1, 8, 16, 64])
@pytest.mark.parametrize("d", [32, 64, 128])
def test_reordered_equals_materialised(hq, hkv, rank, d):
    gen = torch.Generator().manual_seed(hq * 1000 + rank * 10 + d)
    lk = int(torch.randint(1, 70, (1,), generator=gen))
    lq = int(torch.randint(1, lk + 1, (1,), generator=gen))

    def rnd(*shape):
        return torch.randn(*shape, generator=gen, dtype=torch.float64)

    q, k, v = rnd(lq, hq, d), rnd(lk, hkv, d), rnd(lk, hkv, d)
    r, b = rnd(lk, rank), rnd(rank, hkv, d)
    ours = lora_attention(q, k, v, r, b, 1.7, d**-0.5)
    naive = naive_lora_attention(q, k, v, r, b, 1.7, d**-0.5)
    torch.testing.assert_close(ours, naive, rtol=1e-10, atol=1e-10)
    # and the LR term matters
    assert not torch.allclose(ours, lora_attention(q, k, v, None, None, 0.0, d**-0.5))


@pytest.mark.parametrize("budget", [1, 7 * 4 * 50, 10**9])
def test_query_chunks_give_the_same_attention(budget, monkeypatch):
    """Long prompts go through the reference in query chunks bounded by SCORE_ELEMENTS: same result, any chunking."""
    import lragent.kernels.reference as ref

    gen = torch.Generator().manual_seed(11)
    lk, lq, hq, hkv, d, rank = 70, 53, 4, 2, 16, 4
    q, k, v = (torch.randn(n, h, d, generator=gen, dtype=torch.float64) for n, h in ((lq, hq), (lk, hkv), (lk, hkv)))
    r, b = torch.randn(lk, rank, generator=gen, dtype=torch.float64), torch.randn(rank, hkv, d, generator=gen).double()
    monkeypatch.setattr(ref, "SCORE_ELEMENTS", budget)  # 1 query per chunk, ~7 per chunk, one chunk
    ours = lora_attention(q, k, v, r, b, 1.7, d**-0.5)
    torch.testing.assert_close(ours, naive_lora_attention(q, k, v, r, b, 1.7, d**-0.5), rtol=1e-10, atol=1e-10)


def test_paged_backend_matches_contiguous():
    """Scattered blocks, several sequences with cached prefixes and new tokens, mixed adapters incl. slot 0."""
    torch.manual_seed(0)
    cfg = ModelConfig("llama", 100, 64, 64, 1, 8, 2, 16, 1e-6, 1e4, 512, False, False)
    bs, rank, slots = 4, 8, 3
    layout = CacheLayout(bs, {"kv": 64, "lr": 64}, rank)
    cache = KVCache(cfg, layout, torch.float64, torch.device("cpu"))
    backend = TorchReferenceBackend()
    ctx_lens, q_lens, seq_slots = [13, 5, 20], [3, 5, 1], [1, 0, 2]
    perm = torch.randperm(64).tolist()
    tables, lr_tables, used = [], [], 0
    for n in ctx_lens:
        nb = -(-n // bs)
        tables.append(perm[used : used + nb])
        lr_tables.append(list(reversed(perm))[used : used + nb])
        used += nb
    cache.key.normal_(), cache.value.normal_(), cache.lr.normal_()
    value_up = torch.randn(slots, rank, 2 * 16, dtype=torch.float64)
    scaling = torch.tensor([0.0, 2.0, 0.5])

    def pad(t):
        w = max(map(len, t))
        return torch.tensor([x + [-1] * (w - len(x)) for x in t], dtype=torch.int32)

    meta = AttentionMetadata(
        query_lens=q_lens,
        context_lens=ctx_lens,
        query_start=torch.tensor([0, 3, 8, 9], dtype=torch.int32),
        context_lens_t=torch.tensor(ctx_lens, dtype=torch.int32),
        base_block_tables=pad(tables),
        lr_block_tables=pad(lr_tables),
        seq_lora_slots=torch.tensor(seq_slots),
        base_write_idx=None,
        base_slots=torch.zeros(0, dtype=torch.int64),
        lr_slots=None,
    )
    q = torch.randn(9, 8, 16, dtype=torch.float64)
    out = backend.attend(cache, 0, q, value_up, scaling, meta)
    start = 0
    for i, n in enumerate(ctx_lens):
        pos = torch.arange(n)
        idx = torch.tensor(tables[i])[pos // bs] * bs + pos % bs
        lr_idx = torch.tensor(lr_tables[i])[pos // bs] * bs + pos % bs
        k = cache.key[0].reshape(-1, 2, 16)[idx]
        v = cache.value[0].reshape(-1, 2, 16)[idx]
        r = cache.lr[0].reshape(-1, rank)[lr_idx]
        b = value_up[seq_slots[i]].view(rank, 2, 16)
        want = naive_lora_attention(q[start : start + q_lens[i]], k, v, r, b, float(scaling[seq_slots[i]]), 16**-0.5)
        torch.testing.assert_close(out[start : start + q_lens[i]], want, rtol=1e-10, atol=1e-10)
        start += q_lens[i]


def test_batched_decode_matches_per_sequence_loop():
    torch.manual_seed(1)
    cfg = ModelConfig("llama", 100, 64, 64, 1, 8, 2, 16, 1e-6, 1e4, 512, False, False)
    bs, rank = 4, 8
    cache = KVCache(cfg, CacheLayout(bs, {"kv": 40, "lr": 40}, rank), torch.float64, torch.device("cpu"))
    cache.key.normal_(), cache.value.normal_(), cache.lr.normal_()
    cache.value[0, 0].fill_(float("nan")), cache.lr[0, 0].fill_(float("nan"))  # unused block: must not leak
    ctx_lens, slots = [9, 1, 17, 4], [1, 0, 2, 1]
    perm = (torch.randperm(39) + 1).tolist()  # block 0 stays unused (and NaN)
    tables = [perm[i * 5 : i * 5 + -(-n // bs)] for i, n in enumerate(ctx_lens)]
    lr_tables = [perm[20 + i * 5 : 20 + i * 5 + -(-n // bs)] for i, n in enumerate(ctx_lens)]

    def pad(t):
        w = max(map(len, t))
        return torch.tensor([x + [-1] * (w - len(x)) for x in t], dtype=torch.int32)

    def meta(is_decode):
        return AttentionMetadata(
            query_lens=[1] * 4,
            context_lens=ctx_lens,
            query_start=torch.arange(5, dtype=torch.int32),
            context_lens_t=torch.tensor(ctx_lens, dtype=torch.int32),
            base_block_tables=pad(tables),
            lr_block_tables=pad(lr_tables),
            seq_lora_slots=torch.tensor(slots),
            base_write_idx=None,
            base_slots=torch.zeros(0, dtype=torch.int64),
            lr_slots=None,
            is_decode=is_decode,
        )

    q = torch.randn(4, 8, 16, dtype=torch.float64)
    value_up = torch.randn(3, rank, 32, dtype=torch.float64)
    scaling = torch.tensor([0.0, 2.0, 0.5])
    backend = TorchReferenceBackend()
    batched = backend.attend(cache, 0, q, value_up, scaling, meta(True))
    looped = backend.attend(cache, 0, q, value_up, scaling, meta(False))
    torch.testing.assert_close(batched, looped, rtol=1e-10, atol=1e-10)
