"""Scoring: HotpotQA EM/F1 with the standard normalisation; ScienceQA option letters without the 'A' trap."""

import pytest

from lragent.agents.scoring import (
    exact_match,
    f1_score,
    normalize_answer,
    option_letter,
    scienceqa_correct,
    score_hotpotqa,
    score_scienceqa,
)

DELAWARE = ["Harrisburg", "Dover", "Wilmington", "Georgetown"]  # scienceqa_grade1-4 row 1, key B
FRAGMENT = ["All the judges at the important meeting.", "The cardboard box gets wet it falls apart."]  # key A
SCARF = ["wool scarf", "asphalt road"]


def test_normalize_answer_standard():
    assert normalize_answer("The  Badr-Hari!") == "badrhari"
    assert normalize_answer("An Apple a day") == "apple day"
    assert normalize_answer("  Qin   dynasty. ") == "qin dynasty"


@pytest.mark.parametrize(
    ("pred", "gold", "em"),
    [
        ("Badr Hari", "Badr Hari", True),
        ("badr hari.", "Badr Hari", True),
        ("the Super Bowl XLVIII", "Super Bowl XLVIII", True),
        ("Super Bowl", "Super Bowl XLVIII", False),
        ("", "Badr Hari", False),
        (None, "Badr Hari", False),
        ("   ", "Badr Hari", False),
        ("", "the", False),  # a key that normalises to '' must not match an empty answer
        ("yes", "yes", True),
    ],
)
def test_exact_match(pred, gold, em):
    assert exact_match(pred, gold) is em


def test_f1_partial_and_yes_no_rule():
    assert f1_score("Super Bowl", "Super Bowl XLVIII") == pytest.approx(2 * 1.0 * (2 / 3) / (1 + 2 / 3))
    assert f1_score("Badr Hari", "Badr Hari") == 1.0
    assert f1_score("no", "yes") == 0.0
    assert f1_score("yes it is", "yes") == 0.0  # official rule: yes/no must match exactly
    assert f1_score("", "Badr Hari") == 0.0
    assert f1_score(None, "Badr Hari") == 0.0
    s = score_hotpotqa("Badr  Hari", "Badr Hari")
    assert s.correct and s.em == 1.0 and s.f1 == 1.0


def test_scienceqa_empty_answer_is_not_option_a():
    # The HotpotQA normaliser maps both "" and "A" to "" (it strips the article "a"): the trap.
    assert normalize_answer("") == normalize_answer("A") == ""
    for empty in ("", "   ", None, "[]", "''"):
        assert option_letter(empty, FRAGMENT) is None
        assert not scienceqa_correct(empty, FRAGMENT, "A")
    assert not score_scienceqa("", FRAGMENT, "A").correct
    assert not score_scienceqa("the", FRAGMENT, "A").correct


@pytest.mark.parametrize(
    ("pred", "letter"),
    [
        ("B", "B"),
        ("b", "B"),
        ("(B)", "B"),
        ("B.", "B"),
        ("B)", "B"),
        ("B. Dover", "B"),
        ("(B) Dover", "B"),
        ("B Dover", "B"),
        ("Dover", "B"),
        ("dover.", "B"),
        ("The answer is (B)", "B"),
        ("option C", "C"),
        ("The capital is Wilmington, I think", "C"),
        ("Georgtown", "D"),  # fuzzy
        ("E", None),  # not an option of this question
        ("Paris", None),
        ("Harrisburg or Dover", None),  # two options: ambiguous
    ],
)
def test_option_letter_forms(pred, letter):
    assert option_letter(pred, DELAWARE) == letter


def test_option_text_starting_with_a_is_not_letter_a():
    choices = ["A wool scarf", "asphalt road"]
    assert option_letter("A wool scarf", choices) == "A"
    assert option_letter("asphalt road", choices) == "B"
    assert option_letter("A", SCARF) == "A"
    assert option_letter("a", SCARF) == "A"
    assert option_letter("asphalt road", SCARF) == "B"


def test_scienceqa_score():
    assert score_scienceqa("B", DELAWARE, "B").correct
    assert score_scienceqa("Dover", DELAWARE, "B").mapped == "B"
    assert not score_scienceqa("A", DELAWARE, "B").correct
    assert score_scienceqa("All the judges at the important meeting", FRAGMENT, "A").correct


# ---- the answer formats a model emits at ScienceQA's Finish --------------------------------------------------------


@pytest.mark.parametrize(
    "pred",
    [
        "B", "b", "(B)", "B)", "B.", "B]", "[B]", "**B**", "Finish[B]", "B) Dover", "(B) Dover", "B. Dover",
        "B: Dover", "B - Dover", "b) dover", "B Dover", "Dover", "dover.", "[Dover]", "Option B", "option (B)",
        "Option B: Dover", "The answer is B", "The answer is: B", "The answer is (B).", "Answer: B",
        "answer is option B", "The capital of Delaware is Dover.", '"B"',
    ],
)  # fmt: skip
def test_option_letter_maps_every_emitted_format(pred):
    assert option_letter(pred, DELAWARE) == "B"
    assert score_scienceqa(pred, DELAWARE, "B").correct
    assert not score_scienceqa(pred, DELAWARE, "A").correct


@pytest.mark.parametrize("pred", ["E", "(E)", "A or B", "Harrisburg, Dover", "I think so", "[]", "Finish[]", "**"])
def test_option_letter_refuses_what_it_cannot_map(pred):
    assert option_letter(pred, DELAWARE) is None
    assert not any(score_scienceqa(pred, DELAWARE, key).correct for key in "ABCD")


# ---- labels before an option's text, and a letter with another option's text (issue 15) -------------------------


@pytest.mark.parametrize(
    ("pred", "letter"),
    [
        ("the answer is a wool scarf", "A"),  # option A's text (with an article), not the letter "a"
        ("The answer is an asphalt road", "B"),
        ("Answer: asphalt road", "B"),
        ("The correct option is B", "B"),
        ("the correct choice is (b)", "B"),
        ("option b", "B"),
        ("the answer is b.", "B"),
        ("Option C", None),  # out of range: wrong, not silently mapped
        ("B wool scarf", "B"),  # a letter and another option's text: the letter wins, as in "B) wool scarf"
        ("B) a wool scarf", "B"),
    ],
)
def test_option_letter_reads_labels_without_eating_articles(pred, letter):
    assert option_letter(pred, SCARF) == letter


def test_an_article_after_a_label_is_not_option_a():
    choices = ["Dover", "Salem", "a wool scarf"]
    assert option_letter("the answer is a wool scarf", choices) == "C"
    assert option_letter("Answer: a wool scarf", choices) == "C"
    assert option_letter("the answer is a", choices) == "A"
