"""``pgdurable show``: one instance — its header, state, inbox, children, parent and error.

``collect`` builds the document (``--json`` prints it as is) and ``render`` writes it as
text, one section after another; the step history (``--history N``) follows the state as
a timeline.
"""

from __future__ import annotations

import datetime as dt
from typing import Any

import click
import psycopg

from pgdurable.db.queries import Queries
from pgdurable.ops.cli.common import (
    NOT_FOUND,
    CliError,
    clip,
    compact,
    connected,
    database_options,
    json_option,
    pretty,
    print_json,
    resolve,
    rows,
    stored_json,
    table,
    when,
)


@click.command("show", short_help="one instance: header, state, inbox, children, error")
@database_options()
@click.argument("ident", metavar="ID|KEY")
@click.option("--by-key", is_flag=True, help="ID|KEY is a correlation key, even if it is all digits")
@click.option(
    "--inbox", "inbox_limit", type=click.IntRange(0), default=20, show_default=True, help="signals shown"
)
@click.option(
    "--children",
    "children_limit",
    type=click.IntRange(0),
    default=20,
    show_default=True,
    help="children shown",
)
@click.option(
    "--history",
    "history_limit",
    type=click.IntRange(0),
    default=50,
    show_default=True,
    help="the last step attempts shown",
)
@json_option
def show(
    dsn: str | None,
    schema: str | None,
    config_path: str | None,
    ident: str,
    by_key: bool,
    inbox_limit: int,
    children_limit: int,
    history_limit: int,
    as_json: bool,
) -> int:
    """One instance, by id or by correlation key: header, state (and result), inbox,
    children, parent and the last error in full.

    A key names the instance that holds it now, else the newest that ever carried it (a
    scan of the table when no live instance holds it). Exit 3 when there is none.
    """
    target = resolve(dsn, schema, config_path)
    with connected(target) as (conn, q):
        iid = find(conn, q, ident, by_key=by_key)
        doc = collect(conn, q, iid, inbox_limit=inbox_limit, children_limit=children_limit)
        doc["history"] = history(conn, q, iid, history_limit)
        doc["last_traceback"] = last_traceback(conn, q, iid)
    if as_json:
        print_json(doc)
    else:
        render(doc)
    return 0


def find(conn: psycopg.Connection[Any], q: Queries, ident: str, *, by_key: bool) -> int:
    """The id that ``ident`` names (an id when all digits, else a correlation key)."""
    if ident.isdigit() and not by_key:
        return int(ident)
    row = conn.execute(q["ops_instance_id_by_key"], {"key": ident}).fetchone()
    if row is None or row[0] is None:
        raise CliError(f"no instance with correlation key {ident!r}", NOT_FOUND)
    return int(row[0])


