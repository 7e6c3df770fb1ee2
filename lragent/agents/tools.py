"""Offline tools over ONE question's own material, answering in the training trajectories' Observation wording.

HotpotQA (distractor setting): the question's `context` ([title, [sentences]] x 10) is the whole "Wikipedia":
  Retrieve[entity]  best title match (case/punctuation/accent-insensitive, fuzzy via difflib) -> the paragraph's
                    first sentences; no good match -> "Could not find [x]. Similar: [...]" (AutoAct/langchain form).
  Lookup[keyword]   next sentence containing the keyword in the last passage found by Retrieve or BingSearch,
                    "(Result i/n) sentence", "No Results", "No More Results"; the data's messages when there is none.
  BingSearch[query] BM25 (rank-bm25) over the paragraphs; returns the top paragraph's text.
ScienceQA: Image2Text[image] returns the caption and OCR text; BingSearch/Retrieve have no corpus unless one is
given (they answer with the data's failure messages). Finish and Reflect belong to the pipeline; it calls
`note_step` so that Lookup knows what the last step was, as AutoAct does.
"""

from __future__ import annotations

import ast
import difflib
import re
import unicodedata
from dataclasses import dataclass, field

from rank_bm25 import BM25Okapi

# Observation texts, verbatim from the AutoAct trajectories in /work/shared/data/trajectories.
MSG_SEARCH_ERROR = "bingSearch error, please try again."
MSG_RETRIEVE_ERROR = "Could not find that page, please try again."
MSG_NO_RESULTS = "No Results"
MSG_NO_MORE_RESULTS = "No More Results"
MSG_LOOKUP_NO_RETRIEVED = (
    "The last page Retrieved was not found, so you cannot Lookup a keyword in it. Please try one of the similar pages "
    "given."
)
MSG_LOOKUP_NO_SEARCHED = (
    "The last page Searched was not found, so you cannot Lookup a keyword in it. Please try one of the similar pages "
    "given."
)
MSG_LOOKUP_INVALID = "Invalid action. Lookup only follows the Retrieve or BingSearch action."
MSG_NO_IMAGE = "This question doesn't have an image."
MSG_FINISH = "Please reflect your answer."
MSG_REFLECT_INVALID = "Invalid action. Reflect only follows the Finish action."
MSG_REFLECT_WRONG = "The answer maybe wrong, please try to solve the question again."
MSG_CORRECT = "Answer is CORRECT"
MSG_INCORRECT = "Answer is INCORRECT"
MSG_INVALID = {
    "hotpotqa": "Invalid Action. Valid Actions are Lookup[<topic>] Retrieve[<topic>] BingSearch[<topic>] "
    "Finish[<answer>] and Reflect[right/wrong].",
    "scienceqa": "Invalid Action. Valid Actions are Retrieve[<topic>] BingSearch[<topic>] Finish[<answer>] "
    "Image2Text[imgae] and Reflect[right/wrong].",
}
# What a tool says when it found nothing (or the loop's own messages): no evidence for a reader (see `evidence`).
_NO_EVIDENCE = frozenset(
    (MSG_SEARCH_ERROR, MSG_RETRIEVE_ERROR, MSG_NO_RESULTS, MSG_NO_MORE_RESULTS, MSG_LOOKUP_NO_RETRIEVED,
     MSG_LOOKUP_NO_SEARCHED, MSG_LOOKUP_INVALID, MSG_NO_IMAGE, MSG_FINISH, MSG_REFLECT_INVALID, MSG_REFLECT_WRONG,
     MSG_CORRECT, MSG_INCORRECT, *MSG_INVALID.values())
)  # fmt: skip


def evidence(observations: list[str]) -> list[str]:
    """The observations that carry information, each once, in order: what a reader of the agents' work needs.
    Failures ('bingSearch error', 'Could not find [x]. Similar: []', invalid actions, no image) are left out
    (a miss that lists similar titles stays: the titles are what the tools know);
    on ScienceQA's offline tools that leaves mostly the image's caption and OCR text."""
    kept: list[str] = []
    for obs in observations:
        if obs in _NO_EVIDENCE or (obs.startswith("Could not find [") and obs.endswith("Similar: []")) or obs in kept:
            continue
        kept.append(obs)
    return kept


TASK_TOOLS = {
    "hotpotqa": ("BingSearch", "Retrieve", "Lookup", "Finish", "Reflect"),
    "scienceqa": ("Image2Text", "BingSearch", "Retrieve", "Finish", "Reflect"),
}

_STOPWORDS = frozenset(
    "a an the of in on at to for and or is are was were be by with from as that this which who whom what when where "
    "how did does do it its his her their he she they".split()
)


