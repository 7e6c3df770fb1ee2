"""Answer scoring: HotpotQA exact match / F1 and ScienceQA option-letter accuracy.

HotpotQA uses the standard SQuAD/HotpotQA normalisation (lowercase, drop punctuation, drop the articles
a/an/the, collapse whitespace) and the official F1 rule that a yes/no/noanswer mismatch scores 0.

ScienceQA is scored on the option letter. The HotpotQA normaliser must NOT be used there: it deletes the article
"a", so an empty prediction would equal the key "A". Predictions are mapped to a letter first ("B", "(B)",
"B. Dover", "Dover", "the answer is B"); anything empty or unmappable is wrong.
"""

from __future__ import annotations

import difflib
import re
import string
from collections import Counter
from dataclasses import dataclass

LETTERS = "ABCDEFGHIJ"
_PUNCT = set(string.punctuation)


def normalize_answer(s: str) -> str:
    """HotpotQA/SQuAD normalisation: lower, strip punctuation, articles and extra whitespace."""
    s = s.lower()
    s = "".join(ch for ch in s if ch not in _PUNCT)
    s = re.sub(r"\b(a|an|the)\b", " ", s)
    return " ".join(s.split())


def exact_match(prediction: str | None, gold: str) -> bool:
    """HotpotQA EM. An empty (or None) prediction is always wrong, even if the key normalises to ''."""
    if prediction is None or not prediction.strip():
        return False
    pred = normalize_answer(prediction)
    return bool(pred) and pred == normalize_answer(gold)


def f1_score(prediction: str | None, gold: str) -> float:
    """HotpotQA token F1 (official rule: yes/no/noanswer must match exactly)."""
    if prediction is None:
        return 0.0
    pred, ref = normalize_answer(prediction), normalize_answer(gold)
    special = ("yes", "no", "noanswer")
    if (pred in special or ref in special) and pred != ref:
        return 0.0
    pred_toks, ref_toks = pred.split(), ref.split()
    common = Counter(pred_toks) & Counter(ref_toks)
    same = sum(common.values())
    if same == 0:
        return 0.0
    precision, recall = same / len(pred_toks), same / len(ref_toks)
    return 2 * precision * recall / (precision + recall)


def _norm_option(s: str) -> str:
    """Option-text normalisation for ScienceQA: lower, no punctuation, single spaces. Articles are KEPT."""
    s = "".join(ch if ch not in _PUNCT else " " for ch in s.lower())
    return " ".join(s.split())


def _in_range(letter: str, n_choices: int) -> bool:
    return letter in LETTERS[: max(n_choices, 0)]


_LABEL = re.compile(r"\b(?:option|answer|choice)(?:\s+is)?\s*:?\s*", re.IGNORECASE)


def _labelled_letter(text: str, choices: list[str]) -> str | None:
    """The letter after an "option / answer (is) / choice" label: a letter in range, "" for a letter out of range
    (wrong), None when there is no labelled letter. Why the care: a lower-case letter must stand alone ("option b",
    "answer is (c)"), else "the answer is a wool scarf" would read the article as option A; a label followed by an
    option's exact text maps to that option."""
    for label in _LABEL.finditer(text):
        rest = text[label.end() :]
        exact = [i for i, c in enumerate(choices) if _norm_option(c) == _norm_option(rest) and _norm_option(rest)]
        if len(exact) == 1:
            return LETTERS[exact[0]]
        m = re.match(r"\(([A-Ja-j])\)|([A-J])(?![A-Za-z])|([a-j])\s*[.)]?\s*$", rest)
        if m:
            letter = next(g for g in m.groups() if g).upper()
            return letter if _in_range(letter, len(choices)) else ""
    return None


