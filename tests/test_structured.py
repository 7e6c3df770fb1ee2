"""Structured output (lragent/engine/structured.py) with the embedded SmolLM2 tokenizer, on the CPU.

Each constraint kind is driven by a greedy "model": random logits, apply_bitmask, argmax, accept, until the state
says the output is complete; the decoded text must then be in the constraint's language. Along the way the stop
token must be allowed exactly when the output so far is complete.
"""

from __future__ import annotations

import dataclasses
import json
import random
import re

import pytest
import torch
import transformers

from lragent.engine import structured
from lragent.engine.structured import (
    GrammarBackend,
    GrammarState,
    StructuredOutputError,
    allocate_bitmask,
    apply_bitmask,
    apply_bitmask_reference,
    reset_rows,
)
from lragent.sampling import SamplingParams

TOOL_SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 12},
        "mode": {"enum": ["search", "lookup", "finish"]},
        "arguments": {
            "type": "object",
            "properties": {
                "query": {"type": "string", "maxLength": 20},
                "limit": {"type": "integer", "minimum": 1, "maximum": 50},
                "exact": {"type": "boolean"},
            },
            "required": ["query", "limit"],
        },
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 8}, "maxItems": 3},
    },
    "required": ["name", "mode", "arguments", "tags"],
}


@pytest.fixture(scope="session")
def tokenizer(model_dir):
    return transformers.AutoTokenizer.from_pretrained(model_dir)


@pytest.fixture(scope="session")
def vocab_size(model_config) -> int:
    return model_config.vocab_size


@pytest.fixture(scope="session")
def backend(tokenizer, vocab_size) -> GrammarBackend:
    return GrammarBackend(tokenizer, vocab_size)


