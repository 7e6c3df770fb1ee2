"""`lragent analyze` on a tiny slice: one short trajectory, random role adapters, the real embedded model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from lragent.eval import analyze as A
from lragent.eval.runner import AdapterSet
from lragent.train import data as D


@pytest.fixture(autouse=True)
def one_thread():
    """One torch thread: on a busy 2-core machine more threads spin against each other (5-10x slower)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _trajectory_file(tmp_path: Path) -> Path:
    steps = [
        D.Step(
            "I need to find the director of the film Jaws.",
            "Retrieve[Jaws (film)]",
            "Jaws is a 1975 American thriller film directed by Steven Spielberg and based on the novel by "
            "Peter Benchley.",
        ),
        D.Step(
            "Now I need the birth year of Steven Spielberg.",
            "Lookup[born]",
            "Steven Allan Spielberg (born December 18, 1946) is an American filmmaker.",
        ),
        D.Step("Steven Spielberg was born in 1946.", "Finish[1946]", "Please reflect your answer."),
    ]
    text = D.render_history("hotpotqa", "In which year was the director of Jaws born?", steps)
    path = tmp_path / "eval.json"
    path.write_text(json.dumps({"questions": [{"trajectory": text}, {"trajectory": text}]}))
    return path


def _tiny_spec(tmp_path: Path, adapters: dict, **overrides) -> A.AnalyzeSpec:
    """One 96-token trajectory, a 32-token window, the non_shared control: the tests' analysis, `overrides` aside."""
    base = dict(limit=1, max_tokens=96, window=32, control=True, kv_cache_bytes=32 << 20)
    aset = AdapterSet("random-shared-a", dict(adapters))
    return A.AnalyzeSpec(trajectories=str(_trajectory_file(tmp_path)), adapter_sets=[aset], **{**base, **overrides})


def test_parse_pairs_and_split_point():
    assert A.parse_pairs("handoff") == list(A.HANDOFF_PAIRS)
    assert len(A.parse_pairs("all")) == 6
    assert A.parse_pairs("plan:action, action->reflect") == [("plan", "action"), ("action", "reflect")]
    with pytest.raises(ValueError):
        A.parse_pairs("plan:nobody")
    assert A.split_point(100, 32, 16) == 64  # 36 reader tokens: the last block boundary leaving >= 32
    assert A.split_point(96, 32, 16) == 64


def test_analyze_shared_a_tiny(tmp_path, shared_a_adapters):
    spec = _tiny_spec(tmp_path, shared_a_adapters, pairs=[("plan", "plan"), ("plan", "action")])
    logs: list[str] = []
    report = A.run_analysis(spec, log=logs.append)
    (s,) = report["sets"]
    assert s["shared_a"] and s["trajectories"] == 1 and s["tokens"] == 96
    sim = s["similarity"]
    assert len(sim["per_layer"]["key"]) == s["num_layers"] == 30
    # layer 0 sees the same embeddings in every agent: keys, base values and (shared A) R are identical
    for q in ("key", "base_value", "lr"):
        assert sim["per_layer"][q][0] == pytest.approx(1.0, abs=1e-5)
    assert sim["mean"]["adapter_output"] < sim["mean"]["base_value"]
    fid = {f["scheme"]: f for f in s["fidelity"]}
    assert list(fid) == ["non_shared", "full_shared", "base_shared", "base_lr_shared", "stacked_lr", "droidspeak"]
    split = A.split_point(96, 32, 16)
    for scheme, f in fid.items():
        assert f["positions"] == 2 * (96 - split)
        # an agent reading its own cache is exact under every scheme
        assert f["per_pair"]["plan->plan"]["kl_max"] < 1e-6 and f["per_pair"]["plan->plan"]["agreement"] == 1.0
        cross = f["per_pair"]["plan->action"]
        if scheme == "non_shared":
            assert cross["kl_max"] < 1e-6 and cross["agreement"] == 1.0 and cross["reused_tokens_mean"] == 0
        else:
            assert cross["kl_mean"] > 1e-6  # the reader really read another agent's cache
            # base_shared and droidspeak reuse the shared entries and compute their own (LR, critical layers)
            own = scheme in ("base_shared", "droidspeak")
            reused = cross["base_reused_tokens_mean"] if own else cross["reused_tokens_mean"]
            assert reused == split
    assert fid["base_shared"]["per_pair"]["plan->action"]["reused_tokens_mean"] == 0  # LR prefill of [0, P)
    gap = s["role_gap"]  # plan vs action, both their own passes: the adapters differ, so does the output
    assert list(gap["per_pair"]) == ["plan->action"] and gap["kl_mean"] > 1e-6
    paths = A.write_report(report, tmp_path / "out")
    assert all(p.is_file() for p in paths.values())
    assert "base_lr_shared" in paths["md"].read_text()


