"""Option-permutation augmentation of ScienceQA training examples (lragent.train.augment) and its CLI wiring."""

from __future__ import annotations

import json
from collections import Counter

import pytest

from lragent.train import augment as A
from lragent.train import data as fmt
from lragent.train import examples as E
from lragent.train.cli import config_from_args, train_parser, training_split

R = fmt.RESPONSE
# Excerpt of a real scienceqa_action.json example (observations shortened): an earlier wrong Finish (A), a Reflect,
# then the Finish answer C that the action role must output.
REAL_QUESTION = (
    "Which of the following is not a type of electromagnetic radiation?\n"
    "Options:(A) Radio waves (B) Microwaves (C) Infrared waves (D) Ultraviolet waves"
)
REAL_TAIL = (
    f"Thought: {R}What are the different types of electromagnetic radiation?\n"
    f"Aciton: BingSearch[{R}types of electromagnetic radiation]\n"
    "Obversation: Electromagnetic radiation, in classical physics, the flow of energy ... visible light.\n"
    f"Thought: {R}Which of the following is not a type of electromagnetic radiation?\n"
    f"Aciton: Finish[{R}A]\n"
    "Obversation: Please reflect your answer.\n"
    f"Thought: {R}Is my answer correct?\n"
    "Action: Reflect[wrong]\n"
    "Obversation: The answer maybe wrong, please try to solve the question again.\n"
    f"Thought: {R}Which of the following is not a type of electromagnetic radiation?\n"
    f"Aciton: Finish[{R}"
)


OPTIONS_2013 = "(A) Infrared waves (B) Radio waves (C) Microwaves (D) Ultraviolet waves"


def real_example() -> E.Example:
    return E.Example("action", fmt.head("scienceqa", REAL_QUESTION) + REAL_TAIL, "C")


def finish_example(
    question: str, answer: str, thought: str = "I know it.", options: str = "", steps: str = ""
) -> E.Example:
    """A ScienceQA action example whose output is the Finish answer (``steps``: earlier history text)."""
    options = options or "(A) red (B) green (C) blue (D) yellow"
    head = fmt.head("scienceqa", f"{question}\nOptions:{options}")
    return E.Example("action", head + steps + f"Thought: {R}{thought}\nAciton: Finish[{R}", answer)


def test_remap_of_a_real_example_moves_every_letter_consistently():
    ex = real_example()
    out = A.permute_example(ex, (2, 0, 1, 3))  # new A = old C, new B = old A, new C = old B, D stays
    assert out is not None and out.role == "action"
    assert f"\nOptions:{OPTIONS_2013}\n" in out.input
    assert f"Aciton: Finish[{R}B]\nObversation: Please reflect" in out.input  # earlier answer A (Radio waves) -> B
    assert out.output == "A"  # gold C (Infrared waves) -> A
    question = REAL_QUESTION.split("Options:")[0] + "Options:" + OPTIONS_2013
    assert out.input == fmt.head("scienceqa", question) + REAL_TAIL.replace(f"Finish[{R}A]", f"Finish[{R}B]")
    back = A.permute_example(out, (1, 2, 0, 3))  # the inverse order restores the original exactly
    assert back == ex


def test_examples_with_unclear_letters_are_kept_once_and_counted():
    clear = finish_example("Which color is the sky?", "C", "The sky is blue.")
    search = f"Thought: {R}x\nAciton: Retrieve[{R}sky]\nObversation: B C D\n"
    observed = finish_example("Which color is the sky?", "C", steps=search)
    unclear = [
        finish_example("Which color is the sky?", "C", "The answer is C) blue."),
        finish_example("Which color is the sky?", "C", "Finish[C]"),
        finish_example("Which color is the sky?", "C", "option (C) blue fits"),
        finish_example("Which color is the sky?", "blue"),  # a Finish output that is not a letter
    ]
    out, stats = A.augment_examples([clear, observed, *unclear], 3, seed=0)
    assert stats.augmented == 2 and stats.copies == 6 and stats.ambiguous == 4 and stats.no_options == 0
    assert A.augment_examples([finish_example("Sky?", "C", "Blue: vitamin C is no color.")], 1)[1].ambiguous == 1
    assert out[0] == clear and out[4] == observed and out[8:] == unclear  # originals first, unclear untouched
    assert all("Obversation: B C D" in e.input for e in out[4:8])  # tool output is not an option reference
    hotpot = E.Example("action", fmt.head("hotpotqa", "Who?") + f"Thought: {R}x\nAciton: Finish[{R}", "Nixon")
    assert A.augment_examples([hotpot], 3)[1].no_options == 1