def normalize_title(s: str) -> str:
    """Case-, accent- and punctuation-insensitive form of a title or entity."""
    s = unicodedata.normalize("NFKD", s)
    s = "".join(ch for ch in s if not unicodedata.combining(ch)).lower()
    s = re.sub(r"[^\w\s]|_", " ", s)
    return " ".join(s.split())


def bm25_tokens(s: str) -> list[str]:
    return [w for w in normalize_title(s).split() if w not in _STOPWORDS]


@dataclass(frozen=True)
class Passage:
    title: str
    sentences: tuple[str, ...]

    @property
    def text(self) -> str:
        return "".join(self.sentences).strip()


def ocr_text(orc: str) -> str:
    """EasyOCR's stringified [(box, text, conf), ...] -> 'text1,text2'; '[]' -> ''."""
    orc = (orc or "").strip()
    if not orc.startswith("["):
        return orc
    try:
        items = ast.literal_eval(orc)
    except (ValueError, SyntaxError):
        return orc
    texts = [str(it[1]) for it in items if isinstance(it, (list, tuple)) and len(it) >= 2]
    return ",".join(texts)


@dataclass
class ToolConfig:
    max_sentences: int | None = 5  # sentences Retrieve returns (None: the whole paragraph)
    max_chars: int = 1500  # hard cap on any observation (cut at a sentence boundary when possible)
    retrieve_threshold: float = 0.85  # difflib ratio for a fuzzy title hit
    n_similar: int = 5  # titles listed in "Could not find [x]. Similar: [...]"
    search_top_k: int = 1  # paragraphs BingSearch returns


