"""What an insert needs to know, shared by the light client and the worker.

Kept free of worker code: a producer imports this (through pgdurable.client) without the
runtime. A machine class carries its MachineInfo in ``__pgdurable__``; a plain string names a
machine the producer does not import.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import msgspec

from pgdurable.contract import values

#: Statuses in which a correlation key counts as occupied unless told otherwise.
LIVE_STATUSES: tuple[str, ...] = (
    "runnable",
    "executing",
    "awaiting_signal",
    "awaiting_children",
    "held",
)
TERMINAL_STATUSES: tuple[str, ...] = ("done", "failed", "cancelled")
STATUSES: tuple[str, ...] = LIVE_STATUSES + TERMINAL_STATUSES

_json_encoder = msgspec.json.Encoder()


@dataclass(frozen=True, slots=True)
class MachineInfo:
    """Static facts about a machine, attached to its class."""

    name: str
    version: int
    queue: str
    initial: str
    steps: tuple[str, ...]
    state_type: Any  # a msgspec-decodable type, or None for a plain dict
    history: bool = True  # its step attempts are recorded in the history table
    on_cancel: str | None = None  # the step a cancel sends an instance to (FSM.on_cancel)
    deadline: float | None = None  # seconds from the insert to the instance's default deadline


class Insert(msgspec.Struct, frozen=True):
    """One instance to create: a machine (class or name), its state and insert options.

    Used by ``Client.insert_many`` and as a child of ``Spawn`` (where it is also ``Child``).
    ``correlation_scope=None`` means the live statuses; ``[]`` means the key neither
    deduplicates nor addresses. A frozen msgspec Struct: a thousand of them are built in
    a fraction of a millisecond, which a bulk producer notices.
    """

    fsm: Any
    state: Any = None
    queue: str | None = None
    priority: int = 0
    schedule_in: float | dt.timedelta | None = None
    schedule_at: dt.datetime | None = None
    correlation_key: str | None = None
    correlation_scope: Sequence[str] | None = None
    concurrency_key: str | tuple[str, object] | None = None
    rate_limit: str | tuple[str, object] | None = None
    weight: float = 1.0
    version: int | None = None
    step: str | None = None
    #: Start by then, or end (``on_expiry``: ``"fail"`` or ``"cancel"``) instead of running
    #: late: an aware datetime, or ``expires_in`` seconds (or a timedelta) from the insert.
    expires_at: dt.datetime | None = None
    expires_in: float | dt.timedelta | None = None
    on_expiry: str = "fail"
    #: Finish by then, or fail (live children cancelled): an aware datetime, or seconds (or a
    #: timedelta) from the insert. None: the machine's ``deadline``, if it declares one.
    deadline: dt.datetime | float | dt.timedelta | None = None


Child = Insert


class InsertRow(msgspec.Struct, frozen=True, omit_defaults=True):
    """An Insert resolved to column values (NULLs left for the database to resolve).

    ``insert_many`` sends them as a COPY stream (``bulk.py``); the children of a ``Spawn``
    travel as one JSON document of these rows (``rows_json``), unpacked server-side by
    ``json_to_recordset``: one parameter, encoded by msgspec, with each state embedded as
    it is (``Raw``), never re-encoded. Fields at their defaults are left out of the
    document (the statement fills them in), which keeps it small.
    """

    fsm: str
    state: msgspec.Raw
    version: int | None = None
    step: str | None = None
    queue: str | None = None
    priority: int = 0
    at: dt.datetime | None = None
    delay: float = 0.0
    correlation_key: str | None = None
    scope: list[str] | None = None  # None: the live statuses
    concurrency_key: str | None = None
    rate_limit: str | None = None
    weight: float = 1.0
    ord: int = 0
    parent_id: int | None = None
    expires_at: dt.datetime | None = None
    expires_in: float | None = None
    on_expiry: str | None = None  # None: fail
    deadline_at: dt.datetime | None = None
    deadline_in: float | None = None
    #: The W3C traceparent of the producer (the spawning step's span; docs/observability.md).
    traceparent: str | None = None


def encode_json(value: Any) -> str:
    """JSON text for a jsonb parameter (bound as text, cast server-side)."""
    return _json_encoder.encode(value).decode()


def seconds(value: float | dt.timedelta | None) -> float:
    if value is None:
        return 0.0
    if isinstance(value, dt.timedelta):
        return value.total_seconds()
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TypeError(f"expected seconds (int, float or timedelta), got {value!r}")
    return float(value)


def limit_key(value: str | tuple[str, object] | None, what: str) -> str | None:
    """A concurrency or rate-limit key: "name" or ("name", partition) -> "name:partition"."""
    if value is None or isinstance(value, str):
        if value == "":
            raise ValueError(f"{what} must not be empty")
        values.check_text(value, what)
        return value
    if isinstance(value, tuple) and len(value) == 2 and isinstance(value[0], str):
        key = f"{value[0]}:{value[1]}"
        values.check_text(key, what)
        return key
    raise TypeError(f"{what} must be a string or a (name, partition) pair, got {value!r}")


def machine_info(fsm: Any) -> MachineInfo | None:
    return getattr(fsm, "__pgdurable__", None)


def encode_state(info: MachineInfo | None, state: Any) -> bytes:
    """Encode a state for storage; with a known State type, validate it first.

    Raises ``InvalidValue`` for a state PostgreSQL could not store or a worker could not
    decode, or one holding inf/nan (see ``pgdurable.contract.values``).
    """
    if state is None:
        state = {}
    if info is not None and info.state_type is not None and not isinstance(state, info.state_type):
        state = msgspec.convert(state, info.state_type, strict=False)
    return values.encode(state, "state")


def check_correlation_key(key: object) -> None:
    if key is not None:
        if not isinstance(key, str):
            raise TypeError(f"correlation_key must be a string, got {key!r}")
        values.check_text(key, "correlation_key")


def resolve(spec: Insert, state: bytes | None = None) -> InsertRow:
    """Turn an Insert into column values, validating what can be checked here; ``state``,
    when given, stands for the spec's state, already encoded."""
    info = machine_info(spec.fsm)
    if info is not None:
        name, version, step, queue = info.name, info.version, info.initial, info.queue
    elif isinstance(spec.fsm, str) and spec.fsm:
        name, version, step, queue = spec.fsm, None, None, None
    else:
        raise TypeError(f"fsm must be a machine class or a machine name, got {spec.fsm!r}")
    if spec.version is not None:
        version = spec.version
    if spec.step is not None:
        step = spec.step
    if spec.queue is not None:
        queue = spec.queue
    if spec.schedule_in is not None and spec.schedule_at is not None:
        raise ValueError("give schedule_in or schedule_at, not both")
    if spec.schedule_at is not None and spec.schedule_at.tzinfo is None:
        raise ValueError("schedule_at must be timezone-aware")
    if not isinstance(spec.weight, int | float) or spec.weight <= 0:
        raise ValueError(f"weight must be a positive number, got {spec.weight!r}")
    values.check_positive(spec.weight, "weight")
    values.check_text(name, "machine name")
    values.check_text(step, "step")
    values.check_text(queue, "queue")
    delay = seconds(spec.schedule_in)
    values.check_seconds(delay, "schedule_in")
    if isinstance(spec.priority, bool) or not isinstance(spec.priority, int):
        raise TypeError(f"priority must be an int, got {spec.priority!r}")
    check_correlation_key(spec.correlation_key)
    if not -32768 <= spec.priority <= 32767:
        raise ValueError(f"priority must fit a smallint, got {spec.priority!r}")
    scope = None if spec.correlation_scope is None else list(spec.correlation_scope)
    bad = [s for s in scope or () if s not in STATUSES]
    if bad:
        raise ValueError(f"correlation_scope has unknown statuses {bad}; known: {list(STATUSES)}")
    if scope and not set(LIVE_STATUSES) <= set(scope):  # an empty scope is fine: no identity
        # The key must be occupied from the insert on: a scope that starts counting later
        # would let two instances share the key until one of them enters the scope, and
        # that transition could then never commit.
        raise ValueError(
            f"correlation_scope must be empty or contain every live status {list(LIVE_STATUSES)}"
            f" (plus any terminal ones that should keep the key reserved); got {scope}"
        )
    expires_at, expires_in, on_expiry, deadline_at, deadline_in = time_limits(spec, info)
    return InsertRow(
        fsm=name,
        version=version,
        step=step,
        state=msgspec.Raw(encode_state(info, spec.state) if state is None else state),
        queue=queue,
        priority=spec.priority,
        at=spec.schedule_at,
        delay=delay,
        correlation_key=spec.correlation_key,
        scope=scope,
        concurrency_key=limit_key(spec.concurrency_key, "concurrency_key"),
        rate_limit=limit_key(spec.rate_limit, "rate_limit"),
        weight=float(spec.weight),
        expires_at=expires_at,
        expires_in=expires_in,
        on_expiry=on_expiry,
        deadline_at=deadline_at,
        deadline_in=deadline_in,
    )


