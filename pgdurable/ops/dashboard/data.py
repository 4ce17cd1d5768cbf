"""What the pages show, read with the named queries the CLI's verbs run (and their code:
``status.build``, ``show.collect``, ``show.history``), on a synchronous connection; the
app runs these in its thread pool. No SQL text here."""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import psycopg

from pgdurable.contract.spec import STATUSES
from pgdurable.db.queries import Queries
from pgdurable.ops.cli.common import parse_duration, parse_time, rows
from pgdurable.ops.cli.show import collect, history, last_traceback
from pgdurable.ops.cli.status import build, workers_text

if TYPE_CHECKING:
    from pgdurable.contract.fsm import Registry
    from pgdurable.ops.transitions import Graph


def overview(conn: psycopg.Connection[Any], q: Queries, schema: str, window: dt.timedelta) -> dict[str, Any]:
    """``pgdurable status``'s document, each queue with its throughput (rows finished per
    minute within ``window``)."""
    queues = rows(conn.execute(q["ops_status_queues"], {"window": window}))
    owners = rows(conn.execute(q["ops_status_owners"]))
    listeners = {r["queue"]: int(r["feeders"]) for r in rows(conn.execute(q["ops_status_listeners"]))}
    doc = build(schema, conn.info.dbname, window, queues, owners, listeners, None)
    minutes = window.total_seconds() / 60.0
    for e in doc["queues"]:
        e["throughput"] = sum(e["finished"].values()) / minutes
        e["workers_text"] = workers_text(e["workers"])
    errors = rows(conn.execute(q["schedule_errors"]))
    doc["problems"] += [f"schedule {r['name']}: {r['last_error']}" for r in errors]
    return doc


class FilterError(ValueError):
    """A filter of the instances page that is not one (its message names it)."""


@dataclass(frozen=True, slots=True)
class Filters:
    """The instances page's filters, as the query string gives them."""

    machine: str = ""
    queue: str = ""
    statuses: tuple[str, ...] = ()
    key: str = ""
    since: str = ""
    until: str = ""
    on_inserted: bool = False
    cursor: int | None = None
    limit: int = 50

    def params(self) -> dict[str, Any]:
        """``ops_instance_list``'s parameters (one row more than a page: is there a next?)."""
        bad = [s for s in self.statuses if s not in STATUSES]
        if bad:
            raise FilterError(f"status {bad[0]!r} is not one of {', '.join(STATUSES)}")
        p: dict[str, Any] = {
            "cursor": self.cursor,
            "machine": self.machine or None,
            "queue": self.queue or None,
            "statuses": list(self.statuses) or None,
            "key": self.key or None,
            "on_inserted": self.on_inserted,
            "limit": self.limit + 1,
        }
        for name, text in (("since", self.since), ("until", self.until)):
            p[f"{name}_at"] = p[f"{name}_ago"] = None
            if not text.strip():
                continue
            ago = parse_duration(text)
            at = parse_time(text) if ago is None else None
            if ago is None and at is None:
                raise FilterError(
                    f"{name} {text!r} is neither a duration ago (30m, 2h, 7d) nor an ISO time "
                    "(2026-12-01T10:00:00+00:00)"
                )
            p[f"{name}_ago"], p[f"{name}_at"] = ago, at
        return p


Page = tuple[list[dict[str, Any]], int | None]


def instances(conn: psycopg.Connection[Any], q: Queries, f: Filters) -> Page:
    """A page of instances, newest first, and the cursor of the next page (None: the last)."""
    # Never prepared, like `pgdurable list`: each page is planned for its own filters.
    found = rows(conn.execute(q["ops_instance_list"], f.params(), prepare=False))
    page = found[: f.limit]
    return page, page[-1]["id"] if len(found) > f.limit else None


def instance(conn: psycopg.Connection[Any], q: Queries, iid: int, last: int = 200) -> dict[str, Any]:
    """``pgdurable show``'s document: header, state, inbox, children, parent, error, the
    step timeline with its logs. A CliError (NOT_FOUND) when there is no such instance."""
    doc = collect(conn, q, iid, inbox_limit=50, children_limit=50)
    doc["history"] = history(conn, q, iid, last)
    doc["last_traceback"] = last_traceback(conn, q, iid)
    return doc


def graph(registry: Registry | None, doc: dict[str, Any]) -> tuple[Graph, bool]:
    """The instance's machine, as its code declares it when the modules are loaded, with the
    transitions this instance took counted on its edges; the bool: the code was read."""
    from pgdurable.ops.transitions import Graph, observe, transitions

    taken = [(h["step"], h["outcome"], h["next_step"], 1) for h in doc["history"] if h["step"] is not None]
    found = registry.get(doc["machine"], doc["version"]) if registry is not None else None
    if found is not None:
        return observe(transitions(found[0]), taken), True
    first = next((h["step"] for h in doc["history"] if h["step"]), doc["step"] or "?")
    bare = Graph(doc["machine"], doc["version"] or 0, doc["queue"], first, (), ())
    return observe(bare, taken), False


def held(conn: psycopg.Connection[Any], q: Queries, cursor: int | None, limit: int = 100) -> Page:
    """The held rows, newest first, each with its reason (``last_error``)."""
    return instances(conn, q, Filters(statuses=("held",), cursor=cursor, limit=limit))
