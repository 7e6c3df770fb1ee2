"""Supervised examples for the three roles, read from the AutoAct trajectory files.

``hotpotqa_action.json`` / ``hotpotqa_reflect.json`` (and the ScienceQA ones) are used as shipped. There is no
HotpotQA plan file: plan examples are derived from ``hotpotqa_full_trajectories.json`` by replaying each trajectory in
the prompt format of :mod:`lragent.train.data` and cutting it at every plan output (two calls per tool step: the
thought, then ``Aciton: {tool}[``). ScienceQA ships a plan file in the reference code's other layout
(``Action: \\n### Response:\\n{tool}``); to keep one format, its trajectories are rebuilt from the histories inside all
three ScienceQA files and the plan examples derived the same way.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from lragent.train import data as fmt

FILES: dict[tuple[str, str], str] = {
    (task, role): f"{task}_{role}.json" for task in fmt.TASKS for role in ("action", "reflect")
}
FULL_TRAJECTORIES = {"hotpotqa": "hotpotqa_full_trajectories.json"}
SCIENCEQA_PLAN_FILE = "scienceqa_plan.json"


@dataclass(frozen=True)
class Example:
    """One supervised example: the role reads ``input`` and must generate ``output`` (then EOS)."""

    role: str
    input: str
    output: str
    kind: str = ""  # thought | tool | argument | verdict ("" when read from a file)


@dataclass(frozen=True)
class Trajectory:
    task: str
    question: str
    steps: tuple[fmt.Step, ...]

    @property
    def head(self) -> str:
        return fmt.head(self.task, self.question)


def default_data_dir() -> Path:
    """The trajectory folder: ``<repo>/../shared/data/trajectories`` when present, else the workplace path."""
    repo_sibling = Path(__file__).resolve().parents[3] / "shared" / "data" / "trajectories"
    return repo_sibling if repo_sibling.is_dir() else Path("/work/shared/data/trajectories")


def read_examples(path: Path, role: str) -> list[Example]:
    """A shipped ``[{"input", "output"}, ...]`` file as examples of ``role``."""
    with open(path, encoding="utf-8") as f:
        return [Example(role, item["input"], item["output"]) for item in json.load(f)]


def _full_trajectory_steps(prompt: str) -> list[fmt.Step]:
    """Steps of a ``Thought N: / Action N: / Observation N:`` text, read as the data's generator read them:
    line by line, text after the first colon, and steps with an empty field dropped."""
    fields: dict[str, list[str]] = {"Thought": [], "Action": [], "Observation": []}
    for line in prompt.split("\n"):
        for label, values in fields.items():
            if line.startswith(label):
                values.append(line[line.find(":") + 1 :].strip())
                break
    triples = zip(fields["Thought"], fields["Action"], fields["Observation"])
    return [fmt.Step(t, a, o) for t, a, o in triples if t and a and o]


def read_full_trajectories(path: Path, task: str = "hotpotqa") -> list[Trajectory]:
    """The correct trajectories of a ``*_full_trajectories.json`` file (fields ``question``, ``correct``,
    ``prompt``)."""
    with open(path, encoding="utf-8") as f:
        items = json.load(f)
    return [
        Trajectory(task, item["question"], tuple(_full_trajectory_steps(item["prompt"])))
        for item in items
        if item.get("correct", True)
    ]


def trajectories_from_prompts(task: str, texts: Iterable[str]) -> list[Trajectory]:
    """Rebuild trajectories from prompt texts that hold their prefixes: per question, the longest history wins."""
    best: dict[str, list[fmt.Step]] = {}
    prefix = fmt.SYSTEM_PROMPTS[task] + "\nQuestion:"
    for text in texts:
        head, steps = fmt.parse_history(text)
        if head.startswith(prefix) and len(steps) >= len(best.get(head, [])):
            best[head] = steps
    return [Trajectory(task, head[len(prefix) : -1], tuple(steps)) for head, steps in best.items()]


def _walk(traj: Trajectory) -> Iterator[tuple[str, fmt.Step, bool]]:
    """``(history before the step, step, reflect's turn)`` for each step; reflect's turn is the step after Finish."""
    history, after_finish = traj.head, False
    for step in traj.steps:
        yield history, step, after_finish
        parsed = step.parsed
        after_finish = parsed is not None and parsed[0] == fmt.FINISH
        history += fmt.render_step(step)


def plan_examples(traj: Trajectory) -> list[Example]:
    """Two plan examples per plan step whose tool is one of the task's tools (thought, then tool line).
    Steps after a Finish are reflect's; steps with a misspelt or missing tool are skipped."""
    out = []
    for history, step, reflect_turn in _walk(traj):
        parsed = step.parsed
        if reflect_turn or parsed is None or parsed[0] not in fmt.TOOLS[traj.task]:
            continue
        out.append(Example("plan", fmt.plan_thought_prompt(history), step.thought, "thought"))
        tool_prompt = fmt.plan_tool_prompt(history, step.thought)
        out.append(Example("plan", tool_prompt, fmt.plan_tool_output(parsed[0]), "tool"))
    return out


def action_examples(traj: Trajectory) -> list[Example]:
    """The action examples the data's generator made (every non-Reflect tool step with an argument)."""
    out = []
    for history, step, _ in _walk(traj):
        parsed = step.parsed
        if parsed is not None and parsed[0] != fmt.REFLECT and parsed[1]:
            prompt = fmt.action_prompt(history, step.thought, parsed[0])
            out.append(Example("action", prompt, parsed[1], "argument"))
    return out


def reflect_examples(traj: Trajectory) -> list[Example]:
    """The reflect examples the data's generator made (thought and verdict of every Reflect step)."""
    out = []
    for history, step, _ in _walk(traj):
        parsed = step.parsed
        if parsed is not None and parsed[0] == fmt.REFLECT:
            out.append(Example("reflect", fmt.reflect_thought_prompt(history), step.thought, "thought"))
            prompt = fmt.reflect_verdict_prompt(history, step.thought)
            out.append(Example("reflect", prompt, step.action[: step.action.find("]") + 1], "verdict"))
    return out


def task_trajectories(task: str, data_dir: Path | None = None) -> list[Trajectory]:
    """HotpotQA: the full-trajectory file. ScienceQA: rebuilt from the histories in its three files."""
    data_dir = Path(data_dir or default_data_dir())
    if task in FULL_TRAJECTORIES:
        return read_full_trajectories(data_dir / FULL_TRAJECTORIES[task], task)
    names = [FILES[(task, "action")], FILES[(task, "reflect")], SCIENCEQA_PLAN_FILE]
    texts = [item["input"] for name in names for item in json.loads((data_dir / name).read_text(encoding="utf-8"))]
    return trajectories_from_prompts(task, texts)


def load_role_examples(task: str, role: str, data_dir: Path | None = None) -> list[Example]:
    """Training examples of ``role`` for ``task`` (plan derived, action and reflect as shipped)."""
    if task not in fmt.TASKS or role not in fmt.ROLES:
        raise ValueError(f"unknown task/role {task!r}/{role!r}: tasks {fmt.TASKS}, roles {fmt.ROLES}")
    data_dir = Path(data_dir or default_data_dir())
    if role == "plan":
        return [ex for traj in task_trajectories(task, data_dir) for ex in plan_examples(traj)]
    return read_examples(data_dir / FILES[(task, role)], role)


def question_of(prompt: str) -> str:
    """The head (system prompt and question) of a role prompt: every example of one trajectory shares it."""
    cut = prompt.find(fmt.THOUGHT_PROMPT)
    return prompt if cut < 0 else prompt[:cut]


def is_heldout(question: str, fraction: float, seed: int = 0) -> bool:
    """Whether a question belongs to the held-out split: a hash of (seed, question) below ``fraction``.

    Hashing the question, not drawing per example, keeps every example of one trajectory on one side (they share
    their prompts' prefix, so splitting them would leak) and holds out the same questions for all three roles."""
    digest = hashlib.blake2b(f"{seed}:{question}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") / 2**64 < fraction


def split_heldout(examples: Sequence[Example], fraction: float, seed: int = 0) -> tuple[list[Example], list[Example]]:
    """``(train, held-out)`` by question (see :func:`is_heldout`); ``fraction`` 0 holds nothing out."""
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"held-out fraction must be in [0, 1), got {fraction}")
    train: list[Example] = []
    heldout: list[Example] = []
    for ex in examples:
        (heldout if fraction > 0 and is_heldout(question_of(ex.input), fraction, seed) else train).append(ex)
    return train, heldout