def time_limits(
    spec: Insert, info: MachineInfo | None
) -> tuple[dt.datetime | None, float | None, str | None, dt.datetime | None, float | None]:
    """An insert's expiry and deadline as column values: (expires_at, expires_in,
    on_expiry, deadline_at, deadline_in); a relative one counts from the insert (the
    database's clock). The machine class's ``deadline`` when the insert gives none."""
    if spec.expires_at is not None and spec.expires_in is not None:
        raise ValueError("give expires_at or expires_in, not both")
    if spec.expires_at is not None and (
        not isinstance(spec.expires_at, dt.datetime) or spec.expires_at.tzinfo is None
    ):
        raise ValueError(f"expires_at must be a timezone-aware datetime, got {spec.expires_at!r}")
    expires_in = None if spec.expires_in is None else seconds(spec.expires_in)
    values.check_seconds(expires_in, "expires_in")
    if spec.on_expiry not in ("fail", "cancel"):
        raise ValueError(f"on_expiry must be 'fail' or 'cancel', got {spec.on_expiry!r}")
    deadline_at = deadline_in = None
    if isinstance(spec.deadline, dt.datetime):
        if spec.deadline.tzinfo is None:
            raise ValueError("deadline must be timezone-aware when it is a datetime")
        deadline_at = spec.deadline
    elif spec.deadline is not None:
        deadline_in = seconds(spec.deadline)
    elif info is not None and info.deadline is not None:
        deadline_in = info.deadline
    values.check_seconds(deadline_in, "deadline")
    return (
        spec.expires_at,
        expires_in,
        None if spec.on_expiry == "fail" else spec.on_expiry,
        deadline_at,
        deadline_in,
    )


def rows_json(rows: Sequence[InsertRow], parents: Sequence[int] | None = None) -> str:
    """The JSON document of a batch insert: each row with its position (and parent)."""
    numbered = [
        msgspec.structs.replace(r, ord=i, parent_id=None if parents is None else parents[i])
        for i, r in enumerate(rows)
    ]
    return _json_encoder.encode(numbered).decode()
