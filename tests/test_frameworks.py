"""The agent-framework examples (examples/*_roles.py) end to end: the OpenAI Agents SDK, LangGraph and smolagents
each run the plan / action / reflect workflow against a real uvicorn server on loopback, with the embedded
SmolLM2-135M on CPU and the shipped hotpotqa-shared-a role adapters (base_lr_shared).

Each test gets a fresh server, so its cache holds only what this workflow computed: the first request (plan) must
reuse nothing, and a later role's reuse must come from another role's prefix (cross-role reuse, the point of LRAgent).
"""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

import httpx
import pytest
from loopback import serve
from prometheus_client.parser import text_string_to_metric_families

from lragent.adapters import adapter_set
from lragent.config import EngineConfig
from lragent.engine.llm_engine import LLMEngine
from lragent.server import ServerSettings, create_app

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
sys.path.insert(0, str(EXAMPLES))  # the examples import their shared task module as a sibling

task = importlib.import_module("roles_task")


@pytest.fixture
def server():
    adapters = {role: str(path) for role, path in adapter_set("hotpotqa-shared-a").items()}
    config = EngineConfig(adapters=adapters, sharing="base_lr_shared", kv_cache_bytes=48 << 20, max_model_len=2048)
    with serve(create_app(LLMEngine(config), ServerSettings())) as url:
        yield url


def reused_by_adapter(url: str) -> dict[str, float]:
    """lragent_prompt_tokens_reused_total per adapter, from /metrics."""
    families = text_string_to_metric_families(httpx.get(f"{url}/metrics", timeout=30).text)
    return {
        s.labels["adapter"]: s.value
        for family in families
        for s in family.samples
        if s.name == "lragent_prompt_tokens_reused_total"
    }


@pytest.mark.parametrize(
    "example, finish",
    [("agents_sdk_roles", "finish"), ("langgraph_roles", "finish"), ("smolagents_roles", "final_answer")],
)
def test_framework_workflow(server, example, finish):
    summary = importlib.import_module(example).main(f"{server}/v1", max_tokens=16)
    # the workflow completed: plan, one to three action calls, reflect, in that order
    roles = [r.role for r in summary.requests]
    assert roles[0] == "plan" and roles[-1] == "reflect" and 1 <= roles.count("action") <= 3, roles
    assert set(roles[1:-1]) == {"action"} and summary.reflection.strip()
    # tool calls were parsed into the framework's call objects and the tools ran on their arguments
    names = [name for name, _ in summary.tool_calls]
    assert names[0] == "retrieve" and names[-1] == finish and set(names) <= {"retrieve", finish}, names
    assert len(summary.observations) == len(summary.tool_calls) == roles.count("action")
    for (name, args), observation in zip(summary.tool_calls, summary.observations):
        assert isinstance(args, dict) and set(args) == ({"entity"} if name == "retrieve" else {"answer"}), args
        expected = task.lookup(args["entity"]) if name == "retrieve" else str(args["answer"])
        assert observation == expected
    assert summary.answer == summary.tool_calls[-1][1]["answer"]
    # cross-role reuse: nothing was cached before plan; every later role reused a prefix another role computed
    assert summary.requests[0].cached_tokens == 0
    first_action = summary.requests[1]
    assert 0 < first_action.cached_tokens < first_action.prompt_tokens
    assert summary.requests[-1].cached_tokens > 0
    reused = reused_by_adapter(server)
    assert reused.get("plan", 0) == 0 and reused["action"] > 0 and reused["reflect"] > 0, reused
