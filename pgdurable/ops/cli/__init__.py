"""The ``pgdurable`` command: one verb per task, on click.

A module per group of verbs, each verb a click command registered in ``VERBS``:

- ``schema.py``: ``migrate``
- ``runner.py``: ``supervise``
- ``status.py``, ``listing.py``, ``show.py``: ``status``, ``list``, ``show`` (read only)
- ``produce.py``: ``insert``, ``signal`` (through the client)
- ``cleanup.py``: ``cleanup``
- ``deploy.py``: ``check`` (the deploy gate)
- ``graph.py``: ``graph`` (no database; ``pgdurable/ops/transitions.py`` reads the code)

- ``operate.py``: ``cancel``, ``retry``, ``rewind``, ``pause``, ``resume`` (through the client)
- ``inputs.py``: ``inputs``, ``respond`` (pending human input, through the client)
- ``schedules.py``: ``schedule list|create|update|enable|disable|trigger|delete`` (the client)
- ``dashboard.py``: ``dashboard`` (the web dashboard, ``pgdurable/ops/dashboard/``)

The step history is a section of ``show``.
``common.py`` holds what they share: the database options, the connection, the exit
statuses, durations, tables and JSON.

Exit status (docs/operations.md): 0 done; 1 a check found a problem (``migrate --check``:
the schema is behind or ahead; ``check``: the deploy would hold rows or leave a queue
unserved); 2 a usage or operator error (arguments, config file, modules, database address,
privileges), printed as one line on stderr; 3 what was named is not there or not in a
state that allows the request (``show``, ``signal``, ``insert``, ``graph``, ``cancel``,
``retry``, ``rewind``, ``respond``, ``schedule``); 130
interrupted. A traceback means a bug in pgdurable; the traceback of the operator's own
module that failed to import is shown only with ``supervise --log-level debug``.
"""

from __future__ import annotations

from collections.abc import Sequence

import click
import psycopg

from pgdurable.contract.errors import PgdurableError
from pgdurable.ops.cli.cleanup import cleanup
from pgdurable.ops.cli.common import INTERRUPTED, USAGE, CliError, one_line
from pgdurable.ops.cli.dashboard import dashboard
from pgdurable.ops.cli.deploy import check
from pgdurable.ops.cli.graph import graph
from pgdurable.ops.cli.inputs import inputs, respond
from pgdurable.ops.cli.listing import list_
from pgdurable.ops.cli.operate import cancel, pause, resume, retry, rewind
from pgdurable.ops.cli.produce import insert, signal
from pgdurable.ops.cli.runner import supervise
from pgdurable.ops.cli.schedules import schedule
from pgdurable.ops.cli.schema import migrate
from pgdurable.ops.cli.show import show
from pgdurable.ops.cli.status import status

#: Every verb, in the order ``pgdurable --help`` lists them.
VERBS: tuple[click.Command, ...] = (
    migrate,
    supervise,
    status,
    list_,
    show,
    insert,
    signal,
    inputs,
    respond,
    cancel,
    retry,
    rewind,
    pause,
    resume,
    schedule,
    cleanup,
    check,
    graph,
    dashboard,
)


class _Verbs(click.Group):
    def list_commands(self, ctx: click.Context) -> list[str]:
        return [v.name for v in VERBS if v.name is not None]


@click.group(
    cls=_Verbs,
    context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100},
)
@click.version_option(package_name="pgdurable", prog_name="pgdurable", message="%(prog)s %(version)s")
def cli() -> None:
    """Durable machines and jobs on PostgreSQL: run them, watch them, act on them.

    The database of every verb comes from --dsn, else the config file of --config (its
    database.dsn and database.schema), else $PGDURABLE_DSN; the schema from --schema, else
    the config's, else "pgdurable". Verbs that print data take --json.

    Exit status: 0 done; 1 a check found a problem; 2 a usage or operator error (one line
    on stderr); 3 what was named is not there or not in a state that allows it; 130
    interrupted.
    """


for _verb in VERBS:
    cli.add_command(_verb)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command; an operator's mistake is one line on stderr and exit status 2.

    Only errors pgdurable raises on purpose (PgdurableError), a database that cannot be
    reached or refuses a privilege, and a usage mistake are caught here: anything else is
    a bug and keeps its traceback.
    """
    code = USAGE
    try:
        return int(
            cli.main(
                args=list(argv) if argv is not None else None, prog_name="pgdurable", standalone_mode=False
            )
            or 0
        )
    except click.exceptions.NoArgsIsHelpError as exc:
        click.echo(exc.format_message())
        return USAGE
    except click.UsageError as exc:
        where = exc.ctx.command_path if exc.ctx is not None else "pgdurable"
        message = f"{one_line(exc.format_message())} (see: {where} --help)"
    except click.ClickException as exc:
        message, code = one_line(exc.format_message()), exc.exit_code
    except click.Abort:  # Ctrl-C (click has ended the terminal's ^C line)
        return INTERRUPTED
    except KeyboardInterrupt:
        return INTERRUPTED
    except CliError as exc:
        message, code = str(exc), exc.code
    except PgdurableError as exc:
        message = one_line(exc)
    except psycopg.errors.InsufficientPrivilege as exc:
        message = f"the database role lacks a privilege: {one_line(exc)}"
    except psycopg.OperationalError as exc:  # connection refused or lost, server shutting down
        message = one_line(exc)
    click.echo(f"pgdurable: {message}", err=True)
    return code
