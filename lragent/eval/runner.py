"""Accuracy evaluation: the agent pipeline over question files, for several sharing schemes and adapter sets.

    from lragent.eval.runner import EvalSpec, run_eval, write_report
    report = run_eval(EvalSpec(data=["hotpotqa_easy.jsonl"], schemes=["non_shared", "base_lr_shared"],
                               adapter_sets=find_adapter_sets(["lragent/adapters"])))
    write_report(report, "results/eval")       # eval.json + eval.png

One fresh LLM per (adapter set, scheme), so no cache state leaks between schemes; every question file whose task
the adapter set serves runs through it.
"""

from __future__ import annotations

import gc
import json
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from lragent.agents.episode import EpisodeResult
from lragent.agents.pipeline import PipelineConfig, detect_task, run_pipeline
from lragent.agents.tools import ToolConfig

ROLES = ("plan", "action", "reflect")
TASKS = ("hotpotqa", "scienceqa")
DEFAULT_ADAPTER_ROOT = Path(__file__).resolve().parents[1] / "adapters"


@dataclass(frozen=True)
class AdapterSet:
    """plan/action/reflect adapter folders; `task` is set when the set was trained for one task only."""

    name: str
    paths: dict[str, str]
    task: str | None = None

    def serves(self, task: str) -> bool:
        return self.task is None or self.task == task


def _is_set(d: Path) -> bool:
    return all((d / r).is_dir() for r in ROLES)


def _set_task(folder: Path, parts: Sequence[str]) -> str | None:
    """The task a set serves: from a `manifest.json` beside it (the shipped sets' index), else from a path
    component named `<task>` or `<task>-...` / `<task>_...`; None: any task."""
    manifest = folder.parent / "manifest.json"
    if manifest.is_file():
        try:
            entry = json.loads(manifest.read_text(encoding="utf-8")).get(folder.name, {})
        except (ValueError, AttributeError):
            entry = {}
        if isinstance(entry, dict) and entry.get("task") in TASKS:
            return entry["task"]
    for part in reversed([p.lower() for p in parts]):
        for task in TASKS:
            if part == task or part.startswith((task + "-", task + "_")):
                return task
    return None


def find_adapter_sets(roots: Sequence[str | Path], max_depth: int = 3) -> list[AdapterSet]:
    """Every folder (the roots themselves included, up to `max_depth` levels down) holding plan/, action/ and
    reflect/ subfolders. A path component named after a task (hotpotqa, scienceqa) restricts the set to it."""
    found: list[AdapterSet] = []
    for root in map(Path, roots):
        frontier = [(root, 0)]
        while frontier:
            d, depth = frontier.pop(0)
            if not d.is_dir():
                continue
            if _is_set(d):
                name = "/".join(d.relative_to(root).parts) if d != root else root.name
                parts = [root.name, *d.relative_to(root).parts]
                found.append(AdapterSet(name, {r: str(d / r) for r in ROLES}, _set_task(d, parts)))
            elif depth < max_depth:
                frontier.extend((c, depth + 1) for c in sorted(d.iterdir()) if c.is_dir())
    return found


def load_questions(path: str | Path, limit: int | None = None) -> tuple[str, list[dict]]:
    """A JSONL of HotpotQA or ScienceQA rows -> (task, rows[:limit]); the format is detected from the first row."""
    rows: list[dict] = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            if line.strip():
                rows.append(json.loads(line))
            if limit is not None and len(rows) >= limit:
                break
    if not rows:
        raise ValueError(f"{path}: no questions")
    task = detect_task(rows[0])
    bad = [i for i, r in enumerate(rows) if detect_task(r) != task]
    if bad:
        raise ValueError(f"{path}: rows {bad[:5]} are not {task} rows")
    return task, rows


@dataclass
class RunSummary:
    dataset: str
    task: str
    adapters: str
    scheme: str
    n: int
    accuracy: float  # % correct (EM for HotpotQA, option letter for ScienceQA)
    f1: float  # % mean F1 (HotpotQA; equals accuracy for ScienceQA)
    out_of_function: float  # % with no Finish within the iteration cap
    finished: float  # % ended by Reflect[right] / a second Finish
    mean_iterations: float
    agent_calls: int
    parse_failures: int
    prompt_tokens: int
    reused_tokens: int
    computed_tokens: int
    generated_tokens: int
    reuse_ratio: float  # reused / prompt tokens
    ttft_s: float  # sum over all agent calls
    wall_s: float  # the whole run (all questions, concurrently)


