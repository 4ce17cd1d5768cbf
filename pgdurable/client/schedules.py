"""What both clients share to manage cron schedules, without I/O: the ``Schedule`` snapshot,
each statement's parameters, and how a change is computed from the locked row. The
semantics are in docs/schedules.md; cron parsing (croniter) is imported only when a schedule
is created or changed.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from pgdurable.contract import values
from pgdurable.contract.errors import InvalidValue, NoTarget, OperationRefused, UnknownMachine
from pgdurable.contract.schedule import Cron, check_name, check_policies
from pgdurable.contract.spec import STATUSES, machine_info

__all__ = [
    "UNCHANGED",
    "Schedule",
    "ScheduleExists",
    "change_params",
    "create_params",
    "schedule_of",
    "trigger_params",
    "trigger_result",
]


class _Unchanged:
    def __repr__(self) -> str:
        return "UNCHANGED"


#: ``update_schedule``'s default for a field it leaves as it is.
UNCHANGED: Any = _Unchanged()


class ScheduleExists(OperationRefused):
    """``create_schedule``: a schedule by that name exists already."""

    def __init__(self, name: str):
        super().__init__(
            f"schedule {name!r} exists already; update it, or delete it first",
            instance=0,
            status="exists",
            reason="exists",
        )
        self.name = name

    def __reduce__(self) -> Any:
        return (ScheduleExists, (self.name,))


@dataclass(frozen=True, slots=True)
class Schedule:
    """A snapshot of one schedule (``schedules`` row)."""

    name: str
    fsm: str
    cron: str
    timezone: str
    state: Any
    #: None: the machine's queue.
    queue: str | None
    priority: int
    #: ``skip`` or ``catch_up`` (up to ``catch_up_limit`` missed occurrences).
    missed: str
    catch_up_limit: int
    #: ``allow``, ``skip`` or ``cancel``.
    overlap: str
    enabled: bool
    #: The next occurrence to fire (None: a supervisor computes it on its next pass).
    next_fire_at: dt.datetime | None
    #: The occurrence fired last, and the instance it inserted (or that trigger did).
    last_fire_at: dt.datetime | None
    last_instance_id: int | None
    fires: int
    #: Occurrences not fired: dropped by ``missed``, skipped by ``overlap``, or while the
    #: machine was not registered.
    skipped: int
    #: Why the last occurrence did not fire; None once one fires.
    last_error: str | None
    last_error_at: dt.datetime | None
    #: ``code`` (declared with ``@schedule``) or ``api``.
    source: str
    created_at: dt.datetime
    updated_at: dt.datetime


def schedule_of(row: Sequence[Any]) -> Schedule:
    """A ``schedule_get`` (or ``_list``, ``_create``, ``_write``) row as a ``Schedule``."""
    cols = list(row[:21])
    cols[4] = values.decode(cols[4], f"state of schedule {cols[0]!r}")
    return Schedule(*cols)


def _machine(fsm: Any) -> str:
    if isinstance(fsm, str):
        if not fsm:
            raise InvalidValue("a schedule needs a machine name")
        values.check_text(fsm, "machine")
        return fsm
    info = machine_info(fsm)
    if info is None:
        raise TypeError(f"a schedule's machine must be a name or a machine class, got {fsm!r}")
    return info.name


def _definition(
    fsm: Any,
    cron: str,
    tz: str,
    state: Any,
    queue: str | None,
    priority: int,
    missed: str,
    catch_up_limit: int,
    overlap: str,
) -> tuple[Cron, dict[str, Any]]:
    parsed = Cron.parse(cron, tz)
    check_policies(missed, catch_up_limit, overlap)
    if queue is not None:
        if not isinstance(queue, str) or not queue:
            raise InvalidValue(f"queue must be a non-empty name or None (the machine's), got {queue!r}")
        values.check_text(queue, "queue")
    if isinstance(priority, bool) or not isinstance(priority, int) or not -32768 <= priority <= 32767:
        raise InvalidValue(f"priority must be an integer of -32768..32767, got {priority!r}")
    return parsed, {
        "fsm": _machine(fsm),
        "cron": parsed.expr,
        "timezone": tz,
        "state": values.encode({} if state is None else state, "schedule state").decode(),
        "queue": queue,
        "priority": priority,
        "missed": missed,
        "catch_up_limit": catch_up_limit,
        "overlap": overlap,
    }


def create_params(
    name: str,
    fsm: Any,
    cron: str,
    *,
    tz: str,
    state: Any,
    queue: str | None,
    priority: int,
    missed: str,
    catch_up_limit: int,
    overlap: str,
    enabled: bool,
) -> tuple[Cron, dict[str, Any]]:
    """The parameters of ``schedule_create`` but ``next_fire_at`` (computed from the
    database's time, in the transaction), checked before any connection is touched."""
    check_name(name)
    parsed, params = _definition(fsm, cron, tz, state, queue, priority, missed, catch_up_limit, overlap)
    return parsed, {**params, "name": name, "enabled": bool(enabled), "next_fire_at": None}


def change_params(row: Sequence[Any] | None, name: str, changes: dict[str, Any]) -> dict[str, Any]:
    """The parameters of ``schedule_write`` for ``changes`` to the locked row
    (``schedule_get_for_update``): the changed fields checked, the next fire recomputed from
    the database's time when the cron, the time zone, or ``enabled`` (turned on) changed.
    ``changes`` maps ``update_schedule``'s keywords (and ``enabled``) to new values;
    UNCHANGED ones are ignored."""
    if row is None:
        raise NoTarget(f"no schedule {name!r}")
    current = schedule_of(row)
    now: dt.datetime = row[21]
    given = {k: v for k, v in changes.items() if v is not UNCHANGED}
    merged = {
        "fsm": current.fsm,
        "cron": current.cron,
        "tz": current.timezone,
        "state": current.state,
        "queue": current.queue,
        "priority": current.priority,
        "missed": current.missed,
        "catch_up_limit": current.catch_up_limit,
        "overlap": current.overlap,
    }
    enabled = bool(given.pop("enabled", current.enabled))
    unknown = set(given) - set(merged)
    if unknown:
        raise TypeError(f"update_schedule got unknown fields {sorted(unknown)}")
    merged.update(given)
    parsed, params = _definition(**merged)
    recompute = (
        (enabled and not current.enabled)
        or parsed.expr != current.cron
        or merged["tz"] != current.timezone
        or (enabled and current.next_fire_at is None)
    )
    next_fire_at = parsed.next_after(now) if recompute and enabled else current.next_fire_at
    return {
        **params,
        "name": name,
        "enabled": enabled,
        "next_fire_at": next_fire_at,
        "clear_error": bool(given) or (enabled and not current.enabled),
    }


def trigger_params(name: str) -> dict[str, Any]:
    """The parameters of ``schedule_trigger``: its key is reserved in every status."""
    return {"name": name, "scope": list(STATUSES)}


def trigger_result(name: str, row: Sequence[Any] | None) -> int:
    """The id of the instance ``schedule_trigger`` inserted, or the error for its row."""
    assert row is not None
    found, fsm, iid, _notified = row
    if not found:
        raise NoTarget(f"no schedule {name!r}")
    if iid is None:
        raise UnknownMachine(
            f"schedule {name!r} runs machine {fsm!r}, which no supervisor of this schema registered; "
            "start one that runs it"
        )
    return int(iid)
