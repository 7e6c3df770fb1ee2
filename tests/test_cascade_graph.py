"""Cascade decode inside CUDA graphs: a fixed-shape plan in static buffers, rewritten in place between replays.

On the CPU (interpreted Triton, float32) the decode-graph inputs of the Triton backend with cascade on
(`TritonGraphInputs`, variant "cascade") are built once, as a capture builds them, then refilled for different
batches, each call reading the same metadata object (as a replay does): the fixed-shape launches must give the
float64 per-sequence oracle, plain decode and the torch cascade route for every plan (one group of all rows, two
groups plus loners, shared lengths that are not a multiple of the key tile, capacity and rows to spare, rows with
slot 0) and LR layout (r wide, none, stacked, key LR with one slot per group). Steps whose groups do not fit the
plan (too many, mixed slots where key LR layers relied on them agreeing) are declined and counted. On a GPU: an
engine with cascade and CUDA graphs decodes exactly the tokens of one without cascade, and its cascade steps
replayed graphs.
"""

from __future__ import annotations

import os
import random
from dataclasses import replace

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # must precede the first @triton.jit of the kernel modules

from lragent import SamplingParams  # noqa: E402
from lragent.kernels.metadata import BatchRows  # noqa: E402
from lragent.kernels.reference import TorchReferenceBackend, cascade_decode_attention  # noqa: E402
from lragent.kernels.triton_backend import CASCADE, TritonBackend, TritonGraphInputs  # noqa: E402
from lragent.kernels.triton_cascade import CascadeOptions, PrefixMemo, find_groups  # noqa: E402
from tests.test_cascade import DEV, MIXED, SHARED, TOL, _cache, _key_lr, _opt, make_batch, rel_err  # noqa: E402

CUDA = torch.cuda.is_available()
gpu = pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
MAX_LEN = 128  # the static tables' width (positions)

# plans: (rows (group, own tokens, slot), shared blocks per group); block size 4, the CPU key tile 16 tokens
ALL_ONE_GROUP = ([("a", 3, 1), ("a", 1, 0), ("a", 9, 2), ("a", 5, 1)], {"a": 5})  # 20 shared tokens
ONE_SLOT_GROUPS = ([("a", 2, 1), ("a", 6, 1), ("b", 3, 0), ("b", 1, 0), (None, 4, 2)], {"a": 4, "b": 3})
ALL_ONE_SLOT = ([("a", 3, 2), ("a", 1, 2), ("a", 9, 2), (None, 6, 1)], {"a": 7})


def _graph_inputs(backend: TritonBackend, c, max_batch: int) -> TritonGraphInputs:
    pools = ["kv", "lr"] if c.width else ["kv"]
    return backend.graph_inputs(_cache(c, torch.float32), pools, max_batch, MAX_LEN, DEV)


def _static_attend(backend, inputs, meta, c, size):
    """What a replay of the graph of `size` rows computes for batch c: fill the static buffers, then run the
    layer's attention over the metadata captured once (padding rows get random queries; their outputs are
    dropped)."""
    assert inputs.fill(c.rows, size, CASCADE)
    b = c.rows.num_seqs
    query = torch.cat([c.query, torch.randn(size - b, *c.query.shape[1:])]).to(DEV)
    f32 = torch.float32
    out = backend.attend(
        _cache(c, f32), 0, query, _opt(c.value_up, f32, DEV), c.scaling.to(DEV), meta, key_lr=_key_lr(c, f32, DEV)
    )
    return out[:b]


def _expected(backend, c):
    """(plain Triton decode, torch cascade route, float64 per-sequence oracle) of batch c."""
    meta = backend.metadata(c.rows, DEV)
    assert meta.cascade is not None
    f32, f64, cpu = torch.float32, torch.float64, torch.device("cpu")
    plain = backend.attend(
        _cache(c, f32), 0, c.query.to(DEV), _opt(c.value_up, f32, DEV), c.scaling.to(DEV), replace(meta, cascade=None),
        key_lr=_key_lr(c, f32, DEV),
    )  # fmt: skip
    meta = replace(meta, **{k: v.cpu() for k, v in meta.__dict__.items() if isinstance(v, torch.Tensor)})
    plan = meta.cascade
    meta.cascade = replace(plan, **{k: v.cpu() for k, v in plan.__dict__.items() if isinstance(v, torch.Tensor)})
    ups = (_opt(c.value_up, f64, cpu), c.scaling.double())
    lrs = None if c.lr is None else c.lr.double().view(-1, c.width)
    route = cascade_decode_attention(
        c.query.double(), c.key.double().view(-1, c.hkv, c.d), c.value.double().view(-1, c.hkv, c.d), lrs, *ups, meta,
        c.bs, _key_lr(c, f64, cpu),
    )  # fmt: skip
    cache64 = _cache(c, f64)
    cache64.key, cache64.value = [c.key.double()], [c.value.double()]
    cache64.lr = None if c.lr is None else [c.lr.double()]
    oracle = TorchReferenceBackend().attend(
        cache64, 0, c.query.double(), *ups, replace(meta, is_decode=False), key_lr=_key_lr(c, f64, cpu)
    )
    return plain, route, oracle


