"""The plan / action / reflect workflow in smolagents, served by lragent.

plan and reflect are plain `OpenAIServerModel` calls; action is a `ToolCallingAgent` with a `retrieve` tool and
smolagents' own finishing tool, `final_answer`. Each model's `model_id` is the role adapter's name. smolagents asks
for `tool_choice="required"`; here the choice is set step by step (`TOOL_CHOICES`: retrieve, the model's pick,
final_answer), so the agent parses and runs one call per step and always ends. All requests start with the same
system prompt, so later roles reuse its cached prefix.

    lragent serve --adapter-set hotpotqa-shared-a --port 8000
    python examples/smolagents_roles.py --base-url http://127.0.0.1:8000/v1
"""

from __future__ import annotations

import importlib.resources

import yaml
from roles_task import QUESTION, SYSTEM, TOOL_CHOICES, Request, Summary, cli, lookup
from smolagents import ActionStep, ChatMessage, MessageRole, OpenAIServerModel, ToolCallingAgent, tool


@tool
def retrieve(entity: str) -> str:
    """The first paragraph of the entity's article.

    Args:
        entity: the article's title, e.g. a magazine's name.
    """
    return lookup(entity)


def text(role: MessageRole, content: str) -> ChatMessage:
    return ChatMessage(role=role, content=[{"type": "text", "text": content}])


def record(summary: Summary, role: str, message: ChatMessage) -> None:
    """A request's prompt and cached tokens, from the raw `openai` response the model keeps."""
    usage = message.raw.usage
    details = usage.prompt_tokens_details
    summary.requests.append(Request(role, usage.prompt_tokens, details.cached_tokens if details else 0))


def tool_choice(turn: int) -> str | dict:
    """`TOOL_CHOICES[turn]` in the request's spelling (smolagents' finishing tool is `final_answer`)."""
    choice = TOOL_CHOICES[turn].replace("finish", "final_answer")
    return choice if choice == "required" else {"type": "function", "function": {"name": choice}}


def action_agent(model: OpenAIServerModel) -> ToolCallingAgent:
    """The agent with the shared system prompt (the server shows it the tools); after each step, the model's
    `tool_choice` (its keyword arguments go into every request) moves on to the next turn's."""
    templates = yaml.safe_load(
        importlib.resources.files("smolagents.prompts").joinpath("toolcalling_agent.yaml").read_text()
    )
    templates["system_prompt"] = SYSTEM
    model.kwargs["tool_choice"] = tool_choice(0)

    def next_choice(step: ActionStep, agent: ToolCallingAgent) -> None:
        model.kwargs["tool_choice"] = tool_choice(min(step.step_number, len(TOOL_CHOICES) - 1))

    return ToolCallingAgent(
        tools=[retrieve],
        model=model,
        prompt_templates=templates,
        max_steps=len(TOOL_CHOICES),
        step_callbacks={ActionStep: next_choice},
        verbosity_level=0,
    )


def main(base_url: str, api_key: str = "none", max_tokens: int = 32) -> Summary:
    def model(role: str, tokens: int) -> OpenAIServerModel:
        client = {"max_retries": 0, "timeout": 120}
        settings = {"max_tokens": tokens, "temperature": 0, "parallel_tool_calls": False}
        return OpenAIServerModel(role, api_base=base_url, api_key=api_key, client_kwargs=client, **settings)

    summary = Summary()
    question = text(MessageRole.USER, f"Question: {QUESTION}")
    plan = model("plan", max_tokens).generate([text(MessageRole.SYSTEM, SYSTEM), question])
    record(summary, "plan", plan)
    summary.plan = plan.content or ""

    agent = action_agent(model("action", 48))
    summary.answer = agent.run(f"Question: {QUESTION}\nPlan: {summary.plan}")
    for step in agent.memory.steps:
        if isinstance(step, ActionStep) and step.model_output_message is not None:
            record(summary, "action", step.model_output_message)
            summary.tool_calls += [(c.name, c.arguments) for c in step.tool_calls or []]
            summary.observations += [step.observations or ""] if step.tool_calls else []

    trajectory = agent.write_memory_to_messages()
    verdict = text(MessageRole.USER, "Reflect: is the final answer right? Answer in one sentence.")
    reflect = model("reflect", max_tokens).generate([*trajectory, verdict])
    record(summary, "reflect", reflect)
    summary.reflection = reflect.content or ""
    return summary


if __name__ == "__main__":
    cli(main, __doc__.split("\n\n")[0])
