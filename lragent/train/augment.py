r"""Option-permutation augmentation of ScienceQA training examples.

Why: the AutoAct ScienceQA trajectories have 4 options per question and only ~165 action examples end in a Finish
letter, so an adapter can learn a letter prior ("answer A") instead of reading the options. Every augmented copy
reorders a question's options and remaps EVERY reference to an option letter in the example consistently, so the
answer letter is spread over all positions while the reasoning text stays true.

What is remapped (the only letter references whose meaning is certain):

- the option list of the question, ``\nOptions:(A) x (B) y (C) z (D) w\n`` (rebuilt in the same layout);
- each earlier Finish answer in the input, ``Aciton: Finish[\n### Response:\nD]``;
- the output when the example is the Finish answer itself (input ends with ``Finish[\n### Response:\n``).

Any other letter reference (``option C``, ``(B)``, ``answer is D``, ``Finish[D]`` in a thought, a lone ``B``/``C``/...
anywhere) cannot be remapped unambiguously: such examples are kept once, unaugmented, and counted. Only the training
split may be augmented (the copies' heads differ from the original's, so they must never be split by question again:
augment after :func:`lragent.train.examples.split_heldout`, as :func:`split_and_augment` does).
"""

from __future__ import annotations

import hashlib
import itertools
import random
import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field, replace

from lragent.train import data as fmt
from lragent.train.examples import Example, question_of, split_heldout

LETTERS = "ABCDEFGHIJ"
_OPTIONS_LINE = re.compile(r"\nOptions:([^\n]*)\n")
_OPTION = re.compile(r"\(([A-J])\) ?")
FINISH_CALL = fmt.TOOL_LABEL + fmt.FINISH + "[" + fmt.RESPONSE  # "Aciton: Finish[\n### Response:\n"
_FINISH_ANSWER = re.compile(re.escape(FINISH_CALL) + r"([^\]\n]*)\]")
# letter references that would need remapping but whose target is not certain (see the module docstring)
_LETTER_REF = re.compile(
    r"\(([A-J])\)"  # (B)
    r"|\b(?:[Oo]ptions?|[Cc]hoices?|[Aa]nswers?|is|be|select|choose|pick)\s*:?\s*\(?([A-J])\b(?!['’\w-])"  # option B
    r"|\[\s*([A-J])\s*\]"  # Finish[B] in free text
    r"|(?<![\w'’.°-])([B-J])(?![\w'’-])"  # a lone capital B..J (A is also the article)
)
_OBSERVATION = re.compile(re.escape(fmt.OBS_LABEL) + r"[^\n]*")
PLACEHOLDER = "\x00"


@dataclass
class AugmentStats:
    """What :func:`augment_examples` did: counts of examples by outcome and the copies made."""

    augmented: int = 0
    copies: int = 0
    no_options: int = 0
    ambiguous: int = 0
    reasons: Counter[str] = field(default_factory=Counter)

    def summary(self) -> str:
        return (
            f"{self.augmented} examples augmented (+{self.copies} copies), {self.ambiguous} left as is "
            f"(ambiguous letters), {self.no_options} without an option list"
        )


def parse_options(prompt: str) -> tuple[re.Match[str], list[str]] | None:
    """``(match of the options line, option texts)`` when the head lists options A, B, C, ... in the data's exact
    layout (rebuilding it gives the same text), else None: only then can a reordered list be written back."""
    match = _OPTIONS_LINE.search(question_of(prompt))
    if match is None:
        return None
    parts = _OPTION.split(match.group(1))
    if parts[0] != "" or len(parts) < 5:
        return None
    letters, texts = parts[1::2], [t.rstrip(" ") for t in parts[2::2]]
    if "".join(letters) != LETTERS[: len(letters)] or render_options(texts) != match.group(1) or not all(texts):
        return None
    return match, texts


def render_options(texts: Sequence[str]) -> str:
    """The options line body as the data writes it: ``(A) x (B) y ...``."""
    return " ".join(f"({LETTERS[i]}) {t}" for i, t in enumerate(texts))


def _mask_known(text: str, n: int) -> tuple[str, list[str]] | None:
    """Replace every Finish answer in ``text`` by a placeholder; return the masked text and the answers, or None
    when an answer is not one of the ``n`` option letters (an option's text would be fine but is not expected)."""
    answers = [m.group(1) for m in _FINISH_ANSWER.finditer(text)]
    if any(a not in LETTERS[:n] for a in answers):
        return None
    return _FINISH_ANSWER.sub(FINISH_CALL + PLACEHOLDER + "]", text), answers


def _ambiguous_ref(text: str, n: int) -> str | None:
    """The first letter reference in ``text`` (outside the remapped places) naming one of the ``n`` options.
    Observations are skipped: tools never see the options, so a letter there ("vitamin C", "1414 °C", an image's
    labels) is not an option reference and stays as is in every copy."""
    for match in _LETTER_REF.finditer(_OBSERVATION.sub("", text)):
        letter = next(g for g in match.groups() if g is not None)
        if letter in LETTERS[:n]:
            return match.group(0)
    return None


