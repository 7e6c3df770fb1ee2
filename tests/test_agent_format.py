"""The contract between training and the pipeline: for the same step, the pipeline sends the exact prompt the trainer
built (text and token ids), and the pipeline's optional guards (finish at the cap, choice constraints) and AutoAct's
reflect rule behave as the training data shows."""

from __future__ import annotations

import pytest

from lragent.agents import tools as T
from lragent.agents.episode import Phase
from lragent.agents.fake import ByteTokenizer, FakeOutput, ScriptedLLM
from lragent.agents.pipeline import PipelineConfig, make_encoder, make_episode, run_pipeline
from lragent.train import data as D
from lragent.train import examples as E

DATA = E.default_data_dir()
needs_data = pytest.mark.skipif(not (DATA / "hotpotqa_full_trajectories.json").is_file(), reason="no trajectories")


class ReplayTools:
    """Stands in for the ToolBox: answers each tool call with the trajectory's recorded observation."""

    def __init__(self, observations: list[str]) -> None:
        self.observations = list(observations)

    def run(self, tool: str, argument: str | None) -> str:
        return self.observations.pop(0)

    def note_step(self, tool: str) -> None:
        pass


def planned_calls(traj: E.Trajectory) -> tuple[list[tuple[str, str]], list[str]] | None:
    """(role, output) of every call the pipeline makes to replay ``traj``, and the tool observations; None when the
    trajectory holds a step the pipeline cannot reproduce (an unknown tool in the plan's turn)."""
    calls, observations = [], []
    for _, step, reflect_turn in E._walk(traj):
        parsed = step.parsed
        if reflect_turn and parsed is not None and parsed[0] == D.REFLECT:
            calls += [("reflect", step.thought), ("reflect", step.action[: step.action.find("]") + 1])]
        elif parsed is not None and parsed[0] in D.TOOLS[traj.task] and parsed[1]:
            calls += [("plan", step.thought), ("plan", D.plan_tool_output(parsed[0])), ("action", parsed[1])]
            observations += [step.observation] if parsed[0] != D.FINISH else []
        else:
            return None
    return calls, observations


def replay(traj: E.Trajectory, encode) -> list[tuple[str, list[int], str]]:
    """Drive one Episode with the trajectory's own outputs; (role, prompt ids, expected output) of every call."""
    planned = planned_calls(traj)
    assert planned is not None
    calls, observations = planned
    record = {"id": "t", "question": traj.question, "answer": "?", "context": []}
    episode = make_episode(record, encode, task=traj.task)
    episode.toolbox = ReplayTools(observations)
    seen = []
    for role, output in calls:
        call = episode.next_call(0)
        assert call is not None and call.role == role
        seen.append((role, call.prompt_ids, output))
        episode.feed(FakeOutput(output, [], {}))
    return seen


def toy() -> E.Trajectory:
    steps = (
        D.Step("I should search.", "BingSearch[capital of France]", "Paris is the capital of France."),
        D.Step("Found it.", "Finish[Paris]", D.REFLECT_PROMPT_OBS),
        D.Step("Am I sure?", "Reflect[yes]", T.MSG_REFLECT_WRONG),  # AutoAct: anything but [right] is a retry
        D.Step("Check again.", "Finish[Paris]", "Answer is CORRECT"),
    )
    return E.Trajectory("hotpotqa", "What is the capital of France?", steps)


def training_prompts(traj: E.Trajectory) -> dict[tuple[str, str], str]:
    examples = E.plan_examples(traj) + E.action_examples(traj) + E.reflect_examples(traj)
    return {(ex.role, ex.input): ex.output for ex in examples}


def test_pipeline_prompts_equal_training_prompts_on_a_toy_trajectory():
    byte = ByteTokenizer()
    expected = training_prompts(toy())
    seen = replay(toy(), make_encoder(byte))
    assert len(seen) == 3 + 3 + 2 + 3  # search, Finish, reflect (retry), Finish again: final, no reflect after it
    for role, ids, output in seen:
        text = byte.decode(ids)
        if (role, text) in expected:
            assert expected[(role, text)] == output
        else:  # the retry after Reflect[yes]: trained from the data's files, rendered the same way
            assert role == "plan" and "Action: Reflect[yes]\nObversation: " + T.MSG_REFLECT_WRONG in text


