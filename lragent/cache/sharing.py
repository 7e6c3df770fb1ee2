"""The sharing schemes as data: which cache pools a scheme declares, and what each pool's blocks are keyed by.

A scheme is a declaration. The cache allocates the declared pools, the block manager keeps one block table per
pool for every sequence and matches prefixes pool by pool under each pool's keying, and the model runner writes
the entries of every pool a step computes. Nothing else branches on the mode: a new scheme (a wider LR pool, a
hidden-state pool, ...) is a new declaration plus its kernel path.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

    from lragent.model_config import ModelConfig


class StrEnum(str, Enum):
    """`enum.StrEnum` of Python 3.11, here so 3.10 runs too: a member is its value as a string (==, str, format)."""

    def __str__(self) -> str:
        return str(self.value)


class SharingMode(StrEnum):
    NON_SHARED = "non_shared"
    FULL_SHARED = "full_shared"
    BASE_SHARED = "base_shared"
    BASE_LR_SHARED = "base_lr_shared"
    STACKED_LR = "stacked_lr"


SCHEME_NAMES: tuple[str, ...] = tuple(m.value for m in SharingMode)


class PoolKind(StrEnum):
    """What one pool's entries hold per token and layer."""

    KV = "kv"  # a key and a base value (X W_v0; the expanded value under FULL_SHARED): 2 x kv_heads x head_dim
    LR = "lr"  # the low-rank cache X A_v: rank entries (STACKED_LR: X [A_1 | ... | A_N], N x rank entries)


class Keying(StrEnum):
    """What a pool's cached blocks are keyed by, beyond the tokens (and the request's cache salt)."""

    TOKENS = "tokens"  # nothing: every agent reads the producer's entries
    ADAPTER = "adapter"  # the adapter's content digest: only the same weights read them
    VALUE_A = "value_a"  # the digest of the v_proj (and k_proj) A: agents with the same A read them (R = X A)
    VALUE_A_STACK = "value_a_stack"  # the digests of every adapter slot's v_proj A, in slot order (stacked rows)


@dataclass(frozen=True)
class PoolSpec:
    kind: PoolKind
    keyed_by: Keying
    per_agent: bool = False  # sizing: each agent keeps its own copy over every shared KV block
    # an LR row holds the projection through every adapter slot's A side by side, `rank` columns per slot in slot
    # order (slot s at columns (s - 1) * rank): written once per token, each agent reads its own slice
    stacked: bool = False

    @property
    def name(self) -> str:
        return self.kind.value

    def bytes_per_block(self, config: ModelConfig, block_size: int, lr_rank: int, dtype: torch.dtype) -> int:
        """`lr_rank`: the LR pool's row width (`SharingScheme.lr_width`)."""
        per_token = 2 * config.kv_size if self.kind is PoolKind.KV else lr_rank
        return config.num_layers * block_size * per_token * dtype.itemsize


