"""``pgdurable dashboard``: the web dashboard (docs/dashboard.md), served by uvicorn.

The web stack (the ``dashboard`` extra) is imported when the verb runs, so no other verb
pays for it.
"""

from __future__ import annotations

import datetime as dt
import socket
import sys
from typing import TYPE_CHECKING

import click

from pgdurable.ops.cli.common import CliError, Duration, connected, database_options, one_line, resolve

if TYPE_CHECKING:
    from pgdurable.contract.fsm import Registry
    from pgdurable.runtime.config import Config


@click.command("dashboard", short_help="the web dashboard: pages and actions, with logins")
@database_options()
@click.option(
    "--listen",
    metavar="HOST:PORT",
    help="where to serve (default: the config's dashboard.listen, else 127.0.0.1:8321; a port "
    "of 0 takes a free one)",
)
@click.option(
    "--window",
    type=Duration(),
    default="1h",
    show_default=True,
    help="the overview counts the rows that finished within this long",
)
def dashboard(
    dsn: str | None, schema: str | None, config_path: str | None, listen: str | None, window: dt.timedelta
) -> int:
    """Serve the web dashboard: per queue counts and workers, instances with filters, one
    instance's timeline, logs and graph, pending inputs, schedules, held rows; and the
    actions (cancel, retry, rewind, signal, answer an input, pause and resume a queue,
    trigger, enable and disable a schedule).

    Every page needs a login: the config's [dashboard.users.NAME] tables, else the login
    admin with the password in $PGDURABLE_DASHBOARD_PASSWORD. Actions need the admin role.
    It listens on 127.0.0.1 unless told otherwise. The machines' graphs are drawn from the
    code of the config's runtime.modules when they import.
    """
    try:
        import uvicorn

        from pgdurable.ops.dashboard.app import Settings, create_app
        from pgdurable.ops.dashboard.auth import Auth
    except ImportError as exc:
        raise CliError(
            f"the dashboard needs its extra: pip install 'pgdurable[dashboard]' ({one_line(exc)})"
        ) from None

    target = resolve(dsn, schema, config_path)
    cfg = target.config
    auth = Auth.from_config(cfg)
    where = listen or (cfg.dashboard.listen if cfg is not None else "127.0.0.1:8321")
    host, sep, port = where.rpartition(":")
    if not sep or not host or not port.isdigit() or int(port) > 65535:
        raise CliError(f"--listen {where!r} is not HOST:PORT")
    host = host.strip("[]")
    with connected(target):  # an unreachable database or a schema behind: one line now
        pass
    registry = None
    if cfg is not None and cfg.runtime.modules:
        registry = _registry(cfg)
    sock = _bind(host, int(port))
    bound = sock.getsockname()
    shown = f"[{bound[0]}]" if ":" in bound[0] else bound[0]
    click.echo(f"pgdurable dashboard on http://{shown}:{bound[1]}/ (Ctrl-C to stop)", err=False)
    sys.stdout.flush()
    app = create_app(Settings(target.dsn, target.schema, auth, registry, window))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on", access_log=False))
    server.run(sockets=[sock])
    return 0


def _registry(cfg: Config) -> Registry | None:
    """The machines of the config's modules, for the graphs; None when they do not import
    (the pages then draw only the transitions taken)."""
    from pgdurable.contract.errors import ModuleImportError
    from pgdurable.contract.fsm import Registry
    from pgdurable.runtime.config import import_modules

    try:
        import_modules(cfg)
    except ModuleImportError as exc:
        click.echo(f"pgdurable: graphs show only the transitions taken: {exc}", err=True)
        return None
    return Registry.from_modules(cfg.runtime.modules)


def _bind(host: str, port: int) -> socket.socket:
    """The listening socket, bound here so that a taken port is one line."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise CliError(f"cannot listen on {host}:{port}: {exc.strerror}") from None
    sock.listen(128)
    sock.set_inheritable(True)
    return sock
