"""One question's AutoAct loop as a step-wise state machine: `next_call()` says which agent to run on which
token ids, `feed(output)` consumes that agent's output. No model calls here, so many episodes can be driven
concurrently by one batched `llm.generate` per round (see `pipeline.Driver`).

Per iteration (one Thought/Action/Observation step, at most `max_iterations` of them):
  plan    thought  : prompt = trajectory                          -> "{thought}\\n" appended
  plan    tool     : prompt = trajectory                          -> "Aciton: {Tool}[" parsed for the tool
  action  argument : prompt = trajectory + "Aciton: {Tool}[\\n### Response:\\n" -> "{arg}]\\n" + observation
After Finish the next iteration belongs to reflect:
  reflect thought  : prompt = trajectory                          -> "{thought}\\n" appended
  reflect verdict  : prompt = trajectory                          -> "Action: Reflect[right|wrong]\\n" + observation
Reflect[right] ends the episode; Reflect[wrong] sends it back to plan; a second Finish ends it (AutoAct's rule).

Optional guards (EpisodeConfig), both off by default (the paper's loop) and reported per question:
  constrain     : the calls whose output is a closed set say so in `AgentCall.choice` (the driver passes it to the
                  engine's choice constraint): the plan's tool line ("Aciton: {Tool}[" for the task's tools), the
                  reflect verdict (Reflect[right] / Reflect[wrong]) and, for ScienceQA, Finish's option letter. These
                  are exactly the outputs training taught, so a constrained call can no longer leave the format.
  constrain_finish : only the last of those (ScienceQA's Finish letter, limited to the question's own options),
                  a cheap guard against letters the question does not have (training saw only 4-option questions,
                  the eval has mostly 2-3 options) that leaves every other call free.
  score_options : ScienceQA's Finish answer is chosen by likelihood instead of generated: the action agent scores
                  each option's text as the continuation of "Finish[" (the engine's prompt log-probs, summed over the
                  option's tokens) and answers with the letter of the most likely. Small models rank option texts
                  far better than they name a letter (the option texts carry the knowledge; the letters are arbitrary
                  labels), the standard multiple-choice scoring of language-model evaluations. The answer written
                  into the trajectory is the letter, as training taught. That is mode "trajectory"; mode "reader"
                  has the action agent read instead a short prompt of its own: the evidence the tools returned
                  (`tools.evidence`: on ScienceQA mostly the image's caption), then 'Question: {question}\nAnswer:',
                  each option's text scored after it minus its score after 'Answer:' alone (PMI, Holtzman et al.
                  2021). The 135M model answers ScienceQA 8-13 points better in that cloze form than after the
                  ~450-token AutoAct prompt (README, Results); the scheme then reaches the answer only through the
                  evidence its agents gathered, not through the cache the answer is read from.
  score_spans   : HotpotQA's Finish answer is chosen by likelihood among spans of the observations so far
                  (`lragent.agents.spans`: names, dates, numbers; and yes / no): the action agent reads the
                  trajectory up to the current step's thought, then the question restated as 'Question: {question}
                  \nAnswer:', and scores each span as its continuation; the most likely span is the answer written
                  into the trajectory. A small model that finds the answer but copies its own query when asked to
                  write it (the embedded model's failure mode) reads it off instead. With no observation yet the
                  answer is generated as usual.
  finish_at_cap : in the last iteration a question without an answer skips the plan's tool call and goes straight to
                  "Aciton: Finish[" (the text the plan would have written), so the action agent must answer; such
                  answers are flagged `forced_finish`.
"""

from __future__ import annotations

import enum
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from lragent.agents import parsing
from lragent.agents import tools as T
from lragent.agents.formats import TrajectoryFormat
from lragent.agents.scoring import Score
from lragent.agents.spans import answer_spans
from lragent.train import data as D


class Phase(enum.Enum):
    PLAN_THOUGHT = "plan_thought"
    PLAN_TOOL = "plan_tool"
    ACTION = "action"
    REFLECT_THOUGHT = "reflect_thought"
    REFLECT_VERDICT = "reflect_verdict"
    DONE = "done"


ROLE_OF = {
    Phase.PLAN_THOUGHT: "plan",
    Phase.PLAN_TOOL: "plan",
    Phase.ACTION: "action",
    Phase.REFLECT_THOUGHT: "reflect",
    Phase.REFLECT_VERDICT: "reflect",
}


