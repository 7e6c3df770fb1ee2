"""Role-output parsers on good and junk outputs, and the AutoAct pipeline driven by a scripted fake LLM:
prompts in the training format, Finish -> Reflect, Reflect[wrong] back to plan, the 45-iteration cap, batching of
several questions per generate call, and the eval runner end to end (no model loads)."""

import json
from pathlib import Path

import pytest

from lragent.agents import parsing as P
from lragent.agents import tools as T
from lragent.agents.episode import EpisodeConfig
from lragent.agents.fake import ScriptedLLM
from lragent.agents.pipeline import PipelineConfig, call_seed, make_encoder, make_episode, run_pipeline
from lragent.train import data as D

# ---------------------------------------------------------------------------------------------- parsers


@pytest.mark.parametrize(
    ("text", "tool"),
    [
        ("Aciton: Retrieve[", "Retrieve"),
        ("Aciton: BingSearch[", "BingSearch"),
        ("BingSearch[", "BingSearch"),
        ("Bingsearch[", "BingSearch"),
        ("Aciton: BingSearch [", "BingSearch"),
        ("Finish", "Finish"),
        ("Finish[C]", "Finish"),
        ("Action 3: Lookup[river]", "Lookup"),
        ("### Response:", None),
        ("Image2Text[image]", "Image2Text"),
        ("Reflect[right]", "Reflect"),
        ("I think we should use Retrieve[Milhouse] now", "Retrieve"),
        ("None", None),
        ("", None),
        ("Aciton: Refresh[", None),
        ("!!!???", None),
    ],
)
def test_parse_tool(text, tool):
    assert P.parse_tool(text) == tool


def test_parse_tool_respects_allowed_and_reports_the_word():
    assert P.parse_tool("Aciton: Lookup[", allowed=D.TOOLS["scienceqa"]) is None
    assert P.tool_word("Aciton: Refresh[") == "Refresh"
    assert P.tool_word("") is None
    assert P.inline_argument("Reflect[wrong].") == "wrong"
    assert P.inline_argument("Aciton: Retrieve[") is None


@pytest.mark.parametrize(
    ("text", "arg"),
    [
        ("Terracotta Army]", "Terracotta Army"),
        ("D]", "D"),
        ("Qin dynasty", "Qin dynasty"),  # EOS before the bracket
        ("Badr Hari]\nObversation: junk", "Badr Hari"),
        ("### Response: Badr Hari]", "Badr Hari"),
        ("Retrieve[Badr Hari]", "Badr Hari"),  # the model repeated the tool
        ('"Milhouse"]', "Milhouse"),
        ("]", None),
        ("", None),
        (None, None),
    ],
)
def test_parse_argument(text, arg):
    assert P.parse_argument(text) == arg


@pytest.mark.parametrize(
    ("text", "verdict"),
    [
        ("Reflect[right]", "right"),
        ("Reflect[right].", "right"),
        ("Action: Reflect[wrong]", "wrong"),
        ("Reflect[yes]", "right"),
        ("Reflect[Wrong", "wrong"),
        ("Reflect[right/wrong]", None),
        ("Reflect[?]", None),
        ("My answer is correct.", "right"),
        ("The answer is not correct.", "wrong"),
        ("right", "right"),
        ("Is my answer correct or wrong?", None),
        ("blah blah", None),
        ("", None),
        (None, None),
    ],
)
def test_parse_reflect(text, verdict):
    assert P.parse_reflect(text) == verdict


def test_parse_reflect_strict_mode_rejects_free_text():
    assert P.parse_reflect("My answer is correct.", lenient=False) is None
    assert P.parse_reflect("Reflect[right]", lenient=False) == "right"


def test_parse_thought():
    assert P.parse_thought("The answer is in Paris.") == "The answer is in Paris."
    assert P.parse_thought("Thought: look it up. Aciton: Retrieve[x]") == "look it up."
    assert P.parse_thought("   ") is None
    assert P.parse_thought("### Response:") is None
    assert P.parse_thought(None) is None


# ---------------------------------------------------------------------------------------------- pipeline

