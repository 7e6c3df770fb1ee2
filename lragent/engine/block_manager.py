"""Cache blocks for sequences under a sharing scheme: prefix matching per pool, allocation, publishing, release.

Keys and base values share one block table (they are always keyed alike); the LR pool has its own table.
"""

from __future__ import annotations

from lragent.cache.block_pool import BlockPool
from lragent.cache.kv_cache import CacheLayout
from lragent.cache.prefix_hash import block_hashes
from lragent.cache.sharing import SharingScheme
from lragent.engine.sequence import Sequence


class BlockManager:
    def __init__(self, scheme: SharingScheme, layout: CacheLayout):
        self.scheme = scheme
        self.block_size = layout.block_size
        self.base = BlockPool("base", layout.num_base_blocks)
        self.lr = BlockPool("lr", layout.num_lr_blocks) if scheme.has_lr_pool else None

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    @property
    def capacity_tokens(self) -> int:
        cap = self.base.num_blocks
        if self.lr is not None:
            cap = min(cap, self.lr.num_blocks)
        return cap * self.block_size

    def admit(self, seq: Sequence) -> bool:
        """Match the cached prefix and allocate the rest of the prompt; False (nothing held) if it does not fit."""
        full = (len(seq) - 1) // self.block_size  # keep >= 1 token to compute: the last one gives the logits
        base_hashes = block_hashes(seq.token_ids, self.block_size, seq.base_ns, full)
        need = self.blocks_for(len(seq))
        if self.base.peek(base_hashes) == 0 and need > self.base.num_available():
            return False
        base_ids = self.base.match(base_hashes)
        lr_ids: list[int] = []
        if self.lr is not None:
            lr_hashes = block_hashes(seq.token_ids, self.block_size, seq.lr_ns, len(base_ids))
            lr_ids = self.lr.match(lr_hashes)
            seq.lr_hashes = lr_hashes[: len(lr_ids)]
        lr_short = need - len(lr_ids) if self.lr is not None else 0
        if need - len(base_ids) > self.base.num_available() or (
            self.lr is not None and lr_short > self.lr.num_available()
        ):
            self.base.release(base_ids)
            if self.lr is not None:
                self.lr.release(lr_ids)
            return False
        seq.base_hashes = base_hashes[: len(base_ids)]
        seq.base_blocks = base_ids + self.base.allocate(need - len(base_ids))
        seq.num_base_cached = len(base_ids) * self.block_size
        seq.base_registered = len(base_ids)
        if self.lr is not None:
            seq.lr_blocks = lr_ids + self.lr.allocate(lr_short)
            seq.lr_registered = len(lr_ids)
            seq.num_computed = len(lr_ids) * self.block_size
        else:
            seq.num_computed = seq.num_base_cached
        return True

    def can_append(self, seq: Sequence) -> bool:
        if self.blocks_for(len(seq)) <= len(seq.base_blocks):
            return True
        return self.base.num_available() >= 1 and (self.lr is None or self.lr.num_available() >= 1)

    def append_slot(self, seq: Sequence) -> None:
        """Grow the block tables to cover the position about to be computed."""
        if self.blocks_for(len(seq)) > len(seq.base_blocks):
            seq.base_blocks += self.base.allocate(1)
            if self.lr is not None:
                seq.lr_blocks += self.lr.allocate(1)

    def unpublished(self, seq: Sequence) -> tuple[list[int], list[int]]:
        """Blocks (base, LR) that became full and computed since the last `publish`: what it would index."""
        base_full = min(seq.num_base_cached, len(seq)) // self.block_size
        base = seq.base_blocks[seq.base_registered : base_full]
        if self.lr is None:
            return base, []
        lr_full = min(seq.num_computed, len(seq)) // self.block_size
        return base, seq.lr_blocks[seq.lr_registered : lr_full]

    def publish(self, seq: Sequence) -> None:
        """Index every block that became full and computed, so later requests can reuse it."""
        seq.base_registered = self._publish(
            self.base, seq, seq.base_blocks, seq.base_hashes, seq.base_registered, seq.num_base_cached, seq.base_ns
        )
        if self.lr is not None:
            seq.lr_registered = self._publish(
                self.lr, seq, seq.lr_blocks, seq.lr_hashes, seq.lr_registered, seq.num_computed, seq.lr_ns
            )

    def _publish(
        self, pool: BlockPool, seq: Sequence, table: list[int], hashes: list[int], done: int, computed: int, ns: str
    ) -> int:
        full = min(computed, len(seq)) // self.block_size
        if full > done:
            hashes[:] = block_hashes(seq.token_ids, self.block_size, ns, full, known=hashes)
            for i in range(done, full):
                pool.register(table[i], hashes[i])
        return max(done, full)

    def release(self, seq: Sequence) -> None:
        self.base.release(seq.base_blocks)
        if self.lr is not None:
            self.lr.release(seq.lr_blocks)
        seq.base_blocks, seq.lr_blocks = [], []
        seq.num_computed = seq.num_base_cached = 0
        seq.base_registered = seq.lr_registered = 0
        seq.base_hashes, seq.lr_hashes = [], []
