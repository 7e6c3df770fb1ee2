"""The four sharing schemes as data: which pools exist and what their prefix-cache entries are keyed by.

The block manager and the model runner ask the scheme; nothing else branches on the mode.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum


class SharingMode(StrEnum):
    NON_SHARED = "non_shared"
    FULL_SHARED = "full_shared"
    BASE_SHARED = "base_shared"
    BASE_LR_SHARED = "base_lr_shared"


@dataclass(frozen=True)
class SharingScheme:
    mode: SharingMode
    base_keyed_by_adapter: bool  # keys + base values reusable only by the adapter that computed them
    has_lr_pool: bool  # FULL_SHARED stores expanded values instead of a separate LR pool
    lr_keyed_by_adapter: bool
    allows_key_adapter: bool  # a k_proj adapter makes keys agent-specific: only where keys are not shared
    requires_shared_a: bool  # every agent reads every agent's R = X A_v

    def namespaces(self, content_key: str, value_a_key: str, salt: str = "") -> tuple[str, str]:
        """Prefix-cache namespaces (keys + base values, LR) of a request.

        `content_key` digests everything the adapter changes (so a reload of the same weights finds its cache, and
        different weights under a reused name never do); `value_a_key` digests the v_proj `A` alone, which is all an
        LR entry R = X A depends on once it is shared by tokens. A non-empty `salt` (a tenant) separates everything.
        """
        base = content_key if self.base_keyed_by_adapter else ""
        lr = content_key if self.lr_keyed_by_adapter else value_a_key
        prefix = f"salt:{salt}|" if salt else ""
        return prefix + base, prefix + lr

    def lr_blocks_per_base_block(self, num_agents: int) -> int:
        """LR pool sizing: under BASE_SHARED every agent keeps its own LR copy over the same shared base blocks."""
        if not self.has_lr_pool:
            return 0
        return max(1, num_agents) if self.mode is SharingMode.BASE_SHARED else 1


SCHEMES: dict[SharingMode, SharingScheme] = {
    SharingMode.NON_SHARED: SharingScheme(SharingMode.NON_SHARED, True, True, True, True, False),
    # FULL_SHARED reuses the producer's values as they are: the value pool holds V_base + s R B of the producer.
    SharingMode.FULL_SHARED: SharingScheme(SharingMode.FULL_SHARED, False, False, False, True, False),
    SharingMode.BASE_SHARED: SharingScheme(SharingMode.BASE_SHARED, False, True, True, False, False),
    SharingMode.BASE_LR_SHARED: SharingScheme(SharingMode.BASE_LR_SHARED, False, True, False, False, True),
}


def get_scheme(mode: str | SharingMode) -> SharingScheme:
    try:
        return SCHEMES[SharingMode(mode)]
    except ValueError:
        raise ValueError(
            f"unknown sharing scheme {mode!r}; choose one of {', '.join(m.value for m in SharingMode)}"
        ) from None