def test_analyze_fp8_against_the_unquantised_reference(tmp_path, shared_a_adapters):
    """With quantization, the compared engines run FP8 weights and the reference does not: the non_shared control
    then measures the quantisation itself (close, not exact)."""
    spec = _tiny_spec(
        tmp_path, shared_a_adapters, pairs=[("plan", "action")], schemes=["base_lr_shared"], similarity=False,
        quantization="fp8",
    )  # fmt: skip
    report = A.run_analysis(spec, log=lambda _: None)
    assert report["spec"]["quantization"] == "fp8"
    fid = {f["scheme"]: f for f in report["sets"][0]["fidelity"]}
    own = fid["non_shared"]
    assert 1e-6 < own["kl_mean"] < 0.5 and own["agreement"] >= 0.7  # FP8 moves the distribution, a little
    assert fid["base_lr_shared"]["kl_mean"] > 1e-6


def test_cli_unshared_a_forced_and_refused(tmp_path, qv_adapters):
    root = str(Path(next(iter(qv_adapters.values()))).parent)
    common = [
        "--trajectories",
        str(_trajectory_file(tmp_path)),
        "--adapters",
        root,
        "--limit",
        "1",
        "--max-tokens",
        "80",
        "--window",
        "32",
        "--pairs",
        "plan:action",
        "--sharing",
        "base_lr_shared",
        "--no-similarity",
        "--kv-cache-bytes",
        str(32 << 20),
    ]
    assert A.main([*common, "--out", str(tmp_path / "forced")]) == 0
    (s,) = json.loads((tmp_path / "forced" / "analyze.json").read_text())["sets"]
    assert not s["shared_a"] and "similarity" not in s
    (f,) = s["fidelity"]
    assert f["scheme"] == "base_lr_shared" and f["forced"] and f["kl_mean"] > 0
    assert A.main([*common, "--no-force", "--out", str(tmp_path / "refused")]) == 0
    (s,) = json.loads((tmp_path / "refused" / "analyze.json").read_text())["sets"]
    assert s["fidelity"] == []


def test_answer_agreement(tmp_path, capsys):
    def q(scheme, qid, pred, traj, correct=False):
        return {
            "dataset": "d",
            "adapters": "a",
            "scheme": scheme,
            "id": qid,
            "prediction": pred,
            "trajectory": traj,
            "correct": correct,
        }

    questions = [
        q("non_shared", "1", "x", "t1", True),
        q("non_shared", "2", "y", "t2"),
        q("base_shared", "1", "x", "t1", True),
        q("base_shared", "2", "z", "t2b"),
    ]
    path = tmp_path / "eval.json"
    path.write_text(json.dumps({"questions": questions}))
    rows = {r["scheme"]: r for r in A.answer_agreement(path)}
    assert rows["non_shared"]["same_answer"] == 1.0
    assert rows["base_shared"]["same_answer"] == 0.5 and rows["base_shared"]["same_trajectory"] == 0.5
    assert rows["base_shared"]["correct"] == 1
    assert A.main(["--answers", str(path)]) == 0
    assert "base_shared" in capsys.readouterr().out