@pytest.mark.parametrize("layout", ["lr", "none", "stacked", "key_lr"])
def test_static_plan_rewritten_between_replays(layout):
    """One capture's metadata, two (then the first again) batches with different plans written into its buffers."""
    plans = [ONE_SLOT_GROUPS, ALL_ONE_SLOT] if layout == "key_lr" else [(MIXED, SHARED), ALL_ONE_GROUP]
    batches = [make_batch(rows, shared, 4, 2, 16, 4, 4, layout, seed=10 + i) for i, (rows, shared) in enumerate(plans)]
    backend = TritonBackend(cascade=CascadeOptions(4, 2), max_groups=4)  # capacity to spare
    size = 8  # a graph of 8 rows: padding rows in both batches
    inputs = _graph_inputs(backend, batches[0], size)
    assert inputs.variants(size) == [CASCADE] and inputs.variants(1) == []
    inputs.pad(size, CASCADE)
    meta = inputs.metadata(size, variant=CASCADE)  # what the capture records: built once
    plan = meta.cascade
    assert plan is not None and plan.capacity == 4 and plan.groups == [] and plan.max_members == size
    for c in [*batches, batches[0]]:
        got = _static_attend(backend, inputs, meta, c, size)
        plain, route, oracle = _expected(backend, c)
        assert rel_err(route, oracle) < 1e-12
        assert rel_err(got, oracle) < TOL and rel_err(plain, oracle) < TOL
        assert torch.allclose(got, plain.to(got), atol=1e-5, rtol=1e-5)
        assert meta.cascade is plan  # the captured plan, its arrays rewritten in place
    assert backend.cascade_graph_steps == 3 and backend.cascade_eager_steps == 0
    assert plan.slot_bound == (layout == "key_lr")  # key LR layers cascaded because the slots agreed


def test_plans_beyond_capacity_are_declined():
    """More groups than the plan has slots, or mixed slots in a group once a key LR layer relied on them agreeing:
    `fill` writes nothing and says no (the runner then runs the step eagerly), counted."""
    backend = TritonBackend(cascade=CascadeOptions(4, 2), max_groups=1)
    c = make_batch(MIXED, SHARED, 4, 2, 16, 4, 4, "lr", seed=20)
    inputs = _graph_inputs(backend, c, 8)
    meta = inputs.metadata(8, variant=CASCADE)
    assert len(backend.cascade_groups(c.rows)) == 2
    before = inputs.cascade.host.clone()
    assert not inputs.fill(c.rows, 8, CASCADE)
    assert torch.equal(inputs.cascade.host, before)
    assert backend.cascade_eager_steps == 1 and backend.cascade_graph_steps == 0
    # one group fits; with two slots in it it still does (no layer relied on them agreeing) ...
    mixed = make_batch([("a", 2, 1), ("a", 6, 2), (None, 4, 2)], {"a": 4}, 4, 2, 16, 4, 4, "key_lr", seed=21)
    assert inputs.fill(mixed.rows, 8, CASCADE)
    # ... until a captured key LR layer cascaded because the slots of the capture's plan agreed
    meta.cascade.slot_bound = True
    assert not inputs.fill(mixed.rows, 8, CASCADE)
    uniform = make_batch([("a", 2, 1), ("a", 6, 1), (None, 4, 2)], {"a": 4}, 4, 2, 16, 4, 4, "key_lr", seed=22)
    assert inputs.fill(uniform.rows, 8, CASCADE)
    assert backend.cascade_eager_steps == 2 and backend.cascade_graph_steps == 2


