"""``pgdurable graph``: a machine's steps and transitions, as its code declares them and,
with ``--observed``, as its instances took them (the step history)."""

from __future__ import annotations

import click

from pgdurable.ops.cli.common import NOT_FOUND, CliError, connected, load_config, print_json, resolve


@click.command("graph", short_help="a machine's steps and transitions, as Mermaid or DOT")
@click.argument("machine")
@click.option(
    "--config",
    "config_path",
    metavar="FILE",
    required=True,
    help="the supervisor's TOML config (its modules)",
)
@click.option(
    "--version",
    "machine_version",
    type=click.IntRange(min=1),
    help="the machine's version (default: the newest)",
)
@click.option(
    "--format",
    "fmt",
    type=click.Choice(["mermaid", "dot"]),
    default="mermaid",
    show_default=True,
    help="a Mermaid state diagram or a Graphviz digraph",
)
@click.option(
    "--observed",
    is_flag=True,
    help="also read the step history: how often each transition was taken, and those taken "
    "that the code does not show (needs the database: the config's, or --dsn)",
)
@click.option("--dsn", metavar="DSN", help="with --observed: the database (default: the config's)")
@click.option("--schema", metavar="NAME", help="with --observed: the schema (default: the config's)")
@click.option(
    "--json", "as_json", is_flag=True, help="print the steps and edges as JSON instead of a diagram"
)
def graph(
    machine: str,
    config_path: str,
    machine_version: int | None,
    fmt: str,
    observed: bool,
    dsn: str | None,
    schema: str | None,
    as_json: bool,
) -> int:
    """Draw MACHINE (a machine of the config's modules): its steps, the initial one, and the
    transitions declared in code, ending in done or failed.

    Read from the source of each step: the outcomes it constructs (Next(self.x),
    Await(..., then=self.y), Spawn, Retry, Done, Stop) and those of the methods it calls.
    A step decides at run time what it returns: a step reference that is not written as
    self.x, Class.x or a string is listed as not drawn. Needs no database.

    With --observed, each edge is labelled with how many step attempts took it (×N, from
    the step history of this machine version), and transitions taken that the code does
    not draw are added (Mermaid: "(not in code)"; DOT: dashed).
    """
    from pgdurable.contract.fsm import Registry

    if not observed and (dsn or schema):
        raise click.UsageError("--dsn and --schema are for --observed only")
    from pgdurable.ops.transitions import dot, mermaid, observe, transitions
    from pgdurable.runtime.config import import_modules

    cfg = load_config(config_path)
    import_modules(cfg)
    registry = Registry.from_modules(cfg.runtime.modules)
    found = registry.get(machine, machine_version)
    if found is None:
        versions = registry.versions(machine)
        known = (
            f"it defines {machine!r} in versions {', '.join(map(str, versions))}"
            if versions
            else f"it defines: {', '.join(registry.names()) or 'no machine'}"
        )
        wanted = f"machine {machine!r}" + (f" version {machine_version}" if machine_version else "")
        raise CliError(f"no {wanted} in the modules of {cfg.path} ({known})", NOT_FOUND)
    g = transitions(found[0])
    if observed:
        target = resolve(dsn, schema, config_path)
        with connected(target) as (conn, q):
            taken = conn.execute(
                q["history_transitions"], {"fsm": g.machine, "version": g.version}
            ).fetchall()
        g = observe(g, [(step, outcome, next_step, int(n)) for step, outcome, next_step, n, _last in taken])
    if as_json:
        print_json(g.as_dict())
    else:
        click.echo(mermaid(g) if fmt == "mermaid" else dot(g))
    return 0
