"""Where the calls are in a growing JSON array of {"name": ..., "arguments": {...}} objects.

Tool calls under `tool_choice="required"` (and the array branch of "auto" with a JSON output) are generated as such an
array, constrained by a grammar. To stream each call's `arguments` as it is generated, the server must know, after
every delta, which call it is in, whether that call's name is complete, and where its arguments object starts and
ends. `CallScanner` answers that from a character-level state machine fed only the new text (O(1) per character),
so a long call does not get re-parsed at every token. It tracks only the array's items and their top-level keys;
nested values are skipped by bracket depth, strings by their quotes and escapes.
"""

from __future__ import annotations

import json
from dataclasses import dataclass


@dataclass
class CallSpan:
    """One item of the array, as far as the text shows it."""

    name: str | None = None  # decoded, once its string is complete
    args_start: int | None = None  # index of the `{` that opens the arguments object
    args_end: int | None = None  # one past its closing `}`, once it is complete


class CallScanner:
    """Reads the text of a JSON array of call objects as it grows. `calls` lists the items started so far;
    `bad` is set when the text is not such an array (a grammar-constrained output never is)."""

    def __init__(self) -> None:
        self.text = ""
        self.calls: list[CallSpan] = []
        self.bad = False
        self._started = False  # the array's `[` was seen
        self._stack: list[str] = []  # open brackets; depth 1 is the array, depth 2 an item object
        self._in_string = False
        self._escape = False
        self._string_start = 0
        self._expect_key = False  # inside an item object: the next string is a key
        self._key: str | None = None  # the item key whose value comes next (or is being read)

    def feed(self, new: str) -> None:
        start = len(self.text)
        self.text += new
        for i in range(start, len(self.text)):
            if self.bad:
                return
            self._step(i, self.text[i])

    def _step(self, i: int, c: str) -> None:
        if self._in_string:
            if self._escape:
                self._escape = False
            elif c == "\\":
                self._escape = True
            elif c == '"':
                self._in_string = False
                if len(self._stack) == 2:
                    try:
                        self._item_string(json.loads(self.text[self._string_start : i + 1]))
                    except ValueError:  # an invalid escape
                        self.bad = True
            return
        if c.isspace():
            return
        depth = len(self._stack)
        if depth == 0:  # before the array, or after it closed
            if c == "[" and not self._started:
                self._started = True
                self._stack.append(c)
            else:
                self.bad = True
        elif c == '"':
            self._in_string, self._string_start = True, i
            self.bad = depth == 1  # an item that is not an object
        elif c in "[{":
            self._open(i, c, depth)
        elif c in "]}":
            self._close(i, c)
        elif depth == 2 and c == ":":
            self._expect_key = False
        elif depth == 2 and c == ",":
            self._expect_key, self._key = True, None
        elif depth == 1 and c != ",":
            self.bad = True  # a number or literal as an item

    def _item_string(self, value: str) -> None:
        """A complete string directly inside an item: a key, or the value of the key before it."""
        if self._expect_key:
            self._key = value
        elif self._key == "name":
            self.calls[-1].name = value

    def _open(self, i: int, c: str, depth: int) -> None:
        if depth == 1:
            if c != "{":
                self.bad = True
                return
            self.calls.append(CallSpan())
            self._expect_key, self._key = True, None
        elif depth == 2 and self._key == "arguments" and c == "{":
            self.calls[-1].args_start = i
        self._stack.append(c)

    def _close(self, i: int, c: str) -> None:
        if not self._stack or {"[": "]", "{": "}"}[self._stack[-1]] != c:
            self.bad = True
            return
        self._stack.pop()
        if len(self._stack) == 2 and self._key == "arguments" and self.calls[-1].args_start is not None:
            self.calls[-1].args_end = i + 1
