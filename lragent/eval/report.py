"""Output of an evaluation: a table on the terminal, eval.json and a bar chart eval.png."""

from __future__ import annotations

import gzip
import json
from collections.abc import Sequence
from dataclasses import asdict, fields
from pathlib import Path

from lragent.eval.runner import EvalReport, RunSummary

COLUMNS = (
    ("dataset", "dataset", "{}"),
    ("adapters", "adapters", "{}"),
    ("scheme", "scheme", "{}"),
    ("n", "n", "{}"),
    ("accuracy", "acc %", "{:.1f}"),
    ("f1", "F1 %", "{:.1f}"),
    ("out_of_function", "OOF %", "{:.1f}"),
    ("time_limited", "cut %", "{:.1f}"),
    ("mean_iterations", "iters", "{:.1f}"),
    ("reuse_ratio", "reused %", "{:.1%}"),
    ("computed_tokens", "computed tok", "{}"),
    ("ttft_s", "TTFT s", "{:.2f}"),
    ("wall_s", "wall s", "{:.1f}"),
)


def table_rows(summaries: list[RunSummary]) -> tuple[list[str], list[list[str]]]:
    header = [title for _, title, _ in COLUMNS]
    rows = [[fmt.format(getattr(s, key)) for key, _, fmt in COLUMNS] for s in summaries]
    return header, rows


def format_table(summaries: list[RunSummary]) -> str:
    """Plain fixed-width table (also what `print_table` falls back to without rich)."""
    header, rows = table_rows(summaries)
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(header)]
    line = lambda cells: "  ".join(c.rjust(w) if i >= 3 else c.ljust(w) for i, (c, w) in enumerate(zip(cells, widths)))  # noqa: E731
    return "\n".join([line(header), line(["-" * w for w in widths]), *(line(r) for r in rows)])


def print_table(summaries: list[RunSummary]) -> None:
    try:
        from rich.console import Console  # noqa: PLC0415
        from rich.table import Table  # noqa: PLC0415
    except ImportError:
        print(format_table(summaries))
        return
    header, rows = table_rows(summaries)
    table = Table(title="agent accuracy per sharing scheme")
    for i, h in enumerate(header):
        table.add_column(h, justify="right" if i >= 3 else "left")
    for r in rows:
        table.add_row(*r)
    Console().print(table)


def write_json(report: EvalReport, path: Path) -> None:
    payload = {"spec": report.spec, "summaries": [asdict(s) for s in report.summaries], "questions": report.questions}
    path.write_text(json.dumps(payload, indent=1, default=str), encoding="utf-8")


def write_chart(summaries: list[RunSummary], path: Path) -> None:
    """Grouped bars: accuracy (left) and prompt-token reuse (right) per scheme, one group per dataset/adapter set."""
    import matplotlib  # noqa: PLC0415

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    group_of = lambda s: f"{s.dataset.replace('+', '+' + chr(10))}\n{s.adapters}"  # noqa: E731 (pooled files: one per line)
    groups = list(dict.fromkeys(group_of(s) for s in summaries))
    schemes = list(dict.fromkeys(s.scheme for s in summaries))
    width = 0.8 / max(len(schemes), 1)
    fig, axes = plt.subplots(1, 2, figsize=(max(8, 2.5 * len(groups) + 4), 4.5))
    for ax, key, label in ((axes[0], "accuracy", "accuracy (%)"), (axes[1], "reuse_ratio", "prompt tokens reused")):
        for j, scheme in enumerate(schemes):
            values = []
            for g in groups:
                match = [s for s in summaries if group_of(s) == g and s.scheme == scheme]
                values.append(getattr(match[0], key) if match else 0.0)
            xs = [i + (j - (len(schemes) - 1) / 2) * width for i in range(len(groups))]
            bars = ax.bar(xs, values, width, label=scheme)
            ax.bar_label(bars, fmt="%.1f" if key == "accuracy" else "%.2f", fontsize=7)
        ax.set_xticks(range(len(groups)), groups, fontsize=8)
        ax.set_ylabel(label)
    axes[0].legend(fontsize=8)
    fig.suptitle("AutoAct pipeline per KV sharing scheme")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_report(report: EvalReport, out_dir: str | Path, stem: str = "eval") -> dict[str, Path]:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / f"{stem}.json", "png": out / f"{stem}.png"}
    write_json(report, paths["json"])
    if report.summaries:
        write_chart(report.summaries, paths["png"])
    else:
        paths.pop("png")
    return paths


def load_report(path: str | Path) -> EvalReport:
    """An eval.json (or eval.json.gz) written by `write_report` back into an EvalReport."""
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8") as f:
        data = json.load(f)
    if not isinstance(data, dict) or "summaries" not in data:
        raise ValueError(f"{path}: not an eval.json (no 'summaries')")
    known = {f.name for f in fields(RunSummary)}
    summaries = [RunSummary(**{k: v for k, v in s.items() if k in known}) for s in data["summaries"]]
    return EvalReport(spec=data.get("spec", {}), summaries=summaries, questions=data.get("questions", []))


def merge_reports(paths: Sequence[str | Path]) -> EvalReport:
    """Several eval.json files (e.g. one per scheme, run as separate processes) as one report: summaries and
    questions concatenated in the order given, the specs kept as a list under `merged`."""
    reports = [load_report(p) for p in paths]
    if not reports:
        raise ValueError("nothing to merge")
    return EvalReport(
        spec={"merged": [{"path": str(p), **r.spec} for p, r in zip(paths, reports)]},
        summaries=[s for r in reports for s in r.summaries],
        questions=[q for r in reports for q in r.questions],
    )
