"""Trajectory affinity for data-parallel replicas (plain Python, no Ray): the routing key of a request and the policies
that turn it into a preference order over replicas.

A trajectory's agents (plan, action, reflect, ...) extend one shared prefix; its KV cache lives in one engine, so its
requests must reach one replica. The key is the session id when the client sends one, else chained hashes of the
prompt's leading blocks (token ids when the prompt is token ids, else characters of a canonical text). The adapter
name is deliberately not part of the key: agents of one trajectory use different adapters and must still meet.
"""

from __future__ import annotations

import hashlib
import itertools
import json
from abc import ABC, abstractmethod
from collections import Counter, OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

BLOCK_CHARS = 64  # a text prompt is hashed in blocks of this many characters
BLOCK_TOKENS = 16  # a token-id prompt in blocks of this many ids (the engine's default block size)
MAX_BLOCKS = 256  # only the leading blocks count: the shared prefix of a trajectory, not its whole history


@dataclass(frozen=True)
class RouteKey:
    """What a router needs to know about one request."""

    session: str | None = None  # X-Session-ID / session_id: hard affinity
    prefix: tuple[int, ...] = ()  # chained block hashes, shortest prefix first


def _chain(blocks: Sequence[bytes]) -> tuple[int, ...]:
    """hash_i = H(hash_{i-1}, block_i): equal hashes mean equal prefixes up to that block."""
    out, prev = [], b""
    for block in blocks[:MAX_BLOCKS]:
        prev = hashlib.blake2b(prev + block, digest_size=8).digest()
        out.append(int.from_bytes(prev, "little"))
    return tuple(out)


def text_hashes(text: str) -> tuple[int, ...]:
    """Hashes of the full BLOCK_CHARS-character blocks of `text` (a partial last block is not a shared prefix yet)."""
    data = text[: BLOCK_CHARS * MAX_BLOCKS]
    starts = range(0, len(data) - BLOCK_CHARS + 1, BLOCK_CHARS)
    return _chain([data[i : i + BLOCK_CHARS].encode("utf-8", "surrogatepass") for i in starts])


def token_hashes(ids: Sequence[int]) -> tuple[int, ...]:
    """Hashes of the full BLOCK_TOKENS-id blocks of a token-id prompt."""
    ids = list(ids[: BLOCK_TOKENS * MAX_BLOCKS])
    blocks = [ids[i : i + BLOCK_TOKENS] for i in range(0, len(ids) - BLOCK_TOKENS + 1, BLOCK_TOKENS)]
    return _chain([b"t" + json.dumps(block).encode() for block in blocks])


def _content_text(content: object) -> str:
    if isinstance(content, list):  # OpenAI content parts
        return "".join(str(p.get("text", "")) if isinstance(p, dict) else str(p) for p in content)
    return "" if content is None else str(content)


def canonical_prompt(body: dict) -> str | list[int]:
    """The request's prompt as text (or token ids) whose prefixes are the prefixes of what the engine will see."""
    if "messages" in body:  # chat: role and content of each message, in order
        msgs = body["messages"] if isinstance(body["messages"], list) else []
        return "".join(f"{m.get('role')}\x1f{_content_text(m.get('content'))}\x1e" for m in msgs if isinstance(m, dict))
    if "prompt" in body:  # completions: a string, token ids, or a batch of either (the first one routes)
        prompt = body["prompt"]
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], str | list):
            prompt = prompt[0]
        if isinstance(prompt, list):
            return [int(t) for t in prompt if isinstance(t, int)]
        return str(prompt)
    head = str(body.get("instructions") or "") + "\x1e"  # responses: instructions, then the input items
    given = body.get("input", "")
    if isinstance(given, list):
        return head + "".join(json.dumps(item, sort_keys=True) + "\x1e" for item in given)
    return head + str(given)


