"""The trajectory text every role reads, built from `lragent.train.data` (the one format for training and
inference, owned by the training side). This module only adds the incremental view the pipeline needs.

One shared trajectory (HotpotQA; ScienceQA differs in system prompt and question block):

    {system}\nQuestion:{question}\n
    Thought: \n### Response:\n{thought}\n               <- plan call 1 prompt ends at "### Response:\n"
                                                       <- plan call 2 prompt ends at "{thought}\n" -> "Aciton: Tool["
    Aciton: {Tool}[\n### Response:\n{argument}]\n      <- action prompt ends at "### Response:\n"
    Obversation: {observation}\n
    ... Aciton: Finish[\n### Response:\n{answer}]\nObversation: Please reflect your answer.\n
    Thought: \n### Response:\n{reflect thought}\n      <- reflect calls 1 and 2, same shapes as plan's
    Action: Reflect[right]\nObversation: Answer is CORRECT

The typos ("Aciton", "Obversation") are the data's and stay. Every chunk the pipeline appends starts right after a
newline with a non-space character, so appending encoded chunks gives the ids of encoding the whole text
(byte-level BPE does not merge across "\n" + non-space): what the prefix cache sees is what training saw.
"""

from __future__ import annotations

from dataclasses import dataclass

from lragent.train import data as D


@dataclass(frozen=True)
class TrajectoryFormat:
    """The strings a task's trajectory is made of (all from `lragent.train.data`)."""

    task: str

    @property
    def tools(self) -> tuple[str, ...]:
        """Tools the plan may pick for this task (Reflect is the reflect role's)."""
        return D.TOOLS[self.task]

    def opening(self, record: dict) -> str:
        """Head (system prompt + question) and the first thought header: plan call 1's prompt."""
        return D.head(self.task, self.question(record)) + D.THOUGHT_PROMPT

    def question(self, record: dict) -> str:
        if self.task == "hotpotqa":
            return D.normalize_question(self.task, " ".join(record["question"].split()))
        q = record["Question"].strip()
        if "Options:" not in q:
            q += "\nOptions:" + " ".join(f"({chr(65 + i)}) {c}" for i, c in enumerate(record["choices"]))
        head, _, opts = q.partition("\nOptions:")
        return D.normalize_question(self.task, " ".join(head.split()) + "\nOptions:" + " ".join(opts.split()))

    @staticmethod
    def action_call(tool: str) -> str:
        """After '{thought}\\n': the tool line up to the action prompt's end."""
        return D.TOOL_LABEL + tool + "[" + D.RESPONSE

    @staticmethod
    def free_action(call: str) -> str:
        """An action written without the action role: 'Action: Reflect[right]\\n', or a junk line as generated."""
        if D.parse_action(call) is not None:
            return D.REFLECT_LABEL + call + "\n"
        return D.REFLECT_LABEL + D.RESPONSE + call + "\n"

    @staticmethod
    def observe(obs: str, next_thought: bool = True) -> str:
        """'Obversation: ...\\n' and, unless the episode ends, the next 'Thought: \\n### Response:\\n'."""
        text = D.OBS_LABEL + D.format_observation(obs) + "\n"
        return text + (D.THOUGHT_PROMPT if next_thought else "")


def load_format(task: str) -> TrajectoryFormat:
    if task not in D.TASKS:
        raise ValueError(f"unknown task {task!r}; expected one of {D.TASKS}")
    return TrajectoryFormat(task)
