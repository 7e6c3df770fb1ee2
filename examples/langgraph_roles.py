"""The plan / action / reflect workflow as a LangGraph graph, with LangChain's `ChatOpenAI`, served by lragent.

    START -> plan -> action -> tools -+-> reflect -> END      (after `finish`)
                       ^              |
                       +--------------+

Each node's model is a `ChatOpenAI` whose `model` is the role adapter's name; all nodes read the one message list,
so the server reuses the prefix another role computed. The action node binds `retrieve` and `finish` with a
`tool_choice` per turn (`TOOL_CHOICES`: retrieve, the model's pick, finish); LangChain parses the calls into
`AIMessage.tool_calls` and `ToolNode` runs them.

    lragent serve --adapter-set hotpotqa-shared-a --port 8000
    python examples/langgraph_roles.py --base-url http://127.0.0.1:8000/v1
"""

from __future__ import annotations

from langchain_core.messages import AIMessage, HumanMessage, SystemMessage, ToolMessage
from langchain_core.tools import tool
from langchain_openai import ChatOpenAI
from langgraph.graph import END, START, MessagesState, StateGraph
from langgraph.prebuilt import ToolNode
from roles_task import QUESTION, SYSTEM, TOOL_CHOICES, Request, Summary, cli, lookup


@tool
def retrieve(entity: str) -> str:
    """The first paragraph of the entity's article."""
    return lookup(entity)


@tool
def finish(answer: str) -> str:
    """End the episode with the final answer (a few words)."""
    return answer


def build_graph(base_url: str, api_key: str, max_tokens: int):
    """The compiled graph; its state is LangGraph's message list."""

    def chat(role: str, tokens: int) -> ChatOpenAI:
        return ChatOpenAI(model=role, base_url=base_url, api_key=api_key, max_tokens=tokens, temperature=0,
                          max_retries=0, timeout=120)  # fmt: skip

    plan, reflect, action = chat("plan", max_tokens), chat("reflect", max_tokens), chat("action", 48)
    turns = [action.bind_tools([retrieve, finish], tool_choice=c, parallel_tool_calls=False) for c in TOOL_CHOICES]

    def act(state: MessagesState) -> dict:
        done = sum(isinstance(m, AIMessage) and bool(m.tool_calls) for m in state["messages"])
        return {"messages": [turns[done].invoke(state["messages"])]}

    def after_tools(state: MessagesState) -> str:
        calls = [c for m in state["messages"] if isinstance(m, AIMessage) for c in m.tool_calls]
        return "reflect" if calls[-1]["name"] == "finish" or len(calls) == len(turns) else "action"

    graph = StateGraph(MessagesState)
    graph.add_node("plan", lambda state: {"messages": [plan.invoke(state["messages"])]})
    graph.add_node("action", act)
    graph.add_node("tools", ToolNode([retrieve, finish]))
    graph.add_node("reflect", lambda state: {"messages": [reflect.invoke(state["messages"])]})
    graph.add_edge(START, "plan")
    graph.add_edge("plan", "action")
    graph.add_edge("action", "tools")
    graph.add_conditional_edges("tools", after_tools, ["action", "reflect"])
    graph.add_edge("reflect", END)
    return graph.compile()


def summarise(messages: list) -> Summary:
    """The summary of a finished run, from its messages (each AIMessage carries its request's usage)."""
    summary = Summary()
    answers = [m for m in messages if isinstance(m, AIMessage)]
    roles = ["plan"] + ["action"] * (len(answers) - 2) + ["reflect"]
    for role, message in zip(roles, answers):
        usage = message.usage_metadata or {}
        cached = usage.get("input_token_details", {}).get("cache_read", 0)
        summary.requests.append(Request(role, usage.get("input_tokens", 0), cached))
        summary.tool_calls += [(c["name"], c["args"]) for c in message.tool_calls]
    summary.observations = [str(m.content) for m in messages if isinstance(m, ToolMessage)]
    summary.plan, summary.reflection = str(answers[0].content), str(answers[-1].content)
    finished = [args for name, args in summary.tool_calls if name == "finish"]
    summary.answer = finished[0]["answer"] if finished else None
    return summary


def main(base_url: str, api_key: str = "none", max_tokens: int = 32) -> Summary:
    graph = build_graph(base_url, api_key, max_tokens)
    start = [SystemMessage(SYSTEM), HumanMessage(f"Question: {QUESTION}")]
    return summarise(graph.invoke({"messages": start})["messages"])


if __name__ == "__main__":
    cli(main, __doc__.split("\n\n")[0])
