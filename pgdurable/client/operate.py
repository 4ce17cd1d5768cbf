"""What both clients share to operate instances and queues — cancel, retry, rewind, pause —
without I/O: the result types, each statement's parameters and the reading of its rows.
The semantics are in docs/operating.md; the work is done by the functions of migration 6.
"""

from __future__ import annotations

import datetime as dt
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from pgdurable.contract import values
from pgdurable.contract.errors import (
    InstanceExecuting,
    NoTarget,
    OperationRefused,
    UnknownMachine,
    UnknownStep,
)
from pgdurable.contract.spec import machine_info

__all__ = [
    "CancelResult",
    "RetryReport",
    "Rewound",
    "cancel_params",
    "cancel_result",
    "paused_of",
    "queue_params",
    "retry_filter",
    "retry_result",
    "rewind_params",
    "rewind_result",
]


@dataclass(frozen=True, slots=True)
class CancelResult:
    """What ``cancel`` did to the instance, and to its live descendants.

    ``outcome``: ``cancelled`` (it ended now), ``cancelling`` (it runs its machine's
    on_cancel step next — or already did, and is left to finish it), ``marked`` (a worker
    runs its step: it is cancelled when that step returns, the step's outcome discarded),
    ``terminal`` (it had finished already; ``status`` says how). ``status`` is its status
    after the call. ``descendants`` counts the live descendants a cascade reached, by the
    same outcomes.
    """

    id: int
    outcome: str
    status: str
    descendants: dict[str, int] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class RetryReport:
    """What ``retry_many`` did: the failed instances that matched (``dry_run``: how many
    match now), how many were retried, and how many were left failed and why: ``children``
    (live children), ``key`` (their correlation key is held by another live instance), or
    the status they had reached meanwhile."""

    matched: int
    retried: int
    skipped: dict[str, int] = field(default_factory=dict)
    dry_run: bool = False


def _target(target: int | str, what: str) -> tuple[int | None, str | None]:
    if isinstance(target, bool) or not isinstance(target, int | str):
        raise TypeError(f"{what} target must be an instance id or a correlation key, got {target!r}")
    if isinstance(target, str):
        values.check_text(target, f"{what} target (a correlation key)")
        return None, target
    return target, None


def cancel_params(target: int | str, reason: str | None, cascade: bool, compensate: bool) -> dict[str, Any]:
    """The parameters of ``instance_cancel``."""
    target_id, target_key = _target(target, "cancel")
    values.check_text(reason, "cancel reason")
    return {
        "target_id": target_id,
        "target_key": target_key,
        "reason": reason,
        "cascade": bool(cascade),
        "compensate": bool(compensate),
    }


def cancel_result(target: int | str, rows: Sequence[Sequence[Any]]) -> CancelResult:
    """The ``CancelResult`` of the ``instance_cancel`` rows (the instance's row first)."""
    if not rows:
        what = "no instance" if isinstance(target, int) else "no live instance holds the correlation key"
        raise NoTarget(f"{what} {target!r} to cancel")
    iid, _parent, status, outcome = rows[0]
    below = Counter(row[3] for row in rows[1:] if row[3] != "terminal")
    return CancelResult(int(iid), outcome, status, dict(below))


def retry_result(iid: int, rows: Sequence[Sequence[Any]]) -> str:
    """The step a retried instance runs next, from its ``instance_retry_many`` row, or the
    error that stands for a refusal."""
    if not rows:
        raise NoTarget(f"no instance {iid!r} to retry")
    _id, outcome, status, step = rows[0]
    if outcome == "retried":
        return str(step)
    raise _refused(iid, status, outcome, "retry")


