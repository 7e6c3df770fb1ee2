"""Supervised LoRA training of the agent roles (plan, action, reflect) on AutoAct trajectories.

- :mod:`lragent.train.data`: the ONE prompt format of every role call (training and inference share it).
- :mod:`lragent.train.examples`: training examples (plan derived from full trajectories).
- :mod:`lragent.train.recipes`: independent, shared-A and joint adapter sets, saved as PEFT folders.
- :mod:`lragent.train.cli`: ``lragent train ...``.

Only the format module is imported here: it needs no torch, so the agent pipeline can use it cheaply.
"""

from lragent.train.data import (
    ROLES,
    TASKS,
    Step,
    action_prompt,
    format_observation,
    head,
    normalize_question,
    parse_action_output,
    parse_plan_tool_output,
    plan_thought_prompt,
    plan_tool_output,
    plan_tool_prompt,
    reflect_thought_prompt,
    reflect_verdict_prompt,
    render_history,
    render_step,
)

__all__ = [
    "ROLES",
    "TASKS",
    "Step",
    "action_prompt",
    "format_observation",
    "head",
    "normalize_question",
    "parse_action_output",
    "parse_plan_tool_output",
    "plan_thought_prompt",
    "plan_tool_output",
    "plan_tool_prompt",
    "reflect_thought_prompt",
    "reflect_verdict_prompt",
    "render_history",
    "render_step",
]