def option_letter(prediction: str | None, choices: list[str]) -> str | None:
    """Map a ScienceQA prediction to an option letter, or None when it cannot be mapped (counted wrong).

    Accepted: "B", "b", "(B)", "B.", "B)", "[B]", "**B**", "Finish[B]", "B. Dover", "(B) Dover", "B - Dover",
    "Option B", "the answer is (B)", "The answer is: B", "the correct option is B", the option text
    itself ("Dover", case/punctuation-insensitive), a prediction containing exactly one option's text, or a close
    fuzzy match of one option. A letter outside the choices is returned as None.
    """
    if prediction is None:
        return None
    text = prediction.strip().strip("\"'`*_").strip()
    text = re.sub(r"^(?:Finish\s*)?\[(.*?)\]?$", r"\1", text, flags=re.IGNORECASE).strip()  # "[B]", "Finish[B]"
    text = text.strip("\"'`*_").strip()  # markdown emphasis: "**B**"
    if "[" not in text:
        text = text.rstrip("]").strip()  # the closing bracket of the Finish call: "B]"
    if not text:
        return None
    n = len(choices)
    # 1. the whole prediction is a letter: "B", "b", "(B)", "B.", "B)"
    m = re.fullmatch(r"\(?\s*([A-Ja-j])\s*\)?\s*[.:)]?", text)
    if m:
        letter = m.group(1).upper()
        return letter if _in_range(letter, n) else None
    # 2. the whole prediction is an option's text (before any letter-prefix rule: "A wool scarf" is text)
    norm = _norm_option(text)
    exact = [i for i, c in enumerate(choices) if _norm_option(c) == norm and norm]
    if len(exact) == 1:
        return LETTERS[exact[0]]
    # 3. a letter prefix: "(B) Dover", "B. Dover", "B) Dover", "B: Dover"
    m = re.match(r"\(([A-Ja-j])\)|([A-J])[.:)]\s", text)
    if m:
        letter = (m.group(1) or m.group(2)).upper()
        return letter if _in_range(letter, n) else None
    # 4. "option B", "answer is (B)", "answer: B", "the correct option is B"; "the answer is a wool scarf" is text
    labelled = _labelled_letter(text, choices)
    if labelled is not None:
        return labelled or None
    # 5. "B Dover": a capital letter then an option's text (the letter wins, as in "B) Dover")
    m = re.match(r"([A-J])\s+(.+)", text)
    if m and _in_range(m.group(1), n) and _norm_option(m.group(2)) in {_norm_option(c) for c in choices}:
        return m.group(1)
    # 6. exactly one option's text inside the prediction, or the prediction inside exactly one option
    if len(norm) >= 3:
        padded = f" {norm} "
        inside = [i for i, c in enumerate(choices) if len(_norm_option(c)) >= 3 and f" {_norm_option(c)} " in padded]
        if len(inside) == 1:
            return LETTERS[inside[0]]
        holds = [i for i, c in enumerate(choices) if f" {norm} " in f" {_norm_option(c)} "]
        if len(holds) == 1:
            return LETTERS[holds[0]]
        # 7. close fuzzy match to a single option
        ratios = [difflib.SequenceMatcher(None, norm, _norm_option(c)).ratio() for c in choices]
        if ratios:
            best = max(range(n), key=ratios.__getitem__)
            second = sorted(ratios)[-2] if n > 1 else 0.0
            if ratios[best] >= 0.85 and ratios[best] - second >= 0.1:
                return LETTERS[best]
    return None


def scienceqa_correct(prediction: str | None, choices: list[str], key: str) -> bool:
    """True iff the prediction maps to the key's option letter."""
    letter = option_letter(prediction, choices)
    return letter is not None and letter == key.strip().upper()


@dataclass(frozen=True)
class Score:
    """One question's score. `em` is the headline accuracy (EM for HotpotQA, letter match for ScienceQA)."""

    correct: bool
    em: float
    f1: float
    mapped: str | None = None  # ScienceQA: the letter the prediction mapped to


def score_hotpotqa(prediction: str | None, gold: str) -> Score:
    em = exact_match(prediction, gold)
    return Score(correct=em, em=float(em), f1=f1_score(prediction, gold))


def score_scienceqa(prediction: str | None, choices: list[str], key: str) -> Score:
    letter = option_letter(prediction, choices)
    ok = letter is not None and letter == key.strip().upper()
    return Score(correct=ok, em=float(ok), f1=float(ok), mapped=letter)