def collect(
    conn: psycopg.Connection[Any], q: Queries, iid: int, *, inbox_limit: int, children_limit: int
) -> dict[str, Any]:
    found = rows(conn.execute(q["ops_instance_show"], {"id": iid}))
    if not found:
        raise CliError(f"no instance {iid}", NOT_FOUND)
    r = found[0]
    inbox = rows(conn.execute(q["ops_instance_inbox"], {"id": iid, "limit": inbox_limit}))
    kids = rows(conn.execute(q["ops_instance_children"], {"id": iid, "limit": max(children_limit, 1)}))
    doc: dict[str, Any] = {
        "id": r["id"],
        "machine": r["fsm"],
        "version": r["version"],
        "step": r["step"],
        "status": r["status"],
        "queue": r["queue"],
        "priority": r["priority"],
        "attempt": r["attempt"],
        "crashes": r["crashes"],
        "correlation_key": r["correlation_key"],
        "correlation_scope": r["correlation_scope"],
        "concurrency_key": r["concurrency_key"],
        "rate_limit": r["rate_limit"],
        "weight": r["weight"],
        "awaits": r["awaits"],
        "await_deadline": r["await_deadline"],
        "owner": r["locked_by"],
        "lease_expires_at": r["lease_expires_at"],
        "eligible_at": r["eligible_at"],
        "inserted_at": r["inserted_at"],
        "updated_at": r["updated_at"],
        "now": r["now"],
        "state": stored_json(r["state"]),
        "result": stored_json(r["result"]),
        "saga": stored_json(r["saga"]),
        "inbox": {
            "total": int(inbox[0]["total"]) if inbox else 0,
            "signals": [
                {
                    "id": s["id"],
                    "name": s["name"],
                    "payload": stored_json(s["payload"]),
                    "dedup_key": s["dedup_key"],
                    "inserted_at": s["inserted_at"],
                }
                for s in inbox
            ],
        },
        "children": {
            "pending": r["children_pending"],
            "counts": stored_json(kids[0]["counts"]) if kids else {},
            "first": [
                {k: c[k] for k in ("id", "fsm", "version", "step", "status", "updated_at")}
                for c in kids[:children_limit]
            ],
        },
        "parent": None
        if r["parent_id"] is None
        else {
            "id": r["parent_id"],
            "machine": r["parent_fsm"],  # None: the parent row was collected
            "step": r["parent_step"],
            "status": r["parent_status"],
        },
        "last_error": r["last_error"],
    }
    return doc


def history(conn: psycopg.Connection[Any], q: Queries, iid: int, last: int) -> list[dict[str, Any]]:
    """The instance's last ``last`` step attempts, oldest first (``client.history``'s query)."""
    from pgdurable.client.common import attempt_of, history_params

    if last == 0:
        return []
    found = conn.execute(q["history_of_instance"], history_params(iid, last)).fetchall()
    return [
        {
            "step": a.step,
            "attempt": a.attempt,
            "outcome": a.outcome,
            "next_step": a.next_step,
            "started_at": a.started_at,
            "finished_at": a.finished_at,
            "duration": a.duration,
            "worker": a.worker,
            "error": a.error,
            "traceback": a.traceback,
            "state": a.state,
            "logs": [
                {"at": line.at, "level": line.level, "logger": line.logger, "message": line.message}
                for line in a.logs
            ],
        }
        for a in map(attempt_of, found)
    ]


def last_traceback(conn: psycopg.Connection[Any], q: Queries, iid: int) -> str | None:
    from pgdurable.client.common import instance_of

    row = conn.execute(q["instance_get"], {"id": iid}).fetchone()
    return None if row is None else instance_of(row).last_traceback


def indent(text: str) -> str:
    return "\n".join("  " + line for line in text.splitlines())


def _saga_line(saga: dict[str, Any]) -> str:
    """The instance's compensations in one line (docs/sagas.md)."""
    pending = ", ".join(reversed(saga.get("stack") or [])) or "none"
    mode = saga.get("mode")
    if mode is None:
        return f"a failure would run: {pending}"
    failed = f"; {saga.get('failures') or 0} gave up" if saga.get("failures") else ""
    cause = f" after {saga.get('error')} in step {saga.get('step')}"
    if mode == "compensating":
        return f"compensating{cause}; still to run: {pending}{failed}"
    return f"{mode}{cause}{failed}"


