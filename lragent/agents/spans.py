"""Answer candidates for HotpotQA's Finish: spans of what the agent observed (`EpisodeConfig.score_spans`).

Why: on the embedded 135M model the tools find the gold answer in about half the episodes (it occurs in an
observation), yet the action agent's generated answer matches it in 3-20% of those, and mostly copies its own
search query (`benchmarks/hotpotqa_failure_modes.py`). Scoring the observation's spans instead, after the question
restated below the trajectory, turns the model into an extractive reader: EM 3.5% -> 11.2% on 170 saved H200
episodes (`benchmarks/answer_restated.py`). HotpotQA answers are mostly names, titles, dates and numbers; the
candidates are those: maximal capitalised runs with their inner connectors ("University of the Arts") and the
parts around "and", dates, numbers, later observations first, deduplicated by the EM normalisation, capped.
"""

from __future__ import annotations

import re

from lragent.agents.scoring import normalize_answer

MAX_SPANS = 60
_CAP = r"(?:(?:[A-Z]\.)+|[A-Z][\w'’\-]*(?:\.\w[\w'’\-]*)*)"
_CONN = r"(?:of|the|and|de|la|le|du|del|der|von|van|da|di)"
_MONTH = r"(?:January|February|March|April|May|June|July|August|September|October|November|December)"
_SPAN = re.compile(
    rf"\d{{1,2}} {_MONTH} \d{{4}}|{_MONTH} \d{{1,2}}, \d{{4}}|{_MONTH} \d{{4}}"
    rf"|{_CAP}(?: (?:{_CONN} )*{_CAP})*|\d[\d,.]*\d|\d"
)
YES_NO = ("yes", "no")  # comparison questions answer with these; they are never spans of an observation


def answer_spans(observations: list[str], cap: int = MAX_SPANS, extra: tuple[str, ...] = YES_NO) -> list[str]:
    """Candidate answers from the observations (later ones first), at most `cap` of them, then `extra` (each
    distinct under the EM normalisation)."""
    out: list[str] = []
    seen: set[str] = set()

    def add(text: str) -> None:
        key = normalize_answer(text)
        if key and key not in seen:
            seen.add(key)
            out.append(text)

    for obs in reversed(observations):
        for m in _SPAN.finditer(obs):
            span = re.sub(r"['’]s$", "", m.group(0).strip(" .,'’-"))
            for part in (span, *(span.split(" and ") if " and " in span else ())):
                if len(out) < cap:
                    add(part)
    for text in extra:
        add(text)
    return out
