"""Structured output: per-request grammars (JSON schema, any JSON object, regex, EBNF, a choice of strings) as token
bitmasks, built on xgrammar.

Why xgrammar (measured by `python -m lragent.bench.grammar` on the 2-core CPU, SmolLM2 tokenizer, a ~100-token tool
call): its per-token host work (fill the mask, accept the token) averages ~6 us with a flat profile (p90 ~9 us),
because token masks are precomputed when the grammar compiles; llguidance 1.9.1 has a lower median (~4 us) but a
mean of ~11 us with 20-120 us spikes at every structural position (keys, numbers), which is what a decode step waits
for. xgrammar compiles slower (~3.5-5 ms vs ~0.6 ms for the tool-call schema), which the LRU cache here pays once per
distinct constraint. It also ships the mask-apply kernels we use (C++ on the CPU, Triton on CUDA).

How the engine uses it (one GrammarBackend per engine, one GrammarState per constrained sequence):

    backend = GrammarBackend(tokenizer, model_config.vocab_size, stop_token_ids=sorted(engine.eos_ids))
    backend.compile(params)                # on admission: raises StructuredOutputError naming the field
    state = backend.state(params)          # per sequence (a cache hit after the compile above)
    bitmask = allocate_bitmask(batch, vocab_size, device)    # host memory, all ones; reuse across steps
    ... each step: state.fill(bitmask, row) for constrained rows, reset_rows(bitmask, rows) for the others,
        apply_bitmask(logits, bitmask) before sampling, then state.accept(token); finish with "stop" once
        state.is_terminated(); a False from accept fails that request alone.

Engines without a tokenizer cannot use constraints (the grammar works on the text of the tokens): the engine rejects a
constrained request before queueing it, naming the field; nothing here is built for such an engine.

Threads: xgrammar's fill / accept hold the GIL (measured: a fill loop in a helper thread slows Python work in the
main thread instead of overlapping it), so gain the overlap by ordering, not threads: launch step t's forward (the
GPU runs it asynchronously), then accept the tokens of step t-1 and fill the masks for step t on the host, then wait
for the logits. One GrammarState must not be used by two threads at once; different states may be. GrammarBackend is
safe to share (its cache is locked; xgrammar's compiler is thread-safe).
"""

from __future__ import annotations

import json
import os
import re
import threading
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any

import torch

from lragent.sampling import CONSTRAINTS, SamplingParams

if TYPE_CHECKING:
    import xgrammar

CACHE_SIZE = 256  # compiled grammars kept (LRU); the tool-call schema of the bench is ~70 KB with SmolLM2
_LIBRARY_PREFIX = re.compile(r"^\[[\d:.]+\] \S+?:\d+: (?:Check failed: .*? is false: )?")  # "[14:03:59] x.cc:94: "


class StructuredOutputError(ValueError):
    """A constraint that cannot be used: a malformed or unsatisfiable JSON schema, a bad regex, a bad grammar.

    A ValueError so existing bad-input handling catches it; the message starts with the SamplingParams field name
    ("json_schema: ...") so the server can report the offending param, as sampling.py's own errors do.
    """


def _xgrammar() -> Any:
    """Import xgrammar on first use: engines that never see a constraint do not pay for (or need) it."""
    try:
        import xgrammar
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError("structured output needs xgrammar: pip install xgrammar==0.2.9") from exc
    return xgrammar


def constraint_of(params: SamplingParams) -> tuple[str, str]:
    """(field, canonical text) of the request's one constraint: the cache key, and the field for error messages.

    JSON schemas are re-serialised compactly so a dict and its JSON text share one cache entry. Keys are NOT sorted:
    properties are generated in the schema's declared order, so two orders are two different grammars.
    """
    field = next((name for name in CONSTRAINTS if getattr(params, name) not in (None, False)), None)
    if field is None:
        raise ValueError("these SamplingParams have no output constraint")
    value = getattr(params, field)
    if field == "json_schema":
        if isinstance(value, str):
            try:
                value = json.loads(value)
            except ValueError as exc:
                raise StructuredOutputError(f"json_schema: not valid JSON ({exc})") from None
        if not isinstance(value, dict):
            raise StructuredOutputError(f"json_schema: must be a JSON object, got {type(value).__name__}")
        return field, json.dumps(value, separators=(",", ":"), ensure_ascii=False)
    if field == "json_object":
        return field, ""
    if field == "choice":
        if not isinstance(value, (list, tuple)) or not value or not all(isinstance(c, str) and c for c in value):
            raise StructuredOutputError("choice: must be a non-empty list of non-empty strings")
        return field, json.dumps(list(value), ensure_ascii=False)
    if not isinstance(value, str) or not value:
        raise StructuredOutputError(f"{field}: must be a non-empty string")
    return field, value


