"""Server-sent events, client-disconnect detection, and incremental detokenisation for streamed text."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

from starlette.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

log = logging.getLogger("lragent.server")
T = TypeVar("T")


class ClientDisconnected(Exception):
    """The client went away before its answer was ready."""


def sse(data: dict | str) -> str:
    return f"data: {data if isinstance(data, str) else json.dumps(data, separators=(',', ':'))}\n\n"


async def _wait_disconnect(receive: Receive) -> None:
    """Returns once the client disconnects (the request body has already been read)."""
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return


async def _race(work: Awaitable[T], receive: Receive) -> tuple[bool, T | None]:
    """Run `work` until it finishes or the client disconnects; (finished, result)."""
    task = asyncio.ensure_future(work)
    watch = asyncio.ensure_future(_wait_disconnect(receive))
    try:
        await asyncio.wait({task, watch}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for t in (task, watch):
            t.cancel()
        await asyncio.gather(task, watch, return_exceptions=True)
    if task.cancelled():
        return False, None
    if task.exception() is not None:
        raise task.exception()
    return True, task.result()


async def until_disconnect(receive: Receive, work: Awaitable[T]) -> T:
    """`await work`, but raise ClientDisconnected as soon as the client goes away (and cancel `work`)."""
    finished, result = await _race(work, receive)
    if not finished:
        raise ClientDisconnected()
    return result


class EventStream(StreamingResponse):
    """An SSE response that watches for the client leaving and always runs `on_close` (which aborts the work)."""

    def __init__(self, events: AsyncIterator[str], on_close: Callable[[], None]):
        super().__init__(events, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        self._on_close = on_close

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await _race(self.stream_response(send), receive)
        except OSError:  # the socket broke while sending: the client is gone
            pass
        finally:
            self._on_close()


class TextStream:
    """Turns the growing list of generated token ids into text deltas.

    Text that could still turn out to be the start of a stop string is held back (the engine cuts the final text
    at the stop string), as is a trailing partial UTF-8 character. The final delta comes from the engine's text.
    """

    def __init__(self, tokenizer: Any, stop: list[str], include_stop: bool):
        self.tokenizer = tokenizer
        self.holdback = 0 if include_stop or not stop else max(len(s) for s in stop) - 1
        self.emitted = ""

    def delta(self, token_ids: list[int]) -> str:
        if self.tokenizer is None:
            return ""
        text = self.tokenizer.decode(token_ids, skip_special_tokens=True).rstrip("\ufffd")
        safe = text[: max(len(self.emitted), len(text) - self.holdback)]
        return self._advance(safe)

    def final(self, text: str) -> str:
        return self._advance(text)

    def _advance(self, text: str) -> str:
        if not text.startswith(self.emitted):  # detokenisation changed earlier text; never retract what was sent
            return ""
        new = text[len(self.emitted) :]
        self.emitted = text
        return new
