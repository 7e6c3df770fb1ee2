"""Output of an evaluation: a table on the terminal, eval.json, eval.md (every column) and a bar chart eval.png.

The terminal table (80 columns) has one block per question file and adapter set and one row per scheme: accuracy
with its 95% bootstrap CI over questions (pooled over seeds), the paired delta to non_shared with its CI, the rates of
questions without an answer (OOF) and halted at the iteration cap, and, when an `lragent analyze` report is given,
its handoff fidelity (greedy next-token agreement and KL to non_shared), the sensitive measure of a scheme's error.
The noise-control row (non_shared under other seeds) shows how large a delta run-to-run noise alone makes.
"""

from __future__ import annotations

import gzip
import json
from collections.abc import Sequence
from dataclasses import asdict, fields, replace
from pathlib import Path

from lragent.eval.runner import EvalReport, RunSummary
from lragent.eval.stats import (
    GREEDY_SUFFIX,
    NOISE_LABEL,
    SPANS_SUFFIX,
    SchemeStats,
    attach_fidelity,
    base_label,
    scheme_stats,
    variant,
)
from lragent.eval.tables import markdown, render

COLUMNS = (
    ("dataset", "dataset", "{}"),
    ("adapters", "adapters", "{}"),
    ("scheme", "scheme", "{}"),
    ("n", "n", "{}"),
    ("accuracy", "acc %", "{:.1f}"),
    ("f1", "F1 %", "{:.1f}"),
    ("seed", "seed", "{}"),
    ("out_of_function", "OOF %", "{:.1f}"),
    ("capped", "cap %", "{:.1f}"),
    ("forced", "forced %", "{:.1f}"),
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
    """The per-run table (one row per file x adapter set x scheme x seed); wide, see `print_summary` for 80 columns."""
    print(format_table(summaries))


def _ci(ci: tuple[float, float] | None, signed: bool = False) -> str:
    if ci is None:
        return "-"
    f = "{:+.0f}" if signed else "{:.0f}"
    return "[" + f.format(ci[0]) + "," + f.format(ci[1]) + "]"


def _kl(kl: float | None) -> str:
    if kl is None:
        return "-"
    return f"{kl:.4f}" if kl == 0 or kl >= 1e-3 else f"{kl:.0e}"


SHORT_VARIANTS = {SPANS_SUFFIX: "/s", GREEDY_SUFFIX: "/g"}


def short_label(label: str) -> str:
    """A run label in the terminal's scheme column: the noise control as "ns reseed", variants as "/s", "/g"."""
    base, var = base_label(label), variant(label)
    for long, short in SHORT_VARIANTS.items():
        var = var.replace(long, short)
    return ("ns reseed" if base == NOISE_LABEL else base) + var


NOTES = (
    "acc: % correct, 95% bootstrap CI over questions (seeds pooled); Δ: paired difference to non_shared; "
    "ns reseed: non_shared under other seeds (noise control: a scheme's Δ means little unless it exceeds this "
    "row's); /g: greedy decoding (paired with non_shared/g); /s: HotpotQA answers scored among observed spans "
    "(paired with non_shared/s); OOF: no answer; cap: iteration cap hit; agree/KL: "
    "lragent analyze's next-token agreement and KL to non_shared."
)
KEY_HEADER = ["scheme", "acc %", "95% CI", "Δ acc", "Δ 95% CI", "OOF %", "cap %", "agree%", "KL"]


def key_row(r: SchemeStats) -> list[str]:
    """The terminal's columns of one scheme (see KEY_HEADER)."""
    return [
        short_label(r.scheme),
        f"{r.accuracy:.1f}",
        _ci(r.ci),
        "-" if r.delta is None else f"{r.delta:+.1f}",
        _ci(r.delta_ci, signed=True),
        f"{r.out_of_function:.0f}",
        f"{r.capped:.0f}",
        "-" if r.agreement is None else f"{r.agreement:.1f}",
        _kl(r.kl),
    ]


def summary_stats(report: EvalReport, fidelity: dict | None = None) -> list[SchemeStats]:
    rows = scheme_stats(report.questions)
    if fidelity:
        attach_fidelity(rows, fidelity)
    return rows


def format_summary(rows: list[SchemeStats], width: int = 80) -> str:
    """One block per (file, adapter set): at most `width` characters a line."""
    blocks = []
    groups = list(dict.fromkeys((r.dataset, r.adapters) for r in rows))
    for dataset, adapters in groups:
        members = [r for r in rows if (r.dataset, r.adapters) == (dataset, adapters)]
        seeds = max(len(r.seeds) for r in members)
        title = f"{dataset} | {adapters} | {members[0].n} questions x {seeds} seed(s)"
        right = [False] + [True] * (len(KEY_HEADER) - 1)
        blocks.append(render(KEY_HEADER, [key_row(r) for r in members], width, right, title))
    return "\n\n".join(blocks) + "\n" + _wrap(NOTES, width)


def _wrap(text: str, width: int) -> str:
    import textwrap  # noqa: PLC0415

    return "\n".join(textwrap.wrap(text, width))


def print_summary(report: EvalReport, fidelity: dict | None = None, width: int = 80) -> str:
    """Print the 80-column summary (and return it)."""
    text = format_summary(summary_stats(report, fidelity), width)
    print(text)
    return text


FULL_HEADER = [
    "dataset",
    "adapters",
    "scheme",
    "seeds",
    "n",
    "acc %",
    "95% CI",
    "Δ acc",
    "Δ 95% CI",
    "OOF %",
    "cap %",
    "forced %",
    "agree %",
    "KL",
]


def full_rows(rows: list[SchemeStats]) -> list[list[str]]:
    return [
        [
            r.dataset,
            r.adapters,
            r.scheme,
            " ".join(map(str, r.seeds)),
            str(r.n),
            f"{r.accuracy:.1f}",
            _ci(r.ci),
            "-" if r.delta is None else f"{r.delta:+.1f}",
            _ci(r.delta_ci, signed=True),
            f"{r.out_of_function:.1f}",
            f"{r.capped:.1f}",
            f"{r.forced:.1f}",
            "-" if r.agreement is None else f"{r.agreement:.2f}",
            _kl(r.kl),
        ]
        for r in rows
    ]


def write_markdown(report: EvalReport, path: Path, fidelity: dict | None = None) -> None:
    """eval.md: the per-scheme table with every column, then every run."""
    stats = summary_stats(report, fidelity)
    header, runs = table_rows(report.summaries)
    text = (
        "# Agent accuracy per sharing scheme\n\n"
        + markdown(FULL_HEADER, full_rows(stats))
        + "\n"
        + NOTES
        + "\n\n## Every run\n\n"
        + markdown(header, runs)
    )
    path.write_text(text, encoding="utf-8")


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
                values.append(sum(getattr(m, key) for m in match) / len(match) if match else 0.0)  # mean over seeds
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


def write_report(
    report: EvalReport, out_dir: str | Path, stem: str = "eval", fidelity: dict | None = None
) -> dict[str, Path]:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / f"{stem}.json", "md": out / f"{stem}.md", "png": out / f"{stem}.png"}
    write_json(report, paths["json"])
    write_markdown(report, paths["md"], fidelity)
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


