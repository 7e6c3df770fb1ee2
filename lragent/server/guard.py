"""Input guards that run before any request reaches pydantic or the engine.

Each guard turns a hostile input into a 400 that names the problem, instead of a RecursionError, a ValueError from
`int()` or a UnicodeEncodeError surfacing as a 500: JSON nesting depth is checked on the raw bytes (the C decoder
recurses), numbers are bounded while decoding, lone surrogates are refused before they reach the tokenizer or a
JSON response, and adapter names and paths are checked before they reach the metrics or the file system.
"""

from __future__ import annotations

import json
import math
import os
import re
import unicodedata
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np

from lragent.server.errors import APIError, bad_request

MAX_JSON_DEPTH = 64  # arrays and objects nested in each other; our schemas need 4
MAX_INT_DIGITS = 100  # no field takes an integer this long; Python refuses over 4300 digits with a ValueError
MAX_NAME_CHARS = 128  # adapter names: they become metric labels and model ids
SHOWN_CHARS = 80  # a client's string echoed in an error message is cut to this

# a string, or an unterminated one up to the end: every attempt matches, so the scan stays linear on any input
_STRING = re.compile(rb'"[^"\\]*(?:\\.?[^"\\]*)*"?', re.DOTALL)
_BRACKETS = bytes(range(256)).translate(None, b"[]{}")  # every byte but the brackets: deleted by translate
_CHUNK = 1 << 20
_SURROGATE = re.compile("[\ud800-\udfff]")
_ABS_PATH = re.compile(r"(?<![\w.~-])/[^\s'\"`,;:()\[\]{}]+")


class _BadNumber(ValueError):
    """Raised from the decoder's number hooks; becomes a 400."""


def shown(text: str) -> str:
    """A client's string made safe to echo: cut, and with surrogates escaped so it always encodes."""
    cut = text if len(text) <= SHOWN_CHARS else text[:SHOWN_CHARS] + "..."
    return repr(cut).encode("ascii", "backslashreplace").decode()


def json_depth(body: bytes) -> int:
    """The deepest nesting of [] and {} outside strings, from the raw bytes: linear time, no recursion."""
    total = len(body.translate(None, _BRACKETS))
    if total <= MAX_JSON_DEPTH:  # few brackets at all (strings included): an upper bound, no string scan needed
        return total
    brackets = _STRING.sub(b"", body).translate(None, _BRACKETS)
    if len(brackets) <= MAX_JSON_DEPTH:
        return len(brackets)  # an upper bound that is already small enough
    codes = np.frombuffer(brackets, dtype=np.uint8)
    depth, deepest = 0, 0
    for start in range(0, len(codes), _CHUNK):  # in chunks: bounded memory on a body that is all brackets
        chunk = codes[start : start + _CHUNK]
        opens = (chunk == ord("[")) | (chunk == ord("{"))
        running = np.cumsum(opens.astype(np.int8) * 2 - 1, dtype=np.int64) + depth
        deepest, depth = max(deepest, int(running.max())), int(running[-1])
    return deepest


def _int(text: str) -> int:
    if len(text.lstrip("-")) > MAX_INT_DIGITS:
        raise _BadNumber(f"an integer in the request body has more than {MAX_INT_DIGITS} digits")
    return int(text)


def _float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise _BadNumber(f"the number {text[:SHOWN_CHARS]} in the request body is out of range")
    return value


def _constant(text: str) -> float:
    raise _BadNumber(f"{text} is not valid JSON (numbers must be finite)")


def decode_json(body: bytes) -> Any:
    """Parse a request body; every way it can be malformed is a 400 with a short reason."""
    if json_depth(body) > MAX_JSON_DEPTH:
        raise bad_request(f"the request body nests arrays/objects deeper than {MAX_JSON_DEPTH} levels")
    try:
        data = json.loads(body, parse_int=_int, parse_float=_float, parse_constant=_constant)
    except _BadNumber as exc:
        raise bad_request(str(exc)) from None
    except UnicodeDecodeError:
        raise bad_request("the request body is not valid UTF-8") from None
    except json.JSONDecodeError as exc:
        raise bad_request(f"malformed JSON in the request body: {exc.msg} (character {exc.pos})") from None
    except (ValueError, RecursionError):  # belt and braces: the checks above should leave nothing for here
        raise bad_request("malformed JSON in the request body") from None
    if b"\\u" in body:  # a lone surrogate can only come from a \u escape: invalid UTF-8 bytes fail above
        check_surrogates(data)
    return data


def _surrogate_path(value: Any, path: list[str]) -> list[str] | None:
    """Where the first lone surrogate is (a key path), or None; depth is bounded by MAX_JSON_DEPTH."""
    if isinstance(value, str):
        return path if _SURROGATE.search(value) else None
    pairs: Iterable[tuple[Any, Any]] = (
        value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
    )
    for key, item in pairs:
        if isinstance(key, str) and _SURROGATE.search(key):
            return [*path, shown(key)]
        found = _surrogate_path(item, [*path, str(key)])
        if found is not None:
            return found
    return None


def check_surrogates(data: Any) -> None:
    """Refuse lone UTF-16 surrogates (e.g. "\\ud800") anywhere: no tokenizer or UTF-8 encoder accepts them."""
    path = _surrogate_path(data, [])
    if path is not None:
        param = next((p for p in path if not p.isdigit()), None)
        raise bad_request(f"{'.'.join(path) or 'the body'}: lone UTF-16 surrogates are not valid text", param)


def check_adapter_name(name: str, param: str = "lora_name") -> None:
    """Names become model ids and metric labels: short, printable, no whitespace."""
    if len(name) > MAX_NAME_CHARS:
        raise bad_request(f"{param} is longer than {MAX_NAME_CHARS} characters", param)
    bad = [c for c in name if c.isspace() or unicodedata.category(c) in ("Cc", "Cf", "Cs", "Co", "Cn", "Zl", "Zp")]
    if bad or not name:
        raise bad_request(f"{param} must be non-empty, printable and without whitespace", param)


def resolve_inside(path: str, roots: tuple[str, ...]) -> Path:
    """The real path (symlinks resolved) of a client-given adapter path, if it lies inside an allowed root.

    The same 403 answers a path outside the roots whether or not it exists, so a client cannot probe the disk.
    """
    outside = APIError(403, "lora_path is outside the allowed adapter roots", "lora_path", "forbidden_path")
    if "\x00" in path:
        raise outside
    try:
        real = Path(os.path.realpath(os.path.expanduser(path) if path.startswith("~") else path))
    except (OSError, ValueError):
        raise outside from None
    for root in roots:
        base = Path(os.path.realpath(root))
        if real == base or base in real.parents:
            return real
    raise outside


def scrub_paths(message: str, real: Path, given: str) -> str:
    """An adapter error without server paths: the resolved path reads as the client's own string, any other
    absolute path (a root, a file inside it, a path in an OSError) as <path>."""
    text = message.replace(str(real), given) if str(real) != given else message
    return _ABS_PATH.sub(lambda m: m[0] if m[0].startswith(given) and given.startswith("/") else "<path>", text)
