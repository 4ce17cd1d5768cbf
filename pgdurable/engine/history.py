"""Step history: what a finished attempt leaves behind, and the traceback of a step error.

The group commit writes one ``history`` row per committed outcome whose machine and queue
keep history (``history_insert_many``, one statement per flush, in the flush's transaction);
``params`` builds that statement's parameters, or says there is nothing to send.
"""

from __future__ import annotations

from collections.abc import Sequence
from traceback import format_exception
from typing import TYPE_CHECKING, Any

import msgspec

if TYPE_CHECKING:
    from pgdurable.engine.outcome import Result

#: The most characters of a traceback kept (its end: the innermost frames and the message).
TRACEBACK_LIMIT = 16_384
_CUT = "[… {n} characters cut]\n"

#: Outcomes that send the instance to a step (``next_step``); the others end it or hold it.
_MOVES = frozenset(("next", "retry", "await", "spawn", "compensate"))


def storable(text: str, limit: int) -> str:
    """``text`` as PostgreSQL stores it: no NUL, no lone surrogate, at most ``limit``
    characters — the end is kept, where a traceback names the error."""
    text = text.replace("\x00", "\\x00")
    if not text.isascii():
        text = text.encode("utf-8", "backslashreplace").decode("utf-8")
    if len(text) > limit:
        cut = _CUT.format(n=len(text) - limit)
        text = cut + text[len(text) - limit + len(cut) :]
    return text


def format_traceback(exc: BaseException) -> str:
    """The exception with its traceback and its chain, as Python prints it, bounded."""
    return storable("".join(format_exception(exc)), TRACEBACK_LIMIT)


class _Row(msgspec.Struct, omit_defaults=True):
    """One attempt as history_insert_many reads it from its JSON document."""

    id: int
    fsm: str
    attempt: int
    outcome: str
    started: float
    duration: float
    version: int | None = None
    step: str | None = None
    next_step: str | None = None
    error: str | None = None
    traceback: str | None = None
    state: msgspec.Raw | None = None  # the JSON the step ran with, as the claim read it
    logs: msgspec.Raw | None = None  # its captured log lines (engine.capture)


_encoder = msgspec.json.Encoder()


def params(worker: str, results: Sequence[Result]) -> dict[str, Any] | None:
    """The parameters of ``history_insert_many`` for the results that keep history; None
    when none does (the statement is then not sent)."""
    rows = [
        _Row(
            r.row.id,
            r.row.fsm,
            r.row.attempt,
            r.label or r.kind,
            r.started,
            r.duration,
            r.version or r.row.version,
            r.ran or r.row.step,
            r.step if (r.label or r.kind) in _MOVES else None,
            r.error if r.error is not None else r.raised,
            r.traceback,
            msgspec.Raw(r.row.state.encode()) if r.row.state else None,
            msgspec.Raw(r.logs) if r.logs else None,
        )
        for r in results
        if r.history
    ]
    if not rows:
        return None
    return {"worker": worker, "rows": _encoder.encode(rows).decode()}