class Trajectory:
    """The shared trajectory as text plus token ids, grown by appending encoded chunks.

    Invariant (checked in tests with the real tokenizer): every chunk starts after a newline with a non-space
    character, so `ids == encode(text)` and every agent's prompt is a token-level prefix extension.
    """

    def __init__(self, encode: Callable[[str, bool], list[int]], opening: str) -> None:
        self._encode = encode
        self.text = opening
        self.ids: list[int] = list(encode(opening, True))  # the tokenizer's default specials, as training does

    def append(self, chunk: str) -> None:
        self.text += chunk
        self.ids.extend(self.encode(chunk))

    def encode(self, chunk: str) -> list[int]:
        """Ids of a chunk appended after the current text (what `append` would add)."""
        return list(self._encode(chunk, False))

    def encode_prompt(self, text: str) -> list[int]:
        """Ids of a separate prompt (the tokenizer's default specials, as the opening's)."""
        return list(self._encode(text, True))


def restated_question(question: str) -> str:
    """What score_spans appends below the observations before the spans: the question in the usual cloze form."""
    return f"Question: {' '.join(question.split())}\nAnswer:"


SCORE_OPTIONS = ("", "trajectory", "reader")
READER_PRIOR = "Answer:"  # what the reader's option scores are calibrated against (each option's own prior)
_READER_EVIDENCE_CHARS = 2000


def reader_prompt(question: str, evidence: list[str]) -> str:
    """score_options="reader": the evidence the tools returned (capped), then the question (no options) as a cloze."""
    head = question.split("\nOptions:")[0]
    context = " ".join(" ".join(evidence).split())[:_READER_EVIDENCE_CHARS]
    return (f"Context: {context}\n" if context else "") + restated_question(head)


def option_continuation(text: str) -> str:
    """What an option's text adds after 'Finish[\\n### Response:\\n' when scored: the text on one line, closed."""
    return " ".join(text.split()) + "]"


@dataclass
class AgentCall:
    """One pending agent call of one episode."""

    episode: int  # index of the episode in the driver's list
    role: str  # adapter name: plan | action | reflect
    phase: Phase
    prompt_ids: list[int]
    choice: list[str] | None = None  # with EpisodeConfig.constrain: the output must be one of these strings
    # with EpisodeConfig.score_options: no generation; each entry is a continuation (token ids) whose log-prob after
    # prompt_ids the driver measures and feeds back as the output's `option_scores`
    candidates: list[list[int]] | None = None
    # with candidates: each is also scored after these ids, and the driver feeds back the difference (calibration)
    prior_ids: list[int] | None = None


def metric_value(metrics: Any, name: str) -> float:
    if metrics is None:
        return 0.0
    value = metrics.get(name, 0) if isinstance(metrics, dict) else getattr(metrics, name, 0)
    return float(value or 0)


@dataclass
class EpisodeResult:
    id: str
    task: str
    gold: str
    prediction: str | None
    correct: bool
    em: float
    f1: float
    iterations: int
    out_of_function: bool  # no Finish within the iteration cap (or context) -> scored wrong
    finished: bool  # ended by Reflect[right] or a second Finish
    halt_reason: str  # finished | max_iterations | context | time_limit
    calls: dict[str, int]
    parse_failures: dict[str, int]
    prompt_tokens: int
    reused_tokens: int
    base_reused_tokens: int
    computed_tokens: int
    generated_tokens: int
    ttft_s: float
    wall_s: float
    trajectory: str | None = None
    forced_finish: bool = False  # the answer came from EpisodeConfig.finish_at_cap's forced Finish


@dataclass
class EpisodeConfig:
    max_iterations: int = 45
    max_context_tokens: int = 8192  # halt when a prompt plus max_new_tokens would not fit
    max_new_tokens: int = 128
    constrain: bool = False  # closed-set outputs (tool line, verdict, ScienceQA letter) constrained to their set
    constrain_finish: bool = False  # only ScienceQA's Finish letter constrained to the question's options
    finish_at_cap: bool = False  # last iteration without an answer: Finish is chosen for the plan
    score_options: str = ""  # ScienceQA's Finish: the most likely option after "trajectory" or "reader" ("": off)
    score_spans: bool = False  # HotpotQA's Finish answer: the observation span the action agent finds most likely

    def __post_init__(self) -> None:
        if self.score_options not in SCORE_OPTIONS:
            raise ValueError(f"score_options must be one of {SCORE_OPTIONS[1:]} or empty, not {self.score_options!r}")


