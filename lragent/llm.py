"""The offline Python API: `LLM(...).generate(...)`, `chat`, `cache_stats`."""

from __future__ import annotations

import contextlib
import math
import sys
from collections.abc import Sequence as Seq
from dataclasses import replace
from pathlib import Path
from types import TracebackType
from typing import Any, cast

from lragent.config import EngineConfig
from lragent.engine.llm_engine import LLMEngine, RequestOutput
from lragent.engine.memory import held_only_by
from lragent.lora.request import LoRARequest
from lragent.sampling import SamplingParams

Prompt = str | list[int]
Message = dict[str, str]
ParamsArg = SamplingParams | Seq[SamplingParams | None] | None
AdapterArg = str | Seq[str | None] | None


def _has(value: object, kind: type) -> bool:
    """`value` is a `kind`, or a list / tuple holding one."""
    return isinstance(value, kind) or (isinstance(value, (list, tuple)) and any(isinstance(v, kind) for v in value))


def _params_and_adapter(first: object, second: object) -> tuple[ParamsArg, AdapterArg]:
    """Positions 2 and 3 of `generate` / `chat` by type: sampling params then adapter (vLLM's order), or the
    older adapter then sampling params. A string (or a list holding one) is an adapter, a SamplingParams (or a list
    holding one) is sampling params; with neither (None, lists of None) the order does not matter."""
    if _has(first, str) or _has(second, SamplingParams):
        first, second = second, first
    if _has(first, str) or _has(second, SamplingParams):
        raise TypeError("sampling params and adapter: give one of each (a SamplingParams and an adapter name)")
    return cast(ParamsArg, first), cast(AdapterArg, second)


def ensure_lora(engine: LLMEngine, request: LoRARequest) -> str:
    """The adapter name of `request`, loading its folder under that name when no adapter of that name is loaded."""
    if not isinstance(request, LoRARequest):
        raise TypeError(f"lora_request must be a LoRARequest, got {type(request).__name__}")
    loaded = engine.registry.adapters.get(request.lora_name)
    if loaded is None:
        if not request.lora_path:
            raise ValueError(f"LoRARequest {request.lora_name!r}: not loaded and no lora_path to load it from")
        engine.load_adapter(request.lora_name, request.lora_path)
    elif request.lora_path and _folder(request.lora_path) != _folder(loaded.path):
        raise ValueError(f"adapter {request.lora_name!r} is already loaded from another folder")
    return request.lora_name


def _folder(path: str) -> Path:
    return Path(path).expanduser().resolve()


