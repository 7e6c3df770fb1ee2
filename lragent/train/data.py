r"""The AutoAct / LRAgent role prompt format: ONE format for training and inference.

Every role reads the same growing trajectory text. ``### Response:`` (``RESPONSE`` below, with its newlines) marks
where a role's generated text begins. The format is the one of the shipped training data
(``hotpotqa_action.json``, ``hotpotqa_reflect.json``, ...), typos included: the tool line of a planned step is
labelled ``Aciton:`` and observations ``Obversation:``; a Reflect step is labelled ``Action:``.

Head (system prompt and question), built by :func:`head`::

    {system prompt}\nQuestion:{question}\n

One completed tool step, built by :func:`render_step` (``{tool}`` in BingSearch, Retrieve, Lookup, Finish,
Image2Text)::

    Thought: \n### Response:\n{thought}\nAciton: {tool}[\n### Response:\n{argument}]\nObversation: {observation}\n

A completed Reflect step (written by the reflect role right after a Finish)::

    Thought: \n### Response:\n{thought}\nAction: Reflect[{verdict}]\nObversation: {observation}\n

A step of the agent loop is a sequence of role calls. Each call's prompt is the history so far (the head plus the
completed steps) plus a fixed suffix, and the role must output exactly the text shown, then the end-of-sequence
token (training appends EOS after every output; at inference stop at EOS, with the fallback stops named):

- plan, call 1 (thought): prompt ``history + "Thought: \n### Response:\n"``; output ``{thought}``, one line
  (fallback stop: newline).
- plan, call 2 (tool): prompt ``history + "Thought: \n### Response:\n" + thought + "\n"``; output
  ``Aciton: {tool}[`` (fallback stop: ``[``, kept).
- action: prompt ``plan call 2 prompt + "Aciton: {tool}[" + "\n### Response:\n"``; output ``{argument}`` without the
  closing bracket (fallback stops: ``]``, newline). The history then continues with
  ``"]\nObversation: " + observation + "\n"``.
- reflect, call 1 (thought), only for the step right after a Finish: prompt as plan call 1; output ``{thought}``.
- reflect, call 2 (verdict): prompt as plan call 2; output ``Reflect[right]`` or ``Reflect[wrong]``. The history
  then continues with ``"Action: Reflect[...]\nObversation: " + observation + "\n"``.

The reflect role replaces plan for the step right after ``Finish`` (observation ``Please reflect your answer.``).
Observations are single lines: pass tool results through :func:`format_observation`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

RESPONSE = "\n### Response:\n"
THOUGHT_PROMPT = "Thought: " + RESPONSE  # "Thought: \n### Response:\n": a thought is generated next
TOOL_LABEL = "Aciton: "  # typo kept: the training data spells it so
REFLECT_LABEL = "Action: "  # Reflect steps and unparsable actions are labelled correctly in the data
OBS_LABEL = "Obversation: "  # typo kept

ROLES: tuple[str, ...] = ("plan", "action", "reflect")
TASKS: tuple[str, ...] = ("hotpotqa", "scienceqa")

HOTPOTQA_SYSTEM_PROMPT = (
    "I want you to be a good multi-hop question answerer ,solving a question answering task with interleaving Thought, "
    "Action, Observation steps. Thought can reason about the current situation, and Action can be five types :\n"
    "(1) BingSearch[query], which search the exact detailed query on the Internet and returns the relevant information "
    "to the query. Be specific and precise with your query to increase the chances of getting relevant results. For "
    'example, instead of searching for "dogs," you can search for "popular dog breeds in the United States."For '
    "example, BingSearch[Which type of computer networking technology, developed in the 1970s, allows devices to "
    "communicate over a shared network]\n"
    "(2) Retrieve[entity], which retrieve the exact entity on Wikipedia and returns the first paragraph if it exists. "
    "If not, it will return some similar entities to retrieve. For example, Retrieve[Milhouse]\n"
    "(3) Lookup[keyword], which returns the next sentence containing keyword in the last passage successfully found by "
    "Retrieve or BingSearch. For example, Lookup[river]\n"
    "(4) Finish[answer], which returns a definite answer. For example, Finish[Richard Nixon] (If it is a judgement "
    "question, please Finish[yes] or Finish[no])\n"
    "(5) Reflect[right/wrong], which reflects the answer right or wrong based on the context history. For example, "
    "Reflect[right]\n"
    "Note that Reflect must be the next Action after Finish. You may take as many steps as necessary."
)
SCIENCEQA_SYSTEM_PROMPT = (
    "I want you to be a good multimodal multiple-choice science questions answerer. Select a correct option to a "
    "multi-choice multi-modal question with interleaving Thought, Action, Observation steps. Thought can reason about "
    "the current situation, and Action can be five types:\n"
    "(1) Image2Text[image], which generates captions for the image and detects words in the image.You are recommand to "
    "use it first to get more information about the imgage to the question. If the questions contains image, it will "
    "return catption and ocr text, else, it will return None. For example, Image2Text[image]\n"
    "(2) BingSearch[question], which searches the exact detailed question on the Internet and returns the relevant "
    "information to the query. Be specific and precise with your query to increase the chances of getting relevant "
    'results. For example, instead of searching for "dogs," you can search for "popular dog breeds in the United '
    'States." For example, BingSearch[Which type of computer networking technology, developed in the 1970s, allows '
    "devices to communicate over a shared network]\n"
    "(3) Retrieve[entity], which retrieves the exact entity on Wikipedia and returns the first paragraph if it exists. "
    "If not, it will return some similar entities to retrieve. For example, Retrieve[Milhouse]\n"
    "(4) Finish[option], which returns the answer option and finishes the task. For example, Finish[A]\n"
    "(5) Reflect[right/wrong], which reflects the answer right or wrong based on the context history. For example, "
    "Reflect[right]\n"
    "Note that to determine the answer, it's needed to consider both the Question and the available Options.\n"
    "Note that Reflect must be the next Action after Finish.\n"
    "BingSearch and Retrieve can be used multi-times."
)


SYSTEM_PROMPTS: dict[str, str] = {"hotpotqa": HOTPOTQA_SYSTEM_PROMPT, "scienceqa": SCIENCEQA_SYSTEM_PROMPT}
# Tools the plan role may pick (Reflect is the reflect role's, after Finish).
TOOLS: dict[str, tuple[str, ...]] = {
    "hotpotqa": ("BingSearch", "Retrieve", "Lookup", "Finish"),
    "scienceqa": ("Image2Text", "BingSearch", "Retrieve", "Finish"),
}
FINISH, REFLECT = "Finish", "Reflect"
REFLECT_PROMPT_OBS = "Please reflect your answer."  # the observation after Finish that hands over to reflect


@dataclass(frozen=True)
class Step:
    """One Thought / Action / Observation step. ``action`` is the raw action text, e.g. ``Retrieve[Milhouse]``."""

    thought: str
    action: str
    observation: str

    @property
    def parsed(self) -> tuple[str, str] | None:
        """``(tool, argument)`` as the data's generator split it (first ``[`` and first ``]``), else None."""
        return parse_action(self.action)


