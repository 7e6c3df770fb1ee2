"""`lragent bench trace` on the CPU: trace construction, JSON traces, and an end-to-end run of every system on a
tiny random Llama (a Hugging Face folder written here), tiny lengths and generation."""

from __future__ import annotations

import json

import pytest
import torch

from lragent.bench import trace as tb
from lragent.bench.roofline import ModelCost, Rates, ideal_floor_s, system_floor_s
from lragent.model_config import ModelConfig


def test_paper_trace_matches_the_appendix():
    spec = tb.paper_trace(256)
    assert len(spec.steps) == 17
    table = {1: ("plan", 512, 32), 16: ("reflect", 32, 32), 17: ("reflect", 8, 8)}
    for i in (2, 5, 8, 11, 14):
        table[i] = ("plan", 8, 8)
    for i in (3, 6, 9, 12, 15):
        table[i] = ("action", 8, 8)
    for i in (4, 7, 10, 13):
        table[i] = ("plan", 256, 32)
    for i, step in enumerate(spec.steps, start=1):
        assert (step.agent, step.appended(spec.ctx), step.generate) == table[i], i
    labels = [tb.paper_trace(c).label() for c in tb.PAPER_CTX]
    assert labels == ["1.9k", "3.0k", "5.0k", "9.1k", "17.3k", "33.7k", "66.4k"]
    assert sum(g for _, g in spec.counts) == 280
    capped = tb.paper_trace(16, gen_cap=2, first_prefill=16)
    assert max(s.generate for s in capped.steps) == 2 and capped.steps[0].appended(16) == 16


def test_json_trace_formats_and_errors(tmp_path):
    path = tmp_path / "t.json"
    path.write_text(
        json.dumps(
            {
                "name": "mine",
                "steps": [
                    {"agent": "plan", "prefill": 5, "generate": 2},
                    ["coder", [11, 12, 13], 1],
                    {"agent": "plan", "prefill": "ctx", "generate": 3},
                ],
            }
        )
    )
    name, steps = tb.load_trace(path)
    assert name == "mine" and [s.agent for s in steps] == ["plan", "coder", "plan"]
    spec = tb.TraceSpec(name, 7, steps)
    assert spec.counts == [(5, 2), (3, 1), (7, 3)] and spec.total_tokens == 21 and spec.agents == ["plan", "coder"]
    ids = tb.appended_tokens(spec, 1000, seed=0, trajectory=0)
    assert ids[1] == [11, 12, 13] and len(ids[0]) == 5 and len(ids[2]) == 7
    assert ids == tb.appended_tokens(spec, 1000, seed=0, trajectory=0)  # same ids for every system
    assert ids != tb.appended_tokens(spec, 1000, seed=0, trajectory=1)  # independent trajectories differ
    _, bare = tb.parse_trace([["a", 4, 1]])
    assert bare[0].prefill == 4
    for bad in (
        [],
        {"steps": []},
        [["a", 4]],
        [{"agent": "a", "prefill": 4, "generate": 0}],
        [{"agent": "", "prefill": 4, "generate": 1}],
        [{"agent": "a", "prefill": -1, "generate": 1}],
        [{"agent": "a", "prefill": 0, "generate": 1}],
        [{"agent": "a", "prefill": 4, "generate": 1, "x": 1}],
        [{"agent": "a", "prefill": [1, "b"], "generate": 1}],
    ):
        with pytest.raises(ValueError):
            tb.parse_trace(bad)
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        tb.load_trace(tmp_path / "bad.json")
    with pytest.raises(ValueError, match="ctx"):
        _ = tb.TraceSpec("x", None, steps).counts
    with pytest.raises(ValueError, match="out of range"):
        tb.appended_tokens(tb.TraceSpec("x", 1, ((tb.Step("a", (5000,), 1)),)), 1000, 0, 0)


