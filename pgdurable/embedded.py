"""An embedded PostgreSQL for the demo and the tests (the ``embedded`` extra: pgserver)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .errors import ConfigError


def start(data_dir: str | Path, *, cleanup: str | None = "stop") -> Any:
    """Start (or reuse) a server on ``data_dir``; returns the pgserver handle (``get_uri()``).

    ``cleanup``: "stop" stops it when the process exits, "delete" removes the data too,
    None leaves it running.
    """
    try:
        import pgserver
    except ImportError as exc:  # pragma: no cover - depends on the installation
        raise ConfigError(
            "no dsn given and the embedded PostgreSQL is not installed; "
            "install pgdurable[embedded] or give a dsn"
        ) from exc
    path = Path(data_dir).resolve()
    path.mkdir(parents=True, exist_ok=True)
    return pgserver.get_server(path, cleanup_mode=cleanup)