def parse_action(action: str) -> tuple[str, str] | None:
    """Split ``Tool[argument]`` at the first ``[`` and the first ``]``; None when either bracket is missing."""
    if "[" not in action or "]" not in action:
        return None
    return action[: action.find("[")], action[action.find("[") + 1 : action.find("]")]


def format_observation(text: str) -> str:
    """A tool result as the history holds it: stripped, on one line (the data has no newline in observations)."""
    return " ".join(text.strip().split("\n"))


def normalize_question(task: str, question: str) -> str:
    """The question as the training data writes it. ScienceQA data writes ``...?\nOptions:(A) x (B) y``."""
    question = question.strip()
    if task == "scienceqa":
        question = question.replace("\nOptions: ", "\nOptions:")
    return question


def head(task: str, question: str) -> str:
    """System prompt and question: the fixed start of every prompt of a trajectory (kept when truncating)."""
    return f"{SYSTEM_PROMPTS[task]}\nQuestion:{question}\n"


def render_step(step: Step) -> str:
    """The history text of one completed step (see the module docstring)."""
    parsed = step.parsed
    text = THOUGHT_PROMPT + step.thought + "\n"
    if parsed is None:  # unparsable action: the data shows it as a generated "Action:" line
        text += REFLECT_LABEL + RESPONSE + step.action
    elif parsed[0] == REFLECT:
        text += REFLECT_LABEL + step.action
    else:
        text += TOOL_LABEL + parsed[0] + "[" + RESPONSE + parsed[1] + "]"
    return text + "\n" + OBS_LABEL + step.observation + "\n"