def test_roofline_floor_counts_each_token_once():
    config = ModelConfig.from_dict(
        {
            "vocab_size": 100,
            "hidden_size": 8,
            "intermediate_size": 16,
            "num_hidden_layers": 1,
            "num_attention_heads": 2,
            "num_key_value_heads": 1,
            "head_dim": 4,
        }
    )
    cost = ModelCost.of(config, torch.float32)
    compute_bound = Rates(matmul_flops=1.0, copy_bytes=1e30, device="x", dtype="float32")
    # one step: 3 tokens, 1 generated: one forward over 3 tokens, causal pairs 1 + 2 + 3
    expect = 2 * 3 * cost.linear_params + 2 * cost.head_params + cost.attn_flops_per_pair * 6
    assert ideal_floor_s(cost, compute_bound, [(3, 1)]) == pytest.approx(expect)
    # recomputing everything (Non-Shared) can only cost more than the ideal floor
    steps = [(3, 2), (2, 1)]
    ideal = ideal_floor_s(cost, compute_bound, steps)
    assert system_floor_s(cost, compute_bound, [(3, 3, 2), (7, 7, 1)]) > ideal
    assert system_floor_s(cost, compute_bound, [(3, 3, 2), (7, 3, 1)]) == pytest.approx(ideal)
    # K trajectories in lockstep: K x the FLOPs when compute-bound, one weight read when bandwidth-bound
    assert ideal_floor_s(cost, compute_bound, steps, batch=4) == pytest.approx(4 * ideal)
    bandwidth_bound = Rates(matmul_flops=1e30, copy_bytes=1.0, device="x", dtype="float32")
    one, four = ideal_floor_s(cost, bandwidth_bound, steps), ideal_floor_s(cost, bandwidth_bound, steps, batch=4)
    assert one < four < 4 * one
    # the prefill-only floor leaves the decode passes out
    assert system_floor_s(cost, compute_bound, [(3, 3, 2)], decode=False) < system_floor_s(
        cost, compute_bound, [(3, 3, 2)]
    )


def test_report_backfills_floors_of_older_files():
    """Result files written before a floor existed get it from their own measured rates when merged."""
    total = tb.paper_trace(256).total_tokens
    rows = [
        {
            "system": "base_lr_shared",
            "concurrent": k,
            "ctx": 256,
            "trace": "paper",
            "total_tokens": total,
            "status": "ok",
            "e2e_s": 10.0,
            "steps": [],
        }
        for k in (1, 16)
    ]
    rows.append({**rows[0], "ctx": 16, "total_tokens": 123})  # a --gen-cap variant: not the paper's trace, left alone
    data = {
        "meta": {
            "model": "dummy:smollm2-135m",
            "dtype": "float32",
            "rates": {"matmul_TFLOPs": 1.0, "copy_GBps": 100.0, "device": "x", "dtype": "float32"},
        },
        "rows": rows,
    }
    tb._backfill_floors(data)
    single, k16, other = data["rows"]
    assert 0 < single["floor_s"] < k16["floor_s"] < 16 * single["floor_s"]
    assert k16["time_over_floor"] == pytest.approx(10.0 / k16["floor_s"])
    assert "floor_s" not in other


