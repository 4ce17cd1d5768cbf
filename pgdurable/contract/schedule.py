"""Cron schedules: the ``@schedule`` declaration, and the occurrences of a cron expression in
a time zone, computed the same way by the clients, the supervisors and the cron pass.

Cron expressions are parsed by croniter, imported on first use (``pgdurable.client`` stays
light). croniter is asked only about *wall-clock* times (naive datetimes); this module maps
them to instants with zoneinfo, because croniter's own handling of aware datetimes fires an
ambiguous local time twice when the clocks fall back. The rule (docs/schedules.md):

- each local wall time that matches fires once;
- one that does not exist (the clocks sprang forward over it) fires at the first instant
  after the gap — several such times collapse into that one fire;
- one that exists twice (the clocks fell back) fires at its first instant only.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import functools
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, TypeVar
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from pgdurable.contract import values
from pgdurable.contract.errors import DefinitionError, InvalidValue

__all__ = [
    "MISSED",
    "OVERLAP",
    "Cron",
    "ScheduleDecl",
    "check_policies",
    "declared_schedules",
    "schedule",
]

MISSED = ("skip", "catch_up")
OVERLAP = ("allow", "skip", "cancel")
_ALIASES = ("@yearly", "@annually", "@monthly", "@weekly", "@daily", "@midnight", "@hourly")
_UTC = dt.UTC


@functools.cache
def _zone(name: str) -> ZoneInfo:
    if not isinstance(name, str) or not name:
        raise InvalidValue(f"time zone must be an IANA name such as 'Europe/Paris', got {name!r}")
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError) as exc:
        raise InvalidValue(
            f"unknown time zone {name!r} (an IANA name such as 'Europe/Paris' or 'UTC')"
        ) from exc


def _fields(expr: str) -> tuple[str, bool]:
    """The expression as croniter takes it, and whether it has a seconds field.

    Five fields are standard cron; six fields carry a leading seconds field (as Quartz and
    Spring write it), which croniter wants last.
    """
    if not isinstance(expr, str) or not expr.strip():
        raise InvalidValue(f"a cron expression is needed, such as '0 9 * * MON-FRI', got {expr!r}")
    values.check_text(expr, "cron expression")
    text = " ".join(expr.split())
    if text.startswith("@"):
        if text.lower() not in _ALIASES:
            raise InvalidValue(f"unknown cron alias {expr!r} (one of {', '.join(_ALIASES)})")
        return text.lower(), False
    parts = text.split(" ")
    if len(parts) == 5:
        return text, False
    if len(parts) == 6:
        return " ".join([*parts[1:], parts[0]]), True
    raise InvalidValue(
        f"cron expression {expr!r} has {len(parts)} fields: give 5 (minute hour day month weekday), "
        "or 6 with a leading seconds field"
    )


@dataclass(frozen=True, slots=True)
class Cron:
    """A cron expression in a time zone; ``Cron.parse`` checks both (``InvalidValue``)."""

    expr: str
    tz: str
    _croniter_expr: str
    seconds: bool

    @classmethod
    def parse(cls, expr: str, tz: str = "UTC") -> Cron:
        text, seconds = _fields(expr)
        _zone(tz)
        from croniter import croniter

        try:
            croniter(text, dt.datetime(2000, 1, 1))
        except (ValueError, KeyError) as exc:  # croniter's errors subclass ValueError
            raise InvalidValue(f"invalid cron expression {expr!r}: {exc}") from None
        return cls(" ".join(expr.split()), tz, text, seconds)

    @property
    def zone(self) -> ZoneInfo:
        return _zone(self.tz)

    def _walls(self, start: dt.datetime, *, forward: bool) -> Iterator[dt.datetime]:
        """Matching wall-clock times after (or before) the naive ``start``."""
        from croniter import croniter

        it = croniter(self._croniter_expr, start)
        step = it.get_next if forward else it.get_prev
        while True:
            yield step(dt.datetime)

    def instant(self, wall: dt.datetime) -> dt.datetime:
        """The instant (UTC) a matching wall time fires at: its first instant when it is
        ambiguous, the end of the gap when it does not exist."""
        zone = self.zone
        first = wall.replace(tzinfo=zone, fold=0)
        at = first.astimezone(_UTC)
        if at.astimezone(zone).replace(tzinfo=None) == wall:
            return at  # it exists (its first instant, when it exists twice)
        # A gap: fold=0 reads the wall time with the offset before the transition, fold=1
        # with the one after; the transition lies between, and is where it fires.
        lo = wall.replace(tzinfo=zone, fold=1).astimezone(_UTC)
        hi = at
        lo, hi = min(lo, hi), max(lo, hi)
        while hi - lo > dt.timedelta(seconds=1):
            mid = lo + (hi - lo) / 2
            mid = mid.replace(microsecond=0)
            if mid.astimezone(zone).utcoffset() == lo.astimezone(zone).utcoffset():
                lo = mid
            else:
                hi = mid
        return hi

    def next_after(self, after: dt.datetime) -> dt.datetime:
        """The first occurrence strictly after the aware instant ``after``, in UTC."""
        local = after.astimezone(self.zone)
        for wall in self._walls(local.replace(tzinfo=None, fold=0), forward=True):
            at = self.instant(wall)
            if at > after:
                return at
        raise AssertionError("unreachable")  # pragma: no cover

    def latest(self, until: dt.datetime, *, since: dt.datetime, limit: int) -> list[dt.datetime]:
        """Up to ``limit`` occurrences in [since, until], the latest ones, oldest first."""
        local = until.astimezone(self.zone)
        wall = local.replace(tzinfo=None, fold=0)
        if local.fold == 1:
            # In the second pass of a fall-back hour, wall times up to the end of the
            # repeated hour fired in its first pass, before ``until``: start the walk there.
            wall += local.replace(fold=0).utcoffset() - local.utcoffset()  # type: ignore[operator]
        found: list[dt.datetime] = []
        # get_prev is strictly before its start: start a second later to include ``until``.
        for w in self._walls(wall + dt.timedelta(seconds=1), forward=False):
            at = self.instant(w)
            if at > until or (found and at == found[-1]):
                continue
            if at < since or len(found) >= limit:
                break
            found.append(at)
        return found[::-1]

    def upcoming(self, after: dt.datetime, n: int) -> list[dt.datetime]:
        """The next ``n`` occurrences after ``after``."""
        out: list[dt.datetime] = []
        for _ in range(n):
            after = self.next_after(after)
            out.append(after)
        return out


def check_policies(missed: str, catch_up_limit: int, overlap: str) -> None:
    """Raise InvalidValue naming the policy that is not one of the known ones."""
    if missed not in MISSED:
        raise InvalidValue(f"missed must be one of {', '.join(MISSED)}, got {missed!r}")
    if overlap not in OVERLAP:
        raise InvalidValue(f"overlap must be one of {', '.join(OVERLAP)}, got {overlap!r}")
    if isinstance(catch_up_limit, bool) or not isinstance(catch_up_limit, int) or catch_up_limit < 1:
        raise InvalidValue(f"catch_up_limit must be an integer >= 1, got {catch_up_limit!r}")


@dataclass(frozen=True, slots=True)
class ScheduleDecl:
    """A schedule declared in code with ``@schedule``; ``fsm`` is filled in from the machine
    it decorates. ``state`` is the encoded JSON the occurrences start with."""

    cron: str
    tz: str
    name: str | None
    state: str
    queue: str | None
    priority: int
    missed: str
    catch_up_limit: int
    overlap: str
    enabled: bool
    fsm: str = ""

    def document(self) -> dict[str, Any]:
        """The declaration as stored in ``schedules.declared`` (the state decoded)."""
        return {
            "fsm": self.fsm,
            "cron": self.cron,
            "timezone": self.tz,
            "state": values.decode(self.state, "schedule state"),
            "queue": self.queue,
            "priority": self.priority,
            "missed": self.missed,
            "catch_up_limit": self.catch_up_limit,
            "overlap": self.overlap,
            "enabled": self.enabled,
        }


_T = TypeVar("_T")


def schedule(
    cron: str,
    *,
    tz: str = "UTC",
    name: str | None = None,
    state: Any = None,
    queue: str | None = None,
    priority: int = 0,
    missed: str = "skip",
    catch_up_limit: int = 10,
    overlap: str = "allow",
    enabled: bool = True,
) -> Callable[[_T], _T]:
    """Declare that a machine (an FSM class, or a ``@job``) is started on a cron schedule.

    ``cron``: five fields (``"0 9 * * MON-FRI"``, names and ``@daily``-style aliases), or
    six with a leading seconds field; evaluated in ``tz``. Each occurrence inserts an
    instance with ``state`` (default ``{}``), in ``queue`` (default: the machine's), under
    the correlation key ``schedule:NAME@TIME``. ``name`` defaults to the machine's name;
    give one per schedule when a machine has several. ``missed``: ``"skip"`` fires only the
    latest of several occurrences due at once, ``"catch_up"`` up to ``catch_up_limit`` of
    them. ``overlap``: ``"allow"``, ``"skip"`` (no fire while the previous run is live) or
    ``"cancel"`` (cancel it, then fire). The supervisors register declared schedules at
    start (docs/schedules.md says what a restart keeps of an operator's changes).
    Stack it above ``@job`` (or on the class); several ``@schedule`` may decorate one machine.
    """
    Cron.parse(cron, tz)
    check_policies(missed, catch_up_limit, overlap)
    if name is not None:
        check_name(name)
    if queue is not None and (not isinstance(queue, str) or not queue):
        raise InvalidValue(f"queue must be a non-empty name or None, got {queue!r}")
    if isinstance(priority, bool) or not isinstance(priority, int) or not -32768 <= priority <= 32767:
        raise InvalidValue(f"priority must be an integer of -32768..32767, got {priority!r}")
    encoded = values.encode({} if state is None else state, "schedule state").decode()
    decl = ScheduleDecl(
        " ".join(cron.split()), tz, name, encoded, queue, priority, missed, catch_up_limit, overlap, enabled
    )

    def mark(target: _T) -> _T:
        if not isinstance(target, type) or getattr(target, "__pgdurable__", None) is None:
            raise DefinitionError(
                f"@schedule decorates a machine (an FSM subclass, or a function already made a "
                f"@job: put @schedule above @job), not {target!r}"
            )
        own = list(vars(target).get("__pgdurable_schedules__", ()))
        target.__pgdurable_schedules__ = (decl, *own)  # type: ignore[attr-defined]
        return target

    return mark


def check_name(name: object) -> str:
    """A schedule name: non-empty text."""
    if not isinstance(name, str) or not name.strip():
        raise InvalidValue(f"a schedule name must be non-empty text, got {name!r}")
    values.check_text(name, "schedule name")
    return name


def declared_schedules(machines: Any) -> list[ScheduleDecl]:
    """The schedules declared on ``machines`` (machine classes), each with its machine's
    name, in name order; two with one name are a DefinitionError naming both machines."""
    out: dict[str, ScheduleDecl] = {}
    for machine in machines:
        info = machine.__pgdurable__
        for decl in vars(machine).get("__pgdurable_schedules__", ()):
            full = dataclasses.replace(decl, fsm=info.name, name=decl.name or info.name)
            assert full.name is not None
            other = out.get(full.name)
            if other is not None and other != full:
                raise DefinitionError(
                    f"schedule {full.name!r} is declared twice (on machines {other.fsm!r} and {full.fsm!r}): "
                    "give each @schedule its own name="
                )
            out[full.name] = full
    return [out[n] for n in sorted(out)]
