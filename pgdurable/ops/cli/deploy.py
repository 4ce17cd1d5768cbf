"""``pgdurable check``: the deploy gate. Would the config's code run what the database holds?

It imports the config's modules as a starting supervisor would and compares them with the
database. A problem is one line; any problem makes the exit status 1:

- the schema is not at the version this pgdurable needs;
- live or held rows name a machine, version or step that the modules do not define (a
  supervisor of this config would hold them, not run them);
- a registered machine's queue is run by no ``[queues.NAME]`` of the config: the newest
  registered version of each machine (what an insert by name resolves to) and every
  version that still has live rows — older registrations with no rows left are history
  nobody inserts into, and are not reported;
- a machine the modules define runs on a queue the config does not run.

``--own-queues`` narrows it to the queues this config runs, for a fleet whose configs
split the queues between them: only the rows on those queues are checked, and the queue
rules, which are about the other configs then, are skipped.
"""

from __future__ import annotations

from collections import defaultdict
from typing import TYPE_CHECKING, Any

import click

from pgdurable.contract.errors import SchemaVersionError
from pgdurable.ops.cli.common import (
    PROBLEM,
    connect,
    database_options,
    json_option,
    print_json,
    resolve,
    rows,
)

if TYPE_CHECKING:
    from pgdurable.contract.fsm import Registry
    from pgdurable.runtime.config import Config


@click.command("check", short_help="deploy gate: would this config run what the database holds?")
@database_options(config_required=True)
@click.option("--own-queues", is_flag=True, help="only the queues this config runs (a fleet split by queue)")
@json_option
def check(
    dsn: str | None, schema: str | None, config_path: str | None, own_queues: bool, as_json: bool
) -> int:
    """Deploy gate: import the config's modules and compare them with the database.

    Exit 1, with one line per problem, when the schema is not at this pgdurable's version,
    when live or held rows name a machine, version or step the modules do not define, or
    when a registered machine's queue (or a defined machine's) is run by no queue of the
    config. Exit 0 when a supervisor of this config would run everything it finds.
    """
    from pgdurable.contract.fsm import Registry
    from pgdurable.db import migrations
    from pgdurable.db.queries import for_schema
    from pgdurable.runtime.config import import_modules

    target = resolve(dsn, schema, config_path)
    cfg = target.config
    assert cfg is not None  # --config is required
    import_modules(cfg)  # a module that fails to import: one line naming it, exit 2
    registry = Registry.from_modules(cfg.runtime.modules)
    problems: list[dict[str, Any]] = []
    notes: list[str] = []
    live_rows = 0
    with connect(target.dsn) as conn:
        try:
            migrations.check(conn, target.schema)
        except SchemaVersionError as exc:
            problems.append({"kind": "schema", "message": str(exc)})
        else:
            q = for_schema(target.schema)
            shapes = rows(conn.execute(q["ops_check_live_shapes"]))
            registered = rows(conn.execute(q["ops_machines_registered"]))
            if own_queues:
                shapes = [s for s in shapes if s["queue"] in cfg.queues]
            live_rows = sum(int(s["n"]) for s in shapes)
            problems += undefined_rows(shapes, registry, notes)
            if not own_queues:
                problems += unserved_queues(registered, shapes, registry, cfg)
    ok = not problems
    if as_json:
        print_json(
            {
                "ok": ok,
                "config": cfg.path,
                "schema": target.schema,
                "machines": sorted(
                    f"{m.__pgdurable__.name}@{m.__pgdurable__.version}" for m in registry.machines()
                ),
                "queues": sorted(cfg.queues),
                "live_rows": live_rows,
                "problems": problems,
                "notes": notes,
            }
        )
    else:
        for p in problems:
            click.echo(p["message"])
        for n in notes:
            click.echo(f"note: {n}")
        if ok:
            click.echo(
                f"ok: {len(registry.machines())} machine versions over {len(cfg.queues)} queues; "
                f"{live_rows} live rows, all of machines, versions and steps the modules define"
            )
    if not ok:
        click.echo(
            f"pgdurable: check failed: {len(problems)} problem{'s' if len(problems) != 1 else ''}", err=True
        )
        return PROBLEM
    return 0


