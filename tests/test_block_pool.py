"""Block pool, prefix hashing and scheduling logic: plain Python, no model."""

from __future__ import annotations

import random
from collections import deque

import pytest

from lragent.cache.block_pool import Block, BlockPool
from lragent.cache.kv_cache import CacheLayout
from lragent.cache.prefix_hash import block_hashes
from lragent.cache.sharing import PoolKind, SharingMode, get_scheme
from lragent.engine.block_manager import BlockManager
from lragent.engine.scheduler import Scheduler
from lragent.engine.sequence import Sequence
from lragent.sampling import SamplingParams


def test_hash_chain_depends_on_prefix_and_namespace():
    a = block_hashes(list(range(12)), 4, "")
    assert len(a) == 3
    assert block_hashes(list(range(12)), 4, "plan") != a
    changed = block_hashes([99] + list(range(1, 12)), 4, "")
    assert all(x != y for x, y in zip(a, changed))  # a change in block 0 changes every later hash
    assert block_hashes(list(range(13)), 4, "") == a


def test_pool_refcount_cache_and_lru_eviction():
    pool = BlockPool("t", 3)
    ids = pool.allocate(2)
    pool.register(ids[0], 111)
    pool.register(ids[1], 222)
    pool.release(ids)
    assert pool.num_available() == 3 and len(pool.cached) == 2
    assert pool.match([111, 222, 333]) == ids
    pool.release(ids)
    # allocate 3: the free block first, then evict cached ones, tail first
    pool.allocate(1)
    assert pool.peek([111, 222]) == 2
    pool.allocate(1)
    assert pool.peek([111, 222]) == 1  # block of hash 222 (the tail) was evicted first
    with pytest.raises(MemoryError):
        pool.allocate(2)


class EagerPool(BlockPool):
    """The pool as it was: every block made up front, all ids in the free queue in order."""

    def __init__(self, name: str, num_blocks: int):
        super().__init__(name, num_blocks)
        self.blocks = [Block(i) for i in range(num_blocks)]
        self.free = deque(range(num_blocks))


def test_lazy_blocks_hand_out_what_eager_blocks_did():
    rng = random.Random(7)
    lazy, eager = BlockPool("t", 24), EagerPool("t", 24)
    held: list[list[int]] = []
    for step in range(400):
        op = rng.random()
        if op < 0.45 and lazy.num_available():
            n = rng.randint(1, min(4, lazy.num_available()))
            got = lazy.allocate(n)
            assert got == eager.allocate(n), step
            for block_id in got:
                if rng.random() < 0.6:
                    h = rng.randint(0, 30)
                    lazy.register(block_id, h), eager.register(block_id, h)
            held.append(got)
        elif op < 0.8 and held:
            ids = held.pop(rng.randrange(len(held)))
            lazy.release(ids), eager.release(ids)
        elif op < 0.95:
            hashes = [rng.randint(0, 30) for _ in range(3)]
            found = lazy.match(hashes)
            assert found == eager.match(hashes), step
            if found:
                held.append(found)
        else:
            lazy.drop_cached(), eager.drop_cached()
        assert lazy.num_available() == eager.num_available() and lazy.usage() == eager.usage(), step
    with pytest.raises(MemoryError):
        lazy.allocate(lazy.num_available() + 1)


def test_a_huge_pool_makes_its_blocks_when_used():
    pool = BlockPool("t", 10**9)
    assert pool.num_available() == 10**9 and pool.usage()["blocks_total"] == 10**9
    assert pool.allocate(3) == [0, 1, 2] and len(pool.blocks) == 3 and pool.num_in_use() == 3


def test_release_twice_is_caught():
    pool = BlockPool("t", 2)
    ids = pool.allocate(1)
    pool.release(ids)
    with pytest.raises(AssertionError):
        pool.release(ids)


def make_seq(rid, tokens, adapter="plan", slot=1, mode=None):
    seq = Sequence(rid, tokens, SamplingParams(max_tokens=4), adapter, slot)
    seq.namespaces = get_scheme(mode).namespaces(adapter, "A") if mode else {"kv": adapter, "lr": adapter}
    return seq


@pytest.mark.parametrize("mode", list(SharingMode))
def test_block_manager_keys_pools_per_scheme(mode):
    scheme = get_scheme(mode)
    bm = BlockManager(scheme, CacheLayout(4, {p.name: 32 for p in scheme.pools}, 8))
    first = make_seq("a", list(range(17)), "plan", mode=mode)
    assert bm.admit(first)
    bm.on_computed(first, 17)
    bm.publish(first)
    second = make_seq("b", list(range(17)) + [5, 6, 7, 8], "action", slot=2, mode=mode)
    assert bm.admit(second)
    base_hit = second.num_base_cached
    computed = second.num_computed
    expect_base = 0 if scheme.base_keyed_by_adapter else 16
    expect_lr = 16 if (not scheme.lr_keyed_by_adapter and not scheme.base_keyed_by_adapter) else 0
    assert base_hit == expect_base
    if scheme.spec(PoolKind.CRITICAL_KV) is not None:  # droidspeak: each agent's own critical layers
        expect_lr = 0
    assert computed == (expect_lr if scheme.has_lr_pool or scheme.spec(PoolKind.CRITICAL_KV) else expect_base)


def test_scheduler_preempts_when_cache_is_full():
    scheme = get_scheme("non_shared")
    bm = BlockManager(scheme, CacheLayout(4, {"kv": 4, "lr": 4}, 8))
    sched = Scheduler(bm, max_num_seqs=8, max_num_batched_tokens=64)
    a, b = make_seq("a", list(range(8))), make_seq("b", list(range(100, 108)))
    sched.add(a), sched.add(b)
    batch = sched.schedule()
    assert batch.is_prefill and batch.seqs == [a, b]
    for s in (a, b):
        bm.on_computed(s, len(s))
        s.token_ids.append(1)  # sampled; position 8 needs a third block each
    batch = sched.schedule()
    assert not batch.is_prefill
    assert batch.seqs == [a] and b in sched.waiting and b.metrics.preemptions == 1


def test_drop_cached_forgets_unreferenced_blocks_only():
    pool = BlockPool("t", 4)
    held, loose = pool.allocate(1), pool.allocate(1)
    pool.register(held[0], 1), pool.register(loose[0], 2)
    pool.release(loose)
    pool.drop_cached()
    assert pool.peek([1]) == 1 and pool.peek([2]) == 0
    assert pool.num_available() == 3 and pool.stats.hit_blocks == 0


def test_extending_a_known_chain_equals_hashing_from_scratch():
    tokens = list(range(40))
    head = block_hashes(tokens, 4, "ns", 3)
    assert block_hashes(tokens, 4, "ns", known=head) == block_hashes(tokens, 4, "ns")
