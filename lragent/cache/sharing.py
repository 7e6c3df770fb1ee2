"""The sharing schemes as data: which cache pools a scheme declares, and what each pool's blocks are keyed by.

A scheme is a declaration. The cache allocates the declared pools, the block manager keeps one block table per
pool for every sequence and matches prefixes pool by pool under each pool's keying, and the model runner writes
the entries of every pool a step computes. Nothing else branches on the mode: a new scheme (a wider LR pool, a
hidden-state pool, ...) is a new declaration plus its kernel path.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
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
    DROIDSPEAK = "droidspeak"


SCHEME_NAMES: tuple[str, ...] = tuple(m.value for m in SharingMode)


class PoolKind(StrEnum):
    """What one pool's entries hold per token and layer."""

    KV = "kv"  # a key and a base value (X W_v0; the expanded value under FULL_SHARED): 2 x kv_heads x head_dim
    # the low-rank cache X A_v: rank entries (STACKED_LR: X [A_1 | ... | A_N], N x rank; key_lr: X [A_v | A_k])
    LR = "lr"
    # DROIDSPEAK: the KV pool covers the layers outside the critical set; these two cover the rest
    CRITICAL_KV = "critical_kv"  # key and expanded value of the critical layers only (each agent its own)
    HIDDEN = "hidden"  # the residual stream entering each run of critical layers (but layer 0): hidden_size entries


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

    def bytes_per_block(
        self, config: ModelConfig, block_size: int, lr_rank: int, dtype: torch.dtype, critical: tuple[int, ...] = ()
    ) -> int:
        """`lr_rank`: the LR pool's row width (`SharingScheme.lr_width`); `critical`: DROIDSPEAK's critical layers."""
        per_token = {PoolKind.LR: lr_rank, PoolKind.HIDDEN: config.hidden_size}.get(self.kind, 2 * config.kv_size)
        return pool_layers(self.kind, config.num_layers, critical) * block_size * per_token * dtype.itemsize


# The paper's recomputed layers for LLaMA-3.1-8B (its top 33% by sensitivity): the default for that shape.
PAPER_CRITICAL_LAYERS: tuple[int, ...] = (0, 2, 16, 19, 20, 22, 23, 24, 26, 30, 31)
_LLAMA_31_8B_SHAPE = (32, 4096, 32, 8, 14336)  # layers, hidden, q heads, kv heads, intermediate


def hidden_boundaries(critical: tuple[int, ...]) -> tuple[int, ...]:
    """The first layer of each contiguous run of critical layers, but layer 0 (its input is the token embedding,
    recomputed from the token ids): the layers whose input hidden state the HIDDEN pool keeps."""
    return tuple(layer for layer in sorted(critical) if layer > 0 and layer - 1 not in critical)


def pool_layers(kind: PoolKind, num_layers: int, critical: tuple[int, ...] = ()) -> int:
    """How many layers (or boundaries) a pool of this kind holds entries for."""
    if kind is PoolKind.CRITICAL_KV:
        return len(critical)
    if kind is PoolKind.HIDDEN:
        return len(hidden_boundaries(critical))
    return num_layers - len(critical) if kind is PoolKind.KV else num_layers


def check_critical_layers(layers: tuple[int, ...] | list[int], num_layers: int | None = None) -> tuple[int, ...]:
    """The critical layer set, sorted; ValueError for a non-integer, negative, duplicated or out-of-range layer."""
    layers = list(layers)
    if any(not isinstance(layer, int) or isinstance(layer, bool) for layer in layers):
        raise ValueError(f"critical layers must be integers, got {layers!r:.200}")
    dupes = sorted({layer for layer in layers if layers.count(layer) > 1})
    if dupes:
        raise ValueError(f"critical layers: {', '.join(map(str, dupes))} given more than once")
    bad = [layer for layer in layers if layer < 0 or (num_layers is not None and layer >= num_layers)]
    if bad:
        upper = f"0..{num_layers - 1}" if num_layers is not None else "numbered from 0"
        raise ValueError(f"critical layers {', '.join(map(str, bad))} out of range: the model's layers are {upper}")
    return tuple(sorted(layers))