HOTPOT = {
    "id": "q1",
    "question": "Who was once considered the best kick boxer in the world?",
    "answer": "Badr Hari",
    "context": [
        ["Badr Hari", ["Badr Hari is a Moroccan-Dutch kickboxer.", " He was once considered the best kickboxer."]],
        ["E. Gordon Gee", ["Elwood Gordon Gee is an American academic."]],
    ],
}
SCIENCE = {
    "pid": "s1",
    "Question": "What is the capital of Delaware?\nOptions: (A) Harrisburg (B) Dover (C) Wilmington (D) Georgetown",
    "choices": ["Harrisburg", "Dover", "Wilmington", "Georgetown"],
    "caption": "A map of Delaware.",
    "orc": "[([[1, 2], [3, 4]], 'Dover', 0.9)]",
    "Answer": "B",
}


def phase_of(role: str, prompt: str) -> str:
    """Which call a prompt is, from its tail (the shapes of lragent.train.data's prompt builders)."""
    if role == "action":
        assert prompt.endswith("[" + D.RESPONSE)
        return "argument"
    return "thought" if prompt.endswith(D.THOUGHT_PROMPT) else ("tool" if role == "plan" else "verdict")


class Script:
    """Per-question scripted outputs: `steps` = list of (thought, tool, argument); reflect verdicts in order."""

    def __init__(self, steps, verdicts=("Reflect[right]",), reflect_thought="My answer is correct."):
        self.steps, self.verdicts, self.reflect_thought = list(steps), list(verdicts), reflect_thought
        self.i = self.v = 0

    def __call__(self, role, prompt):
        kind = phase_of(role, prompt)
        if role == "reflect":
            if kind == "thought":
                return self.reflect_thought + "\nAction: junk after the newline"
            out = self.verdicts[min(self.v, len(self.verdicts) - 1)]
            self.v += 1
            return out
        thought, tool, arg = self.steps[min(self.i, len(self.steps) - 1)]
        if kind == "thought":
            return thought
        if kind == "tool":
            if P.parse_tool(tool) in (None, "Reflect"):  # no action call follows: next step
                self.i += 1
            return tool
        self.i += 1
        return arg + "]"


def one(script, record=HOTPOT, cfg=None):
    llm = ScriptedLLM(script)
    return run_pipeline(llm, [record], cfg or PipelineConfig(keep_trajectories=True))[0], llm


def test_full_loop_reaches_finish_and_reflect_with_training_format_prompts():
    steps = [
        ("I need to find the best kick boxer.", "Aciton: BingSearch[", "best kick boxer in the world"),
        ("Badr Hari is the one.", "Aciton: Finish[", "Badr Hari"),
    ]
    res, llm = one(Script(steps))
    assert res.correct and res.em == 1.0 and res.f1 == 1.0
    assert res.prediction == "Badr Hari" and res.finished and not res.out_of_function
    assert res.halt_reason == "finished"
    assert res.iterations == 3  # search, finish, reflect
    assert res.calls == {"plan": 4, "action": 2, "reflect": 2}
    assert res.parse_failures == {}

    # every prompt is exactly what lragent.train.data builds for that role call
    history = D.head("hotpotqa", HOTPOT["question"])
    search_obs = T.ToolBox.for_record(HOTPOT, "hotpotqa").run("BingSearch", "best kick boxer in the world")
    assert search_obs.startswith("Badr Hari is a Moroccan-Dutch")
    s1 = D.Step(steps[0][0], "BingSearch[best kick boxer in the world]", search_obs)
    s2 = D.Step(steps[1][0], "Finish[Badr Hari]", D.REFLECT_PROMPT_OBS)
    h1 = history + D.render_step(s1)
    h2 = h1 + D.render_step(s2)
    expected = [
        ("plan", D.plan_thought_prompt(history)),
        ("plan", D.plan_tool_prompt(history, steps[0][0])),
        ("action", D.action_prompt(history, steps[0][0], "BingSearch")),
        ("plan", D.plan_thought_prompt(h1)),
        ("plan", D.plan_tool_prompt(h1, steps[1][0])),
        ("action", D.action_prompt(h1, steps[1][0], "Finish")),
        ("reflect", D.reflect_thought_prompt(h2)),
        ("reflect", D.reflect_verdict_prompt(h2, "My answer is correct.")),
    ]
    assert [(c.role, c.prompt) for c in llm.log] == expected
    s3 = D.Step("My answer is correct.", "Reflect[right]", T.MSG_CORRECT)
    assert res.trajectory == h2 + D.render_step(s3)
    # the trajectory parses back into the steps with the training side's reader
    assert D.parse_history(res.trajectory) == (history, [s1, s2, s3])


