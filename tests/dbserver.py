"""A throwaway PostgreSQL for the test run when PGDURABLE_TEST_DSN is not set.

Prefers a PostgreSQL found on PATH (initdb + pg_ctl, unix socket only); PostgreSQL refuses to
run as root, so as root (and when no server is on PATH) the embedded one from pgserver is
used instead, which runs the server under an unprivileged account of its own.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def throwaway_server() -> Iterator[str]:
    """Yield the DSN of a fresh server; stop and delete it afterwards."""
    initdb, pg_ctl = shutil.which("initdb"), shutil.which("pg_ctl")
    if initdb and pg_ctl and os.geteuid() != 0:
        with _path_server(initdb, pg_ctl) as dsn:
            yield dsn
        return
    try:
        import pgserver
    except ImportError as exc:
        raise RuntimeError(
            "tests need PostgreSQL: set PGDURABLE_TEST_DSN, put initdb/pg_ctl on PATH "
            "(as a non-root user), or install the embedded extra (pgserver)"
        ) from exc
    data = Path(tempfile.mkdtemp(prefix="pgdurable-test-"))
    server = pgserver.get_server(data, cleanup_mode="delete")
    try:
        yield server.get_uri()
    finally:
        server.cleanup()


@contextmanager
def _path_server(initdb: str, pg_ctl: str) -> Iterator[str]:
    data = Path(tempfile.mkdtemp(prefix="pgdurable-test-"))
    sock = data / "sock"
    sock.mkdir()
    subprocess.run(
        [initdb, "-D", str(data / "db"), "-U", "postgres", "--auth=trust", "-E", "UTF8"],
        check=True,
        capture_output=True,
    )
    opts = f"-k {sock} -h '' -c fsync=on -c max_connections=200"
    subprocess.run(
        [pg_ctl, "-D", str(data / "db"), "-o", opts, "-l", str(data / "log"), "-w", "start"],
        check=True,
        capture_output=True,
    )
    try:
        yield f"postgresql://postgres@/postgres?host={sock}"
    finally:
        subprocess.run([pg_ctl, "-D", str(data / "db"), "-m", "immediate", "stop"], capture_output=True)
        shutil.rmtree(data, ignore_errors=True)
