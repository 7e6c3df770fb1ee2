"""The trace on HF transformers + PEFT: the stack the published LRAgent system is built on.

One `PeftModel` holds the three role adapters; each step calls `set_adapter(agent)`, prefills the tokens the
agent's cache has not seen (one forward pass, SDPA attention) and decodes one token per forward pass: greedily, or
(with `sampling`) through HF's temperature / top-k / top-p warpers and `torch.multinomial` on a generator seeded per
step.
- `hf_non_shared`: one `DynamicCache` per agent. An agent's cache is extended with every token appended since its
  own last turn (the other agents' turns included), so each agent prefills the whole trajectory once, in pieces.
- `hf_full_shared`: one `DynamicCache` for all agents: each token is prefilled once, by whichever agent comes
  first, and the others read its keys and values as they are (FullShared).
"""

from __future__ import annotations

import time

import torch

HF_SYSTEMS = ("hf_non_shared", "hf_full_shared")


def load_hf_peft(model: str, adapters: dict[str, str], device: str, dtype: torch.dtype):
    """A PeftModel with every adapter loaded (the first one active)."""
    from peft import PeftModel
    from transformers import AutoConfig, AutoModelForCausalLM

    if model.startswith("dummy:"):
        from lragent.models.presets import preset

        raw = preset(model.split(":", 1)[1])
        config = AutoConfig.for_model(raw.pop("model_type"), **raw)
        config._attn_implementation = "sdpa"
        torch.manual_seed(0)
        with torch.device(device):
            base = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation="sdpa")
    else:
        from lragent.models.hub import resolve_model

        base = AutoModelForCausalLM.from_pretrained(resolve_model(model), dtype=dtype, attn_implementation="sdpa")
        base = base.to(device)
    base.eval()
    names = list(adapters)
    peft_model = PeftModel.from_pretrained(base, adapters[names[0]], adapter_name=names[0])
    for name in names[1:]:
        peft_model.load_adapter(adapters[name], adapter_name=name)
    return peft_model.eval()


def _new_cache(model):
    from transformers import DynamicCache

    try:
        return DynamicCache(config=model.config)
    except TypeError:
        return DynamicCache()


def cache_bytes(cache) -> int:
    total = 0
    layers = getattr(cache, "layers", None)
    if layers is not None:
        for layer in layers:
            for t in (getattr(layer, "keys", None), getattr(layer, "values", None)):
                if isinstance(t, torch.Tensor):
                    total += t.numel() * t.element_size()
        return total
    for ts in (getattr(cache, "key_cache", []), getattr(cache, "value_cache", [])):
        total += sum(t.numel() * t.element_size() for t in ts if isinstance(t, torch.Tensor))
    return total


def _warpers(sampling: dict | None) -> list | None:
    """HF's logits warpers for {temperature, top_p, top_k} (what `generate(do_sample=True)` applies), None if greedy."""
    from lragent.bench.decoding import is_greedy

    if is_greedy(sampling):
        return None
    assert sampling is not None
    from transformers.generation.logits_process import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

    warpers: list = [TemperatureLogitsWarper(sampling["temperature"])]
    if sampling.get("top_k", -1) > 0:
        warpers.append(TopKLogitsWarper(sampling["top_k"]))
    if sampling.get("top_p", 1.0) < 1.0:
        warpers.append(TopPLogitsWarper(sampling["top_p"]))
    return warpers


class HFRunner:
    """Runs trajectories one at a time; `run_step` returns the same per-step metrics as the engine driver."""

    def __init__(self, peft_model, system: str, device: str, sampling: dict | None = None):
        if system not in HF_SYSTEMS:
            raise ValueError(f"unknown HF system {system!r}")
        self.model, self.system = peft_model, system
        self.device = torch.device(device)
        self.caches: dict[str, object] = {}
        self.kv_peak = 0
        self.warpers = _warpers(sampling)
        self.generator: torch.Generator | None = None

    def reset(self) -> None:
        self.caches = {}
        self.kv_peak = 0

    def _cache_for(self, agent: str):
        key = agent if self.system == "hf_non_shared" else ""
        if key not in self.caches:
            self.caches[key] = _new_cache(self.model)
        return self.caches[key]

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    @torch.inference_mode()
    def _forward(self, ids: list[int], cache) -> int:
        input_ids = torch.tensor([ids], dtype=torch.long, device=self.device)
        out = self.model(input_ids=input_ids, past_key_values=cache, use_cache=True, logits_to_keep=1)
        logits = out.logits[:, -1].float()
        if self.warpers is None:
            return int(logits[0].argmax())
        for warper in self.warpers:
            logits = warper(input_ids, logits)
        return int(torch.multinomial(torch.softmax(logits, dim=-1), 1, generator=self.generator)[0, 0])

    def run_step(self, agent: str, tokens: list[int], generate: int, deadline: float, seed: int = 0) -> dict:
        """Extend the agent's cache with what it has not seen, then generate (sampling: from a generator seeded
        with `seed`). Returns metrics and the new tokens."""
        if self.warpers is not None:
            self.generator = torch.Generator(self.device).manual_seed(seed % (1 << 63))
        self.model.set_adapter(agent)
        cache = self._cache_for(agent)
        seen = cache.get_seq_length()
        if seen >= len(tokens):  # cannot happen with appended tokens >= 1; keep one token to get logits
            raise RuntimeError("an agent's cache is ahead of the trajectory")
        self._sync()
        t0 = time.perf_counter()
        token = self._forward(tokens[seen:], cache)
        t1 = time.perf_counter()
        out = [token]
        while len(out) < generate:
            if time.perf_counter() > deadline:
                raise TimeoutError
            out.append(self._forward([out[-1]], cache))
        t2 = time.perf_counter()
        kv = sum(cache_bytes(c) for c in self.caches.values())
        self.kv_peak = max(self.kv_peak, kv)
        return {
            "prompt_tokens": len(tokens),
            "reused_tokens": seen,
            "computed_tokens": len(tokens) - seen,
            "generated": out,
            "ttft_s": t1 - t0,
            "latency_s": t2 - t0,
        }
