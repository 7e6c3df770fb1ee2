"""k_proj adapters under the schemes that share keys (issue 16): the key LR.

Keys are stored as RoPE(X W_k) only and each LR row is [X A_v | X A_k]; a reader of adapter j adds
s RoPE_p(X A_k B_k^j) to every key it reads (RoPE is linear), inside the attention kernels and the reference.
Exactness against non_shared needs agents whose hidden states agree below the adapted layer, so the engine tests put
the adapters on the last layer of the 2-layer `tiny_llama` only (as tests/test_stacked_lr.py does).
"""

from __future__ import annotations

import json
import os
import random
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import triton
import triton.language as tl
import turns

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # must precede the first @triton.jit of the kernel modules

from safetensors.torch import load_file, save_file  # noqa: E402
from turns import ROLES, exact_llm, run_turns, same_outputs  # noqa: E402

from lragent import LLM  # noqa: E402
from lragent.bench.adapters import write_peft_adapter  # noqa: E402
from lragent.cache.sharing import get_scheme  # noqa: E402
from lragent.kernels.backend import KeyLR  # noqa: E402
from lragent.kernels.metadata import AttentionMetadata  # noqa: E402
from lragent.kernels.reference import TorchReferenceBackend, gather_positions, lora_attention  # noqa: E402
from lragent.kernels.triton_attention import _rope_trig, paged_decode, paged_prefill  # noqa: E402
from lragent.lora.adapter import AdapterError, LoRAAdapter  # noqa: E402
from lragent.lora.digest import value_a_key  # noqa: E402
from lragent.lora.registry import AdapterRegistry  # noqa: E402
from lragent.model_config import ModelConfig  # noqa: E402
from lragent.models.rope import RotaryEmbedding  # noqa: E402

DEV = torch.device(turns.DEV)
QKVO = ("q_proj", "k_proj", "v_proj", "o_proj")


def _without_keys(src: str, dst: Path) -> str:
    """The same adapter with its k_proj weights dropped (the control: key adapters must change the outputs)."""
    dst.mkdir(parents=True, exist_ok=True)
    tensors = load_file(f"{src}/adapter_model.safetensors")
    save_file({k: v for k, v in tensors.items() if ".k_proj." not in k}, str(dst / "adapter_model.safetensors"))
    cfg = json.loads(Path(src, "adapter_config.json").read_text())
    cfg["target_modules"] = [m for m in cfg["target_modules"] if m != "k_proj"]
    (dst / "adapter_config.json").write_text(json.dumps(cfg))
    return str(dst)


@pytest.fixture(scope="module")
def key_adapters(tiny_llama, tmp_path_factory) -> dict[str, dict[str, str]]:
    """q/k/v/o adapters on the last layer: `shared` (one k_proj A and one v_proj A for all), `independent`, `mixed`
    (shared v_proj A, different k_proj A), and `no_keys` (the shared set without k_proj)."""
    model, _ = tiny_llama
    config = ModelConfig.from_file(f"{model}/config.json")
    root = tmp_path_factory.mktemp("key_lr")
    top = (config.num_layers - 1,)
    shared_k: dict[int, torch.Tensor] = {}
    shared_v: dict[int, torch.Tensor] = {}
    mixed_v: dict[int, torch.Tensor] = {}

    def write(name: str, seed: int, **kw) -> str:
        return str(write_peft_adapter(root / name, config, QKVO, seed=seed, b_scale=0.5, layers=top, **kw))

    shared = {r: write(f"s_{r}", 80 + i, shared_value_a=shared_v, shared_key_a=shared_k) for i, r in enumerate(ROLES)}
    return {
        "shared": shared,
        "independent": {r: write(f"i_{r}", 90 + i) for i, r in enumerate(ROLES)},
        "mixed": {r: write(f"m_{r}", 95 + i, shared_value_a=mixed_v) for i, r in enumerate(ROLES[:2])},
        "no_keys": {r: _without_keys(p, root / f"nk_{r}") for r, p in shared.items()},
    }