def merge_reports(paths: Sequence[str | Path], max_time_limited: float = 100.0) -> EvalReport:
    """Several eval.json files (e.g. one per scheme, run as separate processes) as one report: summaries and
    questions concatenated in the order given, the specs kept as a list under `merged`.

    A run (adapter set, scheme, seed) found in several files is kept once, from the file where the time limit
    halted the fewest of its questions (a rerun supersedes a run cut short, whichever file comes first); a run that
    still has more than `max_time_limited` % halted in one of its datasets is left out (halted questions count as
    wrong), and the spec lists it under `dropped`."""
    reports = [_greedy_labelled(load_report(p)) for p in paths]
    if not reports:
        raise ValueError("nothing to merge")
    worst: dict[tuple, float] = {}  # (run, file index) -> the run's worst % halted over its datasets in that file
    for i, r in enumerate(reports):
        for s in r.summaries:
            key = ((s.adapters, s.scheme, s.seed), i)
            worst[key] = max(worst.get(key, 0.0), s.time_limited)
    chosen: dict[tuple, tuple[float, int]] = {}  # run -> (% halted, file index): fewest halted, ties the first file
    for (run, i), pct in worst.items():
        chosen[run] = min(chosen.get(run, (pct, i)), (pct, i))
    keep = {run: i for run, (pct, i) in chosen.items() if pct <= max_time_limited}
    dropped = [dict(zip(("adapters", "scheme", "seed"), run), time_limited=pct)
               for run, (pct, _) in chosen.items() if run not in keep]  # fmt: skip
    return EvalReport(
        spec={"merged": [{"path": str(p), **r.spec} for p, r in zip(paths, reports)], "dropped": dropped},
        summaries=[
            s for i, r in enumerate(reports) for s in r.summaries if keep.get((s.adapters, s.scheme, s.seed)) == i
        ],
        questions=[q for i, r in enumerate(reports) for q in r.questions if keep.get(_run_key(q)) == i],
    )


def _run_key(question: dict) -> tuple:
    """One process's run, over all its datasets: (adapter set, scheme, seed) of a question's record."""
    return (question.get("adapters"), question.get("scheme"), question.get("seed", 0))


def _greedy_labelled(report: EvalReport) -> EvalReport:
    """A greedy report written before greedy runs were labelled `<scheme>/greedy`: its labels get the suffix, so a
    merge with sampled runs of the same seeds keeps them apart (`lragent.eval.runner.EvalSpec.runs`)."""
    if not report.spec.get("pipeline", {}).get("greedy"):
        return report

    def label(scheme: str) -> str:
        return scheme if scheme.endswith(GREEDY_SUFFIX) else scheme + GREEDY_SUFFIX

    return EvalReport(
        spec=report.spec,
        summaries=[replace(s, scheme=label(s.scheme)) for s in report.summaries],
        questions=[{**q, "scheme": label(str(q.get("scheme", "")))} for q in report.questions],
    )