@dataclass
class Episode:
    """State machine of one question."""

    qid: str
    task: str
    gold: str
    fmt: TrajectoryFormat
    toolbox: T.ToolBox
    traj: Trajectory
    score_fn: Callable[[str | None], Score]
    config: EpisodeConfig = field(default_factory=EpisodeConfig)
    phase: Phase = Phase.PLAN_THOUGHT
    iterations: int = 1  # the opening trajectory already starts iteration 1
    answer: str | None = None
    finished: bool = False
    halt_reason: str = ""
    tool: str | None = None  # tool chosen in the current iteration
    calls: Counter = field(default_factory=Counter)
    failures: Counter = field(default_factory=Counter)
    stats: Counter = field(default_factory=Counter)
    t_start: float | None = None
    t_end: float | None = None
    options: tuple[str, ...] = ()  # ScienceQA: the option letters Finish may answer
    option_texts: tuple[str, ...] = ()  # and their texts (what score_options ranks)
    forced_finish: bool = False
    question: str = ""  # the question as asked (score_spans restates it before the answer)
    observations: list[str] = field(default_factory=list)  # the tools' observations so far (score_spans' source)
    thought_at: int = -1  # token count of the trajectory before the current step's thought header (-1: unknown)
    spans: list[str] = field(default_factory=list)  # the spans the pending scoring call ranks

    @property
    def done(self) -> bool:
        return self.phase is Phase.DONE

    @property
    def started(self) -> bool:
        return self.t_start is not None

    def halt(self, reason: str) -> None:
        """Stop from outside (e.g. the driver's time limit); an answer already given is still scored."""
        if not self.done:
            self._halt(reason)

    # -- driver interface -----------------------------------------------------------------------------------
    def next_call(self, index: int) -> AgentCall | None:
        """The pending agent call, or None once done (halts here when the prompt would not fit)."""
        if self.done:
            return None
        if self.t_start is None:
            self.t_start = time.perf_counter()
        ids = list(self.traj.ids)
        if len(ids) + self.config.max_new_tokens > self.config.max_context_tokens:
            self._halt("context")
            return None
        scored = self._span_call(index) or self._reader_call(index)
        if scored is not None:
            return scored
        return AgentCall(index, ROLE_OF[self.phase], self.phase, ids, self._choice(), self._candidates())

    def _scores_options(self, mode: str) -> bool:
        """At ScienceQA's Finish, with its options known, under score_options `mode`."""
        finish = self.phase is Phase.ACTION and self.tool == "Finish"
        known = bool(self.options) and len(self.option_texts) == len(self.options)
        return self.config.score_options == mode and finish and known

    def _candidates(self) -> list[list[int]] | None:
        """Under score_options "trajectory", at ScienceQA's Finish: each option's text closing the call."""
        if not self._scores_options("trajectory"):
            return None
        return [self.traj.encode(option_continuation(text)) for text in self.option_texts]

    def _reader_call(self, index: int) -> AgentCall | None:
        """Under score_options "reader", at ScienceQA's Finish: the action agent's scoring call on the reader
        prompt, each option's text after it and after the prior 'Answer:'. None otherwise."""
        if not self._scores_options("reader"):
            return None
        prompt = self.traj.encode_prompt(reader_prompt(self.question, T.evidence(self.observations)))
        texts = [self.traj.encode(" " + " ".join(text.split())) for text in self.option_texts]
        prior = self.traj.encode_prompt(READER_PRIOR)
        return AgentCall(index, ROLE_OF[self.phase], self.phase, prompt, candidates=texts, prior_ids=prior)

    def _span_call(self, index: int) -> AgentCall | None:
        """Under score_spans, at HotpotQA's Finish after at least one observation: the action agent's scoring call
        on the restated prompt, each span's ids after it; remembers the spans for `feed`. None otherwise."""
        self.spans = []
        if not (self.config.score_spans and self.task == "hotpotqa" and self.phase is Phase.ACTION):
            return None
        if self.tool != "Finish" or not self.observations or self.thought_at < 0 or not self.question:
            return None
        self.spans = answer_spans(self.observations)
        prompt = self.traj.ids[: self.thought_at] + self.traj.encode(restated_question(self.question))
        spans = [self.traj.encode(" " + span) for span in self.spans]
        return AgentCall(index, ROLE_OF[self.phase], self.phase, prompt, candidates=spans)

    def _choice(self) -> list[str] | None:
        """The closed set the pending call's output belongs to (see the module doc), when constraining."""
        finish_letter = self.phase is Phase.ACTION and self.tool == "Finish" and bool(self.options)
        if self.config.constrain_finish and finish_letter:
            return list(self.options)
        if not self.config.constrain:
            return None
        if self.phase is Phase.PLAN_TOOL:
            return [D.plan_tool_output(t) for t in self.fmt.tools]
        if self.phase is Phase.REFLECT_VERDICT:
            return ["Reflect[right]", "Reflect[wrong]"]
        if finish_letter:
            return list(self.options)
        return None

    def feed(self, output: Any) -> None:
        """Consume the output (engine `RequestOutput`-like: .text, .token_ids, .metrics) of the pending call."""
        role = ROLE_OF[self.phase]
        self.calls[role] += 1
        m = getattr(output, "metrics", None)
        for name in ("prompt_tokens", "reused_tokens", "base_reused_tokens", "computed_tokens", "ttft_s"):
            self.stats[name] += metric_value(m, name)
        self.stats["generated_tokens"] += len(getattr(output, "token_ids", None) or [])
        text = getattr(output, "text", "") or ""
        scores = getattr(output, "option_scores", None)
        if scores:  # a scored Finish: the most likely span, or the letter of the most likely option (ties: first)
            best = max(range(len(scores)), key=scores.__getitem__)
            text = self.spans[best] if self.spans else self.options[best]
            self.stats["scored_finishes"] += 1
        handler = {
            Phase.PLAN_THOUGHT: self._on_plan_thought,
            Phase.PLAN_TOOL: self._on_plan_tool,
            Phase.ACTION: self._on_action,
            Phase.REFLECT_THOUGHT: self._on_reflect_thought,
            Phase.REFLECT_VERDICT: self._on_reflect_verdict,
        }[self.phase]
        handler(text)

    # -- transitions ----------------------------------------------------------------------------------------
    def _on_plan_thought(self, text: str) -> None:
        thought = parsing.parse_thought(text)
        if thought is None:
            self.failures["plan_thought"] += 1
        self.traj.append((thought or "") + "\n")
        if self.config.finish_at_cap and self.answer is None and self.iterations >= self.config.max_iterations:
            self.forced_finish = True  # last chance: the plan's tool call is skipped, Finish is written for it
            self.tool = "Finish"
            self.traj.append(self.fmt.action_call("Finish"))
            self.phase = Phase.ACTION
            return
        self.phase = Phase.PLAN_TOOL

    def _on_plan_tool(self, text: str) -> None:
        tool = parsing.parse_tool(text)
        if tool == "Reflect":  # Reflect is reflect's, right after Finish; the plan choosing it is invalid
            verdict = parsing.inline_argument(text) or "right"
            self._observe_free(f"Reflect[{verdict}]", T.MSG_REFLECT_INVALID, "Reflect")
        elif tool is None:
            self.failures["plan_tool"] += 1
            raw = " ".join(text.split()) or "None"
            self._observe_free(raw, T.MSG_INVALID[self.task], "invalid")
        else:  # a known tool; one the task lacks still gets its argument and then the invalid-action observation
            self.tool = tool
            self.traj.append(self.fmt.action_call(tool))
            self.phase = Phase.ACTION

    def _on_action(self, text: str) -> None:
        arg = parsing.parse_argument(text)
        if arg is None:
            self.failures["action"] += 1
        arg = " ".join((arg or "").split())
        self.traj.append(arg + "]\n")
        if self.tool != "Finish":
            obs = self.toolbox.run(self.tool, arg)
            self.observations.append(obs)
            self._observe(obs)
            self._next_iteration(Phase.PLAN_THOUGHT)
        elif self.answer is None:  # first answer: reflect reviews it
            self.answer = arg
            self.toolbox.note_step("Finish")
            self._observe(T.MSG_FINISH)
            self._next_iteration(Phase.REFLECT_THOUGHT)
        else:  # AutoAct: a Finish after a rejected answer is final
            self.answer = arg
            self._observe(T.MSG_CORRECT if self.score_fn(arg).correct else T.MSG_INCORRECT, next_thought=False)
            self.finished = True
            self._halt("finished")

    def _on_reflect_thought(self, text: str) -> None:
        thought = parsing.parse_thought(text)
        if thought is None:
            self.failures["reflect_thought"] += 1
        self.traj.append((thought or "") + "\n")
        self.phase = Phase.REFLECT_VERDICT

    def _on_reflect_verdict(self, text: str) -> None:
        call = parsing.reflect_call(text)
        verdict = parsing.parse_reflect(text)
        if call is not None and (verdict is not None or call.lower() == "right/wrong"):
            # the training data's rule after a Finish: only Reflect[right] accepts the answer; Reflect[yes],
            # Reflect[no], Reflect[right/wrong] get "The answer maybe wrong..." (junk such as Reflect[?] stays invalid)
            verdict = "right" if call.strip(" .").lower() == "right" else "wrong"
        if verdict == "right":
            self.traj.append(self.fmt.free_action("Reflect[right]"))
            correct = self.score_fn(self.answer).correct
            self._observe(T.MSG_CORRECT if correct else T.MSG_INCORRECT, next_thought=False)
            self.finished = True
            self._halt("finished")
        elif verdict == "wrong":  # the call as written ("Reflect[right/wrong]"), like the data's trajectories
            self._observe_free(f"Reflect[{call if call is not None else 'wrong'}]", T.MSG_REFLECT_WRONG, "Reflect")
        else:
            self.failures["reflect_verdict"] += 1
            self._observe_free(" ".join(text.split()) or "None", T.MSG_INVALID[self.task], "invalid")

    # -- helpers --------------------------------------------------------------------------------------------
    def _observe(self, obs: str, next_thought: bool = True) -> None:
        """The observation line, then (unless the episode ends) the next thought header, whose start is kept
        (`thought_at`): two chunks, the same ids as one (the header starts a line)."""
        self.traj.append(self.fmt.observe(obs, next_thought=False))
        if next_thought:
            self.thought_at = len(self.traj.ids)
            self.traj.append(D.THOUGHT_PROMPT)

    def _observe_free(self, call: str, obs: str, step: str) -> None:
        """An action written without an action-agent call, its observation, then back to plan."""
        self.traj.append(self.fmt.free_action(call))
        self.toolbox.note_step(step)
        self._observe(obs)
        self._next_iteration(Phase.PLAN_THOUGHT)

    def _next_iteration(self, phase: Phase) -> None:
        self.tool = None
        if self.iterations >= self.config.max_iterations:
            self._halt("max_iterations")
            return
        self.iterations += 1
        self.phase = phase

    def _halt(self, reason: str) -> None:
        self.halt_reason = reason
        self.phase = Phase.DONE
        self.t_end = time.perf_counter()

    def result(self, keep_trajectory: bool = False) -> EpisodeResult:
        s = self.score_fn(self.answer)
        wall = (self.t_end or time.perf_counter()) - (self.t_start or time.perf_counter())
        return EpisodeResult(
            id=self.qid,
            task=self.task,
            gold=self.gold,
            prediction=self.answer,
            correct=s.correct,
            em=s.em,
            f1=s.f1,
            iterations=self.iterations,
            out_of_function=self.answer is None,
            finished=self.finished,
            halt_reason=self.halt_reason,
            calls=dict(self.calls),
            parse_failures=dict(self.failures),
            prompt_tokens=int(self.stats["prompt_tokens"]),
            reused_tokens=int(self.stats["reused_tokens"]),
            base_reused_tokens=int(self.stats["base_reused_tokens"]),
            computed_tokens=int(self.stats["computed_tokens"]),
            generated_tokens=int(self.stats["generated_tokens"]),
            ttft_s=float(self.stats["ttft_s"]),
            wall_s=wall,
            trajectory=self.traj.text if keep_trajectory else None,
            forced_finish=self.forced_finish and self.answer is not None,
        )