def engine(tiny_llama, adapters: dict[str, str], sharing: str, **kw) -> LLM:
    return exact_llm(tiny_llama[0], adapters, sharing, **kw)


# ------------------------------------------------------------------------------------------------------------
# the declaration and the registry
# ------------------------------------------------------------------------------------------------------------
def test_schemes_that_share_keys_declare_the_key_lr():
    for name in ("base_shared", "base_lr_shared"):
        scheme = get_scheme(name)
        assert scheme.allows_key_adapter and scheme.key_lr and scheme.lr_width(8, 5) == 16
    for name in ("non_shared", "full_shared"):  # keys stored expanded, as before
        scheme = get_scheme(name)
        assert scheme.allows_key_adapter and not scheme.key_lr
    stacked = get_scheme("stacked_lr")
    assert not stacked.allows_key_adapter and not stacked.key_lr and stacked.lr_width(8, 5) == 40


def _adapter(name: str, seed: int, key_seed: int | None = None, d: int = 12, rank: int = 2) -> LoRAAdapter:
    """v_proj A from `seed`; with `key_seed` also a k_proj adapter whose A comes from that seed."""
    gen = torch.Generator().manual_seed(seed)
    weights = {(0, "v_proj"): (torch.randn(d, rank, generator=gen), torch.randn(rank, 6, generator=gen))}
    targets = {"v_proj"}
    if key_seed is not None:
        kgen = torch.Generator().manual_seed(key_seed)
        weights[(0, "k_proj")] = (torch.randn(d, rank, generator=kgen), torch.randn(rank, 6, generator=gen))
        targets.add("k_proj")
    return LoRAAdapter(name, rank, 2.0, frozenset(targets), weights)


def test_base_lr_shared_needs_one_key_a_too():
    reg = AdapterRegistry(get_scheme("base_lr_shared"), num_layers=1, max_loras=4)
    reg.add(_adapter("plan", 1, key_seed=5))
    reg.add(_adapter("action", 1, key_seed=5))  # same v_proj A and k_proj A (B differ): shared
    with pytest.raises(AdapterError, match=r"k_proj A.*'critic' differs in layers 0"):
        reg.add(_adapter("critic", 1, key_seed=6))  # same v_proj A, another k_proj A
    with pytest.raises(AdapterError, match="differs in layers 0"):
        reg.add(_adapter("keyless", 1))  # no key adapter beside ones that have it: its R_k would be zero
    assert set(reg.adapters) == {"plan", "action"}
    # the LR key digests the k_proj A as well: rows [X A_v | X A_k] are shared only where both agree
    assert value_a_key(_adapter("a", 1, key_seed=5), 1) == value_a_key(_adapter("b", 1, key_seed=5), 1)
    assert value_a_key(_adapter("a", 1, key_seed=5), 1) != value_a_key(_adapter("b", 1, key_seed=6), 1)
    assert value_a_key(_adapter("a", 1), 1) != value_a_key(_adapter("b", 1, key_seed=5), 1)
    # base_shared keys each agent's LR by its whole content: independent key A are fine
    free = AdapterRegistry(get_scheme("base_shared"), num_layers=1, max_loras=4)
    free.add(_adapter("plan", 1, key_seed=5))
    free.add(_adapter("action", 2, key_seed=6))


def test_engine_refuses_key_a_that_differ(tiny_llama, key_adapters):
    with pytest.raises(AdapterError, match=r"v_proj A \(and k_proj A\).*differs in layers 1"):
        engine(tiny_llama, key_adapters["mixed"], "base_lr_shared")
    with pytest.raises(AdapterError, match="k_proj"):
        engine(tiny_llama, key_adapters["shared"], "stacked_lr")


