"""Hash chains over full token blocks: block i's hash covers the namespace and every token up to its end."""

from __future__ import annotations

import hashlib
import struct


def block_hashes(
    token_ids: list[int], block_size: int, namespace: str, num_blocks: int | None = None, known: list[int] | None = None
) -> list[int]:
    """One hash per full block (the first `num_blocks` of them if given). A namespace (an adapter's cache key, or ""
    for token-only keying) separates pools that must not be shared between agents. `known`, the chain's hashes
    computed earlier for the same tokens, is extended rather than recomputed (publishing stays O(new blocks))."""
    full = len(token_ids) // block_size if num_blocks is None else num_blocks
    hashes = list(known[:full]) if known else []
    if hashes:
        prev = hashes[-1].to_bytes(8, "little")
    else:
        prev = hashlib.blake2b(namespace.encode(), digest_size=8).digest()
    for i in range(len(hashes), full):
        chunk = token_ids[i * block_size : (i + 1) * block_size]
        digest = hashlib.blake2b(prev + struct.pack(f"<{len(chunk)}q", *chunk), digest_size=8).digest()
        hashes.append(int.from_bytes(digest, "little"))
        prev = digest
    return hashes
