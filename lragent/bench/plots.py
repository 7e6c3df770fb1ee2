"""PNG plots of a `lragent bench trace` result: throughput and TTFT against trajectory length, one line per system.

`python -m lragent.bench.plots results/trace/trace.json [out_dir]` redraws them from the JSON (for runs made on a
machine without matplotlib).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

COLORS = {
    "non_shared": "C3",
    "full_shared": "C1",
    "base_shared": "C2",
    "base_lr_shared": "C0",
    "hf_non_shared": "C5",
    "hf_full_shared": "C4",
}


def _fmt_tokens(n: float) -> str:
    return f"{n / 1000:.1f}k" if n >= 1000 else f"{n:.0f}"


def plot_results(result: dict, out_dir: str | Path) -> list[str]:
    """Write throughput.png and ttft.png (one per concurrency level > 1 as well); returns the paths written."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = [r for r in result["rows"] if r.get("status") == "ok"]
    written = []
    for k in sorted({r["concurrent"] for r in rows}):
        suffix = "" if k == 1 else f"_k{k}"
        for metric, label, fname in (
            ("throughput_tok_s", "throughput (tokens / s)", f"throughput{suffix}.png"),
            ("ttft_s", "TTFT, sum of prefill latencies (s)", f"ttft{suffix}.png"),
        ):
            fig, ax = plt.subplots(figsize=(7, 4.5))
            systems = list(dict.fromkeys(r["system"] for r in rows if r["concurrent"] == k))
            for i, system in enumerate(systems):
                pts = sorted(
                    (r["total_tokens"], r[metric])
                    for r in rows
                    if r["system"] == system and r["concurrent"] == k and r.get(metric)
                )
                if pts:
                    style = "--" if system.startswith("hf_") else "-"
                    ax.plot(
                        [p[0] for p in pts],
                        [p[1] for p in pts],
                        style,
                        marker="o",
                        label=system,
                        color=COLORS.get(system, f"C{i}"),
                    )
            ax.set_xscale("log")
            ax.set_yscale("log")
            ticks = sorted({r["total_tokens"] for r in rows if r["concurrent"] == k})
            ax.set_xticks(ticks)
            ax.set_xticklabels([_fmt_tokens(t) for t in ticks])
            ax.minorticks_off()
            ax.set_xlabel("trajectory length (tokens)")
            ax.set_ylabel(label + (f", {k} concurrent" if k > 1 else ""))
            meta = result.get("meta", {})
            ax.set_title(
                f"{meta.get('model', '')} on {meta.get('device_name', '')}"
                + (" (random weights)" if meta.get("random_weights") else ""),
                fontsize=9,
            )
            ax.grid(True, which="both", alpha=0.3)
            ax.legend(fontsize=8)
            fig.tight_layout()
            path = out_dir / fname
            fig.savefig(path, dpi=110)
            plt.close(fig)
            written.append(str(path))
    return written


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv:
        print("usage: python -m lragent.bench.plots RESULT.json [OUT_DIR]")
        return 2
    path = Path(argv[0])
    for p in plot_results(json.loads(path.read_text()), argv[1] if len(argv) > 1 else path.parent):
        print(p)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