def _library_message(exc: BaseException) -> str:
    """xgrammar's error text without its "[time] file.cc:line: Check failed: ..." prefix."""
    return _LIBRARY_PREFIX.sub("", str(exc).strip()) or type(exc).__name__


class GrammarBackend:
    """Compiles constraints for one tokenizer and model, and hands out per-sequence matchers.

    `vocab_size` is the model's logits width (config.json), which may exceed len(tokenizer): ids without a token
    are never allowed. The stop tokens (default: the tokenizer's EOS) are the only ids the grammar allows once the
    output is complete, and it allows them then and only then; pass the engine's full EOS set (config.json's
    eos_token_id plus the tokenizer's) so that any of them ends a constrained output. Special tokens other than the
    stop tokens (<|im_start|>, <|endoftext|>, ...) are never allowed: xgrammar would otherwise treat their text as
    literal characters inside JSON strings, and the detokenizer drops them (skip_special_tokens), corrupting the text.

    `any_whitespace=False` (the default) fixes JSON formatting to json.dumps's one-line style (", " and ": "):
    with free whitespace a sampling model can emit whitespace until max_tokens (a known xgrammar/vLLM failure), and
    a bounded count (`max_whitespace_cnt`) made masks ~8x slower here. True allows any whitespace between tokens.
    """

    def __init__(
        self,
        tokenizer: Any,
        vocab_size: int,
        *,
        stop_token_ids: Iterable[int] | None = None,
        any_whitespace: bool = False,
        cache_size: int = CACHE_SIZE,
    ) -> None:
        xgr = _xgrammar()
        if stop_token_ids is None:
            stop_token_ids = [] if tokenizer.eos_token_id is None else [tokenizer.eos_token_id]
        stop_token_ids = list(stop_token_ids)
        self.stop_token_ids: tuple[int, ...] = tuple(sorted(set(stop_token_ids)))
        if not self.stop_token_ids or not all(0 <= t < vocab_size for t in self.stop_token_ids):
            raise ValueError(
                f"stop_token_ids must be non-empty ids below vocab_size {vocab_size}, got {stop_token_ids}"
            )
        self.vocab_size = vocab_size
        self.any_whitespace = any_whitespace
        self.cache_size = cache_size
        self.compiles = 0  # compilations done (cache misses), for metrics and tests
        detected = xgr.TokenizerInfo.from_huggingface(tokenizer, vocab_size=vocab_size)
        special = {i for i, tok in getattr(tokenizer, "added_tokens_decoder", {}).items() if tok.special}
        special -= set(self.stop_token_ids)
        vocab = [""] * vocab_size  # "" marks a special token to xgrammar: never allowed, never accepted
        for text, index in tokenizer.get_vocab().items():
            if index < vocab_size and index not in special:
                vocab[index] = text
        metadata = json.loads(detected.dump_metadata()) | {"stop_token_ids": list(self.stop_token_ids)}
        self._info = xgr.TokenizerInfo.from_vocab_and_metadata(vocab, json.dumps(metadata))
        # our own cache (counted, bounded by entries); xgrammar's would key on its own arguments, unbounded by default
        self._compiler = xgr.GrammarCompiler(self._info, max_threads=min(8, os.cpu_count() or 1), cache_enabled=False)
        self._cache: OrderedDict[tuple[str, str], xgrammar.CompiledGrammar] = OrderedDict()
        self._lock = threading.Lock()
        self._not_stop = torch.full((1, (vocab_size + 31) // 32), -1, dtype=torch.int32)  # all bits but stop ids
        for token in self.stop_token_ids:
            word = int(self._not_stop[0, token >> 5]) & 0xFFFFFFFF
            word &= ~(1 << (token & 31))
            self._not_stop[0, token >> 5] = word - (1 << 32) if word >= 1 << 31 else word

    def compile(self, params: SamplingParams) -> xgrammar.CompiledGrammar:
        """The compiled grammar of the request's constraint, from the cache when the same canonical text was seen.

        Raises StructuredOutputError (message starting with the field) for a constraint xgrammar rejects or one no
        output can satisfy (its first mask allows nothing, not even the end). Call it when the request is added, so
        a bad constraint fails that request before it is queued. Compiling runs in the calling thread (~1-20 ms for
        typical schemas, longer for huge ones) and holds the GIL.
        """
        key = constraint_of(params)
        with self._lock:
            compiled = self._cache.get(key)
            if compiled is not None:
                self._cache.move_to_end(key)
                return compiled
        compiled = self._compile(*key)  # outside the lock: other requests' cache hits do not wait for it
        with self._lock:
            self.compiles += 1
            self._cache[key] = compiled
            self._cache.move_to_end(key)
            while len(self._cache) > self.cache_size:
                self._cache.popitem(last=False)
        return compiled

    def _compile(self, field: str, text: str) -> xgrammar.CompiledGrammar:
        xgr = _xgrammar()
        compiler = self._compiler
        try:
            if field == "json_schema":
                compiled = compiler.compile_json_schema(text, any_whitespace=self.any_whitespace, strict_mode=True)
            elif field == "json_object":
                compiled = compiler.compile_json_schema(
                    '{"type":"object"}', any_whitespace=self.any_whitespace, strict_mode=False
                )
            elif field == "regex":
                compiled = compiler.compile_regex(text)
            elif field == "grammar":
                compiled = compiler.compile_grammar(text)  # GBNF-style EBNF, start rule `root`
            else:  # choice: EBNF alternatives; JSON string escapes (\" \\ \n \uXXXX) are valid EBNF literals
                choices = json.loads(text)
                compiled = compiler.compile_grammar(
                    "root ::= " + " | ".join(json.dumps(c, ensure_ascii=False) for c in choices)
                )
        except (RuntimeError, ValueError, TypeError) as exc:
            raise StructuredOutputError(f"{field}: {_library_message(exc)}") from None
        probe = torch.zeros((1, self._not_stop.shape[1]), dtype=torch.int32)
        xgr.GrammarMatcher(compiled).fill_next_token_bitmask(probe, 0)
        if not bool(probe.any()):  # e.g. a left-recursive rule, an empty character class
            raise StructuredOutputError(f"{field}: no output can satisfy this constraint")
        return compiled

    def state(self, params: SamplingParams) -> GrammarState:
        """A fresh matcher for one sequence (compiles, or takes the cached grammar)."""
        return GrammarState(_xgrammar().GrammarMatcher(self.compile(params)), self._not_stop)

    @property
    def cache_len(self) -> int:
        return len(self._cache)


class GrammarState:
    """Where one sequence stands in its grammar: the next-token mask, advancing by sampled tokens, completion."""

    __slots__ = ("_matcher", "_not_stop", "_terminal", "_scratch")

    def __init__(self, matcher: xgrammar.GrammarMatcher, not_stop: torch.Tensor) -> None:
        self._matcher = matcher
        self._not_stop = not_stop  # shared, read-only
        self._terminal: bool | None = None  # is_terminated() of the current position, computed once
        self._scratch: torch.Tensor | None = None

    def fill(self, bitmask: torch.Tensor, row: int) -> None:
        """Write the allowed next tokens into row `row` of a host bitmask from `allocate_bitmask` (bit set = allowed).

        Stop tokens are allowed exactly when the output so far is complete. After the stop token was accepted only
        the stop tokens are allowed (the request is over; this keeps a late call harmless). Does not advance.
        """
        if self._matcher.is_terminated():
            bitmask[row].copy_(~self._not_stop[0])
            return
        self._matcher.fill_next_token_bitmask(bitmask, row)

    def accept(self, token: int) -> bool:
        """Advance by the sampled token. False (state unchanged) if the grammar does not allow it here: the engine
        then fails this request alone. Accepting a stop token when complete terminates the state."""
        self._terminal = None
        if token < 0:  # xgrammar rejects ids >= vocab_size itself
            return False
        return bool(self._matcher.accept_token(int(token)))

    def allows_eos(self) -> bool:
        """The output so far is complete, so the stop tokens are allowed next (and were the EOS sampled, it ends)."""
        return not self._matcher.is_terminated() and bool(self._matcher.is_completed())

    def is_terminated(self) -> bool:
        """The output is complete and nothing but the end can follow (or the stop token was already accepted): the
        engine finishes the request now, reason "stop", without spending a step on sampling the EOS."""
        if self._matcher.is_terminated():
            return True
        if self._terminal is None:
            self._terminal = False
            if self._matcher.is_completed():  # e.g. "a*" is complete but can go on: look at the mask
                if self._scratch is None:
                    self._scratch = torch.empty_like(self._not_stop)
                self._matcher.fill_next_token_bitmask(self._scratch, 0)
                self._terminal = not bool((self._scratch & self._not_stop).any())
        return self._terminal

    def fork(self) -> GrammarState:
        """An independent copy at the same position (n > 1 samples of one prompt share the prompt, not the state)."""
        return GrammarState(self._matcher.fork(), self._not_stop)


def allocate_bitmask(batch: int, vocab_size: int, device: torch.device | str | None = None) -> torch.Tensor:
    """int32 [batch, ceil(vocab_size / 32)], all ones (everything allowed), in host memory.

    The grammar library writes masks on the host, so the tensor lives there whatever `device` is; `device` is where
    the logits are: for CUDA the memory is pinned so `apply_bitmask`'s copy can be asynchronous. A pinned buffer must
    not be refilled before that copy ran (double-buffer, or refill after the step's sampling synchronised).
    """
    pin = torch.device(device).type == "cuda" if device is not None else False
    return torch.full((batch, (vocab_size + 31) // 32), -1, dtype=torch.int32, pin_memory=pin)


def reset_rows(bitmask: torch.Tensor, rows: Sequence[int] | None = None) -> None:
    """Set rows (all rows when None) to all ones: unconstrained sequences' rows must allow everything."""
    if rows is None:
        bitmask.fill_(-1)
    elif len(rows):
        bitmask[torch.as_tensor(list(rows), dtype=torch.long)] = -1


def apply_bitmask(logits: torch.Tensor, bitmask: torch.Tensor, rows: Sequence[int] | None = None) -> None:
    """In place: logits of tokens whose bit is 0 become -inf, on the logits' device.

    `logits` [batch, vocab] (float32 / bfloat16 / float16), `bitmask` int32 [batch, >= ceil(vocab / 32)] (bits past
    `vocab` are ignored); `rows` limits the work to those rows (the others are left untouched). A host bitmask is
    copied to the logits' device (non-blocking when pinned). Kernels: xgrammar's C++ one on the CPU, its Triton one
    on CUDA (compiled by Triton on first use: call once per dtype in the engine's warm-up), else plain torch. The
    CUDA paths do not synchronise; with `rows=None` the torch path can be captured in a CUDA graph.
    """
    if logits.dim() != 2 or bitmask.dim() != 2 or bitmask.dtype != torch.int32:
        raise ValueError("apply_bitmask needs 2-D logits and a 2-D int32 bitmask")
    batch, vocab = logits.shape
    if bitmask.shape[0] != batch or bitmask.shape[1] * 32 < vocab:
        raise ValueError(f"bitmask {tuple(bitmask.shape)} does not cover logits {tuple(logits.shape)}")
    if bitmask.device != logits.device:
        bitmask = bitmask.to(logits.device, non_blocking=True)
    indices = None if rows is None else [int(r) for r in rows]
    if indices is not None and not indices:
        return
    kernel = _library_kernel(logits)
    if kernel is not None:
        kernel(logits, bitmask, vocab, indices)
    else:
        _apply_bitmask_torch(logits, bitmask, indices)


def _library_kernel(logits: torch.Tensor) -> Any:
    if logits.stride(-1) != 1 or logits.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        return None
    try:
        if logits.device.type == "cpu":
            from xgrammar.kernels.apply_token_bitmask_inplace_cpu import apply_token_bitmask_inplace_cpu as kernel
        elif logits.device.type == "cuda":
            from xgrammar.kernels.apply_token_bitmask_inplace_triton import (
                apply_token_bitmask_inplace_triton as kernel,
            )
        else:
            return None
    except ImportError:  # no xgrammar, or no Triton on this CUDA machine
        return None
    return kernel


def _apply_bitmask_torch(logits: torch.Tensor, bitmask: torch.Tensor, rows: list[int] | None) -> None:
    """Bits unpacked with shifts ([batch, words, 32] -> [batch, vocab]), one masked_fill: no loop over tokens."""
    vocab = logits.shape[1]
    shifts = torch.arange(32, dtype=torch.int32, device=logits.device)
    if rows is None:
        bits = ((bitmask.unsqueeze(-1) >> shifts) & 1).flatten(1)[:, :vocab]
        logits.masked_fill_(bits == 0, float("-inf"))
    else:
        index = torch.tensor(rows, dtype=torch.long, device=logits.device)
        bits = ((bitmask[index].unsqueeze(-1) >> shifts) & 1).flatten(1)[:, :vocab]
        logits[index] = logits[index].masked_fill(bits == 0, float("-inf"))


def apply_bitmask_reference(logits: torch.Tensor, bitmask: torch.Tensor) -> None:
    """Slow and obviously correct: token j of row i is allowed iff bit j % 32 of word j // 32 is set."""
    words = bitmask.cpu().tolist()
    for i in range(logits.shape[0]):
        for j in range(logits.shape[1]):
            if not (words[i][j // 32] >> (j % 32)) & 1:
                logits[i, j] = float("-inf")
