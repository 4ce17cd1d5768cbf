"""What can be stored and read back: the checks a value passes before anything is written.

PostgreSQL refuses some values that encode to JSON or text without complaint: a NUL character
(``U+0000``) in a ``jsonb`` document or a ``text`` column, an interval or a timestamp out of
its range. A worker cannot decode a document nested deeper than the Python stack allows
(about 1,000 levels, less the frames already in use). And JSON has no ``inf`` or ``nan``:
msgspec writes them as ``null``, a silent change. Both sides refuse these values at their
boundary — the client before anything is stored, the executor in ``prepare`` (the step's
error goes to ``handle()``) — with an ``InvalidValue`` that names the field.

The checks are cheap on the common path, so that ``insert_many`` keeps its pace: a small
document without a NUL escape or a ``null`` costs a length test and two substring searches;
the scans that find the depth, a non-finite number or the place of a bad value run only when
a cheap bound says they must (more than 256 opening brackets, a ``null`` in the text).
"""

from __future__ import annotations

import math
import re
from array import array
from itertools import accumulate
from typing import Any

import msgspec

from pgdurable.contract.errors import InvalidValue

#: The deepest nesting of arrays and objects a stored value may have. Decoding recurses once
#: per level and Python stops at about 1,000 frames, some of which a worker already uses:
#: a quarter of that leaves a wide margin.
MAX_DEPTH = 256
#: The longest delay or timeout, either way, in seconds: 100 years (of 365.25 days). Far
#: inside PostgreSQL's interval and timestamp ranges from any present time.
MAX_SECONDS = 100 * 365.25 * 86400

_encoder = msgspec.json.Encoder()
_packer = msgspec.msgpack.Encoder()
_NUL_ESCAPE = b"\\u0000"
# A non-finite float64 in msgpack: the 0xcb marker, then all eleven exponent bits set.
_NON_FINITE = re.compile(rb"\xcb[\x7f\xff][\xf0-\xff]")
_STRINGS = re.compile(rb'"(?:[^"\\]|\\.)*"', re.DOTALL)
# bytes.translate: keep only brackets, openers as +1 and closers as -1 (signed bytes).
_STEPS = bytes(1 if b in b"[{" else 255 if b in b"]}" else 0 for b in range(256))
_NOT_BRACKETS = bytes(b for b in range(256) if b not in b"[]{}")


def encode(value: Any, what: str) -> bytes:
    """``value`` as JSON for storage, or ``InvalidValue`` naming ``what``.

    Refuses what PostgreSQL cannot store or a worker cannot decode (``check_json``) and
    ``inf``/``nan`` (JSON has no such numbers; they would be stored as ``null``). Bytes
    are stored as base64 text, msgspec's JSON form of them. Other encoding errors
    (``TypeError``, ``msgspec.EncodeError``, ``UnicodeEncodeError``) pass through.
    """
    try:
        data = _encoder.encode(value)
    except RecursionError:
        raise InvalidValue(_too_deep(what)) from None
    # The common case — a small document, no NUL escape, no null — costs a decode and two
    # searches in the text (a substring search in str is several times faster than in bytes).
    text = data.decode()
    if len(data) > 2 * MAX_DEPTH or "\\u0000" in text:
        check_json(data, what)
    if "null" in text:  # nan and inf are written as null: look for them only then
        check_finite(value, what)
    return data


def check_json(data: bytes, what: str) -> None:
    """Refuse an encoded document nested deeper than ``MAX_DEPTH`` or holding a NUL."""
    # Deeper than MAX_DEPTH takes more than MAX_DEPTH opening and as many closing brackets.
    if (
        len(data) > 2 * MAX_DEPTH
        and data.count(b"[") + data.count(b"{") > MAX_DEPTH
        and json_depth(data) > MAX_DEPTH
    ):
        raise InvalidValue(_too_deep(what))
    if _NUL_ESCAPE in data and _has_nul_escape(data):  # msgspec writes a NUL as this escape
        try:
            where = _path(msgspec.json.decode(data), lambda v: isinstance(v, str) and "\x00" in v)
        except (msgspec.DecodeError, RecursionError):  # a raw NUL byte: not even JSON
            where = None
        at = f" at {where}" if where else ""
        raise InvalidValue(f"{what} contains a NUL character (U+0000){at}, which PostgreSQL cannot store")


