"""Import rules: an acyclic core in layers, applications on top.

Every .py file under lragent/ is parsed with `ast`; every `import` / `from ... import` counts, wherever it sits
(module top, inside a function, under `if TYPE_CHECKING:`). TYPE_CHECKING-only imports are NOT exempt: an annotation
that names a higher layer's type is the same coupling as a runtime import (with `from __future__ import annotations`
most imports are annotation-only anyway). The way out is a Protocol in the lower layer or moving the type down into a
leaf module, as was done for `ModelConfig` (lragent/model_config.py) and the answer scoring (lragent/agents/scoring.py).

Nodes are the packages and top-level modules of lragent (`cache`, `engine`, `llm`, ...); `lragent/__init__.py` is
the node `lragent`, and `from lragent import LLM` is an edge to it. Rules:

  (a) the core never imports an application;
  (b) the package graph (core and applications) has no cycle;
  (c) inside the core, a module imports only strictly lower layers (CORE_LAYERS, lowest first).

A new package or top-level module must be placed in CORE_LAYERS or APPLICATIONS, or this test fails.
"""

from __future__ import annotations

import ast
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1] / "lragent"
PKG = "lragent"

# Lowest first. `config` (EngineConfig) sits directly above `cache` because it validates the sharing-mode name against
# cache/sharing.py's scheme registry; everything from `lora` up may read the frozen EngineConfig. The root package
# (lragent/__init__.py, the public API re-exports) is the top of the core.
CORE_LAYERS: tuple[tuple[str, ...], ...] = (
    ("model_config", "sampling"),  # leaf value types: import nothing from lragent
    ("cache",),  # block pool, prefix hashes, KV pools, sharing schemes
    ("config",),  # EngineConfig
    ("lora",),  # adapters, registry, LoRA bank
    ("kernels",),  # attention backends, Triton kernels (TritonLoRABank extends lora.LoRABank)
    ("models",),  # architectures, loading
    ("quant",),  # weight transforms after loading (FP8 weights)
    ("distributed",),  # tensor parallelism: sharding the model, its config and adapters over ranks
    ("engine",),  # scheduler, block manager, model runner, LLMEngine
    ("llm",),  # the LLM API
    (PKG,),  # lragent/__init__.py
)
# On top of the core; they may import the core and each other, without cycles. `adapters` is the data package of
# shipped adapters; `engine_args` is the CLI-flags -> EngineConfig helper shared by the command-line applications.
APPLICATIONS = frozenset(
    {"server", "agents", "eval", "bench", "train", "demo", "cli", "adapters", "engine_args", "async_llm"}
)

RANK = {name: rank for rank, layer in enumerate(CORE_LAYERS) for name in layer}


@dataclass(frozen=True)
class Edge:
    src: str  # package of the importing file
    dst: str  # package of the imported module
    where: str  # "lragent/x/y.py:12 lragent.z.w"