def test_decode_graph_variant_follows_the_groups():
    backend = TritonBackend(cascade=CascadeOptions(4, 2))
    grouped = make_batch(MIXED, SHARED, 4, 2, 16, 4, 4, "none", seed=30)
    loners = make_batch([(None, 5, 1), (None, 7, 0)], {}, 4, 2, 16, 4, 4, "none", seed=31)
    assert backend.decode_graph(grouped.rows) == CASCADE
    assert backend.decode_graph(loners.rows) == ""
    assert TritonBackend().decode_graph(grouped.rows) == ""


@pytest.fixture(scope="module")
def shared_a_llama(tmp_path_factory) -> tuple[str, dict[str, str]]:
    """2 layers, 4 q heads over 2 kv heads x 64, and plan / action / reflect q/v adapters with one shared v_proj A
    (what base_lr_shared needs)."""
    from lragent.bench.adapters import write_peft_adapter, write_random_llama

    root = tmp_path_factory.mktemp("shared_a_llama")
    config = write_random_llama(
        root / "model", vocab_size=1000, hidden_size=256, intermediate_size=256, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=64, max_position_embeddings=4096,
        tie_word_embeddings=True,
    )  # fmt: skip
    shared: dict[int, torch.Tensor] = {}
    adapters = {
        role: str(write_peft_adapter(root / role, config, ("q_proj", "v_proj"), seed=70 + i, shared_value_a=shared))
        for i, role in enumerate(("plan", "action", "reflect"))
    }
    return str(root / "model"), adapters


def test_prefix_memo_gives_the_groups_of_fresh_comparisons():
    """Block lists growing step by step (appends only; a row's list replaced now and then, as on preemption): the
    groups found with comparisons carried across steps equal those found from scratch."""
    rng = random.Random(5)
    opt = CascadeOptions(block_size=4, min_blocks=2)
    memo = PrefixMemo()
    fresh_ids = iter(range(1000, 100000))
    trunks = [[next(fresh_ids) for _ in range(12)] for _ in range(3)]
    tables = [list(trunks[i % 3][: rng.randint(3, 12)]) + [next(fresh_ids)] for i in range(9)]
    ctx = [4 * len(t) - rng.randint(0, 3) for t in tables]
    for step in range(60):
        for i in range(len(tables)):
            ctx[i] += 1
            if ctx[i] > 4 * len(tables[i]):  # a new block: mostly own, sometimes the next block of its trunk
                trunk = trunks[i % 3]
                nb = len(tables[i])
                same = nb < len(trunk) and tables[i] == trunk[:nb] and rng.random() < 0.5
                tables[i].append(trunk[nb] if same else next(fresh_ids))
        if step % 7 == 3:  # preemption: a new list object (a shorter prefix of the trunk)
            i = rng.randrange(len(tables))
            tables[i] = list(trunks[i % 3][: rng.randint(2, 6)]) + [next(fresh_ids)]
            ctx[i] = 4 * len(tables[i]) - 1
        rows = BatchRows([1] * 9, list(ctx), [1] * 9, {"kv": tables}, {"kv": [0] * 9}, None, True)
        assert find_groups(rows, opt, memo) == find_groups(rows, opt), step


class _DecliningGraphs:
    """Stands in for the decode graphs (no CUDA here): records the variant the runner asks for, declines it."""

    def __init__(self):
        self.asked: list[str | None] = []

    def supports(self, batch) -> bool:
        return not batch.is_prefill

    def run(self, step, variant: str = "", feed=None):
        self.asked.append(variant)
        return None


def test_runner_asks_for_the_cascade_graph_and_runs_declined_steps_eagerly(shared_a_llama):
    from tests.turns import PREFIX, ROLES, exact_llm

    model, adapters = shared_a_llama
    prompt = PREFIX * 2
    llm = exact_llm(model, adapters, "base_lr_shared", attention_backend="triton", cascade_decode=True)
    backend = llm.engine.backend
    backend.cascade = CascadeOptions(block_size=8, min_blocks=4)
    for role in ROLES:
        llm.generate([prompt], SamplingParams(max_tokens=1, temperature=0.0), adapter=role)
    llm.engine.runner.graphs = graphs = _DecliningGraphs()
    params = SamplingParams(max_tokens=3, temperature=0.0, ignore_eos=True)
    outs = llm.generate([prompt + [500 + i] for i in range(3)], params, adapter=list(ROLES))
    assert all(len(o.token_ids) == 3 for o in outs)
    assert graphs.asked.count(CASCADE) >= 2 and backend.cascade_steps >= 2  # declined, then run eagerly