def route_key(body: object, session: str | None) -> RouteKey:
    """The routing key of a request body; a body the replica will refuse gets an empty prefix."""
    if not isinstance(body, dict):
        return RouteKey(session=session)
    if session is None and isinstance(body.get("session_id"), str):
        session = body["session_id"]
    prompt = canonical_prompt(body)
    return RouteKey(session=session, prefix=text_hashes(prompt) if isinstance(prompt, str) else token_hashes(prompt))


class RoutingPolicy(ABC):
    """Orders the live replicas for a request and learns where requests went."""

    def __init__(self) -> None:
        self.inflight: Counter[str] = Counter()  # replica id -> requests routed there and not yet finished
        self.routed: Counter[str] = Counter()  # replica id -> requests routed there (breaks ties between idle ones)

    @abstractmethod
    def choose(self, key: RouteKey, replicas: Sequence[str]) -> list[str]:
        """`replicas` (live ids) in order of preference."""

    def record(self, key: RouteKey, replica: str) -> None:
        """The request with `key` was sent to `replica`."""
        self.inflight[replica] += 1
        self.routed[replica] += 1

    def finished(self, replica: str) -> None:
        self.inflight[replica] = max(0, self.inflight[replica] - 1)

    def forget(self, replica: str) -> None:
        """`replica` died: its trajectories go elsewhere (and rebuild their caches there)."""
        self.inflight.pop(replica, None)
        self.routed.pop(replica, None)

    def by_load(self, replicas: Sequence[str]) -> list[str]:
        return sorted(replicas, key=lambda r: (self.inflight[r], self.routed[r], r))


class RoundRobin(RoutingPolicy):
    """The contrast: every request to the next replica, whatever trajectory it belongs to."""

    def __init__(self, **_: object) -> None:
        super().__init__()
        self._turn = itertools.count()

    def choose(self, key: RouteKey, replicas: Sequence[str]) -> list[str]:
        order = sorted(replicas)
        start = next(self._turn) % len(order) if order else 0
        return order[start:] + order[:start]


class TrajectoryAffinity(RoutingPolicy):
    """Session id first (a trajectory stays on its replica while that replica lives); else the replica that holds the
    longest cached prefix, unless it has `max_imbalance` more requests in flight than the least-loaded one; else the
    least-loaded replica. Both tables are LRU-bounded by `max_entries`."""

    def __init__(self, max_entries: int = 100_000, max_imbalance: int = 8) -> None:
        super().__init__()
        self.max_entries, self.max_imbalance = max_entries, max_imbalance
        self._sessions: OrderedDict[str, str] = OrderedDict()
        self._prefixes: OrderedDict[int, str] = OrderedDict()

    def choose(self, key: RouteKey, replicas: Sequence[str]) -> list[str]:
        ranked = self.by_load(replicas)
        target = self.holder(key, set(replicas))
        if target is None:
            return ranked
        if key.session is None and ranked and self.inflight[target] - self.inflight[ranked[0]] > self.max_imbalance:
            return ranked  # a soft (prefix) match gives way to load
        return [target] + [r for r in ranked if r != target]

    def holder(self, key: RouteKey, live: set[str]) -> str | None:
        """The live replica this key's trajectory is on: by session, else by the longest known prefix."""
        if key.session is not None and self._sessions.get(key.session) in live:
            return self._sessions[key.session]
        for h in reversed(key.prefix):
            if self._prefixes.get(h) in live:
                return self._prefixes[h]
        return None

    def record(self, key: RouteKey, replica: str) -> None:
        super().record(key, replica)
        if key.session is not None:
            _put(self._sessions, key.session, replica, self.max_entries)
        for h in key.prefix:
            _put(self._prefixes, h, replica, self.max_entries)

    def forget(self, replica: str) -> None:
        super().forget(replica)
        for table in (self._sessions, self._prefixes):
            for k in [k for k, r in table.items() if r == replica]:
                del table[k]


def _put(table: OrderedDict, key: object, value: str, limit: int) -> None:
    table[key] = value
    table.move_to_end(key)
    while len(table) > limit:
        table.popitem(last=False)


POLICIES: dict[str, type[RoutingPolicy]] = {"affinity": TrajectoryAffinity, "round_robin": RoundRobin}