def test_reflect_wrong_sends_the_agent_back_and_a_second_finish_is_final():
    steps = [
        ("Guess.", "Aciton: Finish[", "Gordon Gee"),
        ("Look it up.", "Aciton: Retrieve[", "Badr Hari"),
        ("Now I know.", "Aciton: Finish[", "Badr Hari"),
    ]
    res, llm = one(Script(steps, verdicts=["Reflect[wrong]"]))
    assert res.prediction == "Badr Hari" and res.correct and res.finished
    assert res.calls == {"plan": 6, "action": 3, "reflect": 2}
    assert res.iterations == 4
    assert "Action: Reflect[wrong]\nObversation: " + T.MSG_REFLECT_WRONG + "\n" in res.trajectory
    assert res.trajectory.endswith("Aciton: Finish[\n### Response:\nBadr Hari]\nObversation: Answer is CORRECT\n")
    roles = [c.role for c in llm.log]
    assert roles[3:5] == ["reflect", "reflect"] and roles[5] == "plan"


def test_wrong_answer_accepted_by_reflect_is_scored_wrong():
    res, _ = one(Script([("Guess.", "Aciton: Finish[", "Gordon Gee")]))
    assert res.prediction == "Gordon Gee" and not res.correct and res.f1 == 0.0 and res.finished
    assert res.trajectory.endswith("Obversation: Answer is INCORRECT\n")


def test_iteration_cap_is_out_of_function():
    steps = [("Keep searching.", "Aciton: BingSearch[", "kick boxer")]
    res, llm = one(Script(steps))
    assert res.iterations == 45 and res.halt_reason == "max_iterations"
    assert res.out_of_function and not res.correct and res.prediction is None and not res.finished
    assert res.calls == {"plan": 90, "action": 45}
    res, _ = one(Script(steps), cfg=PipelineConfig(max_iterations=3))
    assert res.iterations == 3 and res.calls == {"plan": 6, "action": 3}


def test_answer_given_but_rejected_until_the_cap_keeps_the_last_answer():
    steps = [("Guess.", "Aciton: Finish[", "Badr Hari"), ("Search.", "Aciton: BingSearch[", "x")]
    res, _ = one(Script(steps, verdicts=["Reflect[wrong]"]), cfg=PipelineConfig(max_iterations=5))
    assert res.halt_reason == "max_iterations" and not res.out_of_function and not res.finished
    assert res.prediction == "Badr Hari" and res.correct


def test_junk_outputs_are_counted_and_become_invalid_actions():
    steps = [("", "the weather is nice", "x"), ("Answer.", "Aciton: Finish[", "Badr Hari")]
    script = Script(steps, verdicts=["Reflect[?]", "Reflect[right]"])
    res, _ = one(script, cfg=PipelineConfig(max_iterations=10, keep_trajectories=True))
    # plan thought '' and an unparsable tool; then the reflect verdict 'Reflect[?]' is junk as well
    assert res.parse_failures == {"plan_thought": 1, "plan_tool": 1, "reflect_verdict": 1}
    assert "Action: \n### Response:\nthe weather is nice\nObversation: " + T.MSG_INVALID["hotpotqa"] in res.trajectory
    assert "Action: Reflect[?]\nObversation: " + T.MSG_INVALID["hotpotqa"] in res.trajectory
    assert res.prediction == "Badr Hari" and res.correct  # the next Finish is final (AutoAct)


def test_plan_choosing_reflect_is_invalid_and_skips_the_action_role():
    steps = [("Am I sure?", "Reflect[right]", "unused"), ("Done.", "Aciton: Finish[", "Badr Hari")]
    res, llm = one(Script(steps))
    assert "Action: Reflect[right]\nObversation: " + T.MSG_REFLECT_INVALID in res.trajectory
    assert res.calls["action"] == 1 and res.correct