@needs_data
def test_pipeline_prompts_equal_training_prompts_on_real_trajectories(model_dir):
    """The first 20 replayable HotpotQA trajectories: every call's prompt is a training example's input, and its
    token ids (built chunk by chunk) are the ids the trainer gets by tokenising the whole prompt."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    trajs = [t for t in E.task_trajectories("hotpotqa", DATA) if t.steps and planned_calls(t) is not None][:20]
    assert len(trajs) == 20
    n = 0
    for traj in trajs:
        expected = training_prompts(traj)
        for role, ids, output in replay(traj, make_encoder(tokenizer)):
            text = tokenizer.decode(ids)
            assert expected.get((role, text)) == output, (role, text[-300:])
            assert ids == tokenizer(text, add_special_tokens=True)["input_ids"]
            n += 1
    assert n > 100


HOTPOT = {
    "id": "q1",
    "question": "Who was once considered the best kick boxer in the world?",
    "answer": "Badr Hari",
    "context": [["Badr Hari", ["Badr Hari is a Moroccan-Dutch kickboxer."]]],
}
SCIENCE = {
    "pid": "s1",
    "Question": "What is the capital of Delaware?",
    "choices": ["Harrisburg", "Dover", "Wilmington", "Georgetown"],
    "Answer": "B",
    "caption": "no img",
    "orc": "no img",
}


def searcher(answer: str = "B"):
    """Plans searches forever; the action answers `answer` when asked for a Finish argument."""

    def script(role: str, prompt: str) -> str:
        if role == "action":
            return answer if prompt.endswith("Finish[" + D.RESPONSE) else "capital of Delaware"
        if role == "reflect":
            return "Fine." if prompt.endswith(D.THOUGHT_PROMPT) else "Reflect[right]"
        return "Search more." if prompt.endswith(D.THOUGHT_PROMPT) else "Aciton: BingSearch["

    return script


def test_finish_at_cap_gives_every_question_an_answer():
    cfg = PipelineConfig(max_iterations=3, keep_trajectories=True)
    (free,) = run_pipeline(ScriptedLLM(searcher()), [SCIENCE], cfg)
    assert free.out_of_function and free.halt_reason == "max_iterations" and not free.forced_finish
    cfg = PipelineConfig(max_iterations=3, keep_trajectories=True, finish_at_cap=True)
    llm = ScriptedLLM(searcher("(B) Dover"))
    (res,) = run_pipeline(llm, [SCIENCE], cfg)
    assert res.forced_finish and res.prediction == "(B) Dover" and res.correct and not res.out_of_function
    assert res.halt_reason == "max_iterations" and res.iterations == 3
    assert res.calls == {"plan": 5, "action": 3}  # the last iteration skips the plan's tool call
    assert res.trajectory.endswith("Search more.\nAciton: Finish[\n### Response:\n(B) Dover]\nObversation: "
                                   + T.MSG_FINISH + "\n" + D.THOUGHT_PROMPT)  # fmt: skip


def test_constrain_sends_the_closed_sets_to_the_engine():
    cfg = PipelineConfig(max_iterations=3, constrain=True, finish_at_cap=True)
    llm = ScriptedLLM(searcher("the answer is Dover"))
    (res,) = run_pipeline(llm, [SCIENCE], cfg)
    choices = [(c.role, c.params.choice) for c in llm.log if c.params.choice]
    tools = [D.plan_tool_output(t) for t in D.TOOLS["scienceqa"]]
    assert ("plan", tools) in choices and ("action", ["A", "B", "C", "D"]) in choices
    assert all(c.params.choice is None for c in llm.log if c.prompt.endswith(D.THOUGHT_PROMPT))  # thoughts: free
    assert res.prediction in ("A", "B", "C", "D")  # the fake engine honours the constraint
    (hot,) = run_pipeline(ScriptedLLM(searcher()), [HOTPOT], cfg)
    assert hot.prediction == "B"  # HotpotQA answers stay free text


def test_constrain_finish_limits_only_the_answer_to_the_questions_letters():
    two = dict(SCIENCE, choices=["Harrisburg", "Dover"], pid="s2")
    cfg = PipelineConfig(max_iterations=3, constrain_finish=True, finish_at_cap=True)
    llm = ScriptedLLM(searcher("B) Dover"))
    (res,) = run_pipeline(llm, [two], cfg)
    choices = [(c.role, c.params.choice) for c in llm.log if c.params.choice]
    assert choices == [("action", ["A", "B"])]  # plan tool lines and reflect verdicts stay free
    assert res.prediction == "B" and res.correct
    free_cfg = PipelineConfig(max_iterations=3, finish_at_cap=True)
    (free,) = run_pipeline(ScriptedLLM(searcher("D")), [two], free_cfg)  # a 4-option habit on a 2-option question
    assert free.prediction == "D" and not free.correct
    (held,) = run_pipeline(ScriptedLLM(searcher("D")), [two], cfg)
    assert held.prediction in ("A", "B")
    (hot,) = run_pipeline(ScriptedLLM(searcher()), [HOTPOT], cfg)
    assert hot.prediction == "B"  # HotpotQA answers stay free text


def test_score_options_answers_with_the_most_likely_options_letter():
    """The Finish call becomes one scoring request per option (the prompt, then the option's text closed by ']',
    log-probs from the option on, the action adapter); the letter of the best-scored option is the answer and what
    the trajectory records. Other calls are generated as before."""
    three = dict(SCIENCE, choices=["Harrisburg", "Dover", "Wilmington"], pid="s3")
    cfg = PipelineConfig(max_iterations=3, score_options="trajectory", finish_at_cap=True, keep_trajectories=True)
    favour = {"Harrisburg]": -5.0, "Dover]": -1.5, "Wilmington]": -3.0}
    llm = ScriptedLLM(searcher("A"), scorer=lambda role, context, cont: favour[cont] if role == "action" else 0.0)
    (res,) = run_pipeline(llm, [three], cfg)
    scored = [c for c in llm.log if c.params.prompt_logprobs is not None]
    assert [c.role for c in scored] == ["action"] * 3
    context = scored[0].prompt[: scored[0].params.prompt_logprobs_start]
    assert context.endswith("Aciton: Finish[" + D.RESPONSE)
    assert [c.prompt[len(context) :] for c in scored] == ["Harrisburg]", "Dover]", "Wilmington]"]
    assert all(c.params.max_tokens == 1 and c.params.temperature == 0.0 for c in scored)
    assert res.prediction == "B" and res.correct  # not the "A" the script would have generated
    assert res.trajectory.startswith(context + "B]\n")  # the letter goes into the trajectory
    favour["Harrisburg]"] = 0.0
    (first,) = run_pipeline(ScriptedLLM(searcher("B"), scorer=lambda r, c, o: favour[o]), [three], cfg)
    assert first.prediction == "A" and not first.correct
    (hot,) = run_pipeline(ScriptedLLM(searcher()), [HOTPOT], cfg)  # HotpotQA answers stay generated
    assert hot.prediction == "B"


def test_score_options_reader_reads_the_evidence_and_calibrates_by_the_prior():
    """Under score_options="reader" ScienceQA's Finish is scored after a prompt of its own: the informative
    observations (the caption; not the search error), then the question without its options as a cloze; each
    option is scored there and after 'Answer:' alone, and the answer is the best difference (the option a raw
    score would pick loses to its own prior). Without evidence the prompt is the bare question."""
    pictured = dict(SCIENCE, choices=["Harrisburg", "Dover", "Wilmington"], caption="A map.", orc="[]", pid="s4")
    raw = {" Harrisburg": -1.0, " Dover": -2.0, " Wilmington": -4.0}
    prior = {" Harrisburg": -0.5, " Dover": -3.0, " Wilmington": -3.0}

    def scorer(role: str, context: str, cont: str) -> float:
        assert role == "action"
        return prior[cont] if context == "Answer:" else raw[cont]

    def script(role: str, prompt: str) -> str:
        if role == "plan" and not prompt.endswith(D.THOUGHT_PROMPT):
            return "Aciton: BingSearch[" if "Obversation: Image" in prompt else "Aciton: Image2Text["
        return searcher("A")(role, prompt)

    cfg = PipelineConfig(max_iterations=3, score_options="reader", finish_at_cap=True, keep_trajectories=True)
    llm = ScriptedLLM(script, scorer=scorer)
    (res,) = run_pipeline(llm, [pictured], cfg)
    scored = [c for c in llm.log if c.params.prompt_logprobs is not None]
    contexts = [c.prompt[: c.params.prompt_logprobs_start] for c in scored]
    reader = "Context: Image caption: A map. OCR result: None\nQuestion: What is the capital of Delaware?\nAnswer:"
    assert T.MSG_SEARCH_ERROR in res.trajectory  # the failed search happened, and is not evidence
    assert contexts == [reader] * 3 + ["Answer:"] * 3
    assert [c.prompt[len(x) :] for c, x in zip(scored, contexts)] == [*raw, *raw]
    assert res.prediction == "B" and res.correct  # raw scores alone would answer A
    assert "Aciton: Finish[" + D.RESPONSE + "B]\n" in res.trajectory
    llm = ScriptedLLM(searcher("A"), scorer=scorer)
    (bare,) = run_pipeline(llm, [dict(pictured, caption="no img", orc="no img")], cfg)
    assert {c.prompt[: c.params.prompt_logprobs_start] for c in llm.log if c.params.prompt_logprobs is not None} == {
        "Question: What is the capital of Delaware?\nAnswer:", "Answer:"}  # fmt: skip
    assert bare.prediction == "B"
    with pytest.raises(ValueError, match="score_options"):
        run_pipeline(llm, [pictured], PipelineConfig(score_options="letters"))


def test_evidence_keeps_what_the_tools_found():
    found = ["Image caption: A map. OCR result: None", "Could not find [x]. Similar: ['Dover']"]
    misses = [T.MSG_SEARCH_ERROR, T.MSG_NO_IMAGE, "Could not find [x]. Similar: []", T.MSG_INVALID["scienceqa"]]
    assert T.evidence([misses[0], found[0], *misses[1:], found[0], found[1]]) == found


def test_score_spans_answers_with_the_most_likely_observed_span():
    """HotpotQA's Finish under score_spans: one scoring request per span of the observations (then yes / no), after
    the trajectory cut before the finishing step's thought and the question restated; the best span is the answer
    and what the trajectory records. The restated context is a prefix of the trajectory plus one line (the prefix
    cache serves it). Other calls are generated as before; ScienceQA is untouched."""
    cfg = PipelineConfig(max_iterations=3, score_spans=True, finish_at_cap=True, keep_trajectories=True)

    def favour(role: str, context: str, cont: str) -> float:
        return (0.0 if cont == " Badr Hari" else -2.0 - len(cont)) if role == "action" else 0.0

    def script(role: str, prompt: str) -> str:
        if role == "action" and not prompt.endswith("Finish[" + D.RESPONSE):
            return "Badr Hari"  # the search that finds the answer
        return searcher("kick boxer")(role, prompt)

    llm = ScriptedLLM(script, scorer=favour)
    (res,) = run_pipeline(llm, [HOTPOT], cfg)
    scored = [c for c in llm.log if c.params.prompt_logprobs is not None]
    assert scored and {c.role for c in scored} == {"action"}
    assert all(c.params.max_tokens == 1 and c.params.temperature == 0.0 for c in scored)
    context = scored[0].prompt[: scored[0].params.prompt_logprobs_start]
    restated = "Question: " + HOTPOT["question"] + "\nAnswer:"
    assert context.endswith("\n" + restated)
    head = context[: -len(restated)]
    assert head.endswith("\n") and head.split("\n")[-2].startswith("Obversation: ")
    conts = [c.prompt[len(context) :] for c in scored]
    assert " Badr Hari" in conts and conts[-2:] == [" yes", " no"] and len(set(conts)) == len(conts)
    assert res.prediction == "Badr Hari" and res.correct  # not the "kick boxer" the script would have generated
    assert res.trajectory.startswith(head + D.THOUGHT_PROMPT)
    assert "Aciton: Finish[" + D.RESPONSE + "Badr Hari]\n" in res.trajectory
    (plain,) = run_pipeline(ScriptedLLM(script), [HOTPOT], PipelineConfig(max_iterations=3, finish_at_cap=True))
    assert plain.prediction == "kick boxer" and not plain.correct
    (sci,) = run_pipeline(ScriptedLLM(searcher("B"), scorer=favour), [SCIENCE], cfg)
    assert sci.prediction == "B"  # ScienceQA answers stay generated


def test_score_spans_generates_before_any_observation():
    """A Finish in the first step (nothing observed yet) is generated, as without score_spans."""

    def script(role: str, prompt: str) -> str:
        if role == "action":
            return "Badr Hari"
        if role == "reflect":
            return "Fine." if prompt.endswith(D.THOUGHT_PROMPT) else "Reflect[right]"
        return "I know it." if prompt.endswith(D.THOUGHT_PROMPT) else "Aciton: Finish["

    llm = ScriptedLLM(script, scorer=lambda role, context, cont: 0.0)
    (res,) = run_pipeline(llm, [HOTPOT], PipelineConfig(max_iterations=3, score_spans=True))
    assert not [c for c in llm.log if c.params.prompt_logprobs is not None]
    assert res.prediction == "Badr Hari" and res.finished


@pytest.mark.parametrize(("verdict", "accepted"), [("Reflect[right]", True), ("Reflect[right].", True),
                                                   ("Reflect[yes]", False), ("Reflect[right/wrong]", False),
                                                   ("Reflect[wrong]", False)])  # fmt: skip
def test_reflect_accepts_only_right_as_the_training_data_does(verdict, accepted):
    encode = make_encoder(ByteTokenizer())
    episode = make_episode(HOTPOT, encode)
    for text in ("Answer it.", "Aciton: Finish[", "Badr Hari", "Sure?", verdict):
        episode.next_call(0)
        episode.feed(FakeOutput(text, [], {}))
    if accepted:
        assert episode.done and episode.finished
    else:
        assert episode.phase is Phase.PLAN_THOUGHT and not episode.failures
        call = verdict.rstrip(".")
        assert episode.traj.text.endswith(f"Action: {call}\nObversation: {T.MSG_REFLECT_WRONG}\n{D.THOUGHT_PROMPT}")