# ------------------------------------------------------------------------------------------------------------
# GPU: the engine with cascade and CUDA graphs decodes the tokens of the engine without cascade
# ------------------------------------------------------------------------------------------------------------
@gpu
def test_engine_cascade_graphs_equal_plain(shared_a_llama):
    """Several rows of different adapters over one long prompt (base_lr_shared, float32), greedy: cascade on
    (graphs) == cascade off (graphs), and the cascade steps replayed the cascade graphs."""
    from tests.turns import PREFIX, ROLES, exact_llm

    model, adapters = shared_a_llama
    prompt = PREFIX * 20  # 1,400 tokens: 175 whole blocks of 8 shared by every row
    prompts = [prompt + [500 + i] * (1 + i % 3) for i in range(6)]
    names = [ROLES[i % 3] for i in range(6)]
    params = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True)
    outs = []
    for cascade in (False, True):
        llm = exact_llm(model, adapters, "base_lr_shared", device="cuda", cascade_decode=cascade)
        engine = llm.engine
        backend, graphs = engine.backend, engine.runner.graphs
        assert graphs is not None
        for role in ROLES:  # cache the prompt under every adapter, so the batch below finds it
            llm.generate([prompt], SamplingParams(max_tokens=1, temperature=0.0), adapter=role)
        outs.append([o.token_ids for o in llm.generate(prompts, params, adapter=names)])
        if cascade:
            assert backend.cascade_graph_steps >= 20 and backend.cascade_eager_steps == 0
            assert graphs.replays.get(CASCADE, 0) == backend.cascade_graph_steps
    assert outs[1] == outs[0]


@gpu
def test_engine_cascade_beyond_capacity_runs_eagerly(shared_a_llama):
    """With one group slot, a step of two groups runs eagerly (counted) and still decodes the plain tokens."""
    from tests.turns import PREFIX, ROLES, exact_llm

    model, adapters = shared_a_llama
    prompts = [PREFIX * 10 + [600 + i] for i in range(3)] + [PREFIX[::-1] * 10 + [700 + i] for i in range(3)]
    params = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
    outs = []
    for cascade in (False, True):
        llm = exact_llm(model, adapters, "base_lr_shared", device="cuda", cascade_decode=cascade)
        backend = llm.engine.backend
        if cascade:
            backend.cascade = CascadeOptions(block_size=8, min_blocks=16)  # the default asks for 1024 tokens
            backend.max_groups = 1
        for role in ROLES:
            llm.generate([prompts[0], prompts[3]], SamplingParams(max_tokens=1, temperature=0.0), adapter=role)
        outs.append([o.token_ids for o in llm.generate(prompts, params, adapter=list(ROLES) * 2)])
        if cascade:
            assert backend.cascade_eager_steps >= 1  # (a step with one family decoding alone would fit)
    assert outs[1] == outs[0]


@gpu
@pytest.mark.parametrize("dtype,tol", [(torch.float32, TOL), (torch.bfloat16, 2e-2)])
def test_gpu_cascade_attention_replayed_from_a_cuda_graph(dtype, tol):
    """The layer's cascade attention captured once over the static plan, then replayed for two different plans
    written into its buffers (two groups plus loners; one group), each against the float64 oracle."""
    c = make_batch(MIXED, SHARED, 8, 2, 64, 8, 16, "lr", seed=40)  # 16-token blocks: shared 80 and 48 tokens
    backend = TritonBackend(cascade=CascadeOptions(c.bs, 2), max_groups=4)
    cache, size, b = _cache(c, dtype), 8, c.rows.num_seqs
    inputs = _graph_inputs(backend, c, size)
    inputs.pad(size, CASCADE)
    meta = inputs.metadata(size, variant=CASCADE)
    query = torch.zeros(size, *c.query.shape[1:], device=DEV, dtype=dtype)
    value_up, scaling = c.value_up.to(DEV, dtype), c.scaling.to(DEV)
    backend.attend(cache, 0, query, value_up, scaling, meta)  # compiles outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = backend.attend(cache, 0, query, value_up, scaling, meta)
    for opt, groups in ((CascadeOptions(c.bs, 2), 2), (CascadeOptions(c.bs, 2, min_seqs=3), 1)):
        backend.cascade, backend._planned = opt, None
        assert len(backend.cascade_groups(c.rows)) == groups
        assert inputs.fill(c.rows, size, CASCADE)
        query[:b] = c.query.to(DEV, dtype)
        graph.replay()
        torch.cuda.synchronize()
        _, _, oracle = _expected(backend, c)
        assert rel_err(out[:b], oracle) < tol, (dtype, groups)