def check_finite(value: Any, what: str) -> None:
    """Refuse a value holding ``inf`` or ``nan`` anywhere (JSON cannot hold them)."""
    try:
        # msgpack keeps floats as float64: a byte search finds the candidates at C speed.
        if not _NON_FINITE.search(_packer.encode(value)):
            return
    except (TypeError, ValueError, OverflowError, msgspec.EncodeError):  # e.g. an int past 64 bits
        pass
    try:
        plain = msgspec.to_builtins(value)
    except (TypeError, ValueError, msgspec.EncodeError):  # e.g. a msgspec.Raw: already JSON
        return
    where = _path(plain, lambda v: isinstance(v, float) and not math.isfinite(v))
    if where is not None:
        raise InvalidValue(
            f"{what} holds inf or nan at {where}; JSON cannot hold them (they would be stored as null)"
        )


def check_text(value: object, what: str) -> None:
    """Refuse text PostgreSQL cannot store: a NUL character, or a lone surrogate."""
    if not isinstance(value, str):  # None, or a type error reported where the type is checked
        return
    if "\x00" in value:
        raise InvalidValue(f"{what} contains a NUL character (U+0000), which PostgreSQL cannot store")
    if not value.isascii():
        try:
            value.encode()
        except UnicodeEncodeError:
            raise InvalidValue(
                f"{what} is not valid text: it holds a lone surrogate (U+D800-U+DFFF)"
            ) from None


def check_seconds(value: float | None, what: str) -> None:
    """Refuse a delay or timeout that is not a finite number within ``MAX_SECONDS``."""
    if value is not None and not (math.isfinite(value) and abs(value) <= MAX_SECONDS):
        raise InvalidValue(
            f"{what} must be a finite number of seconds within 100 years ({MAX_SECONDS:.0f} s) "
            f"either way, got {value!r}"
        )


def check_positive(value: float, what: str) -> None:
    """Refuse a weight that is not a finite positive number."""
    if isinstance(value, bool) or not isinstance(value, int | float) or not (0 < value < math.inf):
        raise InvalidValue(f"{what} must be a positive finite number, got {value!r}")


def decode(raw: str | bytes, what: str) -> Any:
    """Decode stored JSON, or ``InvalidValue`` naming ``what`` when this process cannot."""
    try:
        return msgspec.json.decode(raw)
    except RecursionError:
        raise InvalidValue(
            f"{what} cannot be decoded: nested deeper than this process can decode "
            f"(values are limited to {MAX_DEPTH} levels)"
        ) from None
    except (msgspec.DecodeError, msgspec.ValidationError) as exc:
        raise InvalidValue(f"{what} cannot be decoded: {exc}") from None


def json_depth(data: bytes) -> int:
    """The deepest nesting of arrays and objects in a JSON document (brackets in strings
    do not count)."""
    if b'"' in data:
        data = _STRINGS.sub(b"", data)
    steps = array("b", data.translate(_STEPS, _NOT_BRACKETS))
    return max(accumulate(steps), default=0)


def _too_deep(what: str) -> str:
    return f"{what} is nested deeper than {MAX_DEPTH} levels, more than a worker decodes safely"


def _has_nul_escape(data: bytes) -> bool:
    """Whether a ``\\u0000`` escape is really one: preceded by an even run of backslashes
    (``\\\\u0000`` is a backslash followed by the text ``u0000``)."""
    i = data.find(_NUL_ESCAPE)
    while i >= 0:
        j = i
        while j > 0 and data[j - 1] == 0x5C:
            j -= 1
        if (i - j) % 2 == 0:
            return True
        i = data.find(_NUL_ESCAPE, i + 1)
    return False


def _path(value: Any, bad: Any) -> str | None:
    """The JSON path (``$.a[2].b``) of the first string, key or number ``bad`` accepts."""
    stack: list[tuple[Any, str]] = [(value, "$")]
    while stack:
        node, where = stack.pop()
        if isinstance(node, dict):
            items = list(node.items())
            for k, v in reversed(items):
                name = f"{where}.{k}" if isinstance(k, str) else f"{where}[{k!r}]"
                if bad(k):
                    return f"{where} (a key)"
                stack.append((v, name))
        elif isinstance(node, list | tuple | set | frozenset):
            stack.extend((v, f"{where}[{i}]") for i, v in reversed(list(enumerate(node))))
        elif bad(node):
            return where
    return None