# ------------------------------------------------------------------------------------------------------------
# the engine: exact against non_shared
# ------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def non_shared_turns(tiny_llama, key_adapters):
    return {kind: run_turns(engine(tiny_llama, key_adapters[kind], "non_shared")) for kind in ("shared", "independent")}


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize(("sharing", "kind"), [("base_shared", "independent"), ("base_lr_shared", "shared")])
def test_key_adapters_under_shared_keys_equal_non_shared(
    tiny_llama, key_adapters, non_shared_turns, sharing, kind, backend
):
    want = non_shared_turns[kind]
    got = run_turns(engine(tiny_llama, key_adapters[kind], sharing, attention_backend=backend))
    assert all(same_outputs(g, w) for g, w in zip(got, want)), [(g.token_ids, w.token_ids) for g, w in zip(got, want)]
    for i, out in enumerate(got[1:], start=1):
        assert out.metrics.base_reused_tokens >= 64  # the keys and base values of the others' tokens are shared
        if sharing == "base_lr_shared":  # ... and so are the LR rows: nothing recomputed
            new = out.metrics.prompt_tokens - got[i - 1].metrics.prompt_tokens
            assert out.metrics.computed_tokens < new + 8, (i, out.metrics)


@pytest.mark.parametrize("kind", ["shared", "no_keys"])
def test_gathered_prefill_route_equals_non_shared(tiny_llama, key_adapters, non_shared_turns, kind, monkeypatch):
    """Every prefill forced through the gathered route (`value_lr_prefill`: keys gathered, or materialised with the
    key adapters, values with the reader's LR term, no term in the kernel) under base_lr_shared gives non_shared's
    tokens, with and without key adapters."""
    from lragent.kernels import value_lr_prefill

    want = (
        non_shared_turns["shared"]
        if kind == "shared"
        else run_turns(engine(tiny_llama, key_adapters[kind], "non_shared"))
    )
    calls = []
    real = value_lr_prefill.gathered_prefill_args
    monkeypatch.setattr(value_lr_prefill, "VALUE_LR_PREFILL", "materialize")
    monkeypatch.setattr(value_lr_prefill, "gathered_prefill_args", lambda *a, **k: calls.append(a[-1]) or real(*a, **k))
    # eager prefill (a CUDA-graph prefill step keeps the on-chip route)
    llm = engine(
        tiny_llama, key_adapters[kind], "base_lr_shared", attention_backend="triton", cuda_graph_prefill_tokens=0
    )
    got = run_turns(llm)
    assert all(same_outputs(g, w) for g, w in zip(got, want)), [(g.token_ids, w.token_ids) for g, w in zip(got, want)]
    assert calls and all((keys is not None) == (kind == "shared") for keys in calls)  # materialised keys passed on


def test_controls_key_adapters_matter_and_full_shared_reads_the_producer(tiny_llama, key_adapters, non_shared_turns):
    want = non_shared_turns["shared"]
    without = run_turns(engine(tiny_llama, key_adapters["no_keys"], "non_shared"))
    assert not any(same_outputs(o, w) for o, w in zip(without, want))  # the k_proj part changes every turn
    # full_shared takes keys as today: expanded with the producer's adapter (exact for the producer only)
    full = run_turns(engine(tiny_llama, key_adapters["shared"], "full_shared"))
    assert same_outputs(full[0], want[0]) and not any(same_outputs(f, w) for f, w in zip(full[1:], want[1:]))