def render(doc: dict[str, Any]) -> None:
    now: dt.datetime = doc["now"]
    say = click.echo
    version = doc["version"] if doc["version"] is not None else "? (not claimed yet)"
    say(f"instance {doc['id']}: {doc['machine']} v{version}, step {doc['step'] or '-'}, {doc['status']}")
    fields = [
        ("queue", f"{doc['queue']} (priority {doc['priority']})"),
        ("attempt", f"{doc['attempt']} (crashes {doc['crashes']})"),
    ]
    if doc["correlation_key"] is not None:
        scope = ", ".join(doc["correlation_scope"] or []) or "none: it neither dedups nor addresses"
        fields.append(("key", f"{doc['correlation_key']!r} (held while: {scope})"))
    if doc["concurrency_key"] is not None:
        fields.append(("concurrency", doc["concurrency_key"]))
    if doc["rate_limit"] is not None:
        fields.append(("rate limit", f"{doc['rate_limit']} (weight {doc['weight']:g})"))
    if doc["awaits"]:
        until = f", until {when(doc['await_deadline'], now)}" if doc["await_deadline"] else ""
        fields.append(("awaits", ", ".join(doc["awaits"]) + until))
    if doc["owner"] is not None:
        fields.append(("owner", f"{doc['owner']}, lease until {when(doc['lease_expires_at'], now)}"))
    if doc["status"] == "runnable":
        fields.append(("eligible", when(doc["eligible_at"], now)))
    if doc["saga"] is not None:
        fields.append(("saga", _saga_line(doc["saga"])))
    fields += [("inserted", when(doc["inserted_at"], now)), ("updated", when(doc["updated_at"], now))]
    for name, value in fields:
        say(f"  {name:<12}{value}")
    say("state")
    say(pretty(doc["state"]))
    if doc["result"] is not None:
        say("result")
        say(pretty(doc["result"]))
    if doc["history"]:
        say(f"history (the last {len(doc['history'])} step attempts, oldest first)")
        timeline = [
            [
                when(h["started_at"], now),
                h["step"] or "-",
                h["attempt"],
                h["outcome"] + (f" -> {h['next_step']}" if h["next_step"] else ""),
                f"{h['duration'] * 1000:.1f} ms",
                clip(h["worker"], 40),
                clip(h["error"], 60) if h["error"] else "",
            ]
            for h in doc["history"]
        ]
        say(indent(table(["STARTED", "STEP", "TRY", "OUTCOME", "TOOK", "WORKER", "ERROR"], timeline)))
        for h in doc["history"]:
            if h["logs"]:
                say(f"logs of step {h['step']}, try {h['attempt']}")
                for line in h["logs"]:
                    stamp = line["at"].strftime("%H:%M:%S.%f")[:-3]
                    text = f"{stamp} {line['level']:<7} {line['logger']}: {line['message']}"
                    say(indent(text))
    inbox = doc["inbox"]
    if inbox["total"]:
        say(f"inbox ({inbox['total']} signal{'s' if inbox['total'] != 1 else ''})")
        signals = [
            [
                s["id"],
                s["name"],
                clip(compact(s["payload"]), 60),
                s["dedup_key"] or "-",
                when(s["inserted_at"], now),
            ]
            for s in inbox["signals"]
        ]
        say(indent(table(["ID", "NAME", "PAYLOAD", "DEDUP KEY", "DELIVERED"], signals)))
        if inbox["total"] > len(inbox["signals"]):
            say(f"  … {inbox['total'] - len(inbox['signals'])} more (--inbox N)")
    children = doc["children"]
    if children["counts"] or children["pending"]:
        total = sum(children["counts"].values())
        counts = ", ".join(f"{k} {v}" for k, v in sorted(children["counts"].items()))
        pending = f"; {children['pending']} pending" if doc["status"] == "awaiting_children" else ""
        say(f"children ({total}: {counts}{pending})")
        if children["first"]:
            kids = [
                [c["id"], f"{c['fsm']}@{c['version']}", c["step"] or "-", c["status"]]
                for c in children["first"]
            ]
            say(indent(table(["ID", "MACHINE", "STEP", "STATUS"], kids)))
        if total > len(children["first"]):
            say(f"  … {total - len(children['first'])} more (--children N, or pgdurable list)")
    parent = doc["parent"]
    if parent is not None:
        say("parent")
        if parent["machine"] is None:
            say(f"  {parent['id']}  (collected)")
        else:
            say(f"  {parent['id']}  {parent['machine']}  {parent['step'] or '-'}  {parent['status']}")
    if doc["last_error"] is not None:
        say("last error")
        for line in doc["last_error"].splitlines() or [""]:
            say(f"  {line}")
        if doc["last_traceback"]:
            say("traceback")
            say(indent(doc["last_traceback"]))
