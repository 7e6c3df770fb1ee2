"""The plan / action / reflect workflow in the OpenAI Agents SDK, served by lragent.

Each role is an `Agent` whose model is the role adapter's name on the server's /v1/responses endpoint (the SDK's
default model class). The agents hand the run's items on to each other (`to_input_list`), so every request carries
the whole trajectory and the server reuses the prefix another role computed. The action agent runs once per tool
call, its `tool_choice` set turn by turn (`TOOL_CHOICES`: retrieve, the model's pick, finish), so the SDK parses and
runs one call per run.

    lragent serve --adapter-set hotpotqa-shared-a --port 8000
    python examples/agents_sdk_roles.py --base-url http://127.0.0.1:8000/v1
"""

from __future__ import annotations

import asyncio
import json

import agents
from openai import AsyncOpenAI
from roles_task import QUESTION, SYSTEM, TOOL_CHOICES, Request, Summary, cli, lookup


@agents.function_tool
def retrieve(entity: str) -> str:
    """The first paragraph of the entity's article."""
    return lookup(entity)


@agents.function_tool
def finish(answer: str) -> str:
    """End the episode with the final answer (a few words)."""
    return answer


def role_agent(client: AsyncOpenAI, role: str, settings: agents.ModelSettings, **kw) -> agents.Agent:
    """An agent whose model is the adapter `role`; all roles share the instructions, hence the cached prefix."""
    model = agents.OpenAIResponsesModel(model=role, openai_client=client)
    return agents.Agent(name=role, instructions=SYSTEM, model=model, model_settings=settings, **kw)


def action_agent(client: AsyncOpenAI, tool_choice: str) -> agents.Agent:
    """Action with both tools; the run stops at its first tool call so that the workflow decides what comes next."""
    settings = agents.ModelSettings(max_tokens=48, temperature=0, tool_choice=tool_choice, parallel_tool_calls=False)
    return role_agent(client, "action", settings, tools=[retrieve, finish], tool_use_behavior="stop_on_first_tool")


def record(summary: Summary, role: str, result: agents.RunResult) -> None:
    """The run's requests (prompt and cached tokens) and the tool calls it ran."""
    for response in result.raw_responses:
        usage = response.usage
        summary.requests.append(Request(role, usage.input_tokens, usage.input_tokens_details.cached_tokens))
    for item in result.new_items:
        if isinstance(item, agents.ToolCallItem):
            call = item.raw_item
            summary.tool_calls.append((call.name, json.loads(call.arguments)))
        elif isinstance(item, agents.ToolCallOutputItem):
            summary.observations.append(str(item.output))


async def workflow(client: AsyncOpenAI, max_tokens: int) -> Summary:
    summary = Summary()
    text = agents.ModelSettings(max_tokens=max_tokens, temperature=0)
    plan = await agents.Runner.run(role_agent(client, "plan", text), f"Question: {QUESTION}")
    record(summary, "plan", plan)
    summary.plan = str(plan.final_output)
    history = plan.to_input_list()
    for tool_choice in TOOL_CHOICES:
        action = await agents.Runner.run(action_agent(client, tool_choice), history)
        record(summary, "action", action)
        history = action.to_input_list()
        if summary.tool_calls and summary.tool_calls[-1][0] == "finish":
            summary.answer = str(action.final_output)
            break
    reflect = await agents.Runner.run(role_agent(client, "reflect", text), history)
    record(summary, "reflect", reflect)
    summary.reflection = str(reflect.final_output)
    return summary


def main(base_url: str, api_key: str = "none", max_tokens: int = 32) -> Summary:
    agents.set_tracing_disabled(True)  # traces would go to OpenAI's servers
    client = AsyncOpenAI(base_url=base_url, api_key=api_key, max_retries=0, timeout=120)
    return asyncio.run(workflow(client, max_tokens))


if __name__ == "__main__":
    cli(main, __doc__.split("\n\n")[0])