def default_critical_layers(config: ModelConfig) -> tuple[int, ...]:
    """The paper's set for the LLaMA-3.1-8B shape; otherwise every third layer from 0 (a third of the layers, the
    paper's share; `lragent bench droidspeak-layers` measures a set for a given model and adapters)."""
    shape = (config.num_layers, config.hidden_size, config.num_heads, config.num_kv_heads, config.intermediate_size)
    if shape == _LLAMA_31_8B_SHAPE:
        return PAPER_CRITICAL_LAYERS
    return tuple(range(0, config.num_layers, 3))


@dataclass(frozen=True)
class SharingScheme:
    mode: SharingMode
    # Matched in order: a later pool reuses at most the prefix the earlier ones found. The first is the KV pool;
    # tokens found there but not in a later pool need only that pool's entries computed ("LR prefill").
    pools: tuple[PoolSpec, ...]
    allows_key_adapter: bool  # k_proj adapters are supported (expanded keys, or their part in the LR rows: key_lr)
    requires_shared_a: bool  # an LR pool keyed by VALUE_A is read across agents only if their A agree
    # keys are shared: the key pool holds RoPE(X W_k) only and an LR row is [X A_v | X A_k] (r columns each); every
    # reader adds its own s RoPE(X A_k B_k) to the keys it reads, on chip (RoPE is linear)
    key_lr: bool = False
    # DROIDSPEAK, once resolved for a model (`with_critical_layers`): the layers each agent keeps (and recomputes)
    critical_layers: tuple[int, ...] = ()

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

    @property
    def splits_layers(self) -> bool:
        """Some layers live in a pool of their own (CRITICAL_KV) or take a cached hidden state (HIDDEN): the attention
        backend must route each layer to its pool (`AttentionBackend.supports_layer_pools`)."""
        return any(p.kind in (PoolKind.CRITICAL_KV, PoolKind.HIDDEN) for p in self.pools)

    def with_critical_layers(self, layers: tuple[int, ...], num_layers: int) -> SharingScheme:
        """This scheme for a model of `num_layers` layers with `layers` critical (checked). Schemes without a
        CRITICAL_KV pool ignore it. A pool that then covers no layer is left out (the first, the KV pool, always
        stays: its block ids anchor every table): no critical layer gives FULL_SHARED's pools, every layer critical
        an empty shared KV pool, no hidden state and each agent's own KV (NON_SHARED's compute)."""
        if self.spec(PoolKind.CRITICAL_KV) is None:
            return self
        layers = check_critical_layers(layers, num_layers)
        pools = tuple(p for i, p in enumerate(self.pools) if i == 0 or pool_layers(p.kind, num_layers, layers))
        return replace(self, pools=pools, critical_layers=layers)

    def lr_width(self, rank: int, num_slots: int) -> int:
        """Row width of the LR pool: `rank`, `rank` per adapter slot when stacked, 2 `rank` with key LR."""
        if self.stacks_lr:
            return rank * num_slots
        return 2 * rank if self.key_lr else rank

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
        SharingMode.BASE_SHARED,
        (_KV_BY_TOKENS, PoolSpec(PoolKind.LR, Keying.ADAPTER, per_agent=True)),
        True,
        False,
        key_lr=True,
    ),
    # VALUE_A: the digest of the v_proj and k_proj A, all that an LR row [X A_v | X A_k] depends on
    SharingMode.BASE_LR_SHARED: SharingScheme(
        SharingMode.BASE_LR_SHARED, (_KV_BY_TOKENS, PoolSpec(PoolKind.LR, Keying.VALUE_A)), True, True, key_lr=True
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
    # DROIDSPEAK (baseline): FULL_SHARED outside a set of critical layers. Whoever computes a token first stores its
    # keys and expanded values of the other layers and its hidden state entering each run of critical layers (both
    # shared by tokens); each agent keeps its own keys and values of the critical layers, and for tokens another
    # agent computed recomputes them from those hidden states.
    SharingMode.DROIDSPEAK: SharingScheme(
        SharingMode.DROIDSPEAK,
        (_KV_BY_TOKENS, PoolSpec(PoolKind.HIDDEN, Keying.TOKENS), PoolSpec(PoolKind.CRITICAL_KV, Keying.ADAPTER, True)),
        True,
        False,
    ),
}


def get_scheme(mode: str | SharingMode) -> SharingScheme:
    try:
        return SCHEMES[SharingMode(mode)]
    except ValueError:
        raise ValueError(f"unknown sharing scheme {mode!r}; choose one of {', '.join(SCHEME_NAMES)}") from None