def render_history(task: str, question: str, steps: list[Step] | tuple[Step, ...]) -> str:
    """Head plus every completed step: the text all roles share before the next step starts."""
    return head(task, question) + "".join(render_step(s) for s in steps)


# ---- prompt builders: the exact prompt of each role call (append to the history) -------------------------------


def plan_thought_prompt(history: str) -> str:
    """Plan call 1 of a step: output ``{thought}`` then EOS."""
    return history + THOUGHT_PROMPT


def plan_tool_prompt(history: str, thought: str) -> str:
    """Plan call 2 of a step: output ``Aciton: {tool}[`` then EOS (stop at ``[`` as a fallback)."""
    return history + THOUGHT_PROMPT + thought + "\n"


def action_prompt(history: str, thought: str, tool: str) -> str:
    """Action call: output ``{argument}`` then EOS (stop at ``]`` or a newline as a fallback)."""
    return plan_tool_prompt(history, thought) + TOOL_LABEL + tool + "[" + RESPONSE


def reflect_thought_prompt(history: str) -> str:
    """Reflect call 1 (the step after Finish): output ``{thought}`` then EOS."""
    return history + THOUGHT_PROMPT


def reflect_verdict_prompt(history: str, thought: str) -> str:
    """Reflect call 2: output ``Reflect[right]`` or ``Reflect[wrong]`` then EOS."""
    return history + THOUGHT_PROMPT + thought + "\n"


def plan_tool_output(tool: str) -> str:
    """The exact text plan call 2 is trained to produce for ``tool``."""
    return TOOL_LABEL + tool + "["


_TOOL_OUTPUT = re.compile(r"^\s*Aciton:\s*(\w+)\s*\[?")


def parse_plan_tool_output(text: str) -> str | None:
    """The tool name in a plan call 2 generation (``Aciton: Retrieve[`` -> ``Retrieve``), else None."""
    match = _TOOL_OUTPUT.match(text)
    return match.group(1) if match else None


def parse_action_output(text: str) -> str:
    """The argument in an action generation: up to the first ``]`` or newline, stripped."""
    return re.split(r"[\]\n]", text, maxsplit=1)[0].strip()


# ---- reading trajectories back from prompt text -------------------------------------------------------------------

_STEP = re.compile(
    r"Thought: \n### Response:\n([^\n]*)\n"
    r"(?:Aciton: ([^\n\[]*)\[\n### Response:\n([^\n\]]*)\]"  # planned tool step
    r"|Action: \n### Response:\n([^\n]*)"  # unparsable action, or the reference plan file's tool line
    r"|Action: ([^\n]*))"  # Reflect step
    r"\nObversation: ([^\n]*)\n"
)


def parse_history(text: str) -> tuple[str, list[Step]]:
    """Split prompt text into ``(head, completed steps)``; also reads the reference plan file's
    ``Action: \n### Response:\nTool[arg]`` lines. Text after the last completed step is ignored."""
    start = text.find(THOUGHT_PROMPT)
    if start < 0:
        return text, []
    steps, pos = [], start
    while (match := _STEP.match(text, pos)) is not None:
        thought, tool, arg, generated, reflect, obs = match.groups()
        action = f"{tool}[{arg}]" if tool is not None else generated if generated is not None else reflect
        steps.append(Step(thought, action, obs))
        pos = match.end()
    return text[:start], steps