def _refused(iid: int, status: str, reason: str, verb: str) -> Exception:
    if reason == "executing":
        return InstanceExecuting(
            f"instance {iid} is executing: a worker runs its step, and {verb} never races it; "
            "cancel it (the cancel waits for the step), or try again once the step returned",
            instance=iid,
            status=status,
            reason=reason,
        )
    if reason == "children":
        return OperationRefused(
            f"instance {iid} has live children, whose ends would be counted against it; "
            f"{verb} it once they ended (cancel them, or wait for them)",
            instance=iid,
            status=status,
            reason=reason,
        )
    if reason == "compensated":
        return OperationRefused(
            f"instance {iid} ({status}) compensated the steps it had completed, so the step it "
            f"failed in cannot simply run again; rewind it to a step (its first, say) to start over",
            instance=iid,
            status=status,
            reason=reason,
        )
    if reason == "key":
        return OperationRefused(
            f"instance {iid} ({status}) holds a correlation key that another live instance "
            f"holds now; {verb} it once that one ended (or cancel it)",
            instance=iid,
            status=status,
            reason=reason,
        )
    return OperationRefused(
        f"instance {iid} is {status}: only a failed or cancelled instance can be retried "
        "(rewind moves a live or finished one to any step)",
        instance=iid,
        status=status,
        reason=reason,
    )


def rewind_params(iid: int, step: str, state: Any) -> dict[str, Any]:
    """The parameters of ``instance_rewind``; ``state`` None: the state from history."""
    if not isinstance(step, str) or not step:
        raise ValueError(f"rewind needs a step name, got {step!r}")
    values.check_text(step, "rewind step")
    encoded = None if state is None else values.encode(state, "rewind state").decode()
    return {"id": iid, "step": step, "state": encoded}


@dataclass(frozen=True, slots=True)
class Rewound:
    """What ``rewind`` did: the instance is ``runnable`` at ``step`` of machine ``version``;
    ``state_from`` says which state it runs with: ``given`` (the call's), ``history`` (the
    state the instance had when that step last ran, from its step history) or ``stored``
    (its current state: the step never ran, or its machine keeps no history)."""

    id: int
    step: str
    version: int
    state_from: str


def rewind_result(iid: int, step: str, row: Sequence[Any] | None) -> Rewound:
    """The rewound instance; the error that stands for a refusal."""
    if row is None:
        raise NoTarget(f"no instance {iid!r} to rewind")
    outcome, status, version, steps, state_from = row
    if outcome == "rewound":
        return Rewound(iid, step, version, state_from)
    if outcome == "unknown_machine":
        raise UnknownMachine(
            f"instance {iid}'s machine (version {version}) is not registered by any worker of "
            "this schema, so its steps cannot be checked; start a worker that runs it"
        )
    if outcome == "unknown_step":
        raise UnknownStep(f"instance {iid}'s machine version {version} has no step {step!r} (steps: {steps})")
    raise _refused(iid, status, outcome, "rewind")


def retry_filter(
    machine: Any, queue: str | None, error_like: str | None, since: dt.datetime | dt.timedelta | float | None
) -> dict[str, Any]:
    """The filter parameters of ``instance_retry_select`` and ``instance_retry_count``.

    ``machine``: a name or a machine class; ``since``: an aware ``datetime``, or how long
    ago (a ``timedelta`` or seconds) — the instance failed at or after it.
    """
    if machine is not None and not isinstance(machine, str):
        info = machine_info(machine)
        if info is None:
            raise TypeError(f"machine must be a name or a machine class, got {machine!r}")
        machine = info.name
    for text, what in ((machine, "machine"), (queue, "queue"), (error_like, "error_like")):
        values.check_text(text, what)
    since_at = since_ago = None
    if isinstance(since, dt.datetime):
        if since.tzinfo is None:
            raise ValueError("since must be an aware datetime (with a time zone)")
        since_at = since
    elif isinstance(since, dt.timedelta):
        since_ago = since
    elif since is not None:
        if isinstance(since, bool) or not isinstance(since, int | float) or since < 0:
            raise TypeError(f"since must be a datetime, a timedelta or seconds, got {since!r}")
        since_ago = dt.timedelta(seconds=since)
    return {
        "fsm": machine,
        "queue": queue,
        "error_like": error_like,
        "since_at": since_at,
        "since_ago": since_ago,
    }


def queue_params(queue: str) -> dict[str, Any]:
    """The parameters of ``queue_pause`` and ``queue_resume``."""
    if not isinstance(queue, str) or not queue:
        raise ValueError(f"a queue name is needed, got {queue!r}")
    values.check_text(queue, "queue")
    return {"queue": queue}


def paused_of(rows: Sequence[Sequence[Any]]) -> dict[str, dt.datetime]:
    """The ``queue_paused`` rows: queue → when it was paused."""
    return {name: at for name, at in rows}
