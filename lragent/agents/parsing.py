"""Parsers for the three roles' outputs. Every parser returns None on junk; the pipeline counts those failures.

Role outputs are single lines (decoding stops at a newline), in the training data's shapes:
  plan thought  : "The Terracotta Army was buried with ..."            -> parse_thought
  plan tool     : "BingSearch[" / "Finish" / "Action: Lookup[" / "None" -> parse_tool (canonical name or None)
  action        : "Terracotta Army]" / "D]" / "Qin dynasty"              -> parse_argument (text up to the first "]")
  reflect       : "Reflect[right]" / "Reflect[wrong]." / "Reflect[?]"    -> parse_reflect ("right" / "wrong" / None)
"""

from __future__ import annotations

import re

TOOLS = ("BingSearch", "Retrieve", "Lookup", "Image2Text", "Finish", "Reflect")

# Lower-cased, space-free spellings seen in the data or plausible from a small model.
_ALIASES = {t.lower(): t for t in TOOLS} | {
    "search": "BingSearch",
    "bing": "BingSearch",
    "websearch": "BingSearch",
    "image2txt": "Image2Text",
    "imagetotext": "Image2Text",
    "image2text": "Image2Text",
    "lookfor": "Lookup",
    "answer": "Finish",
}

# Labels a model may echo in front of its output ("Action 3:", "Aciton:", "### Response:", "Thought:").
_LABEL = re.compile(r"^\s*(?:#+\s*Response\s*:|(?:Thought|Action|Aciton|Act)\s*\d*\s*:)\s*", re.IGNORECASE)
# Where a thought stops if the model runs on into the next field on the same line.
_FIELD_START = re.compile(r"\s*(?:\bA(?:ction|citon)\s*\d*\s*:|\bOb(?:servation|versation)\s*\d*\s*:|#{2,}\s*Response)")


def _strip_labels(text: str) -> str:
    prev = None
    while prev != text:
        prev, text = text, _LABEL.sub("", text, count=1)
    return text.strip()


def parse_thought(text: str | None) -> str | None:
    """The plan/reflect thought: the line without echoed labels, cut where another field starts. '' -> None."""
    if text is None:
        return None
    line = _strip_labels(text.split("\n", 1)[0])
    m = _FIELD_START.search(line)
    if m:
        line = line[: m.start()]
    line = line.strip()
    return line or None


def canonical_tool(word: str) -> str | None:
    """'bingsearch' / 'Bing Search' / 'IMAGE2TEXT' -> canonical tool name; unknown -> None."""
    return _ALIASES.get(re.sub(r"[\s_\-]", "", word).lower())


def tool_word(text: str | None) -> str | None:
    """The identifier the plan wrote as its tool (known or not), e.g. 'Refresh' for 'Refresh['. None if none."""
    if text is None:
        return None
    line = _strip_labels(text.split("\n", 1)[0])
    m = re.match(r"([A-Za-z][A-Za-z0-9_]*(?: [A-Za-z][A-Za-z0-9_]*)?)\s*(?:\[|$|[.:,])", line)
    if not m:
        m = re.match(r"([A-Za-z][A-Za-z0-9_]*)", line)
    return m.group(1) if m else None


def parse_tool(text: str | None, allowed: tuple[str, ...] = TOOLS) -> str | None:
    """Canonical tool name from a plan output, restricted to `allowed`; None for junk or a tool not allowed.

    Tries the leading word first ("BingSearch[", "Finish", "Aciton: Lookup["), then the first `Tool[` anywhere.
    """
    if text is None:
        return None
    word = tool_word(text)
    if word is not None:
        tool = canonical_tool(word)
        if tool is not None:
            return tool if tool in allowed else None
    m = re.search(r"\b(" + "|".join(TOOLS) + r")\s*\[", text, re.IGNORECASE)
    if m:
        tool = canonical_tool(m.group(1))
        return tool if tool in allowed else None
    return None


def inline_argument(text: str | None) -> str | None:
    """The argument when the plan wrote a whole call, e.g. 'Reflect[right]' -> 'right'; else None."""
    if text is None:
        return None
    m = re.search(r"\[([^\[\]\n]*)\]", text)
    return m.group(1).strip() if m and m.group(1).strip() else None


def parse_argument(text: str | None) -> str | None:
    """The action output's argument: text up to the first ']' (the trajectory supplies the '[').

    'Terracotta Army]' -> 'Terracotta Army'; 'D]' -> 'D'; a missing ']' (max tokens hit) keeps the whole line;
    echoed labels and a repeated 'Tool[' prefix are dropped; empty -> None.
    """
    if text is None:
        return None
    line = _strip_labels(text.split("\n", 1)[0])
    m = re.match(r"(?:" + "|".join(TOOLS) + r")\s*\[(.*)$", line, re.IGNORECASE)  # model repeated "Retrieve["
    if m:
        line = m.group(1)
    line = line.split("]", 1)[0].strip()
    line = line.strip("\"'`").strip()
    return line or None


def reflect_call(text: str | None) -> str | None:
    """The argument of a ``Reflect[...]`` call on the output's first line ('Reflect[yes].' -> 'yes'), else None.

    The AutoAct environment that generated the training data accepts only ``right``: after a Finish, every other
    argument (``yes``, ``right/wrong``, ``?``) is answered with "The answer maybe wrong..." (checked on the data)."""
    if text is None:
        return None
    m = re.search(r"Reflect\s*\[([^\]\n]*)\]", text.split("\n", 1)[0], re.IGNORECASE)
    return m.group(1).strip() if m else None


_RIGHT = {"right", "correct", "yes", "true"}
_WRONG = {"wrong", "incorrect", "no", "false"}


def parse_reflect(text: str | None, lenient: bool = True) -> str | None:
    """Reflect verdict: 'Reflect[right]' -> 'right', 'Reflect[wrong].' -> 'wrong'; 'Reflect[?]' / junk -> None.

    With `lenient`, a bare verdict word ('right', 'Correct.') or a plain sentence with exactly one polarity
    ('My answer is correct.', 'The answer is wrong') is accepted too.
    """
    if text is None:
        return None
    line = text.split("\n", 1)[0]
    m = re.search(r"Reflect\s*\[([^\]]*)\]?", line, re.IGNORECASE)
    if m:
        arg = m.group(1).strip().strip(".").lower()
        if arg in _RIGHT:
            return "right"
        if arg in _WRONG:
            return "wrong"
        return None
    if not lenient:
        return None
    words = re.findall(r"[a-z]+", _strip_labels(line).lower())
    negated = bool(re.search(r"\bnot\s+(?:correct|right)\b", line.lower()))
    pos = {w for w in words if w in ("right", "correct")} and not negated
    neg = {w for w in words if w in ("wrong", "incorrect")} or negated
    if len(words) == 1 and words[0] in _RIGHT | _WRONG:
        return "right" if words[0] in _RIGHT else "wrong"
    if pos and not neg:
        return "right"
    if neg and not pos:
        return "wrong"
    return None