@pytest.fixture(autouse=True)
def one_thread():
    """Two busy cores: one intra-op thread avoids OpenMP spin-waiting on a descheduled sibling (3x faster here)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


SMALL_KV = ["--kv-cache-bytes", str(4 << 20)]


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    from transformers import LlamaConfig, LlamaForCausalLM

    folder = tmp_path_factory.mktemp("tiny_llama")
    config = LlamaConfig(
        vocab_size=512,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=4096,
        tie_word_embeddings=False,
        bos_token_id=1,
        eos_token_id=2,
    )
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(folder)
    return str(folder)


def test_trace_bench_every_system_on_cpu(tmp_path, tiny_model, capsys):
    out = tmp_path / "res"
    rc = tb.main(
        [
            "--model",
            tiny_model,
            "--ctx",
            "16,40",
            "--gen-cap",
            "2",
            "--first-prefill",
            "16",
            "--concurrent",
            "1,2",
            "--out",
            str(out),
            "--run-timeout",
            "60",
            *SMALL_KV,
        ]
    )
    assert rc == 0
    printed = capsys.readouterr().out
    assert "tok/s" in printed and "targets" in printed
    result = json.loads((out / "trace.json").read_text())
    rows = {(r["system"], r["ctx"], r["concurrent"]): r for r in result["rows"]}
    for system in tb.ALL_SYSTEMS:
        for ctx in (16, 40):
            assert rows[(system, ctx, 1)]["status"] == "ok", rows[(system, ctx, 1)]
    for system in tb.ENGINE_SYSTEMS:
        r = rows[(system, 40, 2)]
        assert r["status"] == "ok" and r["trajectories_done"] == 2
    for ctx in (16, 40):
        r = {s: rows[(s, ctx, 1)] for s in tb.ALL_SYSTEMS}
        spec = tb.paper_trace(ctx, gen_cap=2, first_prefill=16)
        for row in r.values():
            assert row["total_tokens"] == spec.total_tokens
            assert row["throughput_tok_s"] > 0 and row["ttft_s"] > 0 and len(row["step_latency_s"]) == 17
            assert row["floor_s"] > 0 and row["time_over_floor"] > 0
            assert row["generated_tokens"] == sum(g for _, g in spec.counts)
            assert row["computed_tokens"] + row["reused_tokens"] == row["prompt_tokens"]
        # HF FullShared prefills every token once: what was appended plus each step's last sample
        assert r["hf_full_shared"]["computed_tokens"] == sum(a for a, _ in spec.counts) + 16
        assert r["hf_non_shared"]["computed_tokens"] > r["hf_full_shared"]["computed_tokens"]
        # sharing: FullShared / BaseLRShared never re-prefill what another agent computed; Non-Shared does
        assert r["full_shared"]["computed_tokens"] < r["non_shared"]["computed_tokens"]
        assert r["base_lr_shared"]["computed_tokens"] < r["non_shared"]["computed_tokens"]
        assert r["base_lr_shared"]["kv_peak_bytes"] < r["non_shared"]["kv_peak_bytes"]
        assert r["base_shared"]["kv_peak_bytes"] < r["non_shared"]["kv_peak_bytes"]
        assert r["hf_full_shared"]["kv_peak_bytes"] < r["hf_non_shared"]["kv_peak_bytes"]
    assert (out / "throughput.png").stat().st_size > 0 and (out / "ttft.png").stat().st_size > 0
    assert (out / "throughput_k2.png").is_file()
    assert result["meta"]["rates"]["matmul_TFLOPs"] > 0
    assert tb.main(["--report", str(out / "trace.json"), "--out", str(tmp_path / "rep"), "--no-plots"]) == 0
    merged = json.loads((tmp_path / "rep" / "trace.json").read_text())
    assert len(merged["rows"]) == len(result["rows"]) and merged["targets"]


def test_trace_bench_json_trace_and_budget(tmp_path, tiny_model):
    trace = tmp_path / "trace.json"
    trace.write_text(json.dumps({"name": "mine", "steps": [["a", 20, 2], ["b", [7, 8, 9], 1], ["a", "ctx", 2]]}))
    out = tmp_path / "res"
    assert (
        tb.main(
            [
                "--model",
                tiny_model,
                "--trace",
                str(trace),
                "--ctx",
                "8",
                "--systems",
                "base_lr_shared,hf_non_shared",
                "--out",
                str(out),
                "--no-plots",
                "--no-warmup",
                *SMALL_KV,
            ]
        )
        == 0
    )
    rows = json.loads((out / "trace.json").read_text())["rows"]
    assert [(r["system"], r["status"], r["total_tokens"]) for r in rows] == [
        ("base_lr_shared", "ok", 36),
        ("hf_non_shared", "ok", 36),
    ]
    # a KV budget of a few blocks cannot hold the prompt: reported, not raised
    assert (
        tb.main(
            [
                "--model",
                tiny_model,
                "--trace",
                str(trace),
                "--ctx",
                "200",
                "--systems",
                "non_shared",
                "--kv-cache-bytes",
                str(6 * 16 * 2 * 2 * 32 * 4),
                "--out",
                str(out),
                "--no-plots",
                "--no-warmup",
            ]
        )
        == 0
    )
    row = json.loads((out / "trace.json").read_text())["rows"][0]
    assert row["status"].startswith("KV budget exhausted")


def test_step_timers_sum_the_engine_step_stats():
    """The trace's timing columns come from the engine's public StepStats (no wrapping of engine internals)."""
    from lragent.engine.stats import StepStats

    def stats(prefill: bool, prepare: float, forward: float, step: float, graphed: bool = False) -> StepStats:
        return StepStats(
            is_prefill=prefill,
            num_seqs=1,
            num_tokens=100 if prefill else 1,
            num_sampled=1,
            prepare_s=prepare,
            forward_s=forward,
            step_s=step,
            graphed=graphed,
        )

    class Engine:  # the listener API only
        def __init__(self):
            self.listeners = []

        def add_step_listener(self, fn):
            self.listeners.append(fn)

        def remove_step_listener(self, fn):
            self.listeners.remove(fn)

    engine = Engine()
    with tb.step_timers(engine) as timers:
        assert timers.summary()["decode_step_ms"] is None  # no decode yet
        steps = (stats(True, 0.01, 0.5, 0.6), stats(False, 0.001, 0.02, 0.03), stats(False, 0.003, 0.04, 0.05, True))
        for s in steps:
            for listener in engine.listeners:
                listener(s)
    assert engine.listeners == []  # unsubscribed on the way out
    s = timers.summary()
    assert s["forward_passes"] == {"prefill": 1, "decode": 2}
    assert s["graph_replays"] == {"prefill": 0, "decode": 1}
    assert s["prefill_forward_s"] == pytest.approx(0.5) and s["decode_forward_s"] == pytest.approx(0.06)
    assert s["decode_step_ms"] == pytest.approx(30.0) and s["host_prepare_ms_per_decode"] == pytest.approx(2.0)
    assert s["host_prepare_prefill_s"] == pytest.approx(0.01) and s["engine_step_s"] == pytest.approx(0.68)
    assert s["outside_forward_s"] == pytest.approx(0.12)
