"""Offline tools on real data rows: Retrieve / Lookup / BingSearch over a HotpotQA context, Image2Text for ScienceQA,
with the Observation wording of the AutoAct trajectories."""

import json
from pathlib import Path

import pytest

from lragent.agents import tools as T
from lragent.agents.tools import ToolBox, ToolConfig, normalize_title, ocr_text

# First row of /work/shared/data/hotpotqa/hotpotqa_easy.jsonl, four of its ten paragraphs (CC BY-SA 4.0).
HOTPOT_ROW = {
    "id": "5a832c3455429954d2e2ec41",
    "question": "Who was once considered the best kick boxer in the world, however he has been involved in a number of "
    'controversies relating to his "unsportsmanlike conducts" in the sport and crimes of violence outside of the ring.',
    "answer": "Badr Hari",
    "context": [
        [
            "Verano de Escándalo (1998)",
            [
                'The 1998 Verano de Escándalo (Spanish for "Summer of Scandal") was the second annual "Verano de '
                'Escandalo" professional wrestling show promoted by AAA.',
                " The show took place on September 18, 1998, in Madero, Tamaulipas, Mexico.",
            ],
        ],
        [
            "E. Gordon Gee",
            [
                "Elwood Gordon Gee (born February 2, 1944) is an American academic and is currently serving his second "
                "term as President of West Virginia University.",
                " He has served as the chief executive at several universities in the United States, previously "
                "serving at Ohio State University.",
            ],
        ],
        [
            "Badr Hari",
            [
                "Badr Hari (Arabic: بدر هاري‎ ‎ ; born 8 December 1984) is a Moroccan-Dutch super heavyweight "
                "kickboxer from Amsterdam, fighting out of Mike's Gym in Oostzaan.",
                " He is a former K-1 Heavyweight champion (2007—2008), It's Showtime Heavyweight world champion "
                '(2009-2010) and "K-1 World Grand Prix 2009" finalist.',
                " Hari has been a prominent figure in the world of kickboxing and was once considered the best "
                "kickboxer in the world, however he has been involved in a number of controversies relating to his "
                '"unsportsmanlike conducts" in the sport and crimes of violence outside of the ring.',
            ],
        ],
        [
            "Global Fighting Championship",
            [
                "Global Fighting Championship (also known as GFC) was a UAE-based kickboxing and mixed martial arts "
                "(MMA) promotion.",
                " It was established in 2014 in Dubai, United Arab Emirates.",
                " The promotion's first event, GFC 1, took place on May 29, 2014 and featured Badr Hari vs. Anderson "
                "Silva.",
            ],
        ],
    ],
}
# ScienceQA rows (scienceqa_grade1-4.jsonl / grade5-8.jsonl, CC BY-NC-SA 4.0): one with an image + OCR, one without.
SCIENCE_IMG = {
    "Question": "Which month is the wettest on average in Boston?\nOptions: (A) December (B) March (C) August",
    "choices": ["December", "March", "August"],
    "caption": "A series of photographs showing a patterned pattern on a fabric.",
    "orc": "[([[55, 0], [425, 0], [425, 19], [55, 19]], 'Average precipitation in Boston; Massachusetts', "
    "0.8485389077262446), ([[19, 53], [43, 53], [43, 73], [19, 73]], '25', 0.9999984827137908)]",
    "Answer": "B",
}
SCIENCE_NOIMG = {
    "Question": "Which is harder?\nOptions: (A) wool scarf (B) asphalt road",
    "choices": ["wool scarf", "asphalt road"],
    "caption": "no img",
    "orc": "no img",
    "Answer": "B",
}
DATA = Path("/work/shared/data")


@pytest.fixture
def box():
    return ToolBox.for_record(HOTPOT_ROW, "hotpotqa")


def test_normalize_title_is_case_accent_punctuation_insensitive():
    assert normalize_title("Verano de Escándalo (1998)") == "verano de escandalo 1998"
    assert normalize_title("E. Gordon Gee") == normalize_title("e gordon  gee")


@pytest.mark.parametrize(
    "entity",
    ["Badr Hari", "badr hari", "BADR HARI!", "Badr Hari kickboxer", "Bader Hari"],
)
def test_retrieve_matches_title_variants(box, entity):
    obs = box.run("Retrieve", entity)
    assert obs.startswith("Badr Hari (Arabic:")
    assert "K-1 Heavyweight champion" in obs  # first sentences of the paragraph, joined on one line
    assert "\n" not in obs


def test_retrieve_accents_and_qualifiers(box):
    assert box.run("Retrieve", "Verano de Escandalo").startswith("The 1998 Verano de Escándalo")
    assert box.run("Retrieve", "Gordon Gee").startswith("Elwood Gordon Gee")


def test_retrieve_not_found_lists_similar_titles_like_the_data(box):
    obs = box.run("Retrieve", "Global Fighting League")
    assert obs.startswith("Could not find [Global Fighting League]. Similar: [")
    assert "'Global Fighting Championship'" in obs
    assert box.run("Retrieve", "zzzz qqqq") == "Could not find [zzzz qqqq]. Similar: []"
    assert box.run("Retrieve", "") == T.MSG_RETRIEVE_ERROR


def test_retrieve_max_sentences():
    small = ToolBox.for_record(HOTPOT_ROW, "hotpotqa", ToolConfig(max_sentences=1))
    obs = small.run("Retrieve", "Badr Hari")
    assert obs.endswith("in Oostzaan.") and "K-1" not in obs


