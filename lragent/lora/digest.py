"""Content digests of adapters: what the prefix cache keys agent-specific blocks by.

A cache entry must be keyed by what it was computed from, never by a load event alone: a name reloaded with other
weights must not find the old entries, and the same weights loaded again may reuse them.
"""

from __future__ import annotations

import hashlib
from typing import Any

import torch

from lragent.lora.adapter import LoRAAdapter

BASE_MODEL_KEY = "<base>"  # no adapter: A = B = 0 (its R is zero, so it never shares LR entries with an agent)


def _feed(h: Any, tensor: torch.Tensor) -> None:
    t = tensor.detach().to("cpu", torch.float32).contiguous()
    h.update(str(tuple(t.shape)).encode())
    h.update(t.numpy().tobytes())


def content_key(adapter: LoRAAdapter) -> str:
    """Digest of every weight, the rank and the scaling: keys entries that depend on the whole adapter."""
    h = hashlib.blake2b(digest_size=16)
    h.update(f"r={adapter.rank};s={adapter.scaling!r}".encode())
    for (layer, module), (a, b) in sorted(adapter.weights.items()):
        h.update(f"|{layer}.{module}".encode())
        _feed(h, a)
        _feed(h, b)
    return "lora:" + h.hexdigest()


def value_a_key(adapter: LoRAAdapter, num_layers: int) -> str:
    """Digest of the v_proj `A` of every layer: all that an LR entry R = X A depends on when shared by tokens; with
    a k_proj adapter also its `A` (an LR row is then [X A_v | X A_k]; without one, the key is what it always was)."""
    h = hashlib.blake2b(digest_size=16)
    for layer in range(num_layers):
        a = adapter.value_down(layer)
        h.update(f"|{layer}:".encode())
        if a is not None:
            _feed(h, a)
        a_k = adapter.key_down(layer)
        if a_k is not None:
            h.update(b"k:")
            _feed(h, a_k)
    return "A:" + h.hexdigest()


def value_a_stack_key(slot_keys: list[str | None]) -> str:
    """Digest of a stack of v_proj `A`s: the `value_a_key` of every adapter slot in slot order (None: an empty slot,
    whose columns are zero). A stacked LR row X [A_1 | ... | A_N] depends on exactly this: the same adapters in the
    same slots give the same key (a reload finds its cache), any load, unload or move gives another."""
    h = hashlib.blake2b(digest_size=16)
    for slot, key in enumerate(slot_keys, start=1):
        h.update(f"|{slot}={key or '-'}".encode())
    return "stack:" + h.hexdigest()