def _module_name(path: Path) -> str:
    parts = (PKG, *path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _node(module: str) -> str | None:
    """Package-level node of a dotted module name inside lragent, or None for third-party modules."""
    parts = module.split(".")
    if parts[0] != PKG:
        return None
    return parts[1] if len(parts) > 1 else PKG


def _is_submodule(dotted: str) -> bool:
    rel = Path(*dotted.split(".")[1:])
    return (ROOT / rel).with_suffix(".py").is_file() or (ROOT / rel / "__init__.py").is_file()


def imported_modules(source: str, module: str, is_package: bool) -> list[tuple[int, str]]:
    """(line, dotted module) of every import in `source`, at any depth (functions, TYPE_CHECKING blocks)."""
    found: list[tuple[int, str]] = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolve against the importing module's package
                base = module.split(".") if is_package else module.split(".")[:-1]
                base = base[: len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            for alias in node.names:
                # `from lragent import engine` imports a package; `from lragent import LLM` an attribute of lragent
                sub = f"{target}.{alias.name}"
                found.append((node.lineno, sub if _node(sub) and _is_submodule(sub) else target))
    return found


def package_edges() -> list[Edge]:
    edges = []
    for path in sorted(ROOT.rglob("*.py")):
        module = _module_name(path)
        src = _node(module)
        for line, target in imported_modules(path.read_text(), module, path.name == "__init__.py"):
            dst = _node(target)
            if dst is not None and dst != src:
                edges.append(Edge(src, dst, f"{path.relative_to(ROOT.parent)}:{line} {target}"))
    return edges


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of `graph` as a path [a, b, ..., a], or None when the graph is acyclic."""
    state: dict[str, int] = {}  # 1: on the DFS stack, 2: done
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt) :] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        stack.pop()
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state and (cycle := visit(start)):
            return cycle
    return None


def layer_violations(edges: list[Edge]) -> list[str]:
    """Core edges that do not go strictly down the layers (same-layer imports included)."""
    return [
        f"{e.where}: {e.src} (layer {RANK[e.src]}) imports {e.dst} (layer {RANK[e.dst]})"
        for e in edges
        if e.src in RANK and e.dst in RANK and RANK[e.dst] >= RANK[e.src]
    ]


def _graph(edges: list[Edge]) -> dict[str, set[str]]:
    graph: dict[str, set[str]] = defaultdict(set)
    for e in edges:
        graph[e.src].add(e.dst)
    return graph


@pytest.fixture(scope="module")
def edges() -> list[Edge]:
    return package_edges()


def test_every_package_is_classified():
    nodes = {_node(_module_name(p)) for p in ROOT.rglob("*.py")}
    unknown = sorted(n for n in nodes if n not in RANK and n not in APPLICATIONS)
    assert not unknown, f"place these in CORE_LAYERS or APPLICATIONS of {Path(__file__).name}: {unknown}"


def test_parser_sees_the_known_dependencies(edges):
    # guards against a walker that silently finds nothing (which would make the rules below pass vacuously)
    pairs = {(e.src, e.dst) for e in edges}
    assert {("engine", "models"), ("models", "kernels"), ("llm", "engine"), (PKG, "llm"), ("server", "engine")} <= pairs


def test_core_imports_no_application(edges):
    bad = [
        f"{e.where}: core {e.src} imports application {e.dst}" for e in edges if e.src in RANK and e.dst in APPLICATIONS
    ]
    assert not bad, "\n".join(bad)


def test_package_graph_has_no_cycle(edges):
    cycle = find_cycle(_graph(edges))
    if cycle:
        hops = zip(cycle, cycle[1:])
        detail = [next(e.where for e in edges if (e.src, e.dst) == hop) for hop in hops]
        pytest.fail("import cycle " + " -> ".join(cycle) + "\n" + "\n".join(detail))


def test_core_layers_point_down(edges):
    bad = layer_violations(edges)
    assert not bad, "\n".join(bad)


def test_leaf_value_types_import_nothing_from_lragent(edges):
    bad = [e.where for e in edges if e.src in CORE_LAYERS[0]]
    assert not bad, "\n".join(bad)


# --- the checks above can fail: the same functions on synthetic input ------------------------------------------


def test_self_check_cycle_finder():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"x": {"y"}, "y": {"z"}, "z": {"y"}}) == ["y", "z", "y"]
    assert find_cycle({"agents": {"eval"}, "eval": {"agents"}}) == ["agents", "eval", "agents"]


def test_self_check_layer_rule():
    up = Edge("cache", "models", "synthetic")
    down = Edge("models", "cache", "synthetic")
    same = Edge("model_config", "sampling", "synthetic")
    assert [v.split(":")[0] for v in layer_violations([up, down, same])] == ["synthetic", "synthetic"]


def test_self_check_parser_finds_lazy_type_checking_and_relative_imports():
    source = (
        "from typing import TYPE_CHECKING\n"
        "import torch\n"
        "if TYPE_CHECKING:\n"
        "    from lragent.engine.llm_engine import LLMEngine\n"
        "def f():\n"
        "    from lragent.server import app\n"
        "    import lragent.bench.trace\n"
        "from lragent import LLM, engine\n"
        "from ..models import llama\n"
        "from . import block_pool\n"
    )
    found = imported_modules(source, "lragent.cache.kv_cache", is_package=False)
    assert sorted((line, _node(m)) for line, m in found if _node(m)) == [
        (4, "engine"),
        (6, "server"),
        (7, "bench"),
        (8, "engine"),
        (8, PKG),
        (9, "models"),
        (10, "cache"),
    ]
