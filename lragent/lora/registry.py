"""Which adapters are loaded, in which slot, and whether they fit the sharing scheme. Plain Python."""

from __future__ import annotations

from lragent.cache.sharing import SharingScheme
from lragent.lora.adapter import AdapterError, LoRAAdapter, unshared_value_layers, validate_adapter_name
from lragent.lora.digest import BASE_MODEL_KEY, content_key, value_a_key, value_a_stack_key


class AdapterRegistry:
    def __init__(self, scheme: SharingScheme, num_layers: int, max_loras: int, allow_unshared_a: bool = False):
        self.scheme = scheme
        self.num_layers = num_layers
        self.max_loras = max_loras
        self.allow_unshared_a = allow_unshared_a
        self.adapters: dict[str, LoRAAdapter] = {}
        self.slots: dict[str, int] = {}
        # (content key, v_proj-A key) per adapter: what its cache entries are keyed by (lora/digest.py)
        self.keys: dict[str, tuple[str, str]] = {}
        self._value_a: dict[str, str] = {}  # v_proj-A digest per adapter, whatever allow_unshared_a says
        self.stack_key = value_a_stack_key([None] * max_loras)  # of the slots as they are now (`_restack`)

    def check(self, adapter: LoRAAdapter) -> None:
        """Refuse an adapter that breaks the scheme, with the reason spelled out."""
        validate_adapter_name(adapter.name)  # first: later messages echo the name, which must be short and printable
        if adapter.name in self.adapters:
            raise AdapterError(f"adapter {adapter.name!r} is already loaded")
        if len(self.adapters) >= self.max_loras:
            raise AdapterError(
                f"cannot load {adapter.name!r}: all {self.max_loras} adapter slots are in use (max_loras)"
            )
        if "k_proj" in adapter.targets and not self.scheme.allows_key_adapter:
            raise AdapterError(
                f"adapter {adapter.name!r} adapts k_proj, which makes keys agent-specific; {self.scheme.mode.value} "
                "as started shares keys across agents with q/v/o/MLP adapters only (use non_shared, or base_shared / "
                "base_lr_shared started with a k_proj adapter or key_lora=True / --key-lora)"
            )
        if self.scheme.requires_shared_a and not self.allow_unshared_a and self.adapters:
            layers = unshared_value_layers([*self.adapters.values(), adapter], self.num_layers)
            if layers:
                shown = ", ".join(map(str, layers[:8])) + (" ..." if len(layers) > 8 else "")
                raise AdapterError(
                    f"base_lr_shared needs every adapter's v_proj A (and k_proj A) to be the same matrix (shared-A), "
                    f"but adapter {adapter.name!r} differs in layers {shown}; train with a shared A, use base_shared, "
                    "or pass allow_unshared_a=True to accept the accuracy loss"
                )

    def add(self, adapter: LoRAAdapter) -> int:
        self.check(adapter)
        used = set(self.slots.values())
        slot = next(s for s in range(1, self.max_loras + 1) if s not in used)
        self.adapters[adapter.name] = adapter
        self.slots[adapter.name] = slot
        a_key = value_a_key(adapter, self.num_layers)
        self.keys[adapter.name] = (content_key(adapter), "" if self.allow_unshared_a else a_key)
        self._value_a[adapter.name] = a_key
        self._restack()
        return slot

    def remove(self, name: str) -> int:
        if name not in self.adapters:
            raise AdapterError(f"unknown adapter {name!r}")
        del self.adapters[name], self.keys[name], self._value_a[name]
        slot = self.slots.pop(name)
        self._restack()
        return slot

    def _restack(self) -> None:
        """`stack_key`: the digest of every slot's v_proj A in slot order, what a stacked LR row (STACKED_LR) is
        computed from; it changes with every load or unload, and comes back when the same adapters are back in the
        same slots."""
        by_slot: list[str | None] = [None] * self.max_loras
        for name, slot in self.slots.items():
            by_slot[slot - 1] = self._value_a[name]
        self.stack_key = value_a_stack_key(by_slot)

    def slot_of(self, name: str | None) -> int:
        if not name:
            return 0
        if name not in self.slots:
            known = ", ".join(sorted(self.slots)) or "none loaded"
            raise AdapterError(f"unknown adapter {name!r} (loaded: {known})")
        return self.slots[name]

    def cache_keys(self, name: str | None) -> tuple[str, str]:
        """(content key, v_proj-A key) of an adapter, for `SharingScheme.namespaces`. With `allow_unshared_a` the
        LR entries are shared whatever the A (the accepted approximation); the base model's R is zero, so it never
        shares LR entries with an agent."""
        if not name:
            return BASE_MODEL_KEY, BASE_MODEL_KEY
        return self.keys[name]
