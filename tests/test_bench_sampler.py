"""Benchmarks that tell the truth about sampling: `lragent bench sampler` (tiny sizes), and the decoding options of
`lragent bench decode` / `bench trace` (accepted, used, recorded) on a tiny random Llama."""

from __future__ import annotations

import json

import pytest
import torch

from lragent import cli
from lragent.bench import decode as db
from lragent.bench import sampler as sb
from lragent.bench import trace as tb
from lragent.bench.decoding import describe, engine_only, request_params, request_seed, sampling_options

AUTOACT = ["--temperature", "0.9", "--top-p", "0.75", "--top-k", "40"]
AUTOACT_OPTS = {"temperature": 0.9, "top_p": 0.75, "top_k": 40}


def test_sampler_bench_smoke(tmp_path, capsys):
    out = tmp_path / "sampler.json"
    argv = ["bench", "sampler", "--device", "cpu", "--batch", "2", "--vocab", "1000", "--reps", "2", "--warmup", "1"]
    assert cli.main([*argv, "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    data = json.loads(out.read_text())
    assert [r["setting"] for r in data["rows"]] == list(sb.SETTINGS)
    for r in data["rows"]:
        assert (r["batch"], r["vocab"], r["reps"]) == (2, 1000, 2)
        assert 0 < r["ms_min"] <= r["ms"] <= r["ms_max"] and r["build_ms"] > 0
        assert r["tok_s"] == pytest.approx(2 / (r["ms"] / 1e3))
    assert data["meta"]["device"] == "cpu" and data["meta"]["reps"] == 2 and data["meta"]["warmup"] == 1
    summary = [line for line in printed.splitlines() if line.startswith("SAMPLER ")]
    assert summary == [data["summary"]]
    fields = dict(part.split("=", 1) for part in summary[0].split()[1:])
    assert fields["ref"] == "b2xv1000" and fields["configs"] == "5"
    assert all(float(fields[f"{s}_ms"]) > 0 for s in sb.SETTINGS)
    # a subset of settings, and bad flags are usage errors
    assert sb.main(["--batch", "1", "--vocab", "64", "--reps", "1", "--settings", "greedy,t0.9-p0.9"]) == 0
    with pytest.raises(SystemExit):
        sb.main(["--settings", "nucleus"])
    with pytest.raises(SystemExit):
        sb.main(["--vocab", "0"])


def test_decoding_options_build_seeded_requests():
    greedy = request_params(None, 5, max_tokens=3)
    assert greedy.greedy and greedy.seed is None and describe(None) == "greedy"
    assert describe({"temperature": 0.0, "top_p": 0.5, "top_k": 3}) == "greedy"  # no temperature: top-p/k unused
    sampled = request_params(AUTOACT_OPTS, request_seed(0, 1, 2), max_tokens=3)
    assert (sampled.temperature, sampled.top_p, sampled.top_k, sampled.max_tokens) == (0.9, 0.75, 40, 3)
    assert sampled.seed == request_seed(0, 1, 2) != request_seed(0, 2, 1)
    assert describe(AUTOACT_OPTS) == "sampled (T 0.9, top-p 0.75, top-k 40, seeded)"
    assert -(1 << 63) <= request_seed(-7, 1 << 62, 3) < 1 << 63
    with pytest.raises(ValueError, match="top_p"):
        sampling_options(type("A", (), {"temperature": 0.9, "top_p": 0.0, "top_k": -1})())


def test_penalty_options_reach_the_requests():
    flags = type("A", (), {"temperature": 0.0, "top_p": 1.0, "top_k": -1, "repetition_penalty": 1.2})
    greedy_opts = sampling_options(flags())
    assert greedy_opts == {"temperature": 0.0, "top_p": 1.0, "top_k": -1, "repetition_penalty": 1.2}
    greedy = request_params(greedy_opts, 3, max_tokens=2)
    assert greedy.greedy and greedy.repetition_penalty == 1.2 and greedy.penalized
    assert describe(greedy_opts) == "greedy + repetition_penalty 1.2"
    sampled_opts = {**AUTOACT_OPTS, "frequency_penalty": 0.3, "presence_penalty": -0.5}
    sampled = request_params(sampled_opts, 4, max_tokens=2)
    assert (sampled.frequency_penalty, sampled.presence_penalty, sampled.seed) == (0.3, -0.5, 4)
    assert describe(sampled_opts).endswith("seeded) + presence_penalty -0.5 + frequency_penalty 0.3")
    assert engine_only(sampled_opts) == "--presence-penalty, --frequency-penalty"
    assert engine_only(AUTOACT_OPTS) is None and engine_only({"json_schema": {}}) == "--json-schema"
    assert sampling_options(type("A", (), AUTOACT_OPTS)()) == AUTOACT_OPTS  # penalties off: not recorded
    with pytest.raises(ValueError, match="frequency_penalty"):
        sampling_options(type("A", (), {**AUTOACT_OPTS, "frequency_penalty": 3.0})())


def test_decode_bench_with_penalties_times_the_engine_only(tmp_path, tiny_llama, capsys):
    common = ["--model", tiny_llama[0], "--batch", "2", "--prompt-len", "8", "--new-tokens", "4"]
    out = tmp_path / "decode.json"
    assert db.main([*common, "--out", str(out), *AUTOACT, "--repetition-penalty", "1.3"]) == 0
    printed = capsys.readouterr().out
    data = json.loads(out.read_text())
    assert data["sampling"] == {**AUTOACT_OPTS, "repetition_penalty": 1.3}
    assert data["rows"][0]["hf_peft_tok_s"] is None and data["rows"][0]["lragent_tok_s"] > 0  # HF has no such run
    assert "penalised=1 " in printed and "+ repetition_penalty 1.3" in printed
    with pytest.raises(SystemExit):
        db.main([*common, "--presence-penalty", "5"])


def test_decode_bench_records_sampling(tmp_path, tiny_llama, capsys):
    model = tiny_llama[0]
    common = ["--model", model, "--batch", "2", "--prompt-len", "8", "--new-tokens", "4"]
    out = tmp_path / "decode.json"
    assert db.main([*common, "--out", str(out), *AUTOACT]) == 0  # with HF + PEFT, sampling too
    printed = capsys.readouterr().out
    data = json.loads(out.read_text())
    assert data["sampling"] == AUTOACT_OPTS and data["decoding"] == describe(AUTOACT_OPTS)
    assert "decoding: sampled (T 0.9, top-p 0.75, top-k 40, seeded)" in printed
    row = data["rows"][0]
    assert row["batch"] == 2 and row["lragent_tok_s"] > 0 and row["hf_peft_tok_s"] > 0 and row["new_tokens_mean"] == 4
    assert "DECODE decoding=sampled temperature=0.9 top_p=0.75 top_k=40 json_schema=0 penalised=0 b2_tok_s=" in printed
    # greedy stays the default; --no-hf times the engine only
    assert db.main([*common, "--out", str(out), "--no-hf"]) == 0
    data = json.loads(out.read_text())
    assert data["decoding"] == "greedy" and data["rows"][0]["hf_peft_tok_s"] is None
    assert "decoding: greedy" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        db.main([*common, "--top-p", "0"])


def test_trace_bench_records_sampling(tmp_path, tiny_llama, capsys):
    trace = tmp_path / "trace.json"
    trace.write_text(json.dumps({"name": "mine", "steps": [["a", 12, 3], ["b", 4, 2], ["a", 4, 3]]}))
    common = ["--model", tiny_llama[0], "--trace", str(trace), "--no-plots", "--no-warmup"]
    common += ["--systems", "base_lr_shared,hf_non_shared", "--kv-cache-bytes", str(4 << 20)]
    sampled, greedy = tmp_path / "sampled", tmp_path / "greedy"
    assert tb.main([*common, "--out", str(sampled), *AUTOACT]) == 0
    assert "decoding: sampled (T 0.9, top-p 0.75, top-k 40, seeded)" in capsys.readouterr().out
    result = json.loads((sampled / "trace.json").read_text())
    assert result["meta"]["sampling"] == AUTOACT_OPTS
    assert result["meta"]["decoding"] == describe(AUTOACT_OPTS)
    assert [(r["system"], r["status"], r["generated_tokens"]) for r in result["rows"]] == [
        ("base_lr_shared", "ok", 8),
        ("hf_non_shared", "ok", 8),
    ]
    assert all(r["decoding"] == describe(AUTOACT_OPTS) for r in result["rows"])
    assert tb.main([*common, "--out", str(greedy)]) == 0
    assert json.loads((greedy / "trace.json").read_text())["meta"]["decoding"] == "greedy"
    # a merged report keeps greedy and sampled rows of one system side by side
    merged_dir = tmp_path / "merged"
    files = [str(greedy / "trace.json"), str(sampled / "trace.json")]
    assert tb.main(["--report", *files, "--out", str(merged_dir), "--no-plots"]) == 0
    merged = json.loads((merged_dir / "trace.json").read_text())
    assert len(merged["rows"]) == 4 and merged["meta"]["decoding"].startswith("mixed: ")
    with pytest.raises(SystemExit):
        tb.main([*common, "--out", str(greedy), "--temperature", "-1"])


def test_sampled_traces_are_reproducible(tiny_llama):
    """Each request of a sampled trace has a fixed seed: two runs draw the same tokens (engine and HF + PEFT), and
    they are not the greedy ones."""
    from lragent.bench.hf_baseline import HFRunner, load_hf_peft
    from lragent.config import EngineConfig
    from lragent.engine.llm_engine import LLMEngine

    model, adapters = tiny_llama
    spec = tb.TraceSpec("mine", None, (tb.Step("plan", 12, 6), tb.Step("action", 4, 6)))
    engine = LLMEngine(EngineConfig(model=model, adapters=adapters, sharing="non_shared", kv_cache_bytes=4 << 20))

    def engine_tokens(sampling):
        runs = tb._Trajectories(engine, spec, 2, seed=0, sampling=sampling)
        assert runs.drive(float("inf")) == "ok"
        engine.reset_prefix_cache()
        return runs.tokens

    first = engine_tokens(AUTOACT_OPTS)
    assert engine_tokens(AUTOACT_OPTS) == first and engine_tokens(None) != first

    runner = HFRunner(load_hf_peft(model, adapters, "cpu", torch.float32), "hf_non_shared", "cpu", AUTOACT_OPTS)

    def hf_tokens(seed):
        runner.reset()
        return runner.run_step("plan", list(range(10, 22)), 8, float("inf"), seed=seed)["generated"]

    assert hf_tokens(3) == hf_tokens(3) != hf_tokens(4)


SCHEMA = {"type": "object", "properties": {"name": {"type": "string"}, "n": {"type": "integer"}}, "required": ["name"]}


def test_json_schema_option_on_the_embedded_model(tmp_path, capsys):
    """`--json-schema FILE` constrains every request of bench decode / trace (engine only; HF + PEFT is skipped); a
    request stops when its schema is complete, so the benchmarks count the tokens generated."""
    schema = tmp_path / "schema.json"
    schema.write_text(json.dumps(SCHEMA))
    out = tmp_path / "decode.json"
    argv = ["--batch", "2", "--prompt-len", "8", "--new-tokens", "24", "--json-schema", str(schema), *AUTOACT]
    assert db.main([*argv, "--out", str(out)]) == 0
    data = json.loads(out.read_text())
    assert data["sampling"]["json_schema"] == SCHEMA and data["decoding"].endswith(" + JSON schema")
    row = data["rows"][0]
    assert row["lragent_tok_s"] > 0 and row["hf_peft_tok_s"] is None and 1 <= row["new_tokens_mean"] <= 24
    assert "json_schema=1" in capsys.readouterr().out

    trace = tmp_path / "trace.json"
    trace.write_text(json.dumps([["a", 12, 24], ["b", 4, 24]]))
    res = tmp_path / "res"
    argv = ["--trace", str(trace), "--json-schema", str(schema), "--systems", "base_lr_shared,hf_non_shared"]
    assert tb.main([*argv, "--out", str(res), "--no-plots", "--no-warmup", "--kv-cache-bytes", str(16 << 20)]) == 0
    rows = {r["system"]: r for r in json.loads((res / "trace.json").read_text())["rows"]}
    ours, hf = rows["base_lr_shared"], rows["hf_non_shared"]
    assert ours["status"] == "ok" and ours["decoding"] == "greedy + JSON schema"
    assert 2 <= ours["generated_tokens"] <= 48
    assert ours["throughput_tok_s"] == pytest.approx((16 + ours["generated_tokens"]) / ours["e2e_s"])
    assert hf["status"] == "skipped (--json-schema: engine only)"
    with pytest.raises(SystemExit):
        db.main(["--json-schema", str(tmp_path / "missing.json")])


def test_json_schema_needs_a_tokenizer(tmp_path, tiny_llama):
    """A model without a tokenizer refuses constrained requests: the trace reports it per system, not as a cache
    or context problem."""
    schema = tmp_path / "schema.json"
    schema.write_text(json.dumps(SCHEMA))
    trace = tmp_path / "trace.json"
    trace.write_text(json.dumps([["a", 12, 3]]))
    argv = ["--model", tiny_llama[0], "--trace", str(trace), "--json-schema", str(schema), "--systems", "non_shared"]
    assert tb.main([*argv, "--out", str(tmp_path / "res"), "--no-plots", "--no-warmup"]) == 0
    row = json.loads((tmp_path / "res" / "trace.json").read_text())["rows"][0]
    assert row["status"].startswith("error: json_schema") and "tokenizer" in row["status"]


def test_bench_decode_shared_prefix_caches_the_common_part_once(tiny_llama, tmp_path):
    """`--shared-prefix N`: every row of the timed batch reuses the N common tokens (whole blocks) from one cached
    copy, the setting cascade decode is measured in; the flag is recorded and HF + PEFT is skipped."""
    model, _ = tiny_llama
    out = tmp_path / "decode.json"
    argv = ["--model", model, "--batch", "3", "--prompt-len", "96", "--new-tokens", "4", "--shared-prefix", "64"]
    assert db.main([*argv, "--cascade-decode", "--out", str(out)]) == 0
    row = json.loads(out.read_text())["rows"][0]
    assert row["hf_peft_tok_s"] is None and row["lragent_tok_s"] > 0
    assert row["reused_tokens_mean"] >= 64  # the common part, from the primer's blocks
    assert db.main([*argv[:-2], "--out", str(tmp_path / "plain.json")]) == 0  # without: nothing reused
    assert json.loads((tmp_path / "plain.json").read_text())["rows"][0]["reused_tokens_mean"] == 0
    with pytest.raises(ValueError, match="shared-prefix"):
        db.main([*argv[:-1], "96", "--out", str(tmp_path / "bad.json")])


def test_bench_trace_and_decode_pass_the_tensor_parallel_size(monkeypatch):
    """`--tensor-parallel-size` reaches the engine config of bench trace and of bench decode (its TP runs themselves
    are the TP tests' business)."""
    import lragent.engine.llm_engine as le

    seen = []
    monkeypatch.setattr(le, "LLMEngine", lambda config: seen.append(config.tensor_parallel_size))
    args = tb._build_parser().parse_args(["--model", "m", "--tensor-parallel-size", "2"])
    args.concurrent = [1]  # parsed from its comma list in main
    tb.build_engine(args, "base_lr_shared", {})
    assert seen == [2]
    calls = []

    def ours(*args, stats, **kw):
        calls.append(kw.get("tensor_parallel_size"))
        stats["new_tokens_mean"] = 1.0
        return 1.0

    monkeypatch.setattr(db, "ours", ours)
    assert db.main(["--batch", "1", "--no-hf", "-tp", "2", "--out", "/dev/null"]) == 0
    assert calls == [2]
