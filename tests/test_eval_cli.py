"""`lragent eval` options for long GPU runs: dtype / KV budget / engine passthrough, the per-run time limit, the whole
evaluation's time budget, pooled question files (--together), checkpoints and --merge. Fake LLMs only (no model)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import lragent.agents.pipeline as pipeline_mod
from lragent.agents import parsing as P
from lragent.agents.fake import ScriptedLLM
from lragent.agents.pipeline import PipelineConfig, run_pipeline
from lragent.eval import cli as eval_cli
from lragent.eval.report import format_table, load_report, merge_reports, write_report
from lragent.eval.runner import AdapterSet, EvalSpec, default_llm_factory, run_eval
from lragent.train import data as D

HOTPOT = {
    "id": "q1",
    "question": "Who was once considered the best kick boxer in the world?",
    "answer": "Badr Hari",
    "context": [["Badr Hari", ["Badr Hari is a Moroccan-Dutch kickboxer.", " He was once considered the best."]]],
}


class Script:
    """Scripted outputs of one question: `steps` = (thought, tool, argument), the last one repeated; reflect
    verdicts in order, the last one repeated (as in test_parsers)."""

    def __init__(self, steps, verdicts=("Reflect[right]",)):
        self.steps, self.verdicts, self.i, self.v = list(steps), list(verdicts), 0, 0

    def __call__(self, role, prompt):
        if role == "action":
            self.i += 1
            return self.steps[min(self.i - 1, len(self.steps) - 1)][2] + "]"
        thought_call = prompt.endswith(D.THOUGHT_PROMPT)
        if role == "reflect":
            if thought_call:
                return "Checking."
            self.v += 1
            return self.verdicts[min(self.v - 1, len(self.verdicts) - 1)]
        thought, tool, _ = self.steps[min(self.i, len(self.steps) - 1)]
        if thought_call:
            return thought
        if P.parse_tool(tool) in (None, "Reflect"):
            self.i += 1
        return tool


class Clock:
    """A fake perf_counter that the fake LLM advances by `step` seconds per generate call."""

    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


class TickingLLM(ScriptedLLM):
    def __init__(self, script, clock: Clock, step: float = 1.0) -> None:
        super().__init__(script)
        self.clock, self.step = clock, step

    def generate(self, prompts, adapter="plan", sampling_params=None):
        self.clock.t += self.step
        return super().generate(prompts, adapter, sampling_params)


@pytest.fixture
def clock(monkeypatch):
    c = Clock()
    monkeypatch.setattr(pipeline_mod.time, "perf_counter", c)
    return c


def records(n: int, prefix: str = "q") -> list[dict]:
    return [{**HOTPOT, "id": f"{prefix}{i}"} for i in range(n)]


def test_time_limit_halts_in_flight_and_drops_unstarted(clock):
    llm = TickingLLM(Script([("s", "Aciton: BingSearch[", "kick boxer")]), clock)  # never finishes
    stats: dict = {}
    cfg = PipelineConfig(workers=2, time_limit_s=5.5, max_iterations=45)
    res = run_pipeline(llm, records(3), cfg, stats=stats)
    assert [r.id for r in res] == ["q0", "q1"]  # q2 never started: left out
    assert stats["not_run"] == 1 and stats["timed_out"] and stats["rounds"] == 6
    assert all(r.halt_reason == "time_limit" and r.out_of_function and not r.correct for r in res)
    assert stats["decode_steps"] > 0


def test_time_limit_keeps_an_answer_already_given(clock):
    # Finish first, reflect rejects, then the plan searches forever: cut by the limit, scored on its answer
    script = Script(
        [("t", "Aciton: Finish[", "Badr Hari"), ("s", "Aciton: BingSearch[", "x")], verdicts=("Reflect[wrong]",)
    )
    res = run_pipeline(TickingLLM(script, clock), records(1), PipelineConfig(time_limit_s=20))
    assert res[0].halt_reason == "time_limit" and res[0].correct and not res[0].out_of_function


def test_no_time_limit_means_no_cut(clock):
    llm = TickingLLM(Script([("t", "Aciton: Finish[", "Badr Hari")]), clock)
    stats: dict = {}
    res = run_pipeline(llm, records(3), PipelineConfig(workers=3), stats=stats)
    assert len(res) == 3 and all(r.halt_reason == "finished" for r in res)
    assert stats["not_run"] == 0 and not stats["timed_out"]


def _files(tmp_path):
    a, b = tmp_path / "easy.jsonl", tmp_path / "medium.jsonl"
    a.write_text("\n".join(json.dumps(r) for r in records(3, "e")) + "\n")
    b.write_text("\n".join(json.dumps(r) for r in records(2, "m")) + "\n")
    return a, b


def test_together_pools_files_in_one_batch_and_reports_each_and_combined(tmp_path):
    a, b = _files(tmp_path)
    made = []

    def factory(spec, scheme, aset):
        llm = ScriptedLLM(Script([("t", "Aciton: Finish[", "Badr Hari")]))
        made.append(llm)
        return llm

    aset = AdapterSet("hotpotqa-shared-a", {"plan": "p", "action": "a", "reflect": "r"}, "hotpotqa")
    spec = EvalSpec(
        data=[str(a), str(b)],
        schemes=["non_shared"],
        adapter_sets=[aset],
        together=True,
        pipeline=PipelineConfig(workers=64),
    )
    checkpoints = []
    report = run_eval(spec, llm_factory=factory, log=lambda s: None, checkpoint=checkpoints.append)
    assert [(s.dataset, s.n) for s in report.summaries] == [("easy", 3), ("medium", 2), ("easy+medium", 5)]
    assert max(made[0].batches) == 5  # both files' questions in one batch
    assert len(checkpoints) == 1 and len(checkpoints[0].summaries) == 3
    assert [q["dataset"] for q in report.questions] == ["easy"] * 3 + ["medium"] * 2
    assert all(s.rounds > 0 and s.not_run == 0 for s in report.summaries)
    # without --together: one run per file, a checkpoint after each
    spec.together = False
    checkpoints.clear()
    report = run_eval(spec, llm_factory=factory, log=lambda s: None, checkpoint=checkpoints.append)
    assert [(s.dataset, s.n) for s in report.summaries] == [("easy", 3), ("medium", 2)]
    assert len(checkpoints) == 2


def test_time_budget_skips_later_runs(tmp_path, clock, monkeypatch):
    import lragent.eval.runner as runner_mod

    monkeypatch.setattr(runner_mod.time, "perf_counter", clock)  # same module object; explicit for clarity
    a, _ = _files(tmp_path)
    aset = AdapterSet("s", {"plan": "p", "action": "a", "reflect": "r"}, "hotpotqa")
    factory = lambda spec, scheme, aset: TickingLLM(Script([("s", "Aciton: BingSearch[", "x")]), clock)  # noqa: E731
    spec = EvalSpec(
        data=[str(a)],
        schemes=["non_shared", "base_shared", "base_lr_shared"],
        adapter_sets=[aset],
        pipeline=PipelineConfig(workers=8),
        time_limit=4,
        time_budget=6,
    )
    logs: list[str] = []
    report = run_eval(spec, llm_factory=factory, log=logs.append)
    # run 1: cut at its 4 s limit; run 2: cut at the 2 s the budget has left; run 3: skipped
    assert [(s.scheme, s.rounds, s.time_limited) for s in report.summaries] == [
        ("non_shared", 4, 100.0),
        ("base_shared", 2, 100.0),
    ]
    assert report.spec["skipped_runs"] == ["easy | s | base_lr_shared"]
    assert any("time budget" in line for line in logs)
    assert "cut %" in format_table(report.summaries)


def test_write_merge_and_reload(tmp_path):
    a, b = _files(tmp_path)
    factory = lambda spec, scheme, aset: ScriptedLLM(Script([("t", "Aciton: Finish[", "Badr Hari")]))  # noqa: E731
    aset = AdapterSet("x", {"plan": "p", "action": "a", "reflect": "r"}, None)
    paths = []
    for scheme in ("non_shared", "base_lr_shared"):
        spec = EvalSpec(data=[str(a), str(b)], schemes=[scheme], adapter_sets=[aset], together=True)
        out = write_report(run_eval(spec, llm_factory=factory, log=lambda s: None), tmp_path / scheme)
        paths.append(out["json"])
    merged = merge_reports(paths)
    assert [s.scheme for s in merged.summaries] == ["non_shared"] * 3 + ["base_lr_shared"] * 3
    assert len(merged.questions) == 10 and len(merged.spec["merged"]) == 2
    again = load_report(write_report(merged, tmp_path / "all")["json"])
    assert again.summaries == merged.summaries
    rc = eval_cli.main(["--merge", *map(str, paths), "--out", str(tmp_path / "cli")])
    assert rc == 0 and (tmp_path / "cli" / "eval.png").stat().st_size > 1000
    assert eval_cli.main(["--merge", str(a), "--out", str(tmp_path / "bad")]) == 2  # a JSONL is no eval.json


def test_merge_keeps_the_most_complete_copy_of_a_run(tmp_path):
    """A run found in two files (a run cut by the time limit, then its rerun) is merged once, from the file with
    fewer questions halted, whichever comes first; --max-time-limited leaves out a run still cut beyond it."""
    a, b = _files(tmp_path)
    factory = lambda spec, scheme, aset: ScriptedLLM(Script([("t", "Aciton: Finish[", "Badr Hari")]))  # noqa: E731
    aset = AdapterSet("x", {"plan": "p", "action": "a", "reflect": "r"}, None)
    spec = EvalSpec(data=[str(a), str(b)], schemes=["non_shared"], adapter_sets=[aset], together=True)
    full = write_report(run_eval(spec, llm_factory=factory, log=lambda s: None), tmp_path / "full")["json"]
    cut = json.loads(Path(full).read_text())
    for rec in cut["summaries"][:1]:
        rec["time_limited"] = 40.0
    for rec in cut["questions"]:
        rec["prediction"] = "halted"
    Path(tmp_path / "cut.json").write_text(json.dumps(cut))
    for order in ([tmp_path / "cut.json", full], [full, tmp_path / "cut.json"]):
        merged = merge_reports(order)
        assert len(merged.questions) == 5 and len(merged.summaries) == 3 and merged.spec["dropped"] == []
        assert {q["prediction"] for q in merged.questions} != {"halted"}
    only_cut = merge_reports([tmp_path / "cut.json"], max_time_limited=10.0)
    assert only_cut.questions == [] and only_cut.summaries == []
    assert only_cut.spec["dropped"] == [{"adapters": "x", "scheme": "non_shared", "seed": 42, "time_limited": 40.0}]
    assert len(merge_reports([tmp_path / "cut.json"]).questions) == 5  # the default keeps every run
    argv = ["--merge", str(tmp_path / "cut.json"), "--max-time-limited", "10", "--out", str(tmp_path / "m")]
    rc = eval_cli.main(argv)
    assert rc == 0 and json.loads((tmp_path / "m" / "eval.json").read_text())["questions"] == []


def test_merge_keeps_greedy_runs_apart_also_from_old_files(tmp_path):
    """A greedy run and a sampled run of the same scheme and seed merge into two rows; a greedy eval.json written
    before greedy labels existed (scheme "non_shared") is relabelled from its spec on merge."""
    a, b = _files(tmp_path)
    factory = lambda spec, scheme, aset: ScriptedLLM(Script([("t", "Aciton: Finish[", "Badr Hari")]))  # noqa: E731
    aset = AdapterSet("x", {"plan": "p", "action": "a", "reflect": "r"}, None)
    paths = []
    for greedy in (False, True):
        spec = EvalSpec(data=[str(a)], schemes=["non_shared"], adapter_sets=[aset],
                        pipeline=PipelineConfig(greedy=greedy))  # fmt: skip
        out = write_report(run_eval(spec, llm_factory=factory, log=lambda s: None), tmp_path / f"g{greedy}")
        paths.append(out["json"])
    old = json.loads(Path(paths[1]).read_text())  # as an older version wrote it: no suffix
    for rec in old["summaries"] + old["questions"]:
        rec["scheme"] = "non_shared"
    Path(paths[1]).write_text(json.dumps(old))
    merged = merge_reports(paths)
    assert {q["scheme"] for q in merged.questions} == {"non_shared", "non_shared/greedy"}
    assert [s.scheme for s in merged.summaries] == ["non_shared", "non_shared/greedy"]


def test_cli_engine_options_reach_the_llm(tmp_path, monkeypatch):
    for role in ("plan", "action", "reflect"):
        (tmp_path / "ad" / "hotpotqa-shared-a" / role).mkdir(parents=True)
    a, _ = _files(tmp_path)
    args = eval_cli.build_parser().parse_args(
        [
            str(a),
            "--adapters",
            str(tmp_path / "ad"),
            "--device",
            "cpu",
            "--dtype",
            "float32",
            "--kv-cache-bytes",
            "2G",
            "--engine-arg",
            "max_num_seqs=64",
            "--engine-arg",
            "enforce_eager=true",
            "--together",
            "--time-limit",
            "30",
            "--time-budget",
            "100",
        ]
    )
    spec = eval_cli.spec_from_args(args)
    assert spec.dtype == "float32" and spec.together and spec.time_limit == 30 and spec.time_budget == 100
    assert spec.engine_kwargs == {"max_num_seqs": 64, "enforce_eager": True, "kv_cache_bytes": 2 << 30}
    seen = {}

    class FakeLLM:
        def __init__(self, **kwargs):
            seen.update(kwargs)

    import lragent

    monkeypatch.setattr(lragent, "LLM", FakeLLM)
    spec.force = True
    default_llm_factory(spec, "base_lr_shared", spec.adapter_sets[0])
    assert seen["dtype"] == "float32" and seen["device"] == "cpu" and seen["kv_cache_bytes"] == 2 << 30
    assert seen["allow_unshared_a"] and seen["max_num_seqs"] == 64 and seen["sharing"] == "base_lr_shared"
    assert eval_cli.parse_engine_args(["a=1.5", "b=none", "c=text"]) == {"a": 1.5, "b": None, "c": "text"}
    with pytest.raises(ValueError):
        eval_cli.parse_engine_args(["novalue"])
    bad = eval_cli.build_parser().parse_args([str(a), "--adapters", str(tmp_path / "ad"), "--time-limit", "0"])
    with pytest.raises(ValueError):
        eval_cli.spec_from_args(bad)


def test_seeds_and_noise_control_rows_with_confidence_intervals(tmp_path, capsys):
    from lragent.eval.report import print_summary
    from lragent.eval.stats import NOISE_LABEL

    aset = AdapterSet("fake", {r: "x" for r in D.ROLES}, "hotpotqa")
    data = tmp_path / "q.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in records(6)))
    spec = EvalSpec(data=[str(data)], schemes=["non_shared", "base_lr_shared"], adapter_sets=[aset], seeds=[1, 2],
                    noise_control=True, pipeline=PipelineConfig(workers=6))  # fmt: skip
    assert spec.runs() == [
        ("non_shared", "non_shared", 1),
        ("non_shared", "non_shared", 2),
        ("base_lr_shared", "base_lr_shared", 1),
        ("base_lr_shared", "base_lr_shared", 2),
        ("non_shared", NOISE_LABEL, 1001),
        ("non_shared", NOISE_LABEL, 1002),
    ]
    planned = iter(spec.runs())

    def factory(spec, scheme, aset):  # base_lr_shared answers right only under seed 1: accuracy 50%, delta -50
        engine_scheme, label, seed = next(planned)
        assert engine_scheme == scheme
        answer = "Badr Hari" if label != "base_lr_shared" or seed == 1 else "Nixon"
        return ScriptedLLM(Script([("t", "Aciton: Finish[", answer)]))

    report = run_eval(spec, llm_factory=factory, log=lambda s: None)
    assert [(s.scheme, s.seed) for s in report.summaries] == [(label, seed) for _, label, seed in spec.runs()]
    assert {q["seed"] for q in report.questions} == {1, 2, 1001, 1002}
    text = print_summary(report)
    assert all(len(line) <= 80 for line in text.splitlines())
    lines = {line.split()[0]: line for line in text.splitlines() if line.strip()}
    assert "100.0" in lines["non_shared"] and "50.0" in lines["base_lr_shared"] and "-50.0" in lines["base_lr_shared"]
    assert "+0.0" in lines["ns"]  # the noise control: reseeded non_shared, same answers here
    assert "6 questions x 2 seed(s)" in text
    paths = write_report(report, tmp_path / "out")
    md = paths["md"].read_text()
    assert NOISE_LABEL in md and "1001 1002" in md and "Every run" in md


def test_cli_seeds_noise_control_and_fidelity(tmp_path, monkeypatch, capsys):
    args = eval_cli.build_parser().parse_args(["q.jsonl", "--seeds", "1", "2", "3", "--noise-control"])
    monkeypatch.setattr(eval_cli, "find_adapter_sets", lambda roots: [AdapterSet("a", {r: "x" for r in D.ROLES})])
    spec = eval_cli.spec_from_args(args)
    assert spec.run_seeds() == [1, 2, 3] and spec.noise_control and len(spec.runs()) == 6
    only = eval_cli.build_parser().parse_args(["q.jsonl", "--sharing", "none", "--seeds", "1", "2", "--noise-control"])
    assert [label for _, label, _ in eval_cli.spec_from_args(only).runs()] == ["non_shared/reseed"] * 2
    with pytest.raises(ValueError, match="none"):  # nothing to run
        eval_cli.spec_from_args(eval_cli.build_parser().parse_args(["q.jsonl", "--sharing", "none"]))
    assert spec.pipeline.finish_at_cap and not spec.pipeline.constrain
    args = eval_cli.build_parser().parse_args(["q.jsonl", "--free", "--constrain"])
    spec = eval_cli.spec_from_args(args)
    assert spec.run_seeds() == [42] and not spec.pipeline.finish_at_cap and spec.pipeline.constrain
    # --merge with --fidelity: analyze's agreement/KL join the table
    factory = lambda spec, scheme, aset: ScriptedLLM(Script([("t", "Aciton: Finish[", "Badr Hari")]))  # noqa: E731
    data = tmp_path / "q.jsonl"
    data.write_text(json.dumps(HOTPOT) + "\n")
    aset = AdapterSet("fake", {r: "x" for r in D.ROLES})
    spec = EvalSpec(data=[str(data)], schemes=["non_shared", "base_shared"], adapter_sets=[aset])
    out = write_report(run_eval(spec, llm_factory=factory, log=lambda s: None), tmp_path / "run")
    analyze = tmp_path / "analyze.json"
    fid = [{"scheme": "base_shared", "agreement": 0.75, "kl_mean": 0.5}]
    analyze.write_text(json.dumps({"sets": [{"adapters": "fake", "fidelity": fid}]}))
    argv = ["--merge", str(out["json"]), "--fidelity", str(analyze), "--out", str(tmp_path / "m")]
    assert eval_cli.main(argv) == 0
    text = capsys.readouterr().out
    base = next(line for line in text.splitlines() if line.startswith("base_shared"))
    assert "75.0" in base and "0.5000" in base
    assert eval_cli.main(["--merge", str(out["json"]), "--fidelity", str(data)]) == 2  # not an analyze.json
