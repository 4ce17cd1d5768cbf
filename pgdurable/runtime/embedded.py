"""An embedded PostgreSQL for the demo and the tests (the ``embedded`` extra: pgserver)."""

from __future__ import annotations

import logging
import warnings
from pathlib import Path
from typing import Any

from pgdurable.contract.errors import ConfigError


def start(data_dir: str | Path, *, cleanup: str | None = "stop") -> Any:
    """Start (or reuse) a server on ``data_dir``; returns the pgserver handle (``get_uri()``).

    ``cleanup``: "stop" stops it when the process exits, "delete" removes the data too,
    None leaves it running.
    """
    try:
        with warnings.catch_warnings():  # platformdirs warns when XDG_RUNTIME_DIR is unset
            warnings.simplefilter("ignore")
            import pgserver
    except ImportError as exc:  # pragma: no cover - depends on the installation
        raise ConfigError(
            "no dsn given and the embedded PostgreSQL is not installed; "
            "install pgdurable[embedded] or give a dsn"
        ) from exc
    path = Path(data_dir).resolve()
    path.mkdir(parents=True, exist_ok=True)
    logging.getLogger("pgserver").setLevel(logging.WARNING)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        # get_server is re-exported by pgserver/__init__.py without __all__.
        return pgserver.get_server(path, cleanup_mode=cleanup)  # type: ignore[attr-defined]