def _bit(bitmask: torch.Tensor, row: int, token: int) -> bool:
    return bool((int(bitmask[row, token // 32]) >> (token % 32)) & 1)


def drive(backend: GrammarBackend, params: SamplingParams, seed: int, max_steps: int = 3000) -> list[int]:
    """Greedy decoding over random logits under the constraint; returns the tokens (the stop token excluded)."""
    state = backend.state(params)
    gen = torch.Generator().manual_seed(seed)
    bitmask = allocate_bitmask(1, backend.vocab_size)
    tokens: list[int] = []
    for _ in range(max_steps):
        if state.is_terminated():
            return tokens
        state.fill(bitmask, 0)
        assert [_bit(bitmask, 0, t) for t in backend.stop_token_ids] == [state.allows_eos()] * len(
            backend.stop_token_ids
        ), "the stop tokens must be allowed exactly when the output is complete"
        logits = torch.randn(1, backend.vocab_size, generator=gen)
        apply_bitmask(logits, bitmask)
        token = int(logits.argmax())
        assert state.accept(token), f"the grammar refused the token its own mask allowed: {token}"
        if token not in backend.stop_token_ids:
            tokens.append(token)
    raise AssertionError(f"no complete output within {max_steps} tokens")


def _validate(value, schema: dict, path: str = "$") -> None:
    """Just enough JSON-schema validation for TOOL_SCHEMA (strict objects: no unknown keys)."""
    if "enum" in schema:
        assert value in schema["enum"], path
        return
    kind = schema["type"]
    if kind == "object":
        assert isinstance(value, dict), path
        assert set(schema.get("required", ())) <= value.keys() <= schema["properties"].keys(), path
        for key, item in value.items():
            _validate(item, schema["properties"][key], f"{path}.{key}")
    elif kind == "array":
        assert isinstance(value, list) and len(value) <= schema.get("maxItems", len(value)), path
        for i, item in enumerate(value):
            _validate(item, schema["items"], f"{path}[{i}]")
    elif kind == "string":
        assert isinstance(value, str) and len(value) <= schema.get("maxLength", len(value)), path
    elif kind == "integer":
        assert isinstance(value, int) and not isinstance(value, bool), path
        assert schema.get("minimum", value) <= value <= schema.get("maximum", value), path
    elif kind == "boolean":
        assert isinstance(value, bool), path
    else:
        raise AssertionError(f"validator does not know {kind}")


# --- each constraint kind: the output is in its language ------------------------------------------------------


@pytest.mark.parametrize("seed", range(3))
def test_json_schema_output_validates(backend, tokenizer, seed):
    text = tokenizer.decode(drive(backend, SamplingParams(json_schema=TOOL_SCHEMA), seed))
    _validate(json.loads(text), TOOL_SCHEMA)


def test_json_schema_as_text_gives_the_same_output(backend, tokenizer):
    as_dict = drive(backend, SamplingParams(json_schema=TOOL_SCHEMA), seed=7)
    assert drive(backend, SamplingParams(json_schema=json.dumps(TOOL_SCHEMA, indent=2)), seed=7) == as_dict


@pytest.mark.parametrize("seed", range(2))
def test_json_object_output_is_a_dict(backend, tokenizer, seed):
    assert isinstance(json.loads(tokenizer.decode(drive(backend, SamplingParams(json_object=True), seed))), dict)


@pytest.mark.parametrize("seed", range(4))
def test_regex_output_fullmatches(backend, tokenizer, seed):
    pattern = r"[A-Z][a-z]{1,8} \d{2,4}(-[a-z]{1,5})?"
    text = tokenizer.decode(drive(backend, SamplingParams(regex=pattern), seed))
    assert re.fullmatch(pattern, text), text


@pytest.mark.parametrize("seed", range(4))
def test_choice_output_is_one_of_the_choices(backend, tokenizer, seed):
    choices = ["search", 'say "hi"', "back\\slash", "new\nline", "café ☕"]
    assert tokenizer.decode(drive(backend, SamplingParams(choice=choices), seed)) in choices


@pytest.mark.parametrize("seed", range(3))
def test_ebnf_grammar_language(backend, tokenizer, seed):
    text = tokenizer.decode(drive(backend, SamplingParams(grammar='root ::= ("yes" | "no") "!"'), seed))
    assert text in ("yes!", "no!")


def test_ebnf_with_repetition(backend, tokenizer):
    grammar = 'root ::= item ("," item)*\nitem ::= [0-9] | "x"'
    for seed in range(3):
        assert re.fullmatch(
            r"[0-9x](,[0-9x])*", tokenizer.decode(drive(backend, SamplingParams(grammar=grammar), seed))
        )


# --- completion and the stop token ----------------------------------------------------------------------------


def test_terminated_once_only_the_end_can_follow(backend, tokenizer):
    state = backend.state(SamplingParams(grammar='root ::= "yes!"'))
    assert not state.is_terminated() and not state.allows_eos()
    for token in tokenizer.encode("yes!", add_special_tokens=False):
        assert not state.is_terminated()
        assert state.accept(token)
    assert state.allows_eos() and state.is_terminated()  # the engine stops here, reason "stop"
    assert state.accept(tokenizer.eos_token_id)  # or lets the model sample the stop token: also fine
    assert state.is_terminated() and not state.allows_eos()
    bitmask = allocate_bitmask(1, backend.vocab_size)
    state.fill(bitmask, 0)  # harmless after the end: only the stop tokens
    assert [t for t in range(64) if _bit(bitmask, 0, t)] == list(backend.stop_token_ids)


def test_complete_but_extensible_is_not_terminated(backend, tokenizer):
    state = backend.state(SamplingParams(regex="a+"))
    assert state.accept(tokenizer.encode("a", add_special_tokens=False)[0])
    assert state.allows_eos() and not state.is_terminated()  # "a" is complete, "aa" too: the model decides
    bitmask = allocate_bitmask(1, backend.vocab_size)
    state.fill(bitmask, 0)
    assert _bit(bitmask, 0, tokenizer.eos_token_id) and _bit(bitmask, 0, tokenizer.convert_tokens_to_ids("a"))


def test_disallowed_token_is_refused_and_the_state_kept(backend, tokenizer):
    state = backend.state(SamplingParams(choice=["yes", "no"]))
    assert not state.accept(tokenizer.encode("maybe", add_special_tokens=False)[0])
    assert not state.accept(tokenizer.eos_token_id)  # nothing complete yet
    assert not state.accept(-1)
    assert not state.accept(backend.vocab_size + 5)
    for token in tokenizer.encode("no", add_special_tokens=False):
        assert state.accept(token)
    assert state.is_terminated()


def test_special_tokens_never_allowed_inside_strings(backend, tokenizer):
    state = backend.state(SamplingParams(json_schema={"type": "string"}))
    assert state.accept(tokenizer.encode('"', add_special_tokens=False)[0])
    bitmask = allocate_bitmask(1, backend.vocab_size)
    state.fill(bitmask, 0)
    special = sorted(i for i, t in tokenizer.added_tokens_decoder.items() if t.special)
    assert special and not any(_bit(bitmask, 0, t) for t in special)
    assert _bit(bitmask, 0, tokenizer.convert_tokens_to_ids("hello"))


def test_extra_stop_tokens_and_padded_vocabulary(tokenizer, vocab_size):
    padded = vocab_size + 40  # a model whose logits are wider than the tokenizer
    backend = GrammarBackend(tokenizer, padded, stop_token_ids=[0, tokenizer.eos_token_id])
    assert backend.stop_token_ids == (0, tokenizer.eos_token_id)
    state = backend.state(SamplingParams(regex="ab?"))
    bitmask = allocate_bitmask(1, padded)
    state.fill(bitmask, 0)
    assert not any(_bit(bitmask, 0, t) for t in (0, tokenizer.eos_token_id, *range(vocab_size, padded)))
    assert state.accept(tokenizer.convert_tokens_to_ids("a"))
    state.fill(bitmask, 0)
    assert _bit(bitmask, 0, 0) and _bit(bitmask, 0, tokenizer.eos_token_id)  # both end it once complete
    assert not any(_bit(bitmask, 0, t) for t in range(vocab_size, padded))
    assert state.accept(0) and state.is_terminated()
    with pytest.raises(ValueError, match="stop_token_ids"):
        GrammarBackend(tokenizer, vocab_size, stop_token_ids=[vocab_size])


def test_fork_is_independent(backend, tokenizer):
    state = backend.state(SamplingParams(choice=["yes", "no"]))
    other = state.fork()
    assert isinstance(other, GrammarState)
    assert state.accept(tokenizer.convert_tokens_to_ids("yes")) and state.is_terminated()
    assert not other.is_terminated() and other.accept(tokenizer.convert_tokens_to_ids("no"))


# --- bad input: StructuredOutputError naming the field --------------------------------------------------------


def _bypassing_validation(**fields) -> SamplingParams:
    """SamplingParams with a value its own validation would reject, to test the backend's own checks."""
    params = SamplingParams()
    for name, value in fields.items():
        object.__setattr__(params, name, value)
    return params


@pytest.mark.parametrize(
    "params, field",
    [
        (_bypassing_validation(json_schema='{"type": "object",'), "json_schema"),  # malformed text
        (_bypassing_validation(json_schema=[1, 2]), "json_schema"),  # not an object
        (SamplingParams(json_schema={"type": "nope"}), "json_schema"),
        (SamplingParams(json_schema={"type": 3}), "json_schema"),
        (SamplingParams(json_schema={"type": "object", "properties": 5}), "json_schema"),
        (SamplingParams(json_schema={"$ref": "#/$defs/missing"}), "json_schema"),
        (SamplingParams(json_schema={"type": "integer", "minimum": 5, "maximum": 1}), "json_schema"),  # unsatisfiable
        (SamplingParams(json_schema={"enum": []}), "json_schema"),
        (SamplingParams(regex="(("), "regex"),
        (SamplingParams(regex="[a-"), "regex"),
        (SamplingParams(regex="(?=a)a"), "regex"),  # lookahead: unsupported
        (SamplingParams(regex=r"[^\s\S]"), "regex"),  # matches nothing
        (SamplingParams(grammar='root ::= ("yes" | '), "grammar"),
        (SamplingParams(grammar="root ::= undefined_rule"), "grammar"),
        (SamplingParams(grammar='start ::= "a"'), "grammar"),  # no root rule
        (SamplingParams(grammar='root ::= root "a"'), "grammar"),  # no finite output
        (_bypassing_validation(choice=[]), "choice"),
    ],
)
def test_bad_constraint_names_the_field(backend, params, field):
    with pytest.raises(StructuredOutputError, match=rf"^{field}: \S") as info:
        backend.state(params)
    assert isinstance(info.value, ValueError)
    assert "/project/cpp" not in str(info.value)  # the library's source location is stripped


def test_sampling_params_rejects_malformed_schema_text_first():
    with pytest.raises(ValueError, match="^json_schema"):
        SamplingParams(json_schema='{"type": ')


def test_unconstrained_params_are_a_programming_error(backend):
    with pytest.raises(ValueError, match="no output constraint"):
        backend.compile(SamplingParams())


# --- the compile cache ----------------------------------------------------------------------------------------


def test_same_constraint_compiles_once(backend):
    schema = {"type": "object", "properties": {"cached": {"type": "integer"}}, "required": ["cached"]}
    before = backend.compiles
    first = backend.compile(SamplingParams(json_schema=schema))
    assert backend.compiles == before + 1
    assert backend.compile(SamplingParams(json_schema=json.dumps(schema, indent=4))) is first  # text form: same key
    backend.state(SamplingParams(json_schema=schema, temperature=0.5))
    assert backend.compiles == before + 1
    reordered = {"required": ["cached"], "properties": schema["properties"], "type": "object"}
    backend.compile(SamplingParams(json_schema=reordered))  # another declared order may be another grammar
    assert backend.compiles == before + 2


def test_cache_is_lru_and_bounded(backend):
    size = backend.cache_size
    backend.cache_size = 2
    try:
        before = backend.compiles
        a, b, c = (SamplingParams(regex=f"lru{i}") for i in range(3))
        backend.compile(a), backend.compile(b), backend.compile(a), backend.compile(c)  # evicts b, keeps a
        assert backend.compiles == before + 3 and backend.cache_len == 2
        backend.compile(a)
        assert backend.compiles == before + 3
        backend.compile(b)
        assert backend.compiles == before + 4
    finally:
        backend.cache_size = size


def test_errors_are_not_cached_as_grammars(backend):
    before = backend.compiles
    for _ in range(2):
        with pytest.raises(StructuredOutputError):
            backend.compile(SamplingParams(regex="(("))
    assert backend.compiles == before


# --- bitmasks ---------------------------------------------------------------------------------------------------


def test_allocate_and_reset_rows():
    bitmask = allocate_bitmask(3, 100, "cpu")
    assert bitmask.shape == (3, 4) and bitmask.dtype == torch.int32 and bool((bitmask == -1).all())
    bitmask.zero_()
    reset_rows(bitmask, [0, 2])
    assert bitmask[:, 0].tolist() == [-1, 0, -1]
    reset_rows(bitmask)
    assert bool((bitmask == -1).all())


def _random_case(rng: random.Random, batch: int, vocab: int, words: int, dtype: torch.dtype):
    gen = torch.Generator().manual_seed(rng.randrange(1 << 30))
    logits = torch.randn(batch, vocab, generator=gen).to(dtype)
    density = rng.choice([0.0, 0.02, 0.5, 0.98, 1.0])  # sparse masks like a grammar's, dense, empty, full
    bits = torch.rand(batch, words * 32, generator=gen) < density
    weights = torch.tensor([1 << i for i in range(32)], dtype=torch.int64)
    packed = (bits.view(batch, words, 32).long() * weights).sum(-1)
    bitmask = torch.where(packed >= 1 << 31, packed - (1 << 32), packed).to(torch.int32)
    return logits, bitmask


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_apply_bitmask_matches_reference(dtype):
    rng = random.Random(1234)
    for vocab in (1, 31, 32, 33, 100, 257, 1000):  # not multiples of 32 too
        for extra_words in (0, 1):  # a bitmask wider than the vocabulary: the extra bits are ignored
            batch = rng.randint(1, 5)
            logits, bitmask = _random_case(rng, batch, vocab, (vocab + 31) // 32 + extra_words, dtype)
            expected = logits.clone()
            apply_bitmask_reference(expected, bitmask)
            for apply in (apply_bitmask, lambda x, m: structured._apply_bitmask_torch(x, m, None)):
                got = logits.clone()
                apply(got, bitmask)
                assert torch.equal(got, expected), (vocab, extra_words, dtype)


def test_apply_bitmask_rows_leave_other_rows_alone():
    rng = random.Random(5)
    logits, bitmask = _random_case(rng, 4, 300, 10, torch.float32)
    bitmask[1] = 0
    expected = logits.clone()
    apply_bitmask_reference(expected[2:3], bitmask[2:3])
    apply_bitmask_reference(expected[0:1], bitmask[0:1])
    library, plain = logits.clone(), logits.clone()
    apply_bitmask(library, bitmask, rows=[2, 0])
    structured._apply_bitmask_torch(plain, bitmask, [2, 0])
    assert torch.equal(library, expected) and torch.equal(plain, expected)


def test_apply_bitmask_rejects_a_mask_that_does_not_cover_the_logits():
    with pytest.raises(ValueError, match="does not cover"):
        apply_bitmask(torch.zeros(2, 65), allocate_bitmask(2, 64))
    with pytest.raises(ValueError, match="int32"):
        apply_bitmask(torch.zeros(2, 64), torch.zeros(2, 2, dtype=torch.int64))


def test_fill_batch_rows_then_apply(backend, tokenizer):
    """A batch of three where row 1 is unconstrained: its row stays all ones, and its logits untouched."""
    states = {0: backend.state(SamplingParams(choice=["yes", "no"])), 2: backend.state(SamplingParams(regex="[0-9]"))}
    bitmask = allocate_bitmask(3, backend.vocab_size)
    bitmask.zero_()  # as left over by the previous step
    reset_rows(bitmask, [1])
    for row, state in states.items():
        state.fill(bitmask, row)
    logits = torch.randn(3, backend.vocab_size)
    unconstrained = logits[1].clone()
    apply_bitmask(logits, bitmask)
    assert torch.equal(logits[1], unconstrained)
    assert tokenizer.decode([int(logits[0].argmax())]) in ("yes", "no", "y", "n")
    assert tokenizer.decode([int(logits[2].argmax())]).isdigit()
    assert int(torch.isfinite(logits[2]).sum()) == 10


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_apply_bitmask_on_cuda_matches_reference(dtype):
    rng = random.Random(99)
    for vocab in (33, 1000, 128256):
        logits, bitmask = _random_case(rng, 4, vocab, (vocab + 31) // 32, dtype)
        expected = logits.clone()
        if vocab > 1000:  # the reference is a Python loop: check the torch path against it, the kernel against both
            structured._apply_bitmask_torch(expected, bitmask, None)
        else:
            apply_bitmask_reference(expected, bitmask)
        got = logits.cuda()
        apply_bitmask(got, bitmask.pin_memory())  # a host mask, as the engine passes it
        assert torch.equal(got.cpu(), expected)
        got = logits.cuda()
        structured._apply_bitmask_torch(got, bitmask.cuda(), None)
        assert torch.equal(got.cpu(), expected)


def test_dataclass_replace_keeps_the_constraint():
    # the engine may rebuild params (e.g. defaults filled in): the constraint and its cache key survive
    params = dataclasses.replace(SamplingParams(json_schema=TOOL_SCHEMA), max_tokens=10)
    assert structured.constraint_of(params)[0] == "json_schema"
