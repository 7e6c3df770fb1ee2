"""Plain-text tables that fit a terminal: the terminal gets the key columns, a file gets all of them.

Rich tables shrink every column to fit and cut headers to "ho… no…"; here the caller picks columns short enough for
80 characters and :func:`render` only shortens cells (with "…", widest column first) when they still do not fit.
"""

from __future__ import annotations

from collections.abc import Sequence

WIDTH = 80
GAP = "  "


def _cut(text: str, width: int) -> str:
    return text if len(text) <= width else text[: max(width - 1, 0)] + "…"


def render(
    header: Sequence[str],
    rows: Sequence[Sequence[str]],
    width: int = WIDTH,
    right: Sequence[bool] | None = None,
    title: str | None = None,
) -> str:
    """The table as text lines no longer than ``width`` (title, header, rule, rows); ``right[i]`` right-aligns
    column i. Columns are shrunk widest first, down to 3 characters, when the natural widths do not fit."""
    right = list(right) if right is not None else [False] * len(header)
    widths = [max([len(h), *(len(r[i]) for r in rows)]) for i, h in enumerate(header)]
    budget = width - len(GAP) * (len(header) - 1)
    while sum(widths) > budget and max(widths) > 3:
        widths[widths.index(max(widths))] -= 1

    def line(cells: Sequence[str]) -> str:
        parts = [
            _cut(c, w).rjust(w) if r else _cut(c, w).ljust(w) for c, w, r in zip(cells, widths, right, strict=True)
        ]
        return GAP.join(parts).rstrip()

    lines = [_cut(title, width)] if title else []
    lines += [line(header), GAP.join("-" * w for w in widths)]
    lines += [line(r) for r in rows]
    return "\n".join(lines)


def markdown(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """The full table for a file (no width limit)."""
    out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    return "\n".join(out + ["| " + " | ".join(r) + " |" for r in rows]) + "\n"
