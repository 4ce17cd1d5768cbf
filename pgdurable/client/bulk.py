"""Batch inserts through ``COPY``: the rows of ``insert_many`` as one text stream.

``COPY ... FROM STDIN`` skips the planner and the per-row executor of an ``INSERT ...
SELECT``: PostgreSQL buffers the rows and writes them to the heap in bulk. It cannot
compute anything, so the client hands it finished rows: ids drawn beforehand from the
table's identity sequence (``COPY`` writes given identity values); ``eligible_at`` and
``inserted_at`` from the ``now()`` read as the ids are drawn, so a delay means what it
means in ``insert``; machines named without a version, step or queue resolved from the
``machines`` table first. A batch whose rows all keep the default options sends only the
six columns that differ from the table's defaults.

Rows go in correlation-key order, so two batches sharing keys cannot deadlock; an
occupied key is a unique violation and the whole batch is refused.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import msgspec

from pgdurable.client.tracecontext import current_traceparent
from pgdurable.contract.errors import InvalidValue, UnknownMachine
from pgdurable.contract.spec import (
    LIVE_STATUSES,
    Insert,
    InsertRow,
    MachineInfo,
    check_correlation_key,
    encode_state,
    machine_info,
    resolve,
)

#: The columns the stream carries, in order (the ``instance_copy`` statement names them).
COLUMNS = (
    "id", "fsm", "version", "step", "state", "queue", "priority", "eligible_at",
    "correlation_key", "correlation_scope", "concurrency_key", "rate_limit", "weight",
    "inserted_at", "expires_at", "on_expiry", "deadline", "traceparent",
)  # fmt: skip
#: The columns of a plain batch (``instance_copy_plain``): the rest take their defaults.
PLAIN_COLUMNS = COLUMNS[:6]

_NULL = "\\N"
_ESCAPES = str.maketrans({"\\": "\\\\", "\t": "\\t", "\n": "\\n", "\r": "\\r"})
_LIVE_SCOPE = "{" + ",".join(LIVE_STATUSES) + "}"


def _text(value: str | None) -> str:
    """A text value in COPY's text format: ``\\N`` for NULL, the four specials escaped."""
    return _NULL if value is None else value.translate(_ESCAPES)


def _state(raw: bytes) -> str:
    # msgspec's JSON holds no raw tab, newline or carriage return (inside strings they are
    # escaped, and it emits no whitespace between tokens), so mostly only the backslashes
    # of JSON's own escapes need doubling; a pre-encoded msgspec.Raw state may be indented.
    text = raw.decode()
    if "\n" in text or "\r" in text or "\t" in text:
        return text.translate(_ESCAPES)
    return text.replace("\\", "\\\\") if "\\" in text else text


def _at(now: dt.datetime, at: dt.datetime | None, after: float | None) -> str:
    """A time limit in COPY's text format: absolute, or ``after`` seconds from ``now``."""
    if at is not None:
        return at.isoformat()
    return _NULL if after is None else (now + dt.timedelta(seconds=after)).isoformat()


def _shape_key(spec: Insert) -> tuple[Any, ...]:
    """What a row shares with others of its shape: everything but its state and key."""
    scope = spec.correlation_scope
    return (
        spec.fsm, spec.queue, spec.priority, type(spec.priority), spec.schedule_in, spec.schedule_at,
        None if scope is None else tuple(scope), spec.concurrency_key, spec.rate_limit,
        spec.weight, type(spec.weight), spec.version, spec.step,
        spec.expires_at, spec.expires_in, spec.on_expiry, spec.deadline, type(spec.deadline),
    )  # fmt: skip


