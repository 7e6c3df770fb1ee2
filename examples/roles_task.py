"""The task the three framework examples share: one HotpotQA-style question, two documents, a `retrieve` lookup.

Every example runs the same three-role workflow, each role a LoRA adapter served by `lragent serve` and picked by
the request's `model` name:

    plan     writes a short thought about what to look up
    action   calls tools: retrieve(entity) and finish(answer), one call per turn (`TOOL_CHOICES`)
    reflect  reads the whole trajectory and judges the answer

All roles get the same system prompt (`SYSTEM`) and the growing trajectory, as agent frameworks send it, so the
server reuses the KV cache of the prompt prefix that another role already computed: `Request.cached_tokens`.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from dataclasses import dataclass, field

SYSTEM = (
    "You are one of three agents that answer multi-hop questions together, taking turns on one shared trajectory. "
    "The plan agent thinks about what is missing and which entity to look up next. The action agent calls the "
    "tools: retrieve(entity) returns the first paragraph of the entity's article, and finish(answer) ends the "
    "episode with a short answer. The reflect agent reads the whole trajectory at the end and says whether the "
    "answer is right, in one sentence. Keep every turn short and base it on the retrieved paragraphs only."
)
QUESTION = "Which magazine was started first, Arthur's Magazine or First for Women?"
DOCUMENTS = {
    "Arthur's Magazine": "Arthur's Magazine (1844-1846) was an American literary periodical published in "
    "Philadelphia in the 19th century. In May 1846 it was merged into Godey's Lady's Book.",
    "First for Women": "First for Women is a woman's magazine published by Bauer Media Group in the USA. The "
    "magazine was started in 1989. It is based in Englewood Cliffs, New Jersey.",
}
ROLES = ("plan", "action", "reflect")
# The action role's tool choice turn by turn: a lookup first, then its own pick of the two tools, then finish by name.
# "required" and a named function make the server constrain the output by the tools' JSON schemas, so even a 135M
# model writes calls that parse; the last named turn makes every episode end within three calls.
TOOL_CHOICES = ("retrieve", "required", "finish")


def lookup(entity: str) -> str:
    """The document whose title best matches `entity` (small models misspell titles), or a not-found note."""
    words = set(entity.lower().replace("'", " ").split())
    scored = [(len(words & set(title.lower().replace("'", " ").split())), title) for title in DOCUMENTS]
    score, title = max(scored)
    return DOCUMENTS[title] if score else f"No article for {entity!r}; try one of {sorted(DOCUMENTS)}."


@dataclass
class Request:
    """One model request of the workflow: which role sent it and how much of its prompt came from the cache."""

    role: str
    prompt_tokens: int
    cached_tokens: int


@dataclass
class Summary:
    """What a workflow did: the answer, the tool calls it ran (name, arguments) and what each returned, every
    request, the plan and the verdict."""

    answer: str | None = None
    tool_calls: list[tuple[str, dict]] = field(default_factory=list)
    observations: list[str] = field(default_factory=list)  # the tools' results, one per call
    requests: list[Request] = field(default_factory=list)
    plan: str = ""
    reflection: str = ""

    def report(self) -> str:
        lines = [f"plan: {self.plan.strip()[:80]!r}"]
        lines += [f"tool call: {n}({a}) -> {o[:60]!r}" for (n, a), o in zip(self.tool_calls, self.observations)]
        lines += [f"answer: {self.answer!r}", f"reflect: {self.reflection.strip()[:80]!r}"]
        lines += [
            f"  {r.role:>7}: {r.prompt_tokens:4d} prompt tokens, {r.cached_tokens:4d} cached" for r in self.requests
        ]
        return "\n".join(lines)


def cli(main: Callable[..., Summary], description: str) -> None:
    """`python examples/<framework>_roles.py --base-url ...`: run the workflow once and print its summary."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--base-url", default="http://127.0.0.1:8000/v1", help="the server's /v1 URL")
    parser.add_argument("--api-key", default="none")
    parser.add_argument("--max-tokens", type=int, default=32, help="per free-text turn (plan, reflect)")
    args = parser.parse_args()
    print(main(args.base_url, api_key=args.api_key, max_tokens=args.max_tokens).report())