class LLM:
    """Several LoRA agents on one base model, with a KV cache shared across them as `sharing` allows.

    >>> llm = LLM(adapters={"plan": "adapters/plan", "action": "adapters/action"}, sharing="base_shared")
    >>> llm.generate(["Question: ..."], SamplingParams(max_tokens=32), adapter="plan")[0].outputs[0].text
    """

    def __init__(
        self,
        model: str = "smollm2-135m-instruct",
        adapters: dict[str, str] | None = None,
        sharing: str = "auto",
        device: str = "cpu",
        dtype: str = "auto",
        **engine_kwargs: Any,
    ):
        config = EngineConfig(
            model=model,
            adapters=dict(adapters or {}),
            sharing=sharing,
            device=device,
            dtype=dtype,
            **engine_kwargs,
        )
        self.engine = LLMEngine(config)

    @classmethod
    def from_config(cls, config: EngineConfig) -> LLM:
        llm = cls.__new__(cls)
        llm.engine = LLMEngine(config)
        return llm

    @property
    def tokenizer(self):
        return self.engine.tokenizer

    @property
    def adapters(self) -> list[str]:
        return sorted(self.engine.registry.adapters)

    def generate(
        self,
        prompts: Prompt | Seq[Prompt],
        sampling_params: ParamsArg | AdapterArg = None,
        adapter: AdapterArg | ParamsArg = None,
        cache_salt: str | None = None,
        *,
        lora_request: LoRARequest | Seq[LoRARequest | None] | None = None,
    ) -> list[RequestOutput]:
        """Run all prompts to completion in one continuous batch; outputs come back in prompt order.

        `generate(prompts, sampling_params, adapter="plan")` as in vLLM. Positions 2 and 3 are told apart by type,
        so the older order `generate(prompts, "plan", params)` works too: a SamplingParams (or a list holding one)
        is sampling params, a string (or a list holding one) is an adapter name. `adapter` is one name for all
        prompts or one per prompt (None = the base model); `lora_request` (a LoRARequest, or one per prompt) names
        the adapter instead, loading its folder first when no adapter of that name is loaded.

        With `n` > 1 in a prompt's sampling params, its n outputs come back one after the other in its place (a flat
        list: each sample is its own RequestOutput, whose vLLM-shaped `.outputs` is a one-item list). The batch is
        atomic: a bad request raises before any runs and leaves the engine untouched (an adapter that `lora_request`
        loaded stays loaded). A request the engine fails while running comes back with `finish_reason == "error"`
        and `error` set; the others are unaffected. Prompts with a different `cache_salt` share no cached block with
        these.
        """
        # One prompt (text or token ids) or several; the isinstance tests below are what tell them apart.
        if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
            prompts = [cast(Prompt, prompts)]
        prompts = cast(Seq[Prompt], prompts)
        n = len(prompts)
        sampling_params, adapter = _params_and_adapter(sampling_params, adapter)
        if lora_request is not None:
            if adapter is not None:
                raise ValueError("give either adapter or lora_request, not both")
            adapter = self._adapters_of(lora_request)
        adapters: list[str | None] = (
            list(adapter) if isinstance(adapter, (list, tuple)) else [cast(str | None, adapter)] * n
        )
        params: list[SamplingParams | None] = (
            list(sampling_params)
            if isinstance(sampling_params, (list, tuple))
            else [cast(SamplingParams | None, sampling_params)] * n
        )
        if len(adapters) != n or len(params) != n:
            raise ValueError(f"{n} prompts but {len(adapters)} adapters and {len(params)} sampling params")
        for name in set(adapters):
            self.engine.registry.slot_of(name)  # unknown adapter: fail before queuing anything
        groups: list[list[str]] = []
        try:
            for p, sp, a in zip(prompts, params, adapters):
                groups.append(self._add_samples(p, sp, a, cache_salt))
            done = self._run_to_completion({i for g in groups for i in g})
        except BaseException:
            for request_id in (i for g in groups for i in g):  # nothing of this call stays queued (a bad prompt, ...)
                self.engine.abort(request_id)
            raise
        return [out for g, sp in zip(groups, params) for out in _best([done[i] for i in g], sp)]

    def _adapters_of(self, lora_request: LoRARequest | Seq[LoRARequest | None]) -> str | None | list[str | None]:
        if isinstance(lora_request, (list, tuple)):
            return [None if r is None else ensure_lora(self.engine, r) for r in lora_request]
        return ensure_lora(self.engine, cast(LoRARequest, lora_request))

    def _add_samples(
        self, prompt: Prompt, params: SamplingParams | None, adapter: str | None, salt: str | None
    ) -> list[str]:
        """The samples of one prompt (`params.samples`: best_of, else n): the first computes the prompt, the others
        follow it and reuse its cached blocks; sample j draws with seed + j (when a seed is given)."""
        first = self.engine.add_request(prompt, params, adapter, cache_salt=salt)
        ids = [first]
        if params is None:  # default params: one sample
            return ids
        for j in range(1, params.samples):
            seed = None if params.seed is None else (params.seed + j + (1 << 63)) % (1 << 64) - (1 << 63)
            ids.append(self.engine.add_request(prompt, replace(params, seed=seed), adapter, None, salt, follows=first))
        return ids

    def _run_to_completion(self, ids: set[str]) -> dict[str, RequestOutput]:
        done: dict[str, RequestOutput] = {}
        while len(done) < len(ids):
            for out in self.engine.step():
                if out.finished and out.request_id in ids:
                    done[out.request_id] = out
        return done

    def chat(
        self,
        messages: list[Message] | list[list[Message]],
        sampling_params: ParamsArg | AdapterArg = None,
        adapter: AdapterArg | ParamsArg = None,
        *,
        lora_request: LoRARequest | Seq[LoRARequest | None] | None = None,
    ) -> list[RequestOutput]:
        """Apply the tokenizer's chat template (with the generation prompt) and generate (arguments as `generate`)."""
        if messages and isinstance(messages[0], dict):  # one conversation
            conversations = [messages]
        else:
            conversations = cast(list[list[Message]], messages)
        prompts = [self.apply_chat_template(c) for c in conversations]
        return self.generate(prompts, sampling_params, adapter, lora_request=lora_request)

    def apply_chat_template(self, messages: list[Message]) -> list[int]:
        if self.tokenizer is None or not getattr(self.tokenizer, "chat_template", None):
            raise ValueError("this model has no chat template")
        for m in messages:
            if not isinstance(m, dict) or "role" not in m or "content" not in m:
                raise ValueError("each chat message must be a dict with 'role' and 'content'")
        text = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        return self.tokenizer.encode(text, add_special_tokens=False)

    def cache_stats(self) -> dict:
        return self.engine.cache_stats()

    def load_adapter(self, name: str, path: str) -> None:
        self.engine.load_adapter(name, path)

    def unload_adapter(self, name: str) -> None:
        self.engine.unload_adapter(name)

    # ---- release -------------------------------------------------------------------------------------------
    def close(self) -> None:
        """Free the model, KV cache and adapters now, and on CUDA hand the memory back to the driver.

        Without it the caching allocator keeps the memory reserved after the engine is gone, and the next engine
        in this process would size its cache from what is left. Idempotent; the LLM is unusable afterwards (its
        calls raise RuntimeError("the engine is closed")).
        """
        self.engine.close()

    def __enter__(self) -> LLM:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def __del__(self) -> None:
        """Close when the last reference goes, where that is safe.

        Only when nothing else holds the engine (code that kept `llm.engine` goes on using it; it is freed when that
        reference goes, without the hand-back). Not at interpreter shutdown: modules and the CUDA context may already
        be torn down, and the process hands everything back anyway. Never raising: an exception in `__del__` can only
        be printed as a warning.
        """
        if sys.is_finalizing() or "engine" not in self.__dict__:  # no engine: building it raised
            return
        with contextlib.suppress(Exception):
            if held_only_by(self.__dict__, "engine"):
                self.engine.close()


def _best(outs: list[RequestOutput], params: SamplingParams | None) -> list[RequestOutput]:
    """All samples, or with best_of the n of highest cumulative log-probability, best first (as vLLM orders them);
    a failed sample ranks last."""
    if params is None or params.best_of is None or params.best_of == params.n:
        return outs

    def score(out: RequestOutput) -> float:
        total = sum(out.logprobs)
        return total if out.error is None and math.isfinite(total) else -math.inf

    return sorted(outs, key=score, reverse=True)[: params.n]