@dataclass(slots=True)
class Batch:
    """The rows of one ``insert_many`` call, validated, in insertion order.

    A batch is mostly rows of a few shapes (the same machine and options): each shape is
    resolved and validated once, and a row is its shape, its state and its key.
    """

    shapes: list[InsertRow]  # state and correlation key left empty
    rows: list[tuple[int, bytes, str | None]]  # (shape, state JSON, correlation key)
    order: list[int]  # rows[k] is the caller's specs[order[k]]
    infos: list[MachineInfo | None]  # the machine class of each shape, if the spec gave one
    #: The producer's trace context, the same for every row of the call (None: none).
    traceparent: str | None = None

    @classmethod
    def of(cls, specs: Sequence[Insert]) -> Batch:
        shapes: list[InsertRow] = []
        infos: list[MachineInfo | None] = []
        index: dict[tuple[Any, ...], int] = {}
        rows: list[tuple[int, bytes, str | None]] = []
        for i, spec in enumerate(specs):
            try:
                key: tuple[Any, ...] | None = _shape_key(spec)
                k = index.get(key)  # type: ignore[arg-type]
            except TypeError:  # an unhashable option: a shape of its own
                key, k = None, None
            try:
                if k is None:
                    k = len(shapes)
                    shapes.append(resolve(msgspec.structs.replace(spec, correlation_key=None), state=b""))
                    infos.append(machine_info(spec.fsm))
                    if key is not None:
                        index[key] = k
                check_correlation_key(spec.correlation_key)  # the shape was resolved without it
                rows.append((k, encode_state(infos[k], spec.state), spec.correlation_key))
            except InvalidValue as exc:  # say which row: the batch is refused whole
                raise InvalidValue(f"insert_many row {i}: {exc}") from None
        order = list(range(len(rows)))
        if any(r[2] is not None for r in rows):
            # by key, then position; a str compares by code point, which is the "C" order
            order.sort(key=lambda i: (rows[i][2] is None, rows[i][2] or "", i))
            rows = [rows[i] for i in order]
        return cls(shapes, rows, order, infos, current_traceparent())

    def unresolved(self) -> list[str]:
        """Machine names whose version, step or queue must come from the machines table, or
        that name no deadline (the registered machine's applies)."""
        return sorted(
            {
                r.fsm
                for k, r in enumerate(self.shapes)
                if r.queue is None
                or r.version is None
                or r.step is None
                or (self.infos[k] is None and r.deadline_at is None and r.deadline_in is None)
            }
        )

    def fill(self, machines: Sequence[Sequence[Any]]) -> None:
        """Complete shapes from ``machines_lookup`` rows (name, version, initial_step,
        queue): the newest version, or the one the row names. A row whose queue stays
        unknown refuses the batch, as ``insert`` does."""
        newest: dict[str, tuple[int, str, str, float | None]] = {}
        exact: dict[tuple[str, int], tuple[int, str, str, float | None]] = {}
        for name, version, initial, queue, deadline in machines:
            exact[(name, version)] = (version, initial, queue, deadline)
            if name not in newest or version > newest[name][0]:
                newest[name] = (version, initial, queue, deadline)
        missing: set[str] = set()
        for k, r in enumerate(self.shapes):
            m = newest.get(r.fsm) if r.version is None else exact.get((r.fsm, r.version))
            if m is None:
                if r.queue is None:
                    missing.add(r.fsm)
                continue
            no_deadline = self.infos[k] is None and r.deadline_at is None and r.deadline_in is None
            self.shapes[k] = msgspec.structs.replace(
                r,
                version=m[0] if r.version is None else r.version,
                step=m[1] if r.step is None else r.step,
                queue=m[2] if r.queue is None else r.queue,
                deadline_in=m[3] if no_deadline else r.deadline_in,
            )
        if missing:
            raise UnknownMachine(
                f"machines {sorted(missing)} are not registered by any worker of this schema and"
                " no queue was given; start a worker that runs them or pass queue="
            )

    def plain(self) -> bool:
        """Every option of every row at its default: the short stream will do, the other
        columns taking their table defaults (which are the same; ``eligible_at`` is the
        COPY's own ``now()``)."""
        return (
            self.traceparent is None
            and all(r[2] is None for r in self.rows)
            and all(
                r.priority == 0
                and r.at is None
                and not r.delay
                and r.concurrency_key is None
                and r.rate_limit is None
                and r.weight == 1.0
                and r.expires_at is None
                and r.expires_in is None
                and r.deadline_at is None
                and r.deadline_in is None
                for r in self.shapes
            )
        )

    def queues(self) -> list[str]:
        return sorted({r.queue for r in self.shapes if r.queue is not None})

    def encode(self, ids: Sequence[int], now: dt.datetime, *, plain: bool = False) -> bytes:
        """The COPY text stream: one line per row, ``COLUMNS`` (or ``PLAIN_COLUMNS``) in order."""
        heads, tails = [], []
        now_text = now.isoformat()  # inserted_at: the delays count from the same instant
        trace = _text(self.traceparent)
        for r in self.shapes:
            if r.at is not None:
                eligible = r.at.isoformat()
            else:
                eligible = (now + dt.timedelta(seconds=r.delay) if r.delay else now).isoformat()
            scope = _LIVE_SCOPE if r.scope is None else "{" + ",".join(r.scope) + "}"
            version = _NULL if r.version is None else str(r.version)
            heads.append(f"{_text(r.fsm)}\t{version}\t{_text(r.step)}\t")
            if plain:
                tails.append((f"\t{_text(r.queue)}\n", "", ""))
                continue
            expires = _at(now, r.expires_at, r.expires_in)
            deadline = _at(now, r.deadline_at, r.deadline_in)
            rest = (
                f"\t{_text(r.concurrency_key)}\t{_text(r.rate_limit)}\t{r.weight!r}"
                f"\t{now_text}\t{expires}\t{_text(r.on_expiry)}\t{deadline}\t{trace}\n"
            )
            # A keyless row stores no scope (migration 14): its own end, per row's key.
            tails.append(
                (f"\t{_text(r.queue)}\t{r.priority}\t{eligible}\t", f"\t{scope}{rest}", f"\t{_NULL}{rest}")
            )
        lines = []
        if plain:
            for iid, (k, state, _) in zip(ids, self.rows, strict=True):
                lines.append(f"{iid}\t{heads[k]}{_state(state)}{tails[k][0]}")
            return "".join(lines).encode()
        for iid, (k, state, key) in zip(ids, self.rows, strict=True):
            mid, keyed, keyless = tails[k]
            if key is None:
                lines.append(f"{iid}\t{heads[k]}{_state(state)}{mid}{_NULL}{keyless}")
            else:
                lines.append(f"{iid}\t{heads[k]}{_state(state)}{mid}{_text(key)}{keyed}")
        return "".join(lines).encode()

    def ids_in_input_order(self, ids: Sequence[int]) -> list[int]:
        out = [0] * len(ids)
        for k, iid in enumerate(ids):
            out[self.order[k]] = int(iid)
        return out
