"""Structured output through the engine (embedded SmolLM2, CPU): constrained requests produce text of their
constraint and finish with "stop", unconstrained requests in the same batch are untouched, bad constraints are
refused before anything is queued."""

from __future__ import annotations

import json
import re

import pytest

from lragent import LLM, SamplingParams
from lragent.engine.structured import StructuredOutputError

SCHEMA = {
    "type": "object",
    "properties": {"tool": {"type": "string", "enum": ["search", "lookup", "finish"]},
                   "argument": {"type": "string", "maxLength": 12}},
    "required": ["tool", "argument"],
    "additionalProperties": False,
}  # fmt: skip
PROMPT = "Question: Which magazine was started first, Arthur's Magazine or First for Women?\nAnswer in JSON:"


@pytest.fixture(scope="module")
def llm(qv_adapters):
    return LLM(adapters=qv_adapters, sharing="base_lr_shared", allow_unshared_a=True, max_model_len=512)


def test_constrained_requests_follow_their_constraint(llm):
    params = [
        SamplingParams(max_tokens=48, temperature=0.0, json_schema=SCHEMA),
        SamplingParams(max_tokens=48, temperature=0.9, seed=3, json_schema=json.dumps(SCHEMA)),
        SamplingParams(max_tokens=24, temperature=0.9, seed=4, json_object=True),
        SamplingParams(max_tokens=16, temperature=0.9, seed=5, regex=r"(yes|no), [0-9]{1,3}"),
        SamplingParams(max_tokens=16, temperature=0.0, choice=["Arthur's Magazine", "First for Women"]),
    ]
    outs = llm.generate([PROMPT] * len(params), ["plan", "action", "reflect", None, "plan"], params)
    for out in outs[:2]:
        value = json.loads(out.text)
        assert set(value) == {"tool", "argument"} and value["tool"] in ("search", "lookup", "finish")
        assert len(value["argument"]) <= 12 and out.finish_reason == "stop"
    assert outs[2].finish_reason == "length" or isinstance(json.loads(outs[2].text), dict)
    assert re.fullmatch(r"(yes|no), [0-9]{1,3}", outs[3].text)
    assert outs[4].text in ("Arthur's Magazine", "First for Women") and outs[4].finish_reason == "stop"


def test_unconstrained_neighbours_are_untouched(llm):
    plain = SamplingParams(max_tokens=8, temperature=0.0)
    alone = llm.generate([PROMPT], "plan", plain)[0].token_ids
    mixed = llm.generate([PROMPT, PROMPT], ["plan", "plan"], [plain, SamplingParams(max_tokens=8, json_object=True)])
    assert mixed[0].token_ids == alone


@pytest.mark.parametrize(
    "kwargs, field",
    [({"json_schema": "{not json"}, "json_schema"), ({"json_schema": {"type": "nope"}}, "json_schema"),
     ({"regex": "(("}, "regex"), ({"grammar": "root ::= ("}, "grammar")],
)  # fmt: skip
def test_bad_constraints_are_refused_before_queuing(llm, kwargs, field):
    with pytest.raises(ValueError, match=f"^{field}"):
        llm.generate([PROMPT, PROMPT], "plan", [SamplingParams(max_tokens=2), SamplingParams(max_tokens=2, **kwargs)])
    assert not llm.engine.has_unfinished()


def test_structured_error_is_a_value_error():
    assert issubclass(StructuredOutputError, ValueError)