def test_scienceqa_episode_uses_image2text_and_option_letters():
    steps = [("Look at the image.", "Aciton: Image2Text[", "image"), ("Dover it is.", "Aciton: Finish[", "B")]
    res, llm = one(Script(steps), record=SCIENCE)
    assert res.correct and res.prediction == "B" and res.task == "scienceqa"
    first = llm.log[0].prompt
    assert first == D.plan_thought_prompt(
        D.head(
            "scienceqa",
            "What is the capital of Delaware?\nOptions:(A) Harrisburg (B) Dover (C) Wilmington (D) Georgetown",
        )
    )
    assert "Obversation: Image caption: A map of Delaware. OCR result: Dover\n" in res.trajectory


def test_empty_finish_on_scienceqa_is_wrong_even_for_key_a():
    rec = {**SCIENCE, "Answer": "A"}
    res, _ = one(Script([("?", "Aciton: Finish[", "")]), record=rec)
    assert res.prediction == "" and not res.correct and res.parse_failures == {"action": 1}


def test_context_limit_halts():
    res, _ = one(
        Script([("Search.", "Aciton: BingSearch[", "kick boxer")]),
        cfg=PipelineConfig(max_context_tokens=2600, max_tokens=128),
    )
    assert res.halt_reason == "context" and res.out_of_function and res.iterations < 45


def test_concurrent_questions_batch_roles_and_match_sequential_results():
    q2 = {**HOTPOT, "id": "q2", "question": "Which kick boxer fought at GFC 1?"}
    records = [HOTPOT, q2, SCIENCE]
    scripts = {
        HOTPOT["question"]: [("a", "Aciton: BingSearch[", "kick"), ("b", "Aciton: Finish[", "Badr Hari")],
        q2["question"]: [("c", "Aciton: Finish[", "nobody")],
        "What is the capital of Delaware?": [
            ("d", "Aciton: Image2Text[", "image"),
            ("e", "Aciton: Retrieve[", "Dover"),
            ("f", "Aciton: Finish[", "B"),
        ],
    }

    def make(workers):
        per_q = {q: Script(steps) for q, steps in scripts.items()}

        def script(role, prompt):  # route each call to its question's script by the question line
            question = prompt.split("Question:", 1)[1].split("\n", 1)[0]
            return per_q[question](role, prompt)

        llm = ScriptedLLM(script)
        return run_pipeline(llm, records, PipelineConfig(workers=workers)), llm

    seq, llm1 = make(1)
    par, llm3 = make(3)
    key = lambda r: (r.id, r.prediction, r.correct, r.iterations, r.calls)  # noqa: E731
    assert [key(r) for r in seq] == [key(r) for r in par]
    assert [r.id for r in par] == ["q1", "q2", "s1"] and [r.correct for r in par] == [True, False, True]
    assert max(llm1.batches) == 1 and max(llm3.batches) == 3
    assert len(llm3.batches) < len(llm1.batches)
    # one batch mixes adapters; seeds depend on (seed, question, call number) only, not on the batch
    assert any(len({c.role for c in llm3.log[i : i + 3]}) > 1 for i in range(len(llm3.log) - 2))
    assert sorted(c.params.seed for c in llm1.log) == sorted(c.params.seed for c in llm3.log)
    assert call_seed(42, "q1", 0) == call_seed(42, "q1", 0) != call_seed(42, "q1", 1)
    assert all(c.params.temperature == 0.9 and c.params.top_p == 0.75 and c.params.top_k == 40 for c in llm3.log)
    assert all(c.params.stop == ["\n"] and c.params.max_tokens == 128 for c in llm3.log)


def test_greedy_option_sets_temperature_zero():
    _, llm = one(Script([("x", "Aciton: Finish[", "Badr Hari")]), cfg=PipelineConfig(greedy=True))
    assert all(c.params.temperature == 0.0 and c.params.top_k == 1 for c in llm.log)


def test_prompts_are_token_prefixes_of_the_trajectory_with_the_real_tokenizer():
    path = Path.home() / ".cache" / "lragent" / "smollm2-135m-instruct"
    if not (path / "tokenizer.json").exists():
        pytest.skip("SmolLM2 tokenizer not converted locally")
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path)
    encode = make_encoder(tok)
    ep = make_episode(HOTPOT, encode, episode_config=EpisodeConfig())
    script = Script([("Search it.", "Aciton: BingSearch[", "kick boxer"), ("Found.", "Aciton: Finish[", "Badr Hari")])
    prompts = []
    while (call := ep.next_call(0)) is not None:
        prompts.append(call.prompt_ids)
        text = tok.decode(call.prompt_ids)
        ep.feed(type("Out", (), {"text": script(call.role, text), "token_ids": [], "metrics": None})())
    full = ep.traj.ids
    assert full == tok.encode(ep.traj.text)  # chunked encoding == whole-text encoding (what training sees)
    for ids in prompts:
        assert full[: len(ids)] == ids  # every agent's prompt is a token prefix of the shared trajectory


