"""Compensation (sagas): what a step's result does to its instance's compensations.

An instance's ``saga`` column (migration 8) holds the compensations of the steps it
completed, in the order they completed (``stack``); the last one runs first. A step that
declares ``compensate=`` and returns normally pushes its compensation with its outcome. An
outcome that would end the instance ``failed`` (or ``cancelled``, after an ``on_cancel``
step) with a non-empty stack sends it to the last compensation instead, ``compensating``;
each compensation that returns (or gives up) is popped with its own commit, and the last
one ends the instance as it would have ended, marked ``compensated`` or
``compensation_failed``. Every transition is one ordinary outcome, committed by the flush
under the claim's fencing token, so a worker that dies in a compensation leaves it due:
it runs again, and a compensation whose commit landed never runs twice. docs/sagas.md.
"""

from __future__ import annotations

import logging
from dataclasses import replace
from typing import TYPE_CHECKING, Any

import msgspec

from pgdurable.contract.fsm import StepDef
from pgdurable.contract.spec import MachineInfo
from pgdurable.engine.claim import Claimed

if TYPE_CHECKING:
    from pgdurable.engine.outcome import Result

_encoder = msgspec.json.Encoder()


def read(raw: str | None) -> dict[str, Any] | None:
    """The saga document of a claimed row (None: no step with a compensation completed)."""
    if raw is None:
        return None
    doc = msgspec.json.decode(raw)
    return doc if isinstance(doc, dict) else None


def due(saga: dict[str, Any] | None, step: str) -> bool:
    """Whether ``step`` is the compensation the instance runs now."""
    if saga is None or saga.get("mode") != "compensating":
        return False
    stack = saga.get("stack") or []
    return bool(stack) and stack[-1] == step


def _encode(saga: dict[str, Any]) -> bytes:
    return _encoder.encode(saga)


def after(
    row: Claimed,
    info: MachineInfo,
    sdef: StepDef,
    saga: dict[str, Any] | None,
    result: Result,
    log: logging.Logger,
) -> Result:
    """The result of a step (not a compensation) with its effect on the saga: a completed
    step with a compensation pushes it; an end as failed or cancelled with compensations to
    run turns into the first compensation."""
    if saga is not None and saga.get("mode") is not None:
        return result  # compensating already (an on_cancel step, say), or done compensating
    ends_badly = result.kind == "stop" or (result.kind == "done" and row.cancel_reason is not None)
    stack: list[str] = list((saga or {}).get("stack") or [])
    if ends_badly and stack:
        error = result.error if result.kind == "stop" else f"cancelled: {row.cancel_reason}"
        doc = {**(saga or {}), "mode": "compensating", "error": error, "step": sdef.name, "failures": 0}
        log.warning(
            "instance %d %s in step %r; compensating %d completed steps, the last first",
            row.id,
            "failed" if result.kind == "stop" else "was cancelled",
            sdef.name,
            len(stack),
            extra={
                "event": "compensating",
                "instance": row.id,
                "fsm": info.name,
                "step": sdef.name,
                "attempt": row.attempt,
                "compensations": stack[::-1],
            },
        )
        return replace(
            result,
            kind="next",
            step=stack[-1],
            state=None,
            result=None,
            delay=0.0,
            attempt=0,
            keep_awaits=False,
            keep_rate=False,
            rate_limit=None,
            weight=1.0,
            awaits=[],
            children=[],
            inline=False,
            error=error,
            saga=_encode(doc),
            label="compensate",
        )
    completed = result.kind in ("next", "await", "spawn") and result.raised is None
    if completed and sdef.compensate is not None:
        result.saga = _encode({**(saga or {}), "stack": [*stack, sdef.compensate]})
    return result


def popped(row: Claimed, info: MachineInfo, step: str, saga: dict[str, Any], *, gave_up: bool) -> Result:
    """The result of the due compensation once it returned (or gave up): the next one is
    due, or the instance ends — ``failed``, or ``cancelled`` when a cancel started it (the
    commit statement decides from its cancel reason) — with the error that started it."""
    from pgdurable.engine.outcome import Result

    stack = list(saga.get("stack") or [])[:-1]
    failures = int(saga.get("failures") or 0) + int(gave_up)
    doc = {**saga, "stack": stack, "failures": failures}
    if stack:
        return Result(row, "next", version=info.version, step=stack[-1], saga=_encode(doc), ran=step)
    mode = "compensated" if failures == 0 else "compensation_failed"
    return Result(
        row,
        "stop",
        version=info.version,
        step=step,
        error=str(saga.get("error") or mode),
        saga=_encode({**doc, "mode": mode}),
        ran=step,
        label=mode,
    )