# ------------------------------------------------------------------------------------------------------------
# the kernels against the reference, and the reference against keys expanded with the model's RoPE
# ------------------------------------------------------------------------------------------------------------
def key_case(seqs, hq, hkv, d, rank, num_slots, block_size, seed, values=True, keys=True):
    """seqs: (cached prefix, new tokens, adapter slot). LR rows are [R_v | R_k]; everything a sequence may not read is
    NaN: pool rows past its context or of no sequence, every LR row of a slot-0 sequence, and the R_v (R_k) half
    when no adapter adapts values (keys)."""
    gen = torch.Generator().manual_seed(seed)
    rng = random.Random(seed)
    ctx = [p + q for p, q, _ in seqs]
    nblocks = [-(-c // block_size) for c in ctx]
    total = sum(nblocks) + 2
    base_ids, lr_ids = list(range(total)), list(range(total))
    rng.shuffle(base_ids)
    rng.shuffle(lr_ids)
    nan = float("nan")
    key = torch.full((total, block_size, hkv, d), nan, dtype=torch.float64)
    value = torch.full((total, block_size, hkv, d), nan, dtype=torch.float64)
    lr = torch.full((total, block_size, 2 * rank), nan, dtype=torch.float64)
    tables, lr_tables, used = [], [], 0
    for (_, _, slot), c, nb in zip(seqs, ctx, nblocks):
        bt, lbt = base_ids[used : used + nb], lr_ids[used : used + nb]
        used += nb
        pos = torch.arange(c)
        rows = torch.tensor(bt)[pos // block_size], pos % block_size
        key[rows] = torch.randn(c, hkv, d, generator=gen, dtype=torch.float64)
        value[rows] = torch.randn(c, hkv, d, generator=gen, dtype=torch.float64)
        lrows = torch.tensor(lbt)[pos // block_size], pos % block_size
        if slot:
            own = torch.randn(c, 2 * rank, generator=gen, dtype=torch.float64)
            lr[lrows[0], lrows[1], :rank] = own[:, :rank] if values else nan
            lr[lrows[0], lrows[1], rank:] = own[:, rank:] if keys else nan
        tables.append(bt + [-1] * (max(nblocks) - nb))
        lr_tables.append(lbt + [-1] * (max(nblocks) - nb))
    q_lens = [q for _, q, _ in seqs]
    starts = [0]
    for q in q_lens:
        starts.append(starts[-1] + q)
    meta = AttentionMetadata(
        query_lens=q_lens,
        context_lens=ctx,
        query_start=torch.tensor(starts, dtype=torch.int32),
        context_lens_t=torch.tensor(ctx, dtype=torch.int32),
        base_block_tables=torch.tensor(tables, dtype=torch.int32),
        lr_block_tables=torch.tensor(lr_tables, dtype=torch.int32),
        seq_lora_slots=torch.tensor([s for _, _, s in seqs], dtype=torch.int64),
        base_write_idx=None,
        base_slots=torch.zeros(0, dtype=torch.int64),
        lr_slots=None,
        is_decode=False,
    )

    def up() -> torch.Tensor:
        b = torch.randn(num_slots, rank, hkv * d, generator=gen, dtype=torch.float64) / rank**0.5
        b[0] = 0
        return b

    value_up = up() if values else None
    key_up = up() if keys else None
    scaling = torch.rand(num_slots, generator=gen, dtype=torch.float64) + 0.5
    scaling[0] = 0
    query = torch.randn(sum(q_lens), hq, d, generator=gen, dtype=torch.float64)
    rope = RotaryEmbedding(SimpleNamespace(head_dim=d, rope_theta=10000.0, rope_scaling=None), max(ctx) + 8)
    rope.build(torch.device("cpu"))
    assert rope.cos is not None and rope.sin is not None
    cache = SimpleNamespace(
        key=[key], value=[value], lr=[lr], block_size=block_size, num_kv_heads=hkv, head_dim=d, lr_rank=2 * rank
    )
    key_lr = KeyLR(key_up, rope.cos, rope.sin)
    ref = TorchReferenceBackend().attend(cache, 0, query, value_up, scaling, meta, key_lr=key_lr)
    return SimpleNamespace(
        seqs=seqs, meta=meta, key=key, value=value, lr=lr, value_up=value_up, key_up=key_up, scaling=scaling,
        query=query, rope=rope, cache=cache, key_lr=key_lr, ref=ref, rank=rank,
    )  # fmt: skip


def expanded_reference(c) -> torch.Tensor:
    """Attention over keys expanded the obvious way: K_base + s * RoPE(R_k B_k) with the model's RoPE at each key's
    position, values V_base + s R_v B_v (through `lora_attention`'s LR term)."""
    m, bs, r = c.meta, c.cache.block_size, c.rank
    hkv, d = c.key.shape[-2:]
    out = torch.empty_like(c.query)
    starts = m.query_start.tolist()
    for i, ((_, _, slot), ctx) in enumerate(zip(c.seqs, m.context_lens)):
        idx = gather_positions(m.base_block_tables[i], ctx, bs)
        k, v = c.key.view(-1, hkv, d)[idx], c.value.view(-1, hkv, d)[idx]
        lr = b_up = None
        scale = float(c.scaling[slot])
        if slot:
            rows = c.lr.view(-1, 2 * r)[gather_positions(m.lr_block_tables[i], ctx, bs)]
            if c.key_up is not None:
                part = (rows[:, r:] @ c.key_up[slot]).view(ctx, hkv, d)
                k = k + scale * c.rope(part, torch.arange(ctx))
            if c.value_up is not None:
                lr, b_up = rows[:, :r], c.value_up[slot].view(r, hkv, d)
        q = c.query[starts[i] : starts[i + 1]]
        out[starts[i] : starts[i + 1]] = lora_attention(q, k, v, lr, b_up, scale, d**-0.5)
    return out


def _f32(t: torch.Tensor | None) -> torch.Tensor | None:
    return None if t is None else t.to(DEV, torch.float32)


def _dev(t: torch.Tensor) -> torch.Tensor:
    return t.to(DEV)


def _key_lr(c, trig: str = "chip") -> KeyLR:
    """The kernels compute cos / sin on chip when given the frequencies (trig "chip"), else read the tables."""
    inv_freq = c.rope.inv_freq.to(DEV) if trig == "chip" else None
    return KeyLR(_f32(c.key_up), c.rope.cos.to(DEV), c.rope.sin.to(DEV), inv_freq)


TRIG = ["chip", "table"]


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    out = out.cpu()
    assert not torch.isnan(out).any(), "NaN: a read outside what the sequence may read"
    return ((out.double() - ref).norm() / ref.norm()).item()


# (seqs, hq, hkv, d, rank, slots incl. 0, block size, values adapted, keys adapted)
PREFILL = [
    ([(0, 5, 1), (13, 7, 3), (16, 16, 0), (3, 1, 2)], 4, 2, 16, 8, 4, 4, True, True),  # slot 0 reads no LR
    ([(7, 20, 2), (0, 3, 1)], 2, 2, 32, 3, 3, 8, True, True),  # rank 3 (padded inside), d 32
    ([(21, 9, 1), (5, 4, 2)], 4, 1, 16, 4, 3, 4, False, True),  # keys adapted, values not (R_v half is NaN)
    ([(11, 6, 2)], 2, 1, 16, 4, 3, 4, True, False),  # values adapted, keys not (R_k half is NaN)
]


@pytest.mark.parametrize("case_id", range(len(PREFILL)))
def test_reference_equals_keys_expanded_with_the_model_rope(case_id):
    seqs, hq, hkv, d, rank, slots, bs, values, keys = PREFILL[case_id]
    c = key_case(seqs, hq, hkv, d, rank, slots, bs, seed=case_id, values=values, keys=keys)
    assert not torch.isnan(c.ref).any()
    torch.testing.assert_close(c.ref, expanded_reference(c), rtol=1e-5, atol=1e-5)  # the model RoPE: float32


@pytest.mark.parametrize("case_id", range(len(PREFILL)))
@pytest.mark.parametrize("splits", [1, 3])
@pytest.mark.parametrize("trig", TRIG)
def test_prefill_kernel_rebuilds_the_keys(case_id, splits, trig):
    seqs, hq, hkv, d, rank, slots, bs, values, keys = PREFILL[case_id]
    c = key_case(seqs, hq, hkv, d, rank, slots, bs, seed=case_id, values=values, keys=keys)
    m = c.meta
    out = paged_prefill(
        _f32(c.query), _f32(c.key), _f32(c.value), _f32(c.lr), _dev(m.base_block_tables), _dev(m.lr_block_tables),
        _dev(m.query_start), _dev(m.context_lens_t), _dev(m.seq_lora_slots), _f32(c.value_up), _f32(c.scaling),
        max(m.query_lens), num_splits=splits, key_lr=_key_lr(c, trig),
    )  # fmt: skip
    assert rel_err(out, c.ref) < 2e-5


KEYED = [i for i, case in enumerate(PREFILL) if case[-1]]  # the cases with a key adapter


@pytest.mark.parametrize("case_id", KEYED)
@pytest.mark.parametrize("trig", TRIG)
def test_materialized_keys_then_the_plain_kernel_equal_the_reference(case_id, trig):
    """The default prefill route (`LRAGENT_KEY_LR_PREFILL=materialize`): each reader's keys written once by the
    Triton kernel (== its torch oracle), then the prefill kernel reading its keys there and its values from the pool."""
    from lragent.kernels.key_lr_prefill import materialize_keys, materialize_keys_reference

    seqs, hq, hkv, d, rank, slots, bs, values, keys = PREFILL[case_id]
    c = key_case(seqs, hq, hkv, d, rank, slots, bs, seed=case_id, values=values, keys=keys)
    m = c.meta
    args = (_f32(c.key), _f32(c.lr), _dev(m.base_block_tables), _dev(m.lr_block_tables), _dev(m.seq_lora_slots),
            _f32(c.scaling), _key_lr(c, trig), m.context_lens)  # fmt: skip
    k, starts = materialize_keys(*args)
    k_ref, starts_ref = materialize_keys_reference(*args)
    assert starts.tolist() == starts_ref.tolist() == [sum(m.context_lens[:i]) for i in range(len(seqs))]
    torch.testing.assert_close(k.cpu(), k_ref.cpu(), rtol=1e-5, atol=1e-5)
    slot0 = [i for i, (_, _, slot) in enumerate(seqs) if slot == 0]
    for i in slot0:  # a reader without an adapter gets the base keys as they are
        rows = slice(starts_ref[i], starts_ref[i] + m.context_lens[i])
        base = c.key.view(-1, hkv, d)[gather_positions(m.base_block_tables[i], m.context_lens[i], bs)]
        torch.testing.assert_close(k[rows].cpu().double(), base, rtol=0, atol=1e-6)
    out = paged_prefill(
        _f32(c.query), _f32(c.key), _f32(c.value), _f32(c.lr), _dev(m.base_block_tables), _dev(m.lr_block_tables),
        _dev(m.query_start), _dev(m.context_lens_t), _dev(m.seq_lora_slots), _f32(c.value_up), _f32(c.scaling),
        max(m.query_lens), key_lr=_key_lr(c, trig), key_rows=(k, starts),
    )  # fmt: skip
    assert rel_err(out, c.ref) < 2e-5
    with pytest.raises(ValueError, match="key_rows come with the key_lr"):
        paged_prefill(
            _f32(c.query), _f32(c.key), _f32(c.value), _f32(c.lr), _dev(m.base_block_tables),
            _dev(m.lr_block_tables), _dev(m.query_start), _dev(m.context_lens_t), _dev(m.seq_lora_slots),
            _f32(c.value_up), _f32(c.scaling), max(m.query_lens), key_rows=(k, starts),
        )  # fmt: skip


@pytest.mark.parametrize("mode", ["on_chip", "materialize"])
def test_the_triton_backend_takes_either_key_prefill_route(mode, monkeypatch):
    from lragent.kernels import key_lr_prefill
    from lragent.kernels.triton_backend import TritonBackend

    seqs, hq, hkv, d, rank, slots, bs, values, keys = PREFILL[0]
    c = key_case(seqs, hq, hkv, d, rank, slots, bs, seed=0, values=values, keys=keys)
    monkeypatch.setattr(key_lr_prefill, "KEY_LR_PREFILL", mode)
    called = []
    real = key_lr_prefill.materialize_keys
    monkeypatch.setattr(key_lr_prefill, "materialize_keys", lambda *a, **kw: called.append(1) or real(*a, **kw))
    cache = SimpleNamespace(key=[_f32(c.key)], value=[_f32(c.value)], lr=[_f32(c.lr)], block_size=bs)
    meta = replace(c.meta, query_start=_dev(c.meta.query_start), context_lens_t=_dev(c.meta.context_lens_t),
                   base_block_tables=_dev(c.meta.base_block_tables), lr_block_tables=_dev(c.meta.lr_block_tables),
                   seq_lora_slots=_dev(c.meta.seq_lora_slots))  # fmt: skip
    out = TritonBackend().attend(cache, 0, _f32(c.query), _f32(c.value_up), _f32(c.scaling), meta, key_lr=_key_lr(c))
    assert rel_err(out, c.ref) < 2e-5
    assert called == ([1] if mode == "materialize" else [])


DECODE = [
    ([(0, 1, 1), (30, 1, 3), (16, 1, 0), (41, 1, 2)], 8, 2, 16, 8, 4, 4, True, True),
    ([(12, 1, 2), (25, 1, 1)], 4, 4, 32, 3, 3, 8, False, True),
    ([(9, 1, 1), (37, 1, 2), (20, 1, 0)], 4, 2, 64, 8, 3, 8, True, True),  # d 64: the two-halves rebuild
]


@pytest.mark.parametrize("case_id", range(len(DECODE)))
@pytest.mark.parametrize("splits", [1, 2])
@pytest.mark.parametrize("trig", TRIG)
@pytest.mark.parametrize("halves", [True, False])
def test_decode_kernel_rebuilds_the_keys(case_id, splits, trig, halves, monkeypatch):
    """Both decode forms of the rebuild (two RoPE halves from d 32 on, the default; the whole tile) and both trig
    sources against the reference."""
    from lragent.kernels import triton_attention

    monkeypatch.setattr(triton_attention, "KEY_LR_HALVES", halves)
    seqs, hq, hkv, d, rank, slots, bs, values, keys = DECODE[case_id]
    c = key_case(seqs, hq, hkv, d, rank, slots, bs, seed=10 + case_id, values=values, keys=keys)
    m = c.meta
    out = paged_decode(
        _f32(c.query), _f32(c.key), _f32(c.value), _f32(c.lr), _dev(m.base_block_tables), _dev(m.lr_block_tables),
        _dev(m.context_lens_t), _dev(m.seq_lora_slots), _f32(c.value_up), _f32(c.scaling), num_splits=splits,
        key_lr=_key_lr(c, trig),
    )  # fmt: skip
    assert rel_err(out, c.ref) < 2e-5


@triton.jit
def _trig_probe(pos_ptr, inv_ptr, cos_ptr, sin_ptr, N: tl.constexpr, D: tl.constexpr):
    """The attention kernels' on-chip cos / sin for N positions, written out [N, D]."""
    offs_n, offs_d = tl.arange(0, N), tl.arange(0, D)
    cos, sin = _rope_trig(inv_ptr, inv_ptr, tl.load(pos_ptr + offs_n), offs_n >= 0, offs_d, D, True)
    tl.store(cos_ptr + offs_n[:, None] * D + offs_d[None, :], cos)
    tl.store(sin_ptr + offs_n[:, None] * D + offs_d[None, :], sin)


def test_on_chip_rope_trig_matches_the_tables_at_long_positions():
    """Llama-3.1's scaled frequencies up to position 131071 (angles up to ~1.3e5 rad, where an unreduced approximate
    cos would be far off): the 2 pi reduction keeps the kernel within float32 rounding of the model's tables."""
    scaling = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 8192}  # fmt: skip
    rope = RotaryEmbedding(SimpleNamespace(head_dim=128, rope_theta=500000.0, rope_scaling=scaling), 131072)
    rope.build(torch.device("cpu"))
    assert rope.cos is not None and rope.sin is not None and rope.inv_freq is not None
    positions = torch.tensor([0, 1, 2, 7, 100, 4095, 8191, 8192, 33_700, 65_535, 65_536, 99_999, 131_000, 131_071,
                              12_345, 54_321], dtype=torch.int32)  # fmt: skip
    cos = torch.empty(16, 128, device=DEV)
    sin = torch.empty_like(cos)
    _trig_probe[(1,)](positions.to(DEV), rope.inv_freq.to(DEV), cos, sin, N=16, D=128)
    idx = positions.long()
    torch.testing.assert_close(cos.cpu(), rope.cos[idx], rtol=0, atol=2e-6)
    torch.testing.assert_close(sin.cpu(), rope.sin[idx], rtol=0, atol=2e-6)


@pytest.mark.parametrize("case_id", range(len(DECODE)))
def test_batched_reference_decode_rebuilds_the_keys(case_id):
    """The reference's batched decode path (padding and slot 0 masked, NaN where nothing may be read) against its
    per-sequence loop."""
    seqs, hq, hkv, d, rank, slots, bs, values, keys = DECODE[case_id]
    c = key_case(seqs, hq, hkv, d, rank, slots, bs, seed=10 + case_id, values=values, keys=keys)
    c.meta.is_decode = True
    batched = TorchReferenceBackend().attend(c.cache, 0, c.query, c.value_up, c.scaling, c.meta, key_lr=c.key_lr)
    torch.testing.assert_close(batched, c.ref)


def test_lr_rows_must_be_twice_the_rank_with_key_lr():
    seqs, hq, hkv, d, rank, slots, bs, values, keys = PREFILL[0]
    c = key_case(seqs, hq, hkv, d, rank, slots, bs, seed=0)
    m = c.meta
    with pytest.raises(ValueError, match="R_k"):
        paged_prefill(
            _f32(c.query), _f32(c.key), _f32(c.value), _f32(c.lr[..., :rank].contiguous()), m.base_block_tables,
            m.lr_block_tables, m.query_start, m.context_lens_t, m.seq_lora_slots, _f32(c.value_up), _f32(c.scaling),
            max(m.query_lens), key_lr=_key_lr(c),
        )  # fmt: skip


@pytest.mark.parametrize("sharing", ["base_shared", "base_lr_shared"])
def test_key_lr_rows_only_when_key_adapters_are_served(tiny_llama, key_adapters, sharing):
    """Started with q/v(/o) adapters only, the LR rows stay r wide (X A_v, no cost for key LR) and a k_proj adapter
    loaded later is refused with the way out named; `key_lora=True` reserves the room and accepts it."""
    from lragent import AdapterError

    plain = engine(tiny_llama, key_adapters["no_keys"], sharing)
    rank = plain.engine.bank.max_rank
    assert not plain.engine.scheme.key_lr and plain.engine.cache.layout.lr_rank == rank
    with pytest.raises(AdapterError, match="key_lora"):
        plain.engine.load_adapter("k", key_adapters["shared"]["plan"])
    plain.close()
    ready = engine(tiny_llama, {}, sharing, key_lora=True, max_lora_rank=rank)
    assert ready.engine.scheme.key_lr and ready.engine.cache.layout.lr_rank == 2 * rank
    for role in ("plan", "action"):  # (base_lr_shared: one k_proj A and one v_proj A for all)
        ready.engine.load_adapter(role, key_adapters["shared"][role])
    ready.close()
