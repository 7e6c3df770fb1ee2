"""Cache blocks of sequences: one block pool per pool the sharing scheme declares, one block table per sequence and
pool; prefix matching pool by pool, allocation, progress (`on_computed`), publishing, release. Plain Python.
"""

from __future__ import annotations

from collections.abc import Callable

from lragent.cache.block_pool import BlockPool
from lragent.cache.kv_cache import CacheLayout
from lragent.cache.prefix_hash import block_hashes
from lragent.cache.sharing import SharingScheme
from lragent.engine.sequence import KV, LR, BlockTable, Sequence


class BlockManager:
    def __init__(self, scheme: SharingScheme, layout: CacheLayout):
        self.scheme = scheme
        self.block_size = layout.block_size
        self.pools = {p.name: BlockPool(p.name, layout.num_blocks[p.name]) for p in scheme.pools}
        # called with the blocks a release returns unpublished (pool -> ids): the cache clears their marks
        self.on_free: Callable[[dict[str, list[int]]], None] | None = None

    @property
    def base(self) -> BlockPool:
        return self.pools[KV]

    @property
    def lr(self) -> BlockPool | None:
        return self.pools.get(LR)

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    @property
    def capacity_tokens(self) -> int:
        return min(p.num_blocks for p in self.pools.values()) * self.block_size

    def admit(self, seq: Sequence) -> bool:
        """Match the cached prefix pool by pool (a later pool within what the earlier ones found) and allocate the
        rest of the prompt; False, holding nothing, if it does not fit."""
        need = self.blocks_for(len(seq))
        limit = (len(seq) - 1) // self.block_size  # keep >= 1 token to compute: the last one gives the logits
        start = seq.params.logits_from  # prompt log-probs: the positions that give them are computed, not reused
        if start is not None:
            limit = min(limit, start // self.block_size)
        first = next(iter(self.pools))
        matched: dict[str, tuple[list[int], list[int]]] = {}
        for name, pool in self.pools.items():
            hashes = block_hashes(seq.token_ids, self.block_size, seq.namespaces.get(name, ""), limit)
            if name == first and pool.peek(hashes) == 0 and need > pool.num_available():
                return False
            ids = pool.match(hashes)
            matched[name] = (ids, hashes[: len(ids)])
            limit = len(ids)
        if any(need - len(matched[n][0]) > pool.num_available() for n, pool in self.pools.items()):
            for name, (ids, _) in matched.items():
                self.pools[name].release(ids)
            return False
        for name, (ids, hashes) in matched.items():
            table = seq.table(name)
            table.blocks = ids + self.pools[name].allocate(need - len(ids))
            table.hashes, table.registered, table.cached = hashes, len(ids), len(ids) * self.block_size
        seq.num_computed = min(seq.tables[n].cached for n in self.pools)
        return True

    def can_append(self, seq: Sequence, ahead: int = 0) -> bool:
        if self.blocks_for(len(seq) + ahead) <= len(seq.tables[KV].blocks):
            return True
        return all(pool.num_available() >= 1 for pool in self.pools.values())

    def append_slot(self, seq: Sequence, ahead: int = 0) -> None:
        """Grow the block tables to cover the position about to be computed (`ahead`: that many positions after
        it, for tokens in flight)."""
        if self.blocks_for(len(seq) + ahead) > len(seq.tables[KV].blocks):
            for name, pool in self.pools.items():
                seq.tables[name].blocks += pool.allocate(1)

    def on_computed(self, seq: Sequence, num_tokens: int) -> None:
        """A step ran `num_tokens` more of the sequence: every pool now holds entries up to there."""
        seq.num_computed += num_tokens
        for table in seq.tables.values():
            if table.cached < seq.num_computed:
                table.cached = seq.num_computed

    def unpublished(self, seq: Sequence) -> dict[str, list[int]]:
        """Per pool, the blocks that became full and computed since the last `publish` (pools with none left out):
        what it would index. Called for every sequence of every step, so it stays a few comparisons."""
        out = {}
        for name in self.pools:
            table = seq.tables[name]
            full = min(table.cached, len(seq)) // self.block_size
            if full > table.registered and not table.sealed:
                out[name] = table.blocks[table.registered : full]
        return out

    def publish(self, seq: Sequence) -> None:
        """Index every block that became full and computed, so later requests can reuse it."""
        for name, pool in self.pools.items():
            table = seq.table(name)
            full, new = self._full(seq, table)
            if new:
                table.hashes[:] = block_hashes(
                    seq.token_ids, self.block_size, table.namespace, full, known=table.hashes
                )
                for i, block in enumerate(new, start=table.registered):
                    pool.register(block, table.hashes[i])
                table.registered = full

    def _full(self, seq: Sequence, table: BlockTable) -> tuple[int, list[int]]:
        full = min(table.cached, len(seq)) // self.block_size
        return full, [] if table.sealed else table.blocks[table.registered : full]

    def rekey(self, seq: Sequence, namespaces: dict[str, str]) -> None:
        """The request's pools are keyed by `namespaces` from now on (the adapter set changed under a scheme that
        keys a pool by it). A pool whose key changed while the request holds blocks in it is sealed: what it
        published is valid under the old key, but its later entries follow the new adapter set and must never be
        found under either key. A preempted or waiting request starts over under the new key."""
        for name in self.pools:
            fresh = namespaces.get(name, "")
            if seq.namespaces.get(name, "") == fresh:
                continue
            table = seq.tables.get(name)
            if table is not None:
                if table.blocks:
                    table.sealed = True
                else:
                    table.namespace = fresh
        seq.namespaces = dict(namespaces)

    def release(self, seq: Sequence) -> None:
        unpublished = {}
        for name, pool in self.pools.items():
            table = seq.table(name)
            pool.release(table.blocks)
            unpublished[name] = table.blocks[table.registered :]
            seq.tables[name] = BlockTable(seq.namespaces.get(name, table.namespace))
        seq.num_computed = 0
        if self.on_free is not None and any(unpublished.values()):
            self.on_free(unpublished)

    def drop_cached(self) -> None:
        """Forget every cached block no sequence holds."""
        for pool in self.pools.values():
            pool.drop_cached()