def _counts(by_status: dict[str, int]) -> str:
    total = sum(by_status.values())
    per = ", ".join(f"{s} {n}" for s, n in sorted(by_status.items()))
    return f"{total} row{'s' if total != 1 else ''} ({per})"


def undefined_rows(
    shapes: list[dict[str, Any]], registry: Registry, notes: list[str]
) -> list[dict[str, Any]]:
    """Live and held rows whose machine, version or step the modules do not define."""
    groups: dict[tuple[str, int | None, str | None], dict[str, int]] = defaultdict(lambda: defaultdict(int))
    queues: dict[tuple[str, int | None, str | None], set[str]] = defaultdict(set)
    for s in shapes:
        key = (s["fsm"], s["version"], s["step"])
        groups[key][s["status"]] += int(s["n"])
        queues[key].add(s["queue"])
    out = []
    for (fsm, version, step), by_status in sorted(
        groups.items(), key=lambda kv: (kv[0][0], kv[0][1] or 0, kv[0][2] or "")
    ):
        found = registry.get(fsm, version)
        on = ", ".join(sorted(queues[(fsm, version, step)]))
        what = f"{_counts(by_status)} of machine {fsm!r}" + (
            f" version {version}" if version is not None else ""
        )
        if found is None:
            versions = registry.versions(fsm)
            why = (
                f"the modules define {fsm!r} only in version{'s' if len(versions) != 1 else ''} "
                + ", ".join(map(str, versions))
                if versions
                else f"the modules define no machine {fsm!r}"
            )
            out.append(
                {
                    "kind": "undefined_machine",
                    "machine": fsm,
                    "version": version,
                    "step": step,
                    "rows": by_status,
                    "message": f"{what} on queue {on}: {why}",
                }
            )
            continue
        cls, _ = found
        steps = cls.__pgdurable__.steps
        if step is not None and step not in steps:
            out.append(
                {
                    "kind": "undefined_step",
                    "machine": fsm,
                    "version": version,
                    "step": step,
                    "rows": by_status,
                    "message": f"{what} at step {step!r} on queue {on}: "
                    f"{fsm} v{cls.__pgdurable__.version} has no such step (it has: {', '.join(steps)})",
                }
            )
            continue
        if by_status.get("held"):
            notes.append(
                f"{by_status['held']} held rows of {fsm!r}"
                + (f" version {version}" if version is not None else "")
                + " are defined by the modules: a supervisor of this config releases them when it starts"
            )
    return out


def unserved_queues(
    registered: list[dict[str, Any]], shapes: list[dict[str, Any]], registry: Registry, cfg: Config
) -> list[dict[str, Any]]:
    """Registered machines (the newest version, or one with live rows) and defined machines
    whose queue the config does not run."""
    live = {(s["fsm"], s["version"]) for s in shapes}
    out = []
    for m in registered:
        if registry.get(m["name"], m["version"]) is not None:
            continue  # a supervisor of this config registers it again, with the code's queue
        if m["queue"] in cfg.queues or not (m["newest"] or (m["name"], m["version"]) in live):
            continue
        out.append(
            {
                "kind": "unserved_registered",
                "machine": m["name"],
                "version": m["version"],
                "queue": m["queue"],
                "message": f"machine {m['name']!r} version {m['version']} is registered "
                f"on queue {m['queue']!r}, which this config does not run (no [queues.{m['queue']}])",
            }
        )
    for cls in registry.machines():
        info = cls.__pgdurable__
        if info.queue in cfg.queues:
            continue
        out.append(
            {
                "kind": "unserved_defined",
                "machine": info.name,
                "version": info.version,
                "queue": info.queue,
                "message": f"machine {info.name!r} version {info.version} "
                f"({cls.__module__}) runs on queue {info.queue!r}, which this config does not run "
                f"(no [queues.{info.queue}])",
            }
        )
    return out