@dataclass(frozen=True)
class SharingScheme:
    mode: SharingMode
    # Matched in order: a later pool reuses at most the prefix the earlier ones found. The first is the KV pool;
    # tokens found there but not in a later pool need only that pool's entries computed ("LR prefill").
    pools: tuple[PoolSpec, ...]
    allows_key_adapter: bool  # a k_proj adapter makes keys agent-specific: only where keys are not shared
    requires_shared_a: bool  # an LR pool keyed by VALUE_A is read across agents only if their A agree

    def spec(self, kind: PoolKind) -> PoolSpec | None:
        return next((p for p in self.pools if p.kind is kind), None)

    @property
    def has_lr_pool(self) -> bool:
        return self.spec(PoolKind.LR) is not None

    @property
    def expand_values(self) -> bool:
        """Without an LR pool the value pool stores V_base + s R B of the producer (FULL_SHARED)."""
        return not self.has_lr_pool

    @property
    def base_keyed_by_adapter(self) -> bool:
        return self.pools[0].keyed_by is Keying.ADAPTER

    @property
    def lr_keyed_by_adapter(self) -> bool:
        lr = self.spec(PoolKind.LR)
        return lr is not None and lr.keyed_by is Keying.ADAPTER

    @property
    def stacks_lr(self) -> bool:
        """The LR pool holds X [A_1 | ... | A_N] (STACKED_LR): the LoRA bank projects through every slot at once."""
        lr = self.spec(PoolKind.LR)
        return lr is not None and lr.stacked

    def lr_width(self, rank: int, num_slots: int) -> int:
        """Row width of the LR pool: `rank`, or `rank` per adapter slot when stacked."""
        return rank * num_slots if self.stacks_lr else rank

    def namespaces(self, content_key: str, value_a_key: str, salt: str = "", stack_key: str = "") -> dict[str, str]:
        """Prefix-cache namespace of every pool for one request.

        `content_key` digests everything the adapter changes (a reload of the same weights finds its cache, other
        weights under a reused name never do); `value_a_key` digests the v_proj `A` alone, all that an LR entry
        R = X A depends on once shared by tokens; `stack_key` digests every slot's v_proj `A` in slot order, all
        that a stacked LR row X [A_1 | ... | A_N] depends on (the same for every request until an adapter is loaded
        or unloaded). A non-empty `salt` (a tenant) separates everything.
        """
        keys = {
            Keying.TOKENS: "",
            Keying.ADAPTER: content_key,
            Keying.VALUE_A: value_a_key,
            Keying.VALUE_A_STACK: stack_key,
        }
        prefix = f"salt:{salt}|" if salt else ""
        return {p.name: prefix + keys[p.keyed_by] for p in self.pools}

    def copies_per_kv_block(self, spec: PoolSpec, num_agents: int) -> int:
        """Pool sizing: blocks of `spec` per KV block (BASE_SHARED: every agent its own LR over shared keys)."""
        return max(1, num_agents) if spec.per_agent else 1


_KV_BY_ADAPTER = PoolSpec(PoolKind.KV, Keying.ADAPTER)
_KV_BY_TOKENS = PoolSpec(PoolKind.KV, Keying.TOKENS)
SCHEMES: dict[SharingMode, SharingScheme] = {
    SharingMode.NON_SHARED: SharingScheme(
        SharingMode.NON_SHARED, (_KV_BY_ADAPTER, PoolSpec(PoolKind.LR, Keying.ADAPTER)), True, False
    ),
    # FULL_SHARED reuses the producer's values as they are: the value pool holds V_base + s R B of the producer.
    SharingMode.FULL_SHARED: SharingScheme(SharingMode.FULL_SHARED, (_KV_BY_TOKENS,), True, False),
    SharingMode.BASE_SHARED: SharingScheme(
        SharingMode.BASE_SHARED, (_KV_BY_TOKENS, PoolSpec(PoolKind.LR, Keying.ADAPTER, per_agent=True)), False, False
    ),
    SharingMode.BASE_LR_SHARED: SharingScheme(
        SharingMode.BASE_LR_SHARED, (_KV_BY_TOKENS, PoolSpec(PoolKind.LR, Keying.VALUE_A)), False, True
    ),
    # STACKED_LR: BASE_LR_SHARED's compute with independent adapters. Whoever computes a token stores X A_i for every
    # loaded adapter i; agent j reads its own slice X A_j. Blocks are keyed by the whole stack, so a load or unload
    # makes the old blocks miss (they are LR-prefilled under the new stack), never read with another slot's A.
    SharingMode.STACKED_LR: SharingScheme(
        SharingMode.STACKED_LR,
        (_KV_BY_TOKENS, PoolSpec(PoolKind.LR, Keying.VALUE_A_STACK, stacked=True)),
        False,
        False,
    ),
}


def get_scheme(mode: str | SharingMode) -> SharingScheme:
    try:
        return SCHEMES[SharingMode(mode)]
    except ValueError:
        raise ValueError(f"unknown sharing scheme {mode!r}; choose one of {', '.join(SCHEME_NAMES)}") from None