# ---------------------------------------------------------------------------------------------- runner / cli


def test_runner_end_to_end_with_a_fake_llm(tmp_path):
    from lragent.eval.cli import build_parser, parse_schemes, spec_from_args
    from lragent.eval.report import format_table, write_report
    from lragent.eval.runner import find_adapter_sets, run_eval

    for name in ("hotpotqa-shared-a", "scienceqa-independent", "mixed/any"):
        for role in ("plan", "action", "reflect"):
            (tmp_path / "adapters" / name / role).mkdir(parents=True)
    sets = find_adapter_sets([tmp_path / "adapters"])
    assert sorted((s.name, s.task) for s in sets) == [
        ("hotpotqa-shared-a", "hotpotqa"),
        ("mixed/any", None),
        ("scienceqa-independent", "scienceqa"),
    ]
    (tmp_path / "adapters" / "manifest.json").write_text(json.dumps({"hotpotqa-shared-a": {"task": "scienceqa"}}))
    assert find_adapter_sets([tmp_path / "adapters"])[0].task == "scienceqa"  # the manifest wins
    (tmp_path / "adapters" / "manifest.json").unlink()
    import shutil

    shutil.rmtree(tmp_path / "adapters" / "mixed")
    hp = tmp_path / "hp.jsonl"
    hp.write_text("\n".join(json.dumps({**HOTPOT, "id": f"q{i}"}) for i in range(4)) + "\n")
    sq = tmp_path / "sq.jsonl"
    sq.write_text(json.dumps(SCIENCE) + "\n")

    args = build_parser().parse_args(
        [
            str(hp),
            str(sq),
            "--sharing",
            "non_shared,base_lr_shared",
            "--adapters",
            str(tmp_path / "adapters"),
            "--limit",
            "3",
            "--workers",
            "2",
            "--force",
        ]
    )
    spec = spec_from_args(args)
    assert spec.schemes == ["non_shared", "base_lr_shared"] and spec.force and spec.limit == 3
    made = []

    def factory(spec_, scheme, aset):
        if scheme == "base_lr_shared" and aset.task == "scienceqa" and not spec_.force:
            raise ValueError("v_proj A differs across roles")  # what the engine's AdapterError says, roughly
        made.append((scheme, aset.task))
        answer = "Badr Hari" if aset.task == "hotpotqa" else "B"
        return ScriptedLLM(Script([("t", "Aciton: Finish[", answer)]))

    logs = []
    spec.force = False
    skipped = run_eval(spec, llm_factory=factory, log=logs.append)
    assert len(skipped.summaries) == 3 and any("skipped" in line for line in logs)
    spec.force = True
    made.clear()
    report = run_eval(spec, llm_factory=factory, log=lambda s: None)
    assert len(made) == 4  # fresh LLM per (adapter set, scheme)
    assert [(s.dataset, s.scheme, s.n, s.accuracy) for s in report.summaries] == [
        ("hp", "non_shared", 3, 100.0),
        ("hp", "base_lr_shared", 3, 100.0),
        ("sq", "non_shared", 1, 100.0),
        ("sq", "base_lr_shared", 1, 100.0),
    ]
    assert all(0 < s.reuse_ratio < 1 and s.out_of_function == 0.0 for s in report.summaries)
    paths = write_report(report, tmp_path / "out")
    data = json.loads(paths["json"].read_text())
    assert len(data["questions"]) == 8 and data["summaries"][0]["accuracy"] == 100.0
    assert paths["png"].stat().st_size > 1000
    assert "base_lr_shared" in format_table(report.summaries)
    with pytest.raises(ValueError):
        parse_schemes("non_shared,bogus")
    all_schemes = ["non_shared", "full_shared", "base_shared", "base_lr_shared", "stacked_lr", "droidspeak"]
    assert parse_schemes("all") == all_schemes
