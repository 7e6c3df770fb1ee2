"""One pool of fixed-size cache blocks: reference counts, a prefix index by hash, LRU eviction. Plain Python."""

from __future__ import annotations

from collections import OrderedDict, deque
from dataclasses import dataclass


@dataclass
class Block:
    block_id: int
    ref_count: int = 0
    hash: int | None = None  # set once the block is full and computed; then it can be reused


@dataclass
class PoolStats:
    queried_blocks: int = 0
    hit_blocks: int = 0
    evicted_blocks: int = 0


class BlockPool:
    """Blocks move between three states: in use (ref_count > 0), cached (free but still findable by hash, evicted
    least-recently-freed first) and free (no content).

    A block's bookkeeping is made when the block is first handed out (ids in order, before any freed one is reused):
    a small model on a large GPU has tens of millions of blocks, and making them all up front took seconds of start-up
    and gigabytes of host memory for blocks most runs never touch."""

    def __init__(self, name: str, num_blocks: int):
        self.name = name
        self.num_blocks = num_blocks
        self.blocks: list[Block] = []  # blocks[i] is block i, for the ids handed out so far
        self.free: deque[int] = deque()  # freed ids without content, reused after the never-used ones
        self.cached: OrderedDict[int, None] = OrderedDict()  # block ids with ref_count 0 and a hash, LRU first
        self.by_hash: dict[int, int] = {}
        self.stats = PoolStats()

    def num_available(self) -> int:
        return self.num_blocks - len(self.blocks) + len(self.free) + len(self.cached)

    def num_in_use(self) -> int:
        return self.num_blocks - self.num_available()

    def match(self, hashes: list[int]) -> list[int]:
        """Take a reference on the longest cached prefix of `hashes`; returns its block ids."""
        found = []
        for h in hashes:
            block_id = self.by_hash.get(h)
            if block_id is None:
                break
            found.append(block_id)
        for block_id in found:
            self._take(block_id)
        self.stats.queried_blocks += len(hashes)
        self.stats.hit_blocks += len(found)
        return found

    def peek(self, hashes: list[int]) -> int:
        """How many leading blocks `match` would find, without taking references."""
        n = 0
        for h in hashes:
            if h not in self.by_hash:
                break
            n += 1
        return n

    def allocate(self, n: int) -> list[int]:
        if n > self.num_available():
            raise MemoryError(f"{self.name} pool: {n} blocks wanted, {self.num_available()} available")
        return [self._take(self._pop_free()) for _ in range(n)]

    def release(self, block_ids: list[int]) -> None:
        # Released in reverse so a sequence's tail is evicted before its head (heads are the likelier reuse).
        for block_id in reversed(block_ids):
            block = self.blocks[block_id]
            block.ref_count -= 1
            assert block.ref_count >= 0, f"{self.name}: block {block_id} released twice"
            if block.ref_count == 0:
                if block.hash is None:
                    self.free.append(block_id)
                else:
                    self.cached[block_id] = None

    def register(self, block_id: int, block_hash: int) -> None:
        """Make a full, computed block findable. An identical block already indexed keeps its place."""
        block = self.blocks[block_id]
        if block.hash is not None or block_hash in self.by_hash:
            return
        block.hash = block_hash
        self.by_hash[block_hash] = block_id

    def _pop_free(self) -> int:
        if len(self.blocks) < self.num_blocks:
            self.blocks.append(Block(len(self.blocks)))
            return len(self.blocks) - 1
        if self.free:
            return self.free.popleft()
        block_id, _ = self.cached.popitem(last=False)
        block = self.blocks[block_id]
        assert block.hash is not None, "a cached block is always indexed"
        del self.by_hash[block.hash]
        block.hash = None
        self.stats.evicted_blocks += 1
        return block_id

    def _take(self, block_id: int) -> int:
        block = self.blocks[block_id]
        if block.ref_count == 0:
            self.cached.pop(block_id, None)
        block.ref_count += 1
        return block_id

    def drop_cached(self) -> None:
        """Forget every unreferenced cached block (blocks in use keep their hashes) and zero the hit counters."""
        for block_id in self.cached:
            block = self.blocks[block_id]
            assert block.hash is not None, "a cached block is always indexed"
            del self.by_hash[block.hash]
            block.hash = None
            self.free.append(block_id)
        self.cached.clear()
        self.stats = PoolStats()

    def usage(self) -> dict[str, int]:
        return {
            "blocks_total": self.num_blocks,
            "blocks_in_use": self.num_in_use(),
            "blocks_cached": len(self.cached),
            "queried_blocks": self.stats.queried_blocks,
            "hit_blocks": self.stats.hit_blocks,
            "evicted_blocks": self.stats.evicted_blocks,
        }
