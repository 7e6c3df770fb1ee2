"""`lragent demo` end to end on one question with a tiny iteration cap, with the shipped adapters."""

from __future__ import annotations

import json

import pytest
import torch

from lragent import demo
from lragent.eval import cli as eval_cli
from lragent.eval import tables
from lragent.train import data as D

ROW = {
    "id": "demo-test",
    "level": "easy",
    "type": "bridge",
    "question": "In which year was the director of Jaws born?",
    "answer": "1946",
    "supporting_facts": [["Jaws (film)", 0], ["Steven Spielberg", 0]],
    "context": [
        ["Jaws (film)", ["Jaws is a 1975 American thriller film directed by Steven Spielberg."]],
        ["Steven Spielberg", ["Steven Allan Spielberg (born December 18, 1946) is an American filmmaker."]],
    ],
}


@pytest.fixture(autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_demo_one_question_all_schemes(tmp_path, capsys):
    try:
        demo.default_adapter_set()
    except FileNotFoundError:
        pytest.skip("shipped adapters not present")
    data = tmp_path / "q.jsonl"
    data.write_text(json.dumps(ROW) + "\n")
    rc = demo.main(
        [
            "--data",
            str(data),
            "--questions",
            "1",
            "--max-iterations",
            "1",
            "--max-tokens",
            "8",
            "--kv-cache-bytes",
            str(64 << 20),
            "--out",
            str(tmp_path),
        ]
    )
    assert rc == 0
    out = capsys.readouterr().out
    for scheme in demo.SCHEMES:
        assert scheme in out
    assert "KV MiB" in out and "TTFT" in out
    assert "trajectory of question 1 under non_shared" in out and "Question: In which year" in out
    assert "1. Thought: " in out and "   Action: " in out  # at least one whole step of the trajectory
    text = [line for line in out.splitlines() if str(tmp_path) not in line]  # file paths are as long as they are
    assert all(len(line) <= 80 for line in text), max(text, key=len)
    md = (tmp_path / "demo.md").read_text()
    assert "## Trajectory: base_lr_shared, question 1" in md and "keys + base values MiB" in md
    runs = json.loads((tmp_path / "demo.json").read_text())["runs"]
    assert [r["scheme"] for r in runs] == list(demo.SCHEMES)
    assert not any(r["forced"] for r in runs)  # the shared-A set serves base_lr_shared as is
    for r in runs:
        assert r["summary"]["n"] == 1 and r["summary"]["agent_calls"] >= 2
        assert r["cache"]["bytes_used"] > 0
    by = {r["scheme"]: r for r in runs}
    # with one question, the prefix every later call shares is computed once under the shared schemes
    assert by["full_shared"]["summary"]["computed_tokens"] <= by["non_shared"]["summary"]["computed_tokens"]
    assert by["full_shared"]["cache"]["pools"]["lr"]["bytes_used"] == 0


def test_demo_bad_args(tmp_path, capsys):
    assert demo.main(["--data", str(tmp_path / "missing.jsonl")]) == 2
    assert demo.main(["--sharing", "nope", "--data", str(tmp_path / "missing.jsonl")]) == 2


def _run(scheme: str, correct: bool, prediction: str) -> demo.SchemeRun:
    pools = {name: {"bytes_used": 3 << 20} for name in ("key", "base_value", "lr")}
    summary = {"n": 1, "agent_calls": 12, "computed_tokens": 123456, "reuse_ratio": 0.9, "ttft_s": 12.34,
               "wall_s": 98.7, "f1": 0.0, "prompt_tokens": 9, "reused_tokens": 8, "base_reused_tokens": 7,
               "generated_tokens": 6}  # fmt: skip
    answer = {"id": "1", "gold": "1946", "prediction": prediction, "correct": correct, "iterations": 1, "halt": "x"}
    steps = [D.Step("I need the director of Jaws " * 5, "Retrieve[Jaws (film)]", "Jaws is a 1975 film " * 20)]
    text = D.render_history("hotpotqa", ROW["question"], steps)
    return demo.SchemeRun(scheme, False, summary, {"bytes_used": 9 << 20, "pools": pools}, [answer], [text])


def test_demo_tables_and_trajectory_fit_80_columns():
    runs = [_run(s, s != "full_shared", "a rather long predicted answer " * 3) for s in demo.SCHEMES]
    rows = [ROW]
    for header, table in (demo.answer_rows(runs, rows), demo.metric_rows(runs)):
        text = tables.render(header, table, 80)
        assert all(len(line) <= 80 for line in text.splitlines())
        for scheme in demo.SCHEMES:
            assert scheme[:6] in text
    header, table = demo.metric_rows(runs)
    assert header[:3] == ["scheme", "correct", "calls"] and [r[0] for r in table] == list(demo.SCHEMES)
    assert "…" not in tables.render(header, table, 80)  # the key cost columns fit without cutting
    lines = demo.trajectory_lines(runs[0].trajectories[0])
    assert lines[0].startswith("Question: In which year") and lines[1].startswith("1. Thought: I need")
    assert lines[2] == "   Action: Retrieve[Jaws (film)]" and lines[3].startswith("   Observation: Jaws is")
    assert all(len(line) <= 80 for line in lines)
    full_header, _ = demo.metric_rows(runs, full=True)
    assert "keys/base values reused" in full_header and len(full_header) > len(header)


def test_demo_questions_are_the_first_n_of_the_file(tmp_path):
    data = tmp_path / "q.jsonl"
    data.write_text("".join(json.dumps({**ROW, "id": f"q{i}"}) + "\n" for i in range(5)))
    args = demo.build_parser().parse_args(["--data", str(data), "--questions", "3"])
    spec = demo.spec_from_args(args)
    _, rows = demo.load_questions(spec.data, spec.questions)
    assert [r["id"] for r in rows] == ["q0", "q1", "q2"]  # file order, no selection by outcome
    assert not spec.free and not spec.constrain and spec.score_options == ""


def test_demo_and_eval_take_the_same_score_options():
    """`--score-options` alone is the trajectory form, `reader` the reader; both CLIs parse it the same way and
    refuse other values."""
    for parser, first in ((demo.build_parser(), ["--data", "x.jsonl"]), (eval_cli.build_parser(), ["x.jsonl"])):
        assert parser.parse_args(first).score_options == ""
        assert parser.parse_args([*first, "--score-options"]).score_options == "trajectory"
        assert parser.parse_args([*first, "--score-options", "reader"]).score_options == "reader"
        with pytest.raises(SystemExit):
            parser.parse_args([*first, "--score-options", "letters"])