@dataclass(frozen=True)
class _Template:
    """An example split into fixed text and the letter slots that a permutation rewrites."""

    before: str  # input up to the options line body
    options: list[str]
    body: str  # rest of the input, Finish answers masked
    answers: list[str]
    output_letter: str | None  # the output when it is the Finish answer letter
    output: str


def _template(ex: Example) -> tuple[_Template | None, str]:
    """The example's template, or None and why it cannot be augmented."""
    parsed = parse_options(ex.input)
    if parsed is None:
        return None, "no_options"
    match, options = parsed
    n = len(options)
    masked = _mask_known(ex.input[match.end(1) :], n)
    if masked is None:
        return None, "finish answer not a letter"
    body, answers = masked
    is_finish = ex.input.endswith(FINISH_CALL)
    letter = ex.output.strip() if is_finish and ex.output.strip() in LETTERS[:n] else None
    if is_finish and letter is None:
        return None, "finish output not a letter"
    ref = _ambiguous_ref(body + "\n" + (ex.output if letter is None else ""), n)
    if ref is None:
        question = ex.input[: match.start()]
        ref = _ambiguous_ref(question[question.rfind("\nQuestion:") :], n)
    if ref is not None:
        return None, f"letter reference {ref!r}"
    before = ex.input[: match.start(1)]
    return _Template(before, options, body, answers, letter, ex.output), ""


def _apply(t: _Template, perm: Sequence[int], ex: Example) -> Example:
    """The example with options reordered (new position j holds old option ``perm[j]``) and letters remapped."""
    new_letter = {LETTERS[old]: LETTERS[new] for new, old in enumerate(perm)}
    body = t.body
    for answer in t.answers:
        body = body.replace(PLACEHOLDER, new_letter[answer], 1)
    output = t.output if t.output_letter is None else t.output.replace(t.output_letter, new_letter[t.output_letter])
    return replace(ex, input=t.before + render_options([t.options[i] for i in perm]) + body, output=output)


def permute_example(ex: Example, perm: Sequence[int]) -> Example | None:
    """``ex`` with its options in the order ``perm`` (new position j holds old option ``perm[j]``) and every option
    letter remapped; None when the example cannot be remapped unambiguously (or ``perm`` does not fit its options)."""
    template, _ = _template(ex)
    if template is None or sorted(perm) != list(range(len(template.options))):
        return None
    return _apply(template, perm, ex)


def question_permutations(question: str, n: int, k: int, seed: int) -> list[tuple[int, ...]]:
    """``k`` distinct non-identity orders of ``n`` options, the same for every example of one question (seeded by
    the seed and the question text, so independent of example order and of the role).

    The first ``n - 1`` are the non-identity rows of a randomly relabelled cyclic Latin square: together with the
    original order, every option then sits at every position exactly once, so the answer letters of a question's
    copies are exactly balanced whatever the gold letter is. More are drawn at random among the remaining orders."""
    rng = random.Random(hashlib.blake2b(f"{seed}:{question}".encode(), digest_size=8).digest())
    relabel = list(range(n))
    rng.shuffle(relabel)
    inverse = [relabel.index(i) for i in range(n)]
    shifts = list(range(1, n))
    rng.shuffle(shifts)
    perms: list[tuple[int, ...]] = []
    for s in shifts:  # new position of old option i: relabel[(inverse[i] + s) % n]
        new_pos = [relabel[(inverse[i] + s) % n] for i in range(n)]
        perms.append(tuple(new_pos.index(j) for j in range(n)))
    rest = [p for p in itertools.permutations(range(n)) if p != tuple(range(n)) and p not in perms]
    rng.shuffle(rest)
    return (perms + rest)[:k]


def augment_examples(examples: Sequence[Example], k: int, seed: int = 0) -> tuple[list[Example], AugmentStats]:
    """Every example, each followed by its ``k`` option-permuted copies where it can be augmented (see the module
    docstring). Deterministic for a given ``seed``. ``k`` 0 returns the examples unchanged."""
    stats = AugmentStats()
    if k <= 0:
        return list(examples), stats
    out: list[Example] = []
    for ex in examples:
        out.append(ex)
        template, why = _template(ex)
        if template is None:
            stats.no_options += why == "no_options"
            stats.ambiguous += why != "no_options"
            stats.reasons[why.split(" '")[0]] += 1
            continue
        perms = question_permutations(question_of(ex.input), len(template.options), k, seed)
        out.extend(_apply(template, p, ex) for p in perms)
        stats.augmented += 1
        stats.copies += len(perms)
    return out, stats


def split_and_augment(
    examples: Sequence[Example], fraction: float, seed: int, k: int
) -> tuple[list[Example], list[Example], AugmentStats]:
    """``(train with copies, held-out as is, stats)``: split by question FIRST, then augment the training part only,
    so a question's copies (whose heads differ) can never land on the held-out side."""
    train, heldout = split_heldout(examples, fraction, seed)
    augmented, stats = augment_examples(train, k, seed)
    return augmented, heldout, stats