def summarize(results: Sequence[EpisodeResult], dataset: str, task: str, adapters: str, scheme: str,
              wall_s: float) -> RunSummary:
    n = max(len(results), 1)
    prompt = sum(r.prompt_tokens for r in results)
    reused = sum(r.reused_tokens for r in results)
    return RunSummary(
        dataset=dataset,
        task=task,
        adapters=adapters,
        scheme=scheme,
        n=len(results),
        accuracy=100.0 * sum(r.correct for r in results) / n,
        f1=100.0 * sum(r.f1 for r in results) / n,
        out_of_function=100.0 * sum(r.out_of_function for r in results) / n,
        finished=100.0 * sum(r.finished for r in results) / n,
        mean_iterations=sum(r.iterations for r in results) / n,
        agent_calls=sum(sum(r.calls.values()) for r in results),
        parse_failures=sum(sum(r.parse_failures.values()) for r in results),
        prompt_tokens=prompt,
        reused_tokens=reused,
        computed_tokens=sum(r.computed_tokens for r in results),
        generated_tokens=sum(r.generated_tokens for r in results),
        reuse_ratio=reused / prompt if prompt else 0.0,
        ttft_s=sum(r.ttft_s for r in results),
        wall_s=wall_s,
    )


@dataclass
class EvalSpec:
    data: list[str]
    schemes: list[str] = field(default_factory=lambda: ["base_lr_shared"])
    adapter_sets: list[AdapterSet] = field(default_factory=list)
    limit: int | None = None
    pipeline: PipelineConfig = field(default_factory=PipelineConfig)
    tools: ToolConfig = field(default_factory=ToolConfig)
    model: str = "smollm2-135m-instruct"
    device: str = "auto"
    force: bool = False  # allow base_lr_shared with adapters whose v_proj A differ
    engine_kwargs: dict[str, Any] = field(default_factory=dict)


@dataclass
class EvalReport:
    spec: dict
    summaries: list[RunSummary]
    questions: list[dict]  # per question: dataset, adapters, scheme and the EpisodeResult fields


LLMFactory = Callable[[EvalSpec, str, AdapterSet], Any]


def resolve_device(device: str) -> str:
    if device != "auto":
        return device
    import torch  # noqa: PLC0415

    return "cuda" if torch.cuda.is_available() else "cpu"


def default_llm_factory(spec: EvalSpec, scheme: str, adapters: AdapterSet) -> Any:
    from lragent import LLM  # noqa: PLC0415 (heavy import, only when really running)

    kwargs = dict(spec.engine_kwargs)
    if spec.force:
        kwargs["allow_unshared_a"] = True
    return LLM(model=spec.model, adapters=dict(adapters.paths), sharing=scheme, device=resolve_device(spec.device),
               **kwargs)


def _free_memory() -> None:
    gc.collect()
    try:
        import torch  # noqa: PLC0415

        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    except ImportError:
        pass


def _progress_logger(tag: str, total: int, log: Callable[[str], None], every: int = 10
                     ) -> Callable[[EpisodeResult], None]:
    t0, done = time.perf_counter(), []

    def progress(r: EpisodeResult) -> None:
        done.append(r.correct)
        if len(done) % every == 0 or len(done) == total:
            log(f"  {tag}: {len(done)}/{total} done, {sum(done)} correct ({time.perf_counter() - t0:.0f}s)")

    return progress


def run_eval(spec: EvalSpec, llm_factory: LLMFactory = default_llm_factory,
             log: Callable[[str], None] = print) -> EvalReport:
    datasets = [(Path(p).stem, *load_questions(p, spec.limit)) for p in spec.data]
    if not spec.adapter_sets:
        raise ValueError("no adapter sets: pass --adapters DIR (folders with plan/, action/, reflect/)")
    summaries, questions = [], []
    for aset in spec.adapter_sets:
        todo = [d for d in datasets if aset.serves(d[1])]
        if not todo:
            log(f"adapter set {aset.name} ({aset.task}) serves none of the question files; skipped")
            continue
        for scheme in spec.schemes:
            try:
                llm = llm_factory(spec, scheme, aset)
            except ValueError as e:  # AdapterError: e.g. base_lr_shared with unshared A and no --force
                log(f"{aset.name} | {scheme}: skipped: {e}")
                continue
            try:
                for name, task, rows in todo:
                    t0 = time.perf_counter()
                    progress = _progress_logger(f"{name} | {aset.name} | {scheme}", len(rows), log)
                    results = run_pipeline(llm, rows, spec.pipeline, spec.tools, progress=progress)
                    s = summarize(results, name, task, aset.name, scheme, time.perf_counter() - t0)
                    summaries.append(s)
                    log(f"{name} | {aset.name} | {scheme}: acc {s.accuracy:.1f}% f1 {s.f1:.1f}% "
                        f"oof {s.out_of_function:.1f}% reuse {100 * s.reuse_ratio:.1f}% wall {s.wall_s:.1f}s")
                    questions += [{"dataset": name, "adapters": aset.name, "scheme": scheme, **asdict(r)}
                                  for r in results]
            finally:
                del llm  # one engine (and its KV pool) at a time
                _free_memory()
    spec_dict = asdict(spec)
    return EvalReport(spec=spec_dict, summaries=summaries, questions=questions)
