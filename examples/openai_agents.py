"""A plan / action / reflect agent written against the OpenAI client only, served by lragent.

Each role is a LoRA adapter on one base model, named by the `model` field. Every agent sends the whole
trajectory, as any agent framework would; the server finds the prefix the other agents already processed and
reuses its KV cache across adapters (keys, base values and, under base_lr_shared, the low-rank cache). Nothing
on the client side asks for it: the reuse shows up in `usage.prompt_tokens_details.cached_tokens` and `/metrics`.

Start a server with three role adapters (trained ones, or random shared-A ones for a demo):

    python scripts/load_test.py --write-adapters /tmp/roles
    lragent serve --adapter plan=/tmp/roles/plan --adapter action=/tmp/roles/action \\
        --adapter reflect=/tmp/roles/reflect --sharing base_lr_shared --port 8000

then:

    python examples/openai_agents.py --base-url http://127.0.0.1:8000/v1

With random adapters the agents' words are noise; the tool calls fall back to a scripted plan so the episode
still runs, and the cache reuse is the same.
"""

from __future__ import annotations

import argparse
import re
import time
import urllib.request

from openai import OpenAI

SYSTEM = (
    "You solve multi-hop questions as a team of three agents. plan writes a Thought and picks a tool; action writes "
    "the tool call; reflect checks the final answer. Tools: Retrieve[entity] returns the entity's first paragraph; "
    "Finish[answer] ends the episode with the answer."
)
QUESTION = "Which magazine was started first, Arthur's Magazine or First for Women?"
DOCUMENTS = {
    "Arthur's Magazine": "Arthur's Magazine (1844-1846) was an American literary periodical published in "
    "Philadelphia in the 19th century. Edited by Timothy Shay Arthur, it featured work by Edgar A. Poe, "
    "J.H. Ingraham, Sarah Josepha Hale, Thomas G. Spear, and others. In May 1846 it was merged into Godey's "
    "Lady's Book.",
    "First for Women": "First for Women is a woman's magazine published by Bauer Media Group in the USA. The "
    "magazine was started in 1989. It is based in Englewood Cliffs, New Jersey. In 2011 the circulation of the "
    "magazine was 1,310,696 copies.",
}
SCRIPT = ["Retrieve[Arthur's Magazine]", "Retrieve[First for Women]", "Finish[Arthur's Magazine]"]
TOOL_CALL = re.compile(r"(Retrieve|Finish)\[([^\]]+)\]")


def run_tool(call: str) -> str | None:
    """The observation for a tool call, or None for Finish."""
    tool, arg = TOOL_CALL.search(call).groups()
    if tool == "Finish":
        return None
    return DOCUMENTS.get(arg.strip(), f"Could not find [{arg}].")


def ask(client: OpenAI, role: str, trajectory: list[dict], max_tokens: int) -> str:
    start = time.perf_counter()
    out = client.chat.completions.create(model=role, messages=trajectory, max_tokens=max_tokens, temperature=0)
    u = out.usage
    cached = u.prompt_tokens_details.cached_tokens if u.prompt_tokens_details else 0
    took = time.perf_counter() - start
    print(
        f"  {role:>7}: {u.prompt_tokens:4d} prompt tokens, "
        f"{cached:4d} cached ({cached / u.prompt_tokens:4.0%}), {took:5.2f} s"
    )
    return out.choices[0].message.content or ""


def episode(client: OpenAI, max_tokens: int) -> None:
    trajectory = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": f"Question: {QUESTION}"}]
    for step, scripted in enumerate(SCRIPT):
        thought = ask(client, "plan", trajectory, max_tokens)
        trajectory.append({"role": "assistant", "content": f"Thought {step + 1}: {thought.strip()}"})
        call = ask(client, "action", trajectory, max_tokens)
        match = TOOL_CALL.search(call)
        # keep the model's call if it uses the planned tool; random adapters rarely write a valid one
        call = match.group(0) if match and match[1] == TOOL_CALL.search(scripted)[1] else scripted
        trajectory.append({"role": "assistant", "content": f"Action {step + 1}: {call}"})
        observation = run_tool(call)
        if observation is None:
            break
        trajectory.append({"role": "user", "content": f"Observation {step + 1}: {observation}"})
    verdict = ask(client, "reflect", trajectory, max_tokens)
    print(f"  final action: {call}   reflect says: {verdict.strip()[:60]!r}")


def cache_report(metrics_url: str) -> None:
    """Prompt tokens computed vs reused per adapter, from the server's Prometheus metrics."""
    with urllib.request.urlopen(metrics_url) as r:
        lines = r.read().decode().splitlines()
    table: dict[str, dict[str, float]] = {}
    for line in lines:
        m = re.match(r'lragent_prompt_tokens(_computed|_reused|)_total\{adapter="([^"]+)"\} (\S+)', line)
        if m:
            table.setdefault(m[2], {})[m[1].strip("_") or "prompt"] = float(m[3])
        elif line.startswith("lragent_prefix_cache_hit_rate "):
            hit_rate = float(line.split()[1])
    print("\n/metrics (since the server started):")
    print(f"  {'adapter':>22} {'prompt':>8} {'computed':>9} {'reused':>8}")
    for adapter, row in sorted(table.items()):
        print(f"  {adapter:>22} {row.get('prompt', 0):8.0f} {row.get('computed', 0):9.0f} {row.get('reused', 0):8.0f}")
    total = sum(r.get("prompt", 0) for r in table.values())
    reused = sum(r.get("reused", 0) for r in table.values())
    print(f"  reused {reused / max(total, 1):.0%} of all prompt tokens; prefix-cache block hit rate {hit_rate:.0%}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--base-url", default="http://127.0.0.1:8000/v1")
    parser.add_argument("--api-key", default="none")
    parser.add_argument("--max-tokens", type=int, default=24)
    parser.add_argument("--episodes", type=int, default=1)
    args = parser.parse_args()
    client = OpenAI(base_url=args.base_url, api_key=args.api_key)
    roles = {m.id: m.parent for m in client.models.list().data}
    missing = {"plan", "action", "reflect"} - set(roles)
    if missing:
        raise SystemExit(f"the server lacks adapters {sorted(missing)}; it serves {sorted(roles)}")
    for i in range(args.episodes):
        print(f"episode {i + 1}: {QUESTION}")
        episode(client, args.max_tokens)
    cache_report(args.base_url.rstrip("/").removesuffix("/v1") + "/metrics")


if __name__ == "__main__":
    main()