def test_lookup_is_stateful_over_the_last_passage(box):
    assert box.run("Lookup", "Hari") == T.MSG_LOOKUP_INVALID  # nothing retrieved yet
    box.run("Retrieve", "Badr Hari")
    assert box.run("Lookup", "k-1").startswith("(Result 1/1) He is a former K-1")  # case-insensitive
    assert box.run("Lookup", "K-1") == T.MSG_NO_MORE_RESULTS  # same keyword again: the next hit
    assert box.run("Lookup", "kickboxing").startswith("(Result 1/1) Hari has been a prominent figure")
    assert box.run("Lookup", "Amsterdam").startswith("(Result 1/1) Badr Hari (Arabic:")
    assert box.run("Lookup", "basketball") == T.MSG_NO_RESULTS


def test_lookup_counts_matching_sentences(box):
    box.run("Retrieve", "Badr Hari")
    # "world" is in sentences 2 ("world champion") and 3 ("in the world")
    assert box.run("Lookup", "world").startswith("(Result 1/2) He is a former")
    assert box.run("Lookup", "world").startswith("(Result 2/2) Hari has been")
    assert box.run("Lookup", "world") == T.MSG_NO_MORE_RESULTS


def test_lookup_after_failed_retrieve_or_search_uses_the_data_messages(box):
    box.run("Retrieve", "zzzz qqqq")
    assert box.run("Lookup", "x") == T.MSG_LOOKUP_NO_RETRIEVED
    box.run("BingSearch", "the of and")  # only stop words: no hit
    assert box.run("Lookup", "x") == T.MSG_LOOKUP_NO_SEARCHED
    box.run("Retrieve", "Badr Hari")
    box.note_step("Finish")
    assert box.run("Lookup", "Hari") == T.MSG_LOOKUP_INVALID


def test_bingsearch_bm25_returns_the_best_paragraph_and_feeds_lookup(box):
    obs = box.run("BingSearch", "best kickboxer in the world controversies violence")
    assert obs.startswith("Badr Hari (Arabic:")
    assert box.run("BingSearch", "UAE-based mixed martial arts promotion Dubai").startswith("Global Fighting")
    assert box.run("Lookup", "Dubai").startswith("(Result 1/1) It was established in 2014 in Dubai")
    assert box.run("BingSearch", "") == T.MSG_SEARCH_ERROR
    assert box.run("BingSearch", "photosynthesis chlorophyll") == T.MSG_SEARCH_ERROR


def test_invalid_tools_use_the_task_message(box):
    assert box.run("Image2Text", "image") == T.MSG_INVALID["hotpotqa"]
    assert box.run("Refresh", "x") == T.MSG_INVALID["hotpotqa"]
    sci = ToolBox.for_record(SCIENCE_NOIMG, "scienceqa")
    assert sci.run("Lookup", "x") == T.MSG_INVALID["scienceqa"]
    assert "Image2Text[imgae]" in T.MSG_INVALID["scienceqa"]  # the data's typo


def test_image2text_caption_and_ocr():
    sci = ToolBox.for_record(SCIENCE_IMG, "scienceqa")
    assert sci.run("Image2Text", "image") == (
        "Image caption: A series of photographs showing a patterned pattern on a fabric. "
        "OCR result: Average precipitation in Boston; Massachusetts,25"
    )
    assert ToolBox.for_record(SCIENCE_NOIMG, "scienceqa").run("Image2Text", "image") == T.MSG_NO_IMAGE
    empty = ToolBox.for_record({**SCIENCE_IMG, "orc": "[]"}, "scienceqa").run("Image2Text", "x")
    assert empty.endswith("OCR result: None")
    assert ocr_text("[]") == "" and ocr_text("not a list") == "not a list"


def test_scienceqa_search_without_corpus_fails_like_the_data():
    sci = ToolBox.for_record(SCIENCE_NOIMG, "scienceqa")
    assert sci.run("BingSearch", "hardness of asphalt") == T.MSG_SEARCH_ERROR
    assert sci.run("Retrieve", "asphalt").startswith("Could not find [asphalt]. Similar: []")


def test_observation_messages_appear_verbatim_in_the_trajectories():
    paths = [DATA / "trajectories" / f for f in ("hotpotqa_action.json", "scienceqa_action.json")]
    if not all(p.exists() for p in paths):
        pytest.skip("shared trajectories not available")
    text = "".join(p.read_text(encoding="utf-8") for p in paths)
    for msg in (
        T.MSG_SEARCH_ERROR,
        T.MSG_RETRIEVE_ERROR,
        T.MSG_LOOKUP_NO_RETRIEVED,
        T.MSG_LOOKUP_NO_SEARCHED,
        T.MSG_LOOKUP_INVALID,
        T.MSG_NO_IMAGE,
        T.MSG_FINISH,
        T.MSG_REFLECT_INVALID,
        T.MSG_REFLECT_WRONG,
        T.MSG_INVALID["hotpotqa"],
        T.MSG_INVALID["scienceqa"],
        "Obversation: (Result 1/",
    ):
        assert json.dumps(msg)[1:-1] in text, msg


def test_every_gold_paragraph_of_the_easy_set_is_retrievable_by_title():
    path = DATA / "hotpotqa" / "hotpotqa_easy.jsonl"
    if not path.exists():
        pytest.skip("shared data not available")
    rows = [json.loads(line) for line in path.open(encoding="utf-8")][:50]
    for row in rows:
        box = ToolBox.for_record(row, "hotpotqa")
        for title in {t for t, _ in row["supporting_facts"]}:
            first = dict(row["context"])[title][0].strip()
            assert box.run("Retrieve", title).startswith(first[:40]), title
