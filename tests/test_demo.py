"""`lragent demo` end to end on one question with a tiny iteration cap, with the shipped adapters."""

from __future__ import annotations

import json

import pytest
import torch

from lragent import demo

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
    assert "KV cache used" in out and "TTFT" in out
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
