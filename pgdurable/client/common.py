"""What ``Client`` and ``AsyncClient`` share: the result types, the parameters of each
statement and the reading of its row. No I/O here: the clients only add the talking to
the database.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from psycopg import errors as pgerrors

from pgdurable.client.bulk import Batch
from pgdurable.client.tracecontext import current_traceparent
from pgdurable.contract import values
from pgdurable.contract.errors import DuplicateInstance, NoTarget, UnknownMachine
from pgdurable.contract.outcomes import Done
from pgdurable.contract.spec import TERMINAL_STATUSES, Insert, resolve
from pgdurable.db.queries import Queries

__all__ = [
    "Busy",
    "Failed",
    "Instance",
    "LogLine",
    "StepAttempt",
    "WaitResult",
    "attempt_of",
    "copy_query",
    "history_params",
    "insert_params",
    "insert_result",
    "insert_spec",
    "instance_of",
    "many_error",
    "outcome_of",
    "signal_params",
    "signal_result",
]


@dataclass(frozen=True, slots=True)
class Saga:
    """An instance's compensations (docs/sagas.md).

    ``status``: None while it runs normally (``pending`` holds what a failure would undo),
    ``compensating``, then ``compensated`` (every compensation returned) or
    ``compensation_failed`` (``failures`` of them gave up). ``pending``: the compensations
    still to run, in the order they will run. ``error`` and ``step``: the failure that
    started them, and the step it happened in.
    """

    status: str | None
    pending: tuple[str, ...]
    error: str | None = None
    step: str | None = None
    failures: int = 0


def saga_of(raw: str | None) -> Saga | None:
    """The ``saga`` column as a ``Saga`` (None: no step with a compensation completed)."""
    if raw is None:
        return None
    doc = values.decode(raw, "saga")
    if not isinstance(doc, dict):
        return None
    return Saga(
        doc.get("mode"),
        tuple(reversed(doc.get("stack") or [])),
        doc.get("error"),
        doc.get("step"),
        int(doc.get("failures") or 0),
    )


@dataclass(frozen=True, slots=True)
class Instance:
    """A snapshot of one instance row."""

    id: int
    fsm: str
    version: int | None
    step: str | None
    status: str
    queue: str
    priority: int
    attempt: int
    crashes: int
    state: Any
    result: Any
    last_error: str | None
    awaits: list[str] | None
    await_deadline: dt.datetime | None
    parent_id: int | None
    children_pending: int
    correlation_key: str | None
    concurrency_key: str | None
    rate_limit: str | None
    weight: float
    eligible_at: dt.datetime
    inserted_at: dt.datetime
    updated_at: dt.datetime
    #: The traceback of the error in ``last_error`` when a step raised it (its last 16,384
    #: characters); None otherwise.
    last_traceback: str | None = None
    #: Why it was cancelled: set by ``cancel``, kept once it ended ``cancelled``; while it is
    #: live and no cancel is pending, it runs its machine's on_cancel step.
    cancel_reason: str | None = None
    #: A cancel waits for its executing step to return (docs/operating.md).
    cancel_requested: bool = False
    #: Its compensations, once a step that declares one completed (docs/sagas.md).
    saga: Saga | None = None
    #: It must have started by then, or it ends instead (docs/deadlines.md); cleared once it
    #: started, and once it expired.
    expires_at: dt.datetime | None = None
    #: It must have finished by then, or it fails (docs/deadlines.md); cleared once it fired.
    deadline: dt.datetime | None = None


@dataclass(frozen=True, slots=True)
class StepAttempt:
    """One finished step attempt of an instance, from its history (``history_of_instance``)."""

    instance_id: int
    fsm: str
    version: int | None
    #: The step that ran (None: a held row whose step was not known).
    step: str | None
    attempt: int
    #: ``next``, ``retry``, ``await``, ``spawn``, ``done``, ``stop`` or ``hold``.
    outcome: str
    #: Where the instance went: the next step (``next``, ``await``, ``spawn``), the same
    #: step again (``retry``); None when it finished or was held.
    next_step: str | None
    started_at: dt.datetime
    finished_at: dt.datetime
    #: Seconds, measured on the worker's monotonic clock.
    duration: float
    worker: str
    #: The outcome's error (``Retry``'s, ``Stop``'s reason, a hold's reason), else what the
    #: step raised; None when it neither raised nor failed.
    error: str | None
    #: When the step raised: the exception with its traceback (its last 16,384 characters).
    traceback: str | None
    #: The state the step ran with (None in rows kept before schema version 7).
    state: Any = None
    #: What the step logged (``ctx.log``, its own loggers, ``print`` when captured), in
    #: order: empty when it logged nothing, or capture is off (docs/history.md).
    logs: tuple[LogLine, ...] = ()


@dataclass(frozen=True, slots=True)
class LogLine:
    """One line a step attempt logged."""

    at: dt.datetime
    level: str  # DEBUG … CRITICAL, or PRINT for captured print output
    logger: str
    message: str


@dataclass(frozen=True, slots=True)
class Failed:
    """wait(): the instance ended failed (or cancelled) with ``error`` (for a cancelled
    one, the cancel's reason)."""

    error: str | None
    status: str = "failed"


@dataclass(frozen=True, slots=True)
class Busy:
    """wait(): the instance had not finished when the timeout passed."""

    instance: Instance

    def __repr__(self) -> str:
        # The snapshot itself (state, timestamps with their zones) is too long for a line.
        i = self.instance
        return f"Busy(id={i.id}, fsm={i.fsm!r}, step={i.step!r}, status={i.status!r}, attempt={i.attempt})"


WaitResult = Done | Failed | Busy


def _json(raw: str | None, what: str) -> Any:
    return None if raw is None else values.decode(raw, what)


def instance_of(row: Sequence[Any]) -> Instance:
    """An ``instance_get`` row as an ``Instance``, its state and result decoded (a value
    this process cannot decode, stored behind the client's back: ``InvalidValue``)."""
    cols = list(row)
    cols[9] = _json(cols[9], f"state of instance {cols[0]}")
    cols[10] = _json(cols[10], f"result of instance {cols[0]}")
    cols[26] = saga_of(cols[26])
    return Instance(*cols)


def history_params(iid: int, last: int | None) -> dict[str, Any]:
    """The parameters of ``history_of_instance``."""
    if last is not None and (isinstance(last, bool) or not isinstance(last, int) or last < 0):
        raise ValueError(f"last must be a count of attempts (an integer >= 0) or None, got {last!r}")
    return {"id": iid, "limit": last}


def attempt_of(row: Sequence[Any]) -> StepAttempt:
    """A ``history_of_instance`` row as a ``StepAttempt``, its state decoded."""
    cols = list(row)
    cols[13] = _json(cols[13], f"state of instance {cols[0]} at step {cols[3]}")
    lines = _json(cols[14], f"logs of instance {cols[0]} at step {cols[3]}") or []
    cols[14] = tuple(
        LogLine(dt.datetime.fromtimestamp(x["at"], dt.UTC), x["level"], x["logger"], x["message"])
        for x in lines
    )
    return StepAttempt(*cols)


def outcome_of(inst: Instance) -> WaitResult:
    if inst.status == "done":
        return Done(inst.result)
    if inst.status == "cancelled":
        return Failed(inst.cancel_reason or inst.last_error, inst.status)
    if inst.status in TERMINAL_STATUSES:
        return Failed(inst.last_error, inst.status)
    return Busy(inst)


def insert_spec(fsm: Any, state: Any, options: dict[str, Any]) -> Insert:
    """The ``Insert`` of an ``insert(fsm, state, **options)`` call (or the one it was given)."""
    return fsm if isinstance(fsm, Insert) and state is None and not options else Insert(fsm, state, **options)


def insert_params(spec: Insert) -> dict[str, Any]:
    """The parameters of ``instance_insert_one`` but ``notify``, which the caller decides."""
    r = resolve(spec)
    return {
        "fsm": r.fsm,
        "version": r.version,
        "step": r.step,
        "state": bytes(r.state).decode(),
        "queue": r.queue,
        "priority": r.priority,
        "at": r.at,
        "delay": r.delay,
        "correlation_key": r.correlation_key,
        "correlation_scope": r.scope,
        "concurrency_key": r.concurrency_key,
        "rate_limit": r.rate_limit,
        "weight": r.weight,
        "expires_at": r.expires_at,
        "expires_in": r.expires_in,
        "on_expiry": r.on_expiry,
        "deadline_at": r.deadline_at,
        "deadline_in": r.deadline_in,
        "traceparent": current_traceparent(),
    }


def insert_result(params: dict[str, Any], row: Sequence[Any] | None) -> int:
    """The new id from the ``instance_insert_one`` row, or the error it stands for."""
    assert row is not None
    iid, known, _queue, _notified = row
    if not known:
        raise UnknownMachine(
            f"machine {params['fsm']!r} is not registered by any worker of this schema and no "
            "queue was given; start a worker that runs it or pass queue="
        )
    if iid is None:
        raise DuplicateInstance([params["correlation_key"]])
    return int(iid)


def many_error(specs: Sequence[Insert], exc: pgerrors.UniqueViolation) -> DuplicateInstance:
    """The ``DuplicateInstance`` of a refused batch: the key the database names, if it does."""
    detail = exc.diag.message_detail or ""
    key = detail.partition(")=(")[2].rpartition(") already exists")[0]
    return DuplicateInstance([key] if key else [s.correlation_key or "?" for s in specs])


def copy_query(q: Queries, batch: Batch) -> tuple[bytes, bool]:
    """The COPY statement for ``batch``, and whether it is the short stream."""
    plain = batch.plain()
    return q["instance_copy_plain" if plain else "instance_copy"], plain


def signal_params(
    target: int | str, name: str, payload: Any, dedup_key: str | None, *, notify: bool
) -> dict[str, Any]:
    """The parameters of ``signal_deliver``, checked before any connection is touched."""
    if isinstance(target, bool) or not isinstance(target, int | str):
        raise TypeError(f"signal target must be an instance id or a correlation key, got {target!r}")
    if not name:
        raise ValueError("signal name must not be empty")
    values.check_text(name, "signal name")
    values.check_text(dedup_key, "dedup_key")
    if isinstance(target, str):
        values.check_text(target, "signal target (a correlation key)")
    return {
        "target_id": target if isinstance(target, int) else None,
        "target_key": target if isinstance(target, str) else None,
        "name": name,
        "payload": values.encode({} if payload is None else payload, "signal payload").decode(),
        "dedup_key": dedup_key,
        "notify": notify,
        "traceparent": current_traceparent(),
    }


def signal_result(target: int | str, row: Sequence[Any] | None) -> int | None:
    """The stored signal's id from the ``signal_deliver`` row (None: a duplicate)."""
    if row is None:
        raise NoTarget(f"no live instance {target!r} to signal (unknown or already finished)")
    return None if row[1] is None else int(row[1])