@dataclass
class ToolBox:
    """The tools of one question. Stateful: Lookup reads the last passage found by Retrieve or BingSearch."""

    task: str
    passages: list[Passage]
    caption: str | None = None
    ocr: str | None = None
    config: ToolConfig = field(default_factory=ToolConfig)
    # Lookup state (AutoAct's DocstoreExplorer / bing_lookup semantics)
    last_step: str = ""
    last_found: bool = False
    _lookup_sentences: list[str] = field(default_factory=list)
    _lookup_keyword: str = ""
    _lookup_index: int = 0
    _bm25: BM25Okapi | None = None
    _docs: list[list[str]] = field(default_factory=list)

    @classmethod
    def for_record(cls, record: dict, task: str, config: ToolConfig | None = None) -> ToolBox:
        """Build from a HotpotQA row (`context`) or a ScienceQA row (`caption`, `orc`)."""
        passages = [Passage(t, tuple(s)) for t, s in record.get("context", [])]
        return cls(task, passages, record.get("caption"), record.get("orc"), config or ToolConfig())

    @property
    def tools(self) -> tuple[str, ...]:
        return TASK_TOOLS[self.task]

    def run(self, tool: str, argument: str | None) -> str:
        """Observation of an information tool; an unknown / not-allowed tool -> the data's invalid-action text."""
        arg = (argument or "").strip()
        if tool not in self.tools or tool in ("Finish", "Reflect"):
            obs = MSG_INVALID[self.task]
        elif tool == "Retrieve":
            obs = self.retrieve(arg)
        elif tool == "Lookup":
            return self.lookup(arg)  # Lookup does not change last_step
        elif tool == "BingSearch":
            obs = self.search(arg)
        else:
            obs = self.image2text(arg)
        self.last_step = tool
        return obs

    def note_step(self, tool: str) -> None:
        """Record a step the pipeline handled itself (Finish, Reflect, an invalid action)."""
        self.last_step = tool
        self.last_found = False

    # -- Retrieve -------------------------------------------------------------------------------------------
    def find_title(self, entity: str) -> Passage | None:
        """Exact normalised title; else the title without its "(qualifier)"; else whole-word containment either way
        covering at least half the words ("Badr Hari kickboxer", "Gordon Gee"); else difflib ratio >= threshold."""
        key = normalize_title(entity)
        if not key or not self.passages:
            return None
        norms = [normalize_title(p.title) for p in self.passages]
        bases = [normalize_title(re.sub(r"\s*\([^)]*\)\s*$", "", p.title)) for p in self.passages]
        for names in (norms, bases):
            for p, n in zip(self.passages, names):
                if n == key:
                    return p
        key_words = key.split()
        best: tuple[float, Passage] | None = None
        for p, n in zip(self.passages, bases):
            words = n.split()
            if len(n) < 4 or len(key) < 4:
                continue
            if f" {n} " in f" {key} " or f" {key} " in f" {n} ":
                covered = min(len(words), len(key_words)) / max(len(words), len(key_words))
                if covered >= 0.5 and (best is None or covered > best[0]):
                    best = (covered, p)
        if best is not None:
            return best[1]
        ratios = [
            max(difflib.SequenceMatcher(None, key, n).ratio(), difflib.SequenceMatcher(None, key, b).ratio())
            for n, b in zip(norms, bases)
        ]
        i = max(range(len(ratios)), key=ratios.__getitem__)
        return self.passages[i] if ratios[i] >= self.config.retrieve_threshold else None

    def similar_titles(self, entity: str) -> list[str]:
        key = normalize_title(entity)
        kw = set(key.split())
        scored = []
        for p in self.passages:
            n = normalize_title(p.title)
            overlap = len(kw & set(n.split())) / max(len(kw), 1)
            score = overlap + difflib.SequenceMatcher(None, key, n).ratio()
            if overlap > 0 or score >= 0.5:
                scored.append((score, p.title))
        scored.sort(key=lambda x: -x[0])
        return [t for _, t in scored[: self.config.n_similar]]

    def retrieve(self, entity: str) -> str:
        if not entity:
            self.last_found = False
            return MSG_RETRIEVE_ERROR
        p = self.find_title(entity)
        if p is None:
            self.last_found = False
            return f"Could not find [{entity}]. Similar: {self.similar_titles(entity)}"
        self._set_lookup_passage(list(p.sentences))
        sents = p.sentences if self.config.max_sentences is None else p.sentences[: self.config.max_sentences]
        return self._cap("".join(sents).strip())

    # -- BingSearch -----------------------------------------------------------------------------------------
    def search(self, query: str) -> str:
        tokens = bm25_tokens(query)
        if not tokens or not self.passages:
            self.last_found = False
            return MSG_SEARCH_ERROR
        if self._bm25 is None:
            self._docs = [bm25_tokens(p.title + " " + p.text) or ["_"] for p in self.passages]
            self._bm25 = BM25Okapi(self._docs)
        scores = list(self._bm25.get_scores(tokens))
        if max(scores) <= 0:  # tiny corpora: Okapi idf is 0 for a term in half the documents; count overlaps
            q = set(tokens)
            scores = [float(len(q & set(d))) for d in self._docs]
        order = sorted(range(len(scores)), key=lambda i: -scores[i])
        hits = [i for i in order[: self.config.search_top_k] if scores[i] > 0]
        if not hits:
            self.last_found = False
            return MSG_SEARCH_ERROR
        sentences = [s for i in hits for s in self.passages[i].sentences]
        self._set_lookup_passage(sentences)
        return self._cap("".join(self.passages[i].text for i in hits).strip())

    # -- Lookup ---------------------------------------------------------------------------------------------
    def _set_lookup_passage(self, sentences: list[str]) -> None:
        self.last_found = True
        self._lookup_sentences = [s.strip() for s in sentences if s.strip()]
        self._lookup_keyword, self._lookup_index = "", 0

    def lookup(self, keyword: str) -> str:
        if self.last_step not in ("Retrieve", "BingSearch"):
            return MSG_LOOKUP_INVALID
        if not self.last_found:
            return MSG_LOOKUP_NO_RETRIEVED if self.last_step == "Retrieve" else MSG_LOOKUP_NO_SEARCHED
        kw = keyword.lower().strip()
        if kw != self._lookup_keyword:
            self._lookup_keyword, self._lookup_index = kw, 0
        else:
            self._lookup_index += 1
        if not kw:
            return MSG_NO_RESULTS
        hits = [s for s in self._lookup_sentences if kw in s.lower()]
        if not hits:
            return MSG_NO_RESULTS
        if self._lookup_index >= len(hits):
            return MSG_NO_MORE_RESULTS
        return self._cap(f"(Result {self._lookup_index + 1}/{len(hits)}) {hits[self._lookup_index]}")

    # -- Image2Text -----------------------------------------------------------------------------------------
    def image2text(self, _argument: str = "") -> str:
        caption, orc = self.caption, self.ocr
        if caption is None or orc is None or caption == "no img" or orc == "no img":
            return MSG_NO_IMAGE
        return self._cap(f"Image caption: {caption} OCR result: {ocr_text(orc) or 'None'}")

    def _cap(self, text: str) -> str:
        """Observations are one line in the trajectory; cap their length at a sentence boundary if possible."""
        text = " ".join(text.split())
        limit = self.config.max_chars
        if len(text) <= limit:
            return text
        cut = text[:limit]
        end = max(cut.rfind(". "), cut.rfind("? "), cut.rfind("! "))
        return cut[: end + 1] if end > limit // 2 else cut.rstrip() + " ..."