def test_answer_letters_become_balanced():
    # the worst case for a letter prior: every gold answer is A (the shipped action model answers A 214/240 times)
    exs = [finish_example(f"Question {i}?", "A") for i in range(10)] + [real_example()]
    out, stats = A.augment_examples(exs, 3, seed=5)
    assert stats.augmented == 11 and len(out) == 44
    letters = Counter(e.output for e in out)
    assert letters == {"A": 11, "B": 11, "C": 11, "D": 11}
    for e in out:  # the gold option text always sits behind the output letter
        gold = "red" if "Question:Question" in e.input else "Infrared waves"
        assert f"({e.output}) {gold}" in e.input
    # two-option questions balance too
    two = [finish_example(f"Q{i}?", "B", options="(A) yes (B) no") for i in range(4)]
    assert Counter(e.output for e in A.augment_examples(two, 1, seed=0)[0]) == {"A": 4, "B": 4}


def test_question_permutations_form_a_latin_square_and_are_seeded():
    perms = A.question_permutations("q", 4, 3, seed=1)
    assert len(set(perms)) == 3 and (0, 1, 2, 3) not in perms
    rows = [(0, 1, 2, 3), *perms]
    assert all(sorted(r[j] for r in rows) == [0, 1, 2, 3] for j in range(4))  # each option at each position once
    assert len(A.question_permutations("q", 4, 30, seed=1)) == 23  # capped at the 4! - 1 other orders
    assert A.question_permutations("q", 4, 3, seed=1) == perms
    assert any(A.question_permutations("q", 4, 3, seed=s) != perms for s in range(2, 6))


def test_augmentation_is_deterministic_and_independent_of_order():
    exs = [finish_example(f"Question {i}?", "ABCD"[i % 4]) for i in range(6)] + [real_example()]
    first, _ = A.augment_examples(exs, 3, seed=7)
    assert A.augment_examples(exs, 3, seed=7)[0] == first
    reversed_out, _ = A.augment_examples(exs[::-1], 3, seed=7)
    assert sorted(reversed_out, key=repr) == sorted(first, key=repr)
    assert A.augment_examples(exs, 3, seed=8)[0] != first
    assert A.augment_examples(exs, 0, seed=7)[0] == exs


def test_heldout_split_is_untouched_and_copies_stay_on_the_training_side():
    exs = [finish_example(f"Question number {i}?", "ABCD"[i % 4]) for i in range(60)]
    train, heldout, stats = A.split_and_augment(exs, 0.25, seed=3, k=3)
    plain_train, plain_heldout = E.split_heldout(exs, 0.25, seed=3)
    assert heldout == plain_heldout and heldout  # exactly the un-augmented held-out split
    assert len(train) == 4 * len(plain_train) and stats.augmented == len(plain_train)

    def stem(e: E.Example) -> str:  # the question without its option order
        return E.question_of(e.input).split("\nOptions:")[0]

    assert {stem(e) for e in train} == {stem(e) for e in plain_train}
    assert {stem(e) for e in train}.isdisjoint(stem(e) for e in heldout)


def test_cli_flag_defaults_to_three_for_scienceqa_and_splits_before_augmenting(tmp_path, capsys):
    def cfg(*extra: str):
        return config_from_args(train_parser().parse_args(["--out", str(tmp_path), *extra]))

    assert cfg("--task", "scienceqa").option_permutations == 3
    assert cfg("--task", "hotpotqa").option_permutations == 0
    assert cfg("--task", "scienceqa", "--option-permutations", "0").option_permutations == 0
    assert cfg("--option-permutations", "2").option_permutations == 2
    assert "--option-permutations" in train_parser().format_help()
    with pytest.raises(ValueError):
        cfg("--option-permutations", "-1")

    exs = [finish_example(f"Question number {i}?", "A") for i in range(20)]
    (tmp_path / "scienceqa_action.json").write_text(json.dumps([{"input": e.input, "output": e.output} for e in exs]))
    config = cfg("--task", "scienceqa", "--heldout-fraction", "0.3")
    train, heldout = training_split("scienceqa", "action", tmp_path, config)
    assert heldout == E.split_heldout(exs, 0.3, config.seed)[1] and heldout
    assert len(train) == 4 * (len(exs) - len(heldout))
    assert "option permutations x3" in capsys.readouterr().out
