"""``pgdurable supervise``: run the workers of a config file."""

from __future__ import annotations

import traceback

import click

from pgdurable.contract.errors import ModuleImportError, PgdurableError
from pgdurable.ops.cli.common import CliError, one_line


@click.command("supervise", short_help="run the workers of a config file, one supervisor per host")
@click.argument("config", metavar="CONFIG")
@click.option(
    "--log-level",
    type=click.Choice(["debug", "info", "warning", "error"]),
    help="overrides [logging] level (default info); debug also prints the traceback of a module "
    "that failed to import",
)
def supervise(config: str, log_level: str | None) -> int:
    """Run the worker processes and the maintenance process of CONFIG (a TOML file), one
    supervisor per host; SIGTERM drains, SIGHUP reloads.
    """
    from pgdurable.runtime.supervisor import supervise as run

    try:
        return run(config, log_level=log_level)  # logging: runtime.logs.configure
    except PgdurableError as exc:
        debug = log_level == "debug"
        if debug and exc.__cause__ is not None:
            traceback.print_exception(exc.__cause__)
        message = one_line(exc)
        if isinstance(exc, ModuleImportError) and not exc.not_found and not debug:
            message += "; --log-level debug prints its traceback"
        raise CliError(message) from exc
